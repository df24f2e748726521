"""Promotion gates: ``accuracy >= 0.9`` — a metric, a comparison, a number."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from services.mesh.errors import InvalidArgument

_OPERATORS: Final[Mapping[str, Callable[[float, float], bool]]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_CONDITION: Final = re.compile(
    r"\s*(?P<metric>[A-Za-z_][A-Za-z0-9_.]{0,63})\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<number>\S+)\s*"
)


@dataclass(frozen=True, slots=True)
class Condition:
    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str, field: str = "registration.promote_if") -> Condition:
        """INVALID_ARGUMENT naming ``field`` unless ``text`` reads METRIC OP NUMBER."""
        match = _CONDITION.fullmatch(text)
        threshold = _number(match["number"]) if match else None
        if match is None or threshold is None:
            raise InvalidArgument.for_field(
                field,
                f"{text[:100]!r} is not METRIC OP NUMBER (OP one of < <= > >= == !=), e.g. accuracy >= 0.9",
            )
        return cls(match["metric"], match["op"], threshold)

    def holds(self, metrics: Mapping[str, float]) -> tuple[bool, str]:
        """Whether ``metrics`` meet the condition, and a sentence saying why (for the job's log)."""
        value = metrics.get(self.metric)
        if value is None:
            return False, f"{self} does not hold: the job reported no metric {self.metric!r}"
        verdict = _OPERATORS[self.op](value, self.threshold)
        return verdict, f"{self} {'holds' if verdict else 'does not hold'}: {self.metric} = {value:g}"

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
