"""Promotion gates: parsing and judging ``METRIC OP NUMBER``."""

from __future__ import annotations

import pytest

from services.mesh.errors import InvalidArgument
from services.training.conditions import Condition


@pytest.mark.parametrize(
    ("text", "metrics", "holds"),
    [
        ("accuracy >= 0.9", {"accuracy": 0.9}, True),
        ("accuracy>=0.9", {"accuracy": 0.89}, False),
        ("  loss < 1e-2 ", {"loss": 0.005}, True),
        ("f1 == 1", {"f1": 1.0}, True),
        ("f1 != 1", {"f1": 1.0}, False),
        ("auc > 0.5", {"auc": 0.5}, False),
        ("val.loss <= 3", {"val.loss": 3.0}, True),
    ],
)
def test_a_condition_judges_the_metrics(text: str, metrics: dict[str, float], holds: bool) -> None:
    verdict, why = Condition.parse(text).holds(metrics)
    assert verdict is holds
    assert ("does not hold" in why) is not holds


def test_a_missing_metric_does_not_hold_and_says_so() -> None:
    verdict, why = Condition.parse("accuracy >= 0.9").holds({"loss": 0.1})
    assert verdict is False
    assert "no metric 'accuracy'" in why


@pytest.mark.parametrize(
    "text",
    [
        "",
        "accuracy",
        "accuracy >= ",
        ">= 0.9",
        "accuracy => 0.9",
        "accuracy >= nan",
        "accuracy >= inf",
        "accuracy >= 0.9 and loss < 1",
        "1x >= 2",
        "accuracy >= 0.9; drop",
    ],
)
def test_anything_else_is_an_invalid_argument_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        Condition.parse(text)
    assert [v.field for v in caught.value.violations] == ["registration.promote_if"]
