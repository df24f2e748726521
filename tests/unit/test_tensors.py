"""Open Inference Protocol tensors <-> numpy: decoding, validation, encoding, cache keys.

Requests are built here by hand, field by field, and BYTES payloads and responses are checked
against tritonclient's own (de)serializers, so the two sides of each round trip are written
independently.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import hypothesis.extra.numpy as hnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import InferResult
from tritonclient.utils import serialize_byte_tensor

from services.mesh.errors import InvalidArgument, ResourceExhausted
from services.registry.domain import Signature, TensorSpec
from services.scoring.oip import pb
from services.scoring.tensors import (
    NUMPY_DTYPES,
    STRUCT_CODES,
    batch_rows,
    canonical_key,
    datatype_of,
    decode_request,
    encode_response,
    from_raw,
    pack_values,
    raw_bytes,
    sample_inputs,
    unpack_values,
)

Array = np.ndarray[Any, Any]

TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
ALL_DATATYPES = tuple(NUMPY_DTYPES)


def signature(*inputs: TensorSpec, outputs: Sequence[TensorSpec] = ()) -> Signature:
    return Signature(inputs=tuple(inputs), outputs=tuple(outputs) or (TensorSpec("y", "FP32", (-1, 2)),))


def encode_raw(array: Array) -> bytes:
    if array.dtype.kind == "O":
        return bytes(serialize_byte_tensor(array).item()) if array.size else b""
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def make_request(
    arrays: dict[str, Array],
    *,
    raw: bool,
    outputs: Sequence[str] = (),
    datatypes: dict[str, str] | None = None,
) -> pb.ModelInferRequest:
    """A request carrying ``arrays``; ``datatypes`` overrides the datatype each one claims."""
    request = pb.ModelInferRequest(model_name="m", id="r1")
    for name, array in arrays.items():
        datatype = (datatypes or {}).get(name) or datatype_of(array)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            request.raw_input_contents.append(encode_raw(array))
        else:
            getattr(tensor.contents, TYPED_FIELDS[datatype_of(array)]).extend(array.ravel().tolist())
    for output in outputs:
        request.outputs.add(name=output)
    return request


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> Array:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"é{i}".encode() * i for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        flags: Array = (np.arange(count) % 2 == 0).reshape(shape)
        return flags
    dtype = NUMPY_DTYPES[datatype]
    signed = dtype.kind in "fiV"  # V: bfloat16
    values = (np.arange(count) - (count // 2 if signed else 0)) * (0.5 if dtype.kind in "fV" else 1)
    array: Array = values.astype(dtype).reshape(shape)
    return array


def violations_of(error: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in error.value.violations}


# Round trips


@pytest.mark.parametrize("datatype", list(TYPED_FIELDS))
def test_typed_contents_round_trip(datatype: str) -> None:
    array = sample(datatype)
    sig = signature(TensorSpec("x", datatype, (-1, 3)))

    decoded = decode_request(make_request({"x": array}, raw=False), sig)

    assert decoded.inputs["x"].dtype == NUMPY_DTYPES[datatype]
    np.testing.assert_array_equal(decoded.inputs["x"], array)
    assert decoded.outputs == ("y",)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_raw_contents_round_trip(datatype: str) -> None:
    array = sample(datatype)
    sig = signature(TensorSpec("x", datatype, (-1, 3)))

    decoded = decode_request(make_request({"x": array}, raw=True), sig).inputs["x"]

    assert decoded.dtype == NUMPY_DTYPES[datatype]
    assert decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)


def test_raw_bf16_keeps_the_bits_of_each_value() -> None:
    values = np.array([[1.0, -2.5, 3.140625]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # bfloat16 = the top half of fp32
    request = pb.ModelInferRequest(raw_input_contents=[bits])
    request.inputs.add(name="x", datatype="BF16", shape=[1, 3])

    decoded = decode_request(request, signature(TensorSpec("x", "BF16", (-1, 3)))).inputs["x"]

    assert decoded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(decoded.astype(np.float32), values)


def test_raw_bytes_use_a_little_endian_length_prefix() -> None:
    raw = b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x03\x00\x00\x00\x00\xffc"
    request = pb.ModelInferRequest(raw_input_contents=[raw])
    request.inputs.add(name="x", datatype="BYTES", shape=[3])

    decoded = decode_request(request, signature(TensorSpec("x", "BYTES", (-1,))))

    assert decoded.inputs["x"].tolist() == [b"ab", b"", b"\x00\xffc"]
    assert decoded.nbytes == 5


def test_raw_inputs_are_read_only_views_not_copies() -> None:
    request = make_request({"x": sample("FP32")}, raw=True)

    decoded = decode_request(request, signature(TensorSpec("x", "FP32", (-1, 3)))).inputs["x"]

    assert not decoded.flags.writeable
    # the reshaped view's base is the flat view, whose base is the request's bytes
    flat = decoded.base
    assert isinstance(flat, np.ndarray)
    assert isinstance(flat.base, bytes)


def test_requested_outputs_keep_the_request_order() -> None:
    sig = signature(
        TensorSpec("x", "FP32", (-1, 3)),
        outputs=(
            TensorSpec("a", "FP32", (-1,)),
            TensorSpec("b", "FP32", (-1,)),
            TensorSpec("c", "FP32", (-1,)),
        ),
    )

    decoded = decode_request(make_request({"x": sample("FP32")}, raw=True, outputs=["c", "a"]), sig)

    assert decoded.outputs == ("c", "a")


@settings(max_examples=60, deadline=None)
@given(
    datatype=st.sampled_from([d for d in ALL_DATATYPES if d != "BYTES"]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
    data=st.data(),
)
def test_property_raw_request_and_response_round_trip(
    datatype: str, shape: tuple[int, ...], data: Any
) -> None:
    dtype = NUMPY_DTYPES[datatype]
    # hypothesis cannot draw bfloat16: draw its bit patterns instead
    drawn = data.draw(hnp.arrays(np.dtype("<u2") if datatype == "BF16" else dtype, shape))
    array = drawn.view(dtype)
    sig = signature(TensorSpec("x", datatype, (-1,) * len(shape)))

    decoded = decode_request(make_request({"x": array}, raw=True), sig).inputs["x"]
    response = encode_response(
        {"y": decoded}, ["y"], model_name="m", model_version=1, request_id="", backend="t"
    )

    np.testing.assert_array_equal(decoded.view(np.uint8), array.view(np.uint8))  # NaNs compared by bits
    returned = InferResult(response).as_numpy("y")
    assert returned.shape == shape
    np.testing.assert_array_equal(returned.view(np.uint8), array.view(np.uint8))


@settings(max_examples=40, deadline=None)
@given(elements=st.lists(st.binary(max_size=12), min_size=1, max_size=8), raw=st.booleans())
def test_property_bytes_round_trip(elements: list[bytes], raw: bool) -> None:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    sig = signature(TensorSpec("x", "BYTES", (-1,)))

    decoded = decode_request(make_request({"x": array}, raw=raw), sig).inputs["x"]
    response = encode_response(
        {"y": decoded}, ["y"], model_name="m", model_version=1, request_id="", backend="t"
    )

    assert decoded.tolist() == elements
    assert InferResult(response).as_numpy("y").tolist() == elements


# Validation


FP32_SIG = signature(TensorSpec("x", "FP32", (-1, 3)), TensorSpec("k", "INT64", (2,)))


def good_request(raw: bool = True) -> pb.ModelInferRequest:
    return make_request({"x": sample("FP32"), "k": np.array([1, 2], np.int64)}, raw=raw)


def _set_shape(index: int, shape: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def mutate(request: pb.ModelInferRequest) -> None:
        del request.inputs[index].shape[:]
        request.inputs[index].shape.extend(shape)

    return mutate


def _add_unknown(request: pb.ModelInferRequest) -> None:
    request.inputs.add(name="extra", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\x00" * 4)


def _duplicate(request: pb.ModelInferRequest) -> None:
    request.inputs.add().CopyFrom(request.inputs[1])
    request.raw_input_contents.append(request.raw_input_contents[1])


def _drop_second(request: pb.ModelInferRequest) -> None:
    del request.inputs[1]
    del request.raw_input_contents[1]


def _set_datatype(request: pb.ModelInferRequest) -> None:
    request.inputs[1].datatype = "INT32"


def _short_raw(request: pb.ModelInferRequest) -> None:
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]


def _mix_typed(request: pb.ModelInferRequest) -> None:
    request.inputs[1].contents.int64_contents.extend([1, 2])


def _missing_raw_entry(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[1]


def _unknown_output(request: pb.ModelInferRequest) -> None:
    request.outputs.add(name="nope")


def _twice_output(request: pb.ModelInferRequest) -> None:
    request.outputs.add(name="y")
    request.outputs.add(name="y")


BAD_RAW_REQUESTS = [
    pytest.param(_add_unknown, "inputs[2].name", "'extra' is not an input", id="unknown-input"),
    pytest.param(_duplicate, "inputs[2].name", "'k' is given more than once", id="duplicate-input"),
    pytest.param(_drop_second, "inputs", "'k' is missing", id="missing-input"),
    pytest.param(_set_datatype, "inputs[1].datatype", "'k' is INT32; the model takes INT64", id="datatype"),
    pytest.param(_set_shape(0, [2, 3, 1]), "inputs[0].shape", "'x' has shape [2, 3, 1]", id="rank"),
    pytest.param(
        _set_shape(1, [3]), "inputs[1].shape", "'k' has shape [3]; the model takes [2]", id="fixed-dim"
    ),
    pytest.param(
        _set_shape(0, [-2, -3]), "inputs[0].shape", "'x' has a negative dimension", id="negative-dim"
    ),
    pytest.param(_set_shape(0, [0, 3]), "inputs[0].shape", "'x' has an empty batch", id="empty-batch"),
    pytest.param(
        _short_raw, "raw_input_contents[0]", "'x' has 20 bytes; shape [2, 3] of FP32 needs 24", id="raw-len"
    ),
    pytest.param(_mix_typed, "inputs[1].contents", "'k' has typed contents", id="typed-and-raw"),
    pytest.param(_missing_raw_entry, "raw_input_contents", "has 1 entries for 2 inputs", id="raw-count"),
    pytest.param(_unknown_output, "outputs[0].name", "'nope' is not an output", id="unknown-output"),
    pytest.param(_twice_output, "outputs[1].name", "'y' is requested twice", id="output-twice"),
]


@pytest.mark.parametrize(("mutate", "field", "description"), BAD_RAW_REQUESTS)
def test_bad_raw_request_names_the_field_and_tensor(
    mutate: Callable[[pb.ModelInferRequest], None], field: str, description: str
) -> None:
    request = good_request(raw=True)
    decode_request(request, FP32_SIG)  # the unmutated request is fine
    mutate(request)

    with pytest.raises(InvalidArgument) as error:
        decode_request(request, FP32_SIG)

    assert description in violations_of(error)[field]
    assert error.value.reason == "INVALID_TENSOR"


def _typed_count(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.append(1.0)


def _wrong_field(request: pb.ModelInferRequest) -> None:
    request.inputs[1].contents.ClearField("int64_contents")
    request.inputs[1].contents.int_contents.extend([1, 2])


BAD_TYPED_REQUESTS = [
    pytest.param(
        _typed_count, "inputs[0].contents", "'x' has 7 values in fp32_contents; shape [2, 3] needs 6"
    ),
    pytest.param(
        _wrong_field, "inputs[1].contents", "'k' is INT64, carried in int64_contents, not int_contents"
    ),
]


@pytest.mark.parametrize(("mutate", "field", "description"), BAD_TYPED_REQUESTS)
def test_bad_typed_request_names_the_field_and_tensor(
    mutate: Callable[[pb.ModelInferRequest], None], field: str, description: str
) -> None:
    request = good_request(raw=False)
    decode_request(request, FP32_SIG)
    mutate(request)

    with pytest.raises(InvalidArgument) as error:
        decode_request(request, FP32_SIG)

    assert description in violations_of(error)[field]


def test_every_violation_is_reported_at_once() -> None:
    request = good_request(raw=True)
    _set_datatype(request)
    _short_raw(request)
    _unknown_output(request)

    with pytest.raises(InvalidArgument) as error:
        decode_request(request, FP32_SIG)

    assert set(violations_of(error)) == {"inputs[1].datatype", "raw_input_contents[0]", "outputs[0].name"}
    assert "'k' is INT32" in error.value.message


def test_fp16_has_no_typed_contents() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)

    with pytest.raises(InvalidArgument) as error:
        decode_request(request, signature(TensorSpec("x", "FP16", (-1,))))

    assert "FP16 has no typed contents; send it raw" in violations_of(error)["inputs[0].contents"]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x02\x00\x00\x00a", "element 0 claims 2 bytes; 1 are left"),
        (b"\x01\x00\x00\x00a\x01\x00", "element 1's 4-byte length prefix is cut short"),
        (b"\x01\x00\x00\x00a\x00\x00\x00\x00\x00\x00\x00\x00", "has bytes after its 2 elements"),
        (b"\x01\x00\x00\x00a", "has 1 BYTES elements; its shape needs 2"),
    ],
)
def test_malformed_raw_bytes(raw: bytes, problem: str) -> None:
    request = pb.ModelInferRequest(raw_input_contents=[raw])
    request.inputs.add(name="s", datatype="BYTES", shape=[2])

    with pytest.raises(InvalidArgument) as error:
        decode_request(request, signature(TensorSpec("s", "BYTES", (-1,))))

    assert violations_of(error) == {"raw_input_contents[0]": f"input 's': {problem}"}


def test_typed_values_outside_a_narrow_integer_type() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])

    with pytest.raises(InvalidArgument) as error:
        decode_request(request, signature(TensorSpec("x", "INT8", (-1,))))

    assert "outside INT8's [-128, 127]" in violations_of(error)["inputs[0].contents"]


def test_raw_bool_bytes_must_be_zero_or_one() -> None:
    request = pb.ModelInferRequest(raw_input_contents=[b"\x01\x02"])
    request.inputs.add(name="x", datatype="BOOL", shape=[2])

    with pytest.raises(InvalidArgument) as error:
        decode_request(request, signature(TensorSpec("x", "BOOL", (-1,))))

    assert "BOOL bytes must be 0 or 1" in violations_of(error)["raw_input_contents[0]"]


def test_request_larger_than_the_limit_is_resource_exhausted() -> None:
    request = good_request(raw=True)  # 24 + 16 bytes
    decode_request(request, FP32_SIG, max_bytes=40)

    with pytest.raises(ResourceExhausted) as error:
        decode_request(request, FP32_SIG, max_bytes=39)

    assert error.value.reason == "REQUEST_TOO_LARGE"
    assert error.value.metadata == {"bytes": "40", "limit": "39"}


def test_size_limit_counts_typed_values_decoded() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT64", shape=[100]).contents.int64_contents.extend([0] * 100)

    with pytest.raises(ResourceExhausted):
        decode_request(request, signature(TensorSpec("x", "INT64", (-1,))), max_bytes=799)


# Responses


def test_response_carries_outputs_raw_in_the_given_order() -> None:
    outputs = {"p": np.array([[0.25, 0.75]], np.float32), "label": np.array([b"cat"], dtype=object)}

    response = encode_response(
        outputs,
        ["label", "p"],
        model_name="clf",
        model_version=3,
        request_id="req-1",
        backend="onnxruntime",
        parameters={"cached": True, "rows": 1},
    )

    assert (response.model_name, response.model_version, response.id) == ("clf", "3", "req-1")
    assert response.parameters["backend"].string_param == "onnxruntime"
    assert response.parameters["cached"].bool_param is True
    assert response.parameters["rows"].int64_param == 1
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "BYTES", [1]),
        ("p", "FP32", [1, 2]),
    ]
    result = InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("p"), outputs["p"])
    assert result.as_numpy("label").tolist() == [b"cat"]


def test_response_swaps_big_endian_arrays() -> None:
    big = np.array([1.5, -2.0], dtype=">f4")

    assert datatype_of(big) == "FP32"
    assert raw_bytes(big) == np.array([1.5, -2.0], "<f4").tobytes()
    np.testing.assert_array_equal(from_raw(raw_bytes(big), "FP32", [2]), big)


def test_response_without_a_requested_output_is_a_bug() -> None:
    with pytest.raises(KeyError):
        encode_response({}, ["y"], model_name="m", model_version=1, request_id="", backend="t")


# Cache keys


def test_canonical_key_ignores_dict_order() -> None:
    a, b = sample("FP32"), sample("INT64")

    assert canonical_key({"a": a, "b": b}, ["y"]) == canonical_key({"b": b, "a": a}, ["y"])
    assert len(canonical_key({"a": a}, ["y"])) == 32


def test_canonical_key_is_the_same_for_raw_and_typed_requests() -> None:
    raw = decode_request(good_request(raw=True), FP32_SIG)
    typed = decode_request(good_request(raw=False), FP32_SIG)

    assert canonical_key(raw.inputs, raw.outputs) == canonical_key(typed.inputs, typed.outputs)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        pytest.param(
            ({"x": np.zeros((2, 3), np.float32)}, ["y"]),
            ({"x": np.ones((2, 3), np.float32)}, ["y"]),
            id="bytes",
        ),
        pytest.param(
            ({"x": np.zeros((2, 3), np.float32)}, ["y"]),
            ({"x": np.zeros((3, 2), np.float32)}, ["y"]),
            id="shape",
        ),
        pytest.param(
            ({"x": np.zeros(2, np.float32)}, ["y"]), ({"x": np.zeros(2, np.int32)}, ["y"]), id="datatype"
        ),
        pytest.param(
            ({"x": np.zeros(2, np.float32)}, ["y"]), ({"z": np.zeros(2, np.float32)}, ["y"]), id="name"
        ),
        pytest.param(
            ({"x": np.zeros(2, np.float32)}, ["y"]), ({"x": np.zeros(2, np.float32)}, ["z"]), id="outputs"
        ),
        pytest.param(
            ({"x": np.zeros(2, np.float32)}, ["y", "z"]),
            ({"x": np.zeros(2, np.float32)}, ["z", "y"]),
            id="order",
        ),
        pytest.param(
            ({"x": np.array([b"ab", b"c"], dtype=object)}, ["y"]),
            ({"x": np.array([b"a", b"bc"], dtype=object)}, ["y"]),
            id="bytes-boundaries",
        ),
    ],
)
def test_canonical_key_differs(
    left: tuple[dict[str, Array], list[str]], right: tuple[dict[str, Array], list[str]]
) -> None:
    assert canonical_key(*left) != canonical_key(*right)


def test_canonical_key_scope_separates_models() -> None:
    inputs = {"x": np.zeros(2, np.float32)}

    assert canonical_key(inputs, ["y"], scope="m/1") != canonical_key(inputs, ["y"], scope="m/2")


def test_canonical_key_of_a_non_contiguous_array_is_its_values() -> None:
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)

    assert canonical_key({"x": matrix.T}, []) == canonical_key({"x": np.ascontiguousarray(matrix.T)}, [])


# Batches and samples


def test_batch_rows() -> None:
    assert batch_rows({"a": np.zeros((4, 2)), "b": np.zeros(4)}) == 4


def test_batch_rows_disagreeing_inputs_are_named() -> None:
    with pytest.raises(InvalidArgument) as error:
        batch_rows({"a": np.zeros((4, 2)), "b": np.zeros(3), "c": np.float32(1.0) + np.zeros(())})

    assert violations_of(error) == {
        "b": "input 'b' has 3 rows; 'a' has 4",
        "c": "input 'c' is a scalar: it has no batch axis",
    }


def test_batch_rows_of_nothing() -> None:
    with pytest.raises(InvalidArgument):
        batch_rows({})


def test_sample_inputs_fill_variable_dimensions() -> None:
    sig = signature(
        TensorSpec("x", "FP32", (-1, 3, -1)), TensorSpec("s", "BYTES", (-1,)), TensorSpec("h", "BF16", (2,))
    )

    samples = sample_inputs(sig, rows=5)

    assert samples["x"].shape == (5, 3, 1)
    assert samples["x"].dtype == np.float32
    assert not samples["x"].any()
    assert samples["s"].tolist() == [b""] * 5
    assert samples["h"].dtype == ml_dtypes.bfloat16
    assert samples["h"].shape == (2,)
    # what the samples look like is what the signature accepts
    request = make_request(samples, raw=True)
    assert decode_request(request, sig).inputs.keys() == samples.keys()


def test_from_raw_rejects_a_length_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="cannot hold 2 FP32 values"):
        from_raw(b"\x00" * 12, "FP32", [2])


# Python numbers ↔ raw contents without numpy (the gateway's JSON tensors)


def _numpy_raw(values: list[Any], datatype: str) -> bytes:
    """What the gateway did before pack_values: numbers through a float64 array for floats."""
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            return np.array(values, dtype=np.float64).astype(dtype).tobytes()
    return np.array(values, dtype=dtype).tobytes()


@pytest.mark.parametrize("datatype", sorted(STRUCT_CODES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_packed_values_match_numpy(datatype: str, data: st.DataObject) -> None:
    dtype = NUMPY_DTYPES[datatype]
    array = data.draw(hnp.arrays(dtype, st.integers(0, 12)))
    values = array.tolist()  # the Python numbers JSON holds
    assert pack_values(values, datatype) == _numpy_raw(values, datatype)
    unpacked = unpack_values(raw_bytes(array), datatype, array.size)
    assert [type(value) for value in unpacked] == [type(value) for value in values]
    np.testing.assert_array_equal(np.array(unpacked, dtype=dtype), array.ravel())
    if dtype.kind == "f":
        # float64 values round to the datatype as numpy rounds them; overflow raises
        wide = data.draw(st.lists(st.floats(width=64), max_size=12))
        narrow = np.frombuffer(_numpy_raw(wide, datatype), dtype=dtype)
        if np.any(np.isinf(narrow) & np.isfinite(np.array(wide))):
            with pytest.raises(OverflowError):
                pack_values(wide, datatype)
        else:
            assert pack_values(wide, datatype) == narrow.tobytes()


@pytest.mark.parametrize(
    ("datatype", "value"), [("INT8", 128), ("UINT8", -1), ("UINT64", 2**64), ("FP32", 10**400)]
)
def test_packing_a_value_past_the_range_raises(datatype: str, value: int) -> None:
    with pytest.raises((struct.error, OverflowError)):
        pack_values([value], datatype)


def test_unpacking_the_wrong_length_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="7 bytes cannot hold 2 FP32 values"):
        unpack_values(b"\0" * 7, "FP32", 2)
