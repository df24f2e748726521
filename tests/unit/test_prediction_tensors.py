"""The prediction log's one numpy ↔ Open Inference Protocol tensor conversion."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.scoring.predictions import (
    LoggedTensor,
    check_tensor,
    from_numpy,
    to_numpy,
)

_FIXED = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
_FIXED += ["float16", "float32", "float64"]


@given(
    hnp.arrays(
        st.sampled_from([np.dtype(t) for t in _FIXED]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
        elements={"allow_nan": False},
    )
)
def test_fixed_width_arrays_round_trip_exactly(array: npt.NDArray[Any]) -> None:
    tensor = from_numpy("t", array)
    assert tensor.shape == array.shape
    assert not check_tensor(tensor, "t")
    back = to_numpy(tensor)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert back.tobytes() == array.tobytes()
    back[...] = 0  # writable: the training service may change what it reads


@given(st.lists(st.binary(max_size=8), max_size=6))
def test_bytes_round_trip(elements: list[bytes]) -> None:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    tensor = from_numpy("s", array)
    assert tensor.datatype == "BYTES"
    assert not check_tensor(tensor, "t")
    assert to_numpy(tensor).tolist() == elements


def test_bf16_is_two_raw_bytes_per_element() -> None:
    array = np.array([1.0, -2.5], dtype=ml_dtypes.bfloat16)
    tensor = from_numpy("b", array)
    assert (tensor.datatype, len(tensor.raw)) == ("BF16", 4)
    assert to_numpy(tensor).tobytes() == array.tobytes()


def test_bytes_elements_must_be_bytes_or_str() -> None:
    with pytest.raises(TypeError, match="int"):
        from_numpy("o", np.array([1, b"x"], dtype=object))


def test_to_numpy_refuses_inconsistent_tensors() -> None:
    with pytest.raises(ValueError, match="needs 8"):
        to_numpy(LoggedTensor("t", "FP32", (2,), b"\0" * 4))
    with pytest.raises(ValueError, match="unknown datatype"):
        to_numpy(LoggedTensor("t", "FP8", (1,), b"\0"))
