"""The Open Inference Protocol's REST binding, against stock tritonclient.http's own codec.

Requests are encoded by ``tritonclient.http._utils._get_inference_request`` (the exact bytes and
header length a stock client sends), and responses decoded by ``tritonclient.http.InferResult``,
so both halves of each round trip are written by someone else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request

from services.gateway.oip_rest import (
    HEADER_LENGTH,
    OutputPreferences,
    ParsedInferRequest,
    header_length_of,
    infer_response_body,
    model_metadata_json,
    parse_infer_request,
    server_metadata_json,
)
from services.mesh.errors import InvalidArgument, ResourceExhausted
from services.scoring.oip import pb
from services.scoring.tensors import encode_response, from_raw

Array = np.ndarray[Any, Any]
LIMIT = 1 << 20


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> Array:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"é{i}".encode() * i for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        flags: Array = (np.arange(count) % 2 == 0).reshape(shape)
        return flags
    dtypes = {
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
        "BF16": ml_dtypes.bfloat16,
        "INT8": np.int8,
        "INT64": np.int64,
        "UINT8": np.uint8,
        "UINT64": np.uint64,
    }
    dtype = np.dtype(dtypes[datatype])
    signed = dtype.kind in "fiV"
    values = (np.arange(count) - (count // 2 if signed else 0)) * (0.25 if dtype.kind in "fV" else 1)
    array: Array = values.astype(dtype).reshape(shape)
    return array


def client_input(name: str, array: Array, datatype: str, *, binary: bool) -> InferInput:
    infer_input = InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array, binary_data=binary)
    return infer_input


def client_body(
    inputs: Sequence[InferInput],
    outputs: Sequence[InferRequestedOutput] | None = None,
    *,
    request_id: str = "",
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The body and Inference-Header-Content-Length that tritonclient.http sends."""
    body, header_length = _get_inference_request(
        inputs=list(inputs),
        request_id=request_id,
        outputs=list(outputs) if outputs else None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=dict(parameters) if parameters else None,
    )
    return bytes(body), header_length


def parse(body: bytes, header_length: int | None = None, max_bytes: int = LIMIT) -> ParsedInferRequest:
    return parse_infer_request("m", "3", body, header_length, max_bytes)


def parse_json(document: Any, max_bytes: int = LIMIT) -> ParsedInferRequest:
    return parse(json.dumps(document).encode(), None, max_bytes)


def inputs_of(parsed: ParsedInferRequest) -> dict[str, Array]:
    request = parsed.request
    assert len(request.raw_input_contents) == len(request.inputs)
    return {
        tensor.name: from_raw(raw, tensor.datatype, tuple(tensor.shape))
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
    }


def client_result(response: pb.ModelInferResponse, preferences: OutputPreferences) -> InferResult:
    body, headers = infer_response_body(response, preferences)
    length = headers.get(HEADER_LENGTH)
    return InferResult.from_response_body(body, header_length=None if length is None else int(length))


def violations_of(error: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in error.value.violations}


def tensor(name: Any = "x", datatype: Any = "FP32", shape: Any = None, **rest: Any) -> dict[str, Any]:
    document = {"name": name, "datatype": datatype, "shape": [2] if shape is None else shape}
    if "data" not in rest and "parameters" not in rest:
        rest["data"] = [1.0, 2.0]
    return {**document, **rest}


# Requests: round trips through tritonclient's encoder

ROUND_TRIP_DATATYPES = ("FP32", "INT64", "BOOL", "BYTES", "FP16", "FP64", "INT8", "UINT8", "UINT64")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ROUND_TRIP_DATATYPES)
def test_client_request_round_trip(datatype: str, binary: bool) -> None:
    array = sample(datatype)
    body, header_length = client_body([client_input("x", array, datatype, binary=binary)], request_id="r-7")
    assert (header_length is not None) == binary

    parsed = parse(body, header_length)

    request = parsed.request
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r-7")
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [2, 3])
    assert "binary_data_size" not in tensor.parameters  # consumed by the gateway
    decoded = inputs_of(parsed)["x"]
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_bf16_travels_binary() -> None:
    array = sample("BF16")
    body, header_length = client_body([client_input("x", array, "BF16", binary=True)])

    np.testing.assert_array_equal(inputs_of(parse(body, header_length))["x"], array)


def test_mixed_binary_and_json_inputs_keep_their_order() -> None:
    arrays = {"a": sample("FP32"), "b": sample("BYTES"), "c": sample("INT64", (3,)), "d": sample("BOOL")}
    inputs = [
        client_input("a", arrays["a"], "FP32", binary=True),
        client_input("b", arrays["b"], "BYTES", binary=False),
        client_input("c", arrays["c"], "INT64", binary=True),
        client_input("d", arrays["d"], "BOOL", binary=True),
    ]
    body, header_length = client_body(inputs)

    parsed = parse(body, header_length)

    assert [t.name for t in parsed.request.inputs] == ["a", "b", "c", "d"]
    decoded = inputs_of(parsed)
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_empty_binary_tensor() -> None:
    array = np.zeros((0, 3), np.float32)
    body, header_length = client_body([client_input("x", array, "FP32", binary=True)])

    assert inputs_of(parse(body, header_length))["x"].shape == (0, 3)


def test_nested_data_is_read_row_major() -> None:
    parsed = parse_json({"inputs": [tensor(shape=[2, 2, 2], data=[[[1, 2], [3, 4]], [[5, 6], [7, 8]]])]})

    np.testing.assert_array_equal(inputs_of(parsed)["x"], np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2))


def test_scalar_shape_and_non_finite_floats() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [NaN, Infinity, -1e300]}]}'

    with pytest.raises(InvalidArgument) as error:
        parse(body)
    assert "outside FP32's range" in violations_of(error)["inputs[0].data"]

    decoded = inputs_of(parse(body.replace(b"-1e300", b"-Infinity")))["x"]
    assert np.isnan(decoded[0])
    assert decoded[1:].tolist() == [np.inf, -np.inf]
    scalar = inputs_of(parse_json({"inputs": [tensor(datatype="INT32", shape=[], data=[7])]}))["x"]
    assert scalar.shape == ()
    assert scalar == 7


def test_parameters_and_requested_outputs() -> None:
    outputs = [InferRequestedOutput("y", binary_data=False), InferRequestedOutput("z")]
    body, header_length = client_body(
        [client_input("x", sample("FP32"), "FP32", binary=False)],
        outputs,
        parameters={"tenant": "acme", "rows": 3, "big": 2**63, "fast": True, "ratio": 0.5},
    )

    parsed = parse(body, header_length)

    params = parsed.request.parameters
    assert params["tenant"].string_param == "acme"
    assert params["rows"].int64_param == 3
    assert params["big"].uint64_param == 2**63
    assert params["fast"].bool_param is True
    assert params["ratio"].double_param == 0.5
    assert [o.name for o in parsed.request.outputs] == ["y", "z"]
    assert all("binary_data" not in o.parameters for o in parsed.request.outputs)
    assert parsed.outputs.is_binary("z")
    assert not parsed.outputs.is_binary("y")
    assert not parsed.outputs.is_binary("other")  # Triton's default: JSON


def test_no_requested_outputs_means_binary_data_output() -> None:
    body, header_length = client_body([client_input("x", sample("FP32"), "FP32", binary=False)])

    parsed = parse(body, header_length)

    assert parsed.outputs.binary_default
    assert "binary_data_output" not in parsed.request.parameters
    assert not parse_json({"inputs": [tensor()]}).outputs.binary_default


# Responses: decoded by tritonclient's InferResult


def response_of(outputs: Mapping[str, Array]) -> pb.ModelInferResponse:
    return encode_response(
        outputs, list(outputs), model_name="m", model_version=3, request_id="r-7", backend="onnxruntime"
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ROUND_TRIP_DATATYPES)
def test_response_decodes_with_tritonclient(datatype: str, binary: bool) -> None:
    array = sample(datatype)
    result = client_result(response_of({"y": array}), OutputPreferences(binary_default=binary))

    decoded = result.as_numpy("y")
    assert decoded is not None
    if datatype == "BYTES" and not binary:
        # tritonclient's JSON BYTES come back as str: the same text
        np.testing.assert_array_equal(decoded, np.vectorize(bytes.decode, otypes=[object])(array))
    else:
        assert decoded.dtype == array.dtype
        np.testing.assert_array_equal(decoded, array)
    document = result.get_response()
    assert (document["model_name"], document["model_version"], document["id"]) == ("m", "3", "r-7")
    assert document["parameters"] == {"backend": "onnxruntime"}
    assert ("data" in document["outputs"][0]) != binary


def test_response_mixes_binary_and_json_outputs_as_asked() -> None:
    outputs = {"a": sample("FP32"), "b": sample("INT64"), "c": sample("BYTES"), "d": sample("FP16")}
    preferences = OutputPreferences(binary={"a": True, "c": True, "d": False})

    body, headers = infer_response_body(response_of(outputs), preferences)

    assert headers["Content-Type"] == "application/octet-stream"
    length = int(headers[HEADER_LENGTH])
    document = json.loads(body[:length])
    assert [("data" in o) for o in document["outputs"]] == [False, True, False, True]
    result = InferResult.from_response_body(body, header_length=length)
    for name in ("a", "b", "c", "d"):
        np.testing.assert_array_equal(result.as_numpy(name), outputs[name])


def test_all_json_response_has_no_length_header() -> None:
    body, headers = infer_response_body(response_of({"y": sample("FP32")}), OutputPreferences())

    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body)["outputs"][0]["data"] == [-0.75, -0.5, -0.25, 0.0, 0.25, 0.5]


def test_json_cannot_carry_bf16_or_non_utf8_bytes_so_they_go_binary() -> None:
    outputs = {"h": sample("BF16"), "raw": np.array([b"\xff\xfe", b"ok"], dtype=object)}

    result = client_result(response_of(outputs), OutputPreferences(binary_default=False))

    for name, array in outputs.items():
        assert "binary_data_size" in result.get_output(name)["parameters"]
        np.testing.assert_array_equal(result.as_numpy(name), array)


def test_non_finite_outputs_reach_tritonclient() -> None:
    array = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)

    decoded = client_result(response_of({"y": array}), OutputPreferences()).as_numpy("y")

    np.testing.assert_array_equal(decoded, array)


def test_response_without_raw_contents_is_a_bug_upstream() -> None:
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="y", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)

    with pytest.raises(ValueError, match="raw contents"):
        infer_response_body(response, OutputPreferences())


def test_full_loop_through_stock_client_codec() -> None:
    x = sample("FP32")
    body, header_length = client_body(
        [client_input("x", x, "FP32", binary=True)],
        [InferRequestedOutput("double", binary_data=True), InferRequestedOutput("label", binary_data=False)],
    )
    parsed = parse(body, header_length)
    decoded = inputs_of(parsed)["x"]
    outputs = {"double": decoded * 2, "label": np.array([b"a", b"b"], dtype=object)}

    result = client_result(response_of(outputs), parsed.outputs)

    np.testing.assert_array_equal(result.as_numpy("double"), x * 2)
    assert result.as_numpy("label").tolist() == ["a", "b"]


# Health and metadata


def test_model_metadata_json_has_numeric_shapes() -> None:
    tensor_metadata = pb.ModelMetadataResponse.TensorMetadata
    metadata = pb.ModelMetadataResponse(
        name="m",
        versions=["3"],
        platform="onnxruntime_onnx",
        inputs=[tensor_metadata(name="x", datatype="FP32", shape=[-1, 3])],
        outputs=[tensor_metadata(name="y", datatype="INT64", shape=[-1])],
    )

    assert json.loads(model_metadata_json(metadata)) == {
        "name": "m",
        "versions": ["3"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
    }


def test_server_metadata_json() -> None:
    metadata = pb.ServerMetadataResponse(name="scoremesh", version="0.1", extensions=["binary_tensor_data"])

    assert json.loads(server_metadata_json(metadata)) == {
        "name": "scoremesh",
        "version": "0.1",
        "extensions": ["binary_tensor_data"],
    }


# Bad input


def test_header_length_of() -> None:
    assert header_length_of(None) is None
    assert header_length_of(" 42 ") == 42
    for bad in ("-1", "4.2", "0x10", "", "1_000", "²", "9" * 21):
        with pytest.raises(InvalidArgument) as error:
            header_length_of(bad)
        assert list(violations_of(error)) == [HEADER_LENGTH]


BAD_DOCUMENTS: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "body"),
    ("missing inputs", {"outputs": []}, "inputs"),
    ("inputs not a list", {"inputs": {"name": "x"}}, "inputs"),
    ("input not an object", {"inputs": ["x"]}, "inputs[0]"),
    ("unknown key", {"inputs": [tensor()], "input": []}, "input"),
    ("unknown input key", {"inputs": [tensor(dtype="FP32")]}, "inputs[0].dtype"),
    ("id not a string", {"id": 7, "inputs": [tensor()]}, "id"),
    ("name not a string", {"inputs": [tensor(name=3)]}, "inputs[0].name"),
    ("unknown datatype", {"inputs": [tensor(datatype="FP8")]}, "inputs[0].datatype"),
    ("datatype missing", {"inputs": [{"name": "x", "shape": [1], "data": [1]}]}, "inputs[0].datatype"),
    ("shape not a list", {"inputs": [tensor(shape="2")]}, "inputs[0].shape"),
    ("shape of floats", {"inputs": [tensor(shape=[2.0])]}, "inputs[0].shape"),
    ("shape of bools", {"inputs": [tensor(shape=[True, True])]}, "inputs[0].shape"),
    ("negative dimension", {"inputs": [tensor(shape=[-1])]}, "inputs[0].shape"),
    ("huge dimension", {"inputs": [tensor(shape=[2**63])]}, "inputs[0].shape"),
    ("too few elements", {"inputs": [tensor(shape=[3])]}, "inputs[0].data"),
    ("too many nested", {"inputs": [tensor(shape=[1, 2], data=[[1, 2], [3]])]}, "inputs[0].data"),
    ("data missing", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "inputs[0].data"),
    ("data not a list", {"inputs": [tensor(shape=[], data=1.0)]}, "inputs[0].data"),
    ("string for FP32", {"inputs": [tensor(data=[1.0, "2"])]}, "inputs[0].data"),
    ("bool for FP32", {"inputs": [tensor(data=[1.0, True])]}, "inputs[0].data"),
    ("float for INT64", {"inputs": [tensor(datatype="INT64", data=[1, 2.5])]}, "inputs[0].data"),
    ("INT8 overflow", {"inputs": [tensor(datatype="INT8", data=[1, 128])]}, "inputs[0].data"),
    ("UINT8 negative", {"inputs": [tensor(datatype="UINT8", data=[-1, 0])]}, "inputs[0].data"),
    ("INT64 overflow", {"inputs": [tensor(datatype="INT64", data=[2**63, 0])]}, "inputs[0].data"),
    ("FP16 overflow", {"inputs": [tensor(datatype="FP16", data=[1e6, 0])]}, "inputs[0].data"),
    ("FP64 overflow", {"inputs": [tensor(datatype="FP64", data=[10**400, 0])]}, "inputs[0].data"),
    ("number for BOOL", {"inputs": [tensor(datatype="BOOL", data=[1, 0])]}, "inputs[0].data"),
    ("number for BYTES", {"inputs": [tensor(datatype="BYTES", data=["a", 1])]}, "inputs[0].data"),
    ("lone surrogate", {"inputs": [tensor(datatype="BYTES", data=["a", "\ud800"])]}, "inputs[0].data"),
    ("BF16 as JSON", {"inputs": [tensor(datatype="BF16")]}, "inputs[0].data"),
    (
        "negative binary size",
        {"inputs": [tensor(parameters={"binary_data_size": -4})]},
        "inputs[0].parameters.binary_data_size",
    ),
    (
        "string binary size",
        {"inputs": [tensor(parameters={"binary_data_size": "8"})]},
        "inputs[0].parameters.binary_data_size",
    ),
    (
        "binary size beyond the body",
        {"inputs": [tensor(parameters={"binary_data_size": 8})]},
        "inputs[0].parameters.binary_data_size",
    ),
    (
        "data and binary size",
        {"inputs": [tensor(data=[1, 2], parameters={"binary_data_size": 0})]},
        "inputs[0].data",
    ),
    ("parameters not an object", {"inputs": [tensor()], "parameters": [1]}, "parameters"),
    ("parameter value a list", {"inputs": [tensor()], "parameters": {"k": [1]}}, "parameters.k"),
    ("parameter value null", {"inputs": [tensor()], "parameters": {"k": None}}, "parameters.k"),
    ("parameter too big", {"inputs": [tensor()], "parameters": {"k": 2**64}}, "parameters.k"),
    (
        "binary_data_output not bool",
        {"inputs": [tensor()], "parameters": {"binary_data_output": 1}},
        "parameters.binary_data_output",
    ),
    (
        "shared memory",
        {"inputs": [tensor(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8})]},
        "inputs[0].parameters.shared_memory_region",
    ),
    ("outputs not a list", {"inputs": [tensor()], "outputs": "y"}, "outputs"),
    ("output not an object", {"inputs": [tensor()], "outputs": ["y"]}, "outputs[0]"),
    ("output name missing", {"inputs": [tensor()], "outputs": [{}]}, "outputs[0].name"),
    (
        "binary_data not bool",
        {"inputs": [tensor()], "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]},
        "outputs[0].parameters.binary_data",
    ),
    (
        "classification",
        {"inputs": [tensor()], "outputs": [{"name": "y", "parameters": {"classification": 3}}]},
        "outputs[0].parameters.classification",
    ),
]


@pytest.mark.parametrize(
    ("document", "field"), [c[1:] for c in BAD_DOCUMENTS], ids=[c[0] for c in BAD_DOCUMENTS]
)
def test_bad_document_names_the_field(document: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_json(document)

    assert field in violations_of(error), violations_of(error)


def test_every_problem_is_reported_at_once() -> None:
    document = {"inputs": [tensor(datatype="FP8"), tensor(shape=[5]), tensor(name=None)], "outputs": [3]}

    with pytest.raises(InvalidArgument) as error:
        parse_json(document)

    assert set(violations_of(error)) == {
        "inputs[0].datatype",
        "inputs[1].data",
        "inputs[2].name",
        "outputs[0]",
    }
    assert error.value.reason == "INVALID_INFER_REQUEST"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "INVALID_JSON"),
        (b"", "INVALID_JSON"),
        (b"\xff{}", "INVALID_JSON"),
        (b'{"inputs": [], "inputs": []}', "INVALID_JSON"),
        (b"[" * 100_000, "INVALID_JSON"),
        (b'{"inputs": [' + b"9" * 5000 + b"]}", "INVALID_JSON"),
        (b"null", "INVALID_INFER_REQUEST"),
    ],
    ids=["truncated", "empty", "not utf-8", "duplicate key", "deep", "huge integer", "null"],
)
def test_malformed_json(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse(body)

    assert list(violations_of(error)) == ["body"]
    assert error.value.reason == reason


def binary_request() -> tuple[bytes, int]:
    body, header_length = client_body(
        [
            client_input("x", sample("FP32"), "FP32", binary=True),
            client_input("s", sample("BYTES"), "BYTES", binary=True),
        ]
    )
    assert header_length is not None
    return body, header_length


def test_header_length_beyond_the_body() -> None:
    body, _ = binary_request()

    for header_length in (len(body) + 1, -1):
        with pytest.raises(InvalidArgument) as error:
            parse(body, header_length)
        assert list(violations_of(error)) == [HEADER_LENGTH]


def test_binary_data_cut_short() -> None:
    body, header_length = binary_request()

    with pytest.raises(InvalidArgument) as error:
        parse(body[:-1], header_length)

    assert "inputs[1].parameters.binary_data_size" in violations_of(error)


def test_bytes_after_the_last_binary_tensor() -> None:
    body, header_length = binary_request()

    with pytest.raises(InvalidArgument) as error:
        parse(body + b"\0", header_length)

    assert list(violations_of(error)) == ["body"]


def test_binary_size_that_disagrees_with_the_shape() -> None:
    document = {
        "inputs": [
            tensor(shape=[3], parameters={"binary_data_size": 8}),
            tensor("s", "BYTES", [2], parameters={"binary_data_size": 5}),
        ]
    }
    header = json.dumps(document).encode()
    body = header + bytes(8) + b"\1\0\0\0a"

    with pytest.raises(InvalidArgument) as error:
        parse(body, len(header))

    assert set(violations_of(error)) == {
        "inputs[0].parameters.binary_data_size",
        "inputs[1].parameters.binary_data_size",
    }


def test_binary_size_without_the_header() -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_json({"inputs": [tensor(parameters={"binary_data_size": 8})]})

    assert "inputs[0].parameters.binary_data_size" in violations_of(error)


def test_body_over_the_limit() -> None:
    body, header_length = binary_request()

    with pytest.raises(ResourceExhausted) as error:
        parse(body, header_length, max_bytes=len(body) - 1)

    assert error.value.metadata == {"bytes": str(len(body)), "limit": str(len(body) - 1)}
    parse(body, header_length, max_bytes=len(body))


def test_decoded_inputs_over_the_limit() -> None:
    # "0," is 2 bytes of JSON and 8 bytes of INT64: within the body limit, over the decoded one
    body = json.dumps({"inputs": [tensor(datatype="INT64", shape=[1000], data=[0] * 1000)]}).encode()

    with pytest.raises(ResourceExhausted, match="inputs"):
        parse(body, max_bytes=4000)


# Property: nothing but domain errors, whatever arrives

# JSON can spell lone surrogates, which no UTF-8 string can hold
TEXT = st.text(max_size=6) | st.sampled_from(["\ud800", "x\udfff"])
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT | st.sampled_from(["FP32", "BYTES"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
DATATYPES = st.sampled_from(["FP32", "FP16", "BF16", "INT8", "UINT64", "BOOL", "BYTES", "FP8"])
ELEMENTS = {
    "BOOL": st.booleans(),
    "BYTES": st.text(max_size=3),
    "INT8": st.integers(-130, 130),
    "UINT64": st.integers(-1, 2**64),
}


@st.composite
def plausible_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """Inputs that are well formed more often than not, so the property reaches acceptance."""
    datatype = draw(st.sampled_from(["FP32", "FP16", "BF16", "INT8", "UINT64", "BOOL", "BYTES"]))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    count = int(np.prod(shape)) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    document: dict[str, Any] = {
        "name": draw(st.text(min_size=1, max_size=3)),
        "datatype": datatype,
        "shape": shape,
    }
    if draw(st.booleans()):
        element = ELEMENTS.get(datatype, st.floats(width=32) | st.integers(-70_000, 70_000))
        document["data"] = draw(st.lists(element, min_size=max(count, 0), max_size=max(count, 0)))
    else:
        document["parameters"] = {"binary_data_size": draw(st.integers(0, 16))}
    return document


INPUTS = plausible_inputs() | st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=3) | JSON_VALUES,
        "datatype": DATATYPES | JSON_VALUES,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | JSON_VALUES,
        "data": st.lists(JSON_SCALARS, max_size=6) | JSON_VALUES,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-2, 24) | JSON_VALUES})
        | JSON_VALUES,
    },
)
DOCUMENTS = st.fixed_dictionaries(
    {"inputs": st.lists(INPUTS | JSON_VALUES, max_size=3) | JSON_VALUES},
    optional={
        "id": JSON_VALUES,
        "parameters": st.dictionaries(TEXT, JSON_SCALARS, max_size=3) | JSON_VALUES,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.text(max_size=3)},
                optional={"parameters": st.dictionaries(TEXT, JSON_VALUES)},
            )
            | JSON_VALUES,
            max_size=3,
        )
        | JSON_VALUES,
    },
)


def assert_domain_errors_only(body: bytes, header_length: int | None) -> None:
    try:
        parsed = parse(body, header_length, max_bytes=512)
    except InvalidArgument as error:
        # the error travels as JSON and protobuf: every string in it must be valid Unicode
        for text in (error.message, *(f"{v.field}{v.description}" for v in error.violations)):
            text.encode()
        return
    except ResourceExhausted:
        return  # anything else propagates and fails the property
    assert len(parsed.request.raw_input_contents) == len(parsed.request.inputs)
    inputs_of(parsed)  # what was accepted decodes as declared


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=DOCUMENTS,
    tail=st.binary(max_size=32),
    header=st.sampled_from(["exact", "none", "random"]),
    shift=st.integers(-40, 40),
)
def test_structured_bodies_raise_only_domain_errors(
    document: Any, tail: bytes, header: str, shift: int
) -> None:
    text = json.dumps(document).encode()
    header_length = {"exact": len(text), "none": None, "random": len(text) + shift}[header]

    assert_domain_errors_only(text + tail, header_length)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=600), header_length=st.none() | st.integers(-5, 700))
def test_arbitrary_bytes_raise_only_domain_errors(body: bytes, header_length: int | None) -> None:
    assert_domain_errors_only(body, header_length)
