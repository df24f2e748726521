"""How an inference request's ``model_version`` is read, and which graphs batch."""

from __future__ import annotations

import pytest

from services.mesh.errors import InvalidArgument
from services.registry.domain import Signature, TensorSpec
from services.scoring.router import batch_size_for, parse_reference


@pytest.mark.parametrize(
    ("text", "version", "alias"),
    [("", None, "production"), ("  ", None, "production"), ("3", 3, None), ("staging", None, "staging")],
)
def test_model_version_is_a_number_an_alias_or_nothing(
    text: str, version: int | None, alias: str | None
) -> None:
    reference = parse_reference(text)
    assert (reference.version, reference.alias) == (version, alias)


@pytest.mark.parametrize(
    "text", ["0", "-1", "v 1", "Prod", "a/b", "x" * 64, "9" * 20, "\u00b2", "\u0661", str(2**63)]
)
def test_other_model_versions_are_invalid_arguments(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_reference(text)
    assert [v.field for v in caught.value.violations] == ["model_version"]


def _signature(*shapes: tuple[int, ...]) -> Signature:
    inputs = tuple(TensorSpec(f"in{i}", "FP32", shape) for i, shape in enumerate(shapes))
    return Signature(inputs, (TensorSpec("out", "FP32", (-1, 1)),))


def test_graphs_batch_only_when_every_first_dimension_is_variable() -> None:
    assert batch_size_for(_signature((-1, 4), (-1,)), 64) == 64
    assert batch_size_for(_signature((-1, 4), (2, 4)), 64) == 0
    assert batch_size_for(_signature((4,)), 64) == 0
    assert batch_size_for(_signature((-1, 4)), 0) == 0
    assert batch_size_for(_signature(()), 64) == 0
