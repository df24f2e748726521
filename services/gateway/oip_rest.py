"""The Open Inference Protocol's REST binding ↔ its gRPC messages, as stock ``tritonclient.http``
speaks it. Pure functions; no server, no network.

An inference request is JSON (KServe v2 / Triton HTTP)::

    {"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype", "parameters"?, "data"?}],
     "outputs"?: [{"name", "parameters"?: {"binary_data": bool}}]}

optionally followed by the *binary tensor extension*: with the ``Inference-Header-Content-Length``
header, the body is that many bytes of JSON and then, in input order, the raw bytes of every
input whose parameters carry ``binary_data_size``. :func:`parse_infer_request` turns either form
into one ``ModelInferRequest`` that always carries ``raw_input_contents`` (gRPC forbids mixing
typed and raw contents, and raw is what the scoring service and Triton read fastest), checking
every input against its declared datatype and shape so a REST client is told the REST field
that is wrong (``inputs[1].data``), not a gRPC one. :func:`infer_response_body` writes the
answer back: each output as JSON ``data`` or, where the request asked (``binary_data`` per
output, ``binary_data_output`` for all), as binary bytes after the JSON.

Values are converted by :mod:`services.scoring.tensors`, the mesh's one codec between protocol
datatypes and numpy; this module only adds what JSON needs (element type checks, ranges).

Every problem with a request raises ``InvalidArgument`` naming the field (all found at once), or
``ResourceExhausted`` for sizes over the limit; nothing else escapes for bad input.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from services.gateway.strict_json import DuplicateKey, unique_keys
from services.mesh.errors import FieldViolation, InvalidArgument, ResourceExhausted, raise_for_violations
from services.scoring.oip import pb
from services.scoring.tensors import (
    BYTES,
    NUMPY_DTYPES,
    STRUCT_CODES,
    from_raw,
    join_bytes,
    pack_values,
    split_bytes,
    unpack_values,
)

__all__ = [
    "BODY_FIELD",
    "HEADER_LENGTH",
    "NOT_READY_STATUS",
    "READY_STATUS",
    "OutputPreferences",
    "ParsedInferRequest",
    "header_length_of",
    "infer_response_body",
    "model_metadata_json",
    "parse_infer_request",
    "server_metadata_json",
]

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
"""The binary tensor extension's header: how many leading bytes of the body are JSON."""

BODY_FIELD: Final = "body"
"""The field a violation names when the body as a whole is wrong (malformed JSON, not an object,
bytes that no input accounts for)."""

READY_STATUS: Final = 200
NOT_READY_STATUS: Final = 400
"""Triton answers the ready routes with a status and no body; ``tritonclient.http``'s
``is_server_ready``/``is_model_ready`` test ``status_code == 200`` and nothing else."""

JSON_CONTENT_TYPE: Final = "application/json"
BINARY_CONTENT_TYPE: Final = "application/octet-stream"

_REASON_INVALID: Final = "INVALID_INFER_REQUEST"
_REASON_JSON: Final = "INVALID_JSON"
_INT64_MAX: Final = 2**63 - 1
_UINT64_MAX: Final = 2**64 - 1
_DIGITS: Final = re.compile(r"[0-9]{1,20}")

_REQUEST_KEYS: Final = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS: Final = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS: Final = frozenset({"name", "parameters"})
# tritonclient's shared-memory and classification extensions: nothing the gateway can honour
# (the client's memory is not the scoring service's), so they are refused rather than ignored
_UNSUPPORTED_PARAMETERS: Final = {
    "shared_memory_region": "shared memory is not supported through the gateway",
    "shared_memory_byte_size": "shared memory is not supported through the gateway",
    "shared_memory_offset": "shared memory is not supported through the gateway",
    "classification": "the classification extension is not supported",
}


@dataclass(frozen=True, slots=True)
class OutputPreferences:
    """How the response carries each output: as binary bytes after the JSON, or as JSON ``data``.

    ``binary`` holds each requested output's own ``binary_data``; an output without one follows
    ``binary_default``, the request's ``binary_data_output`` (JSON when absent, as in Triton)."""

    binary_default: bool = False
    binary: Mapping[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        """Whether output ``name`` is asked for as binary data."""
        return self.binary.get(name, self.binary_default)


@dataclass(frozen=True, slots=True)
class ParsedInferRequest:
    """A REST inference request as the gRPC message to forward, plus what the response needs to
    know that gRPC does not carry (``binary_data``, ``binary_data_output``)."""

    request: pb.ModelInferRequest
    outputs: OutputPreferences


# Requests


def header_length_of(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a number (``None`` when absent), or
    ``InvalidArgument`` naming the header when it is not a non-negative decimal integer."""
    if value is None:
        return None
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        raise InvalidArgument.for_field(
            HEADER_LENGTH,
            f"must be a non-negative decimal byte count, not {value[:40]!r}",
            reason=_REASON_INVALID,
        )
    return int(text)


def parse_infer_request(
    model_name: str, model_version: str, body: bytes, header_length: int | None, max_bytes: int
) -> ParsedInferRequest:
    """Parses a REST inference request for ``model_name`` (``model_version`` may be empty).

    ``header_length`` is the ``Inference-Header-Content-Length`` header (see
    :func:`header_length_of`): the JSON's length when binary tensors follow it, ``None`` when the
    whole body is JSON. Every input ends up in ``raw_input_contents``, in input order: JSON
    ``data`` (flat or nested, row-major; nesting is flattened as Triton does, only the element
    count must match the shape) converted to the declared datatype, binary tensors sliced from
    the body. Input and output ``parameters`` are forwarded, except those of the binary
    extension, which are consumed here.

    Raises ``ResourceExhausted`` when the body or the inputs' raw bytes exceed ``max_bytes``,
    else ``InvalidArgument`` listing every bad field (``inputs[0].data``,
    ``inputs[1].parameters.binary_data_size``, ``Inference-Header-Content-Length``, ``body``).
    """
    if len(body) > max_bytes:
        raise _too_large("the request body", len(body), max_bytes)
    json_end = len(body) if header_length is None else header_length
    if not 0 <= json_end <= len(body):
        raise InvalidArgument.for_field(
            HEADER_LENGTH, f"is {header_length}, but the body has {len(body)} bytes", reason=_REASON_INVALID
        )
    document = _load_json(body[:json_end])
    if not isinstance(document, dict):
        raise InvalidArgument.for_field(BODY_FIELD, "must be a JSON object", reason=_REASON_INVALID)

    violations: list[FieldViolation] = []
    _check_keys(document, _REQUEST_KEYS, "", violations)
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in document:
        request.id = _text(document["id"], "id", violations) or ""
    binary_default = False
    parameters = _parameter_object(document, "parameters", violations)
    if parameters is not None:
        wish = parameters.pop("binary_data_output", False)
        if isinstance(wish, bool):
            binary_default = wish
        else:
            violations.append(FieldViolation("parameters.binary_data_output", "must be true or false"))
        _copy_parameters(parameters, "parameters", request.parameters, violations)

    raw_contents = _parse_inputs(document, memoryview(body)[json_end:], request, violations)
    binary = _parse_outputs(document, request, violations)
    raise_for_violations(violations, reason=_REASON_INVALID)
    nbytes = sum(len(raw) for raw in raw_contents)
    if nbytes > max_bytes:
        raise _too_large("the request's inputs", nbytes, max_bytes)
    request.raw_input_contents.extend(raw_contents)
    return ParsedInferRequest(request, OutputPreferences(binary_default, binary))


def _too_large(what: str, nbytes: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"{what} take {nbytes} bytes; the limit is {limit}",
        reason="REQUEST_TOO_LARGE",
        metadata={"bytes": str(nbytes), "limit": str(limit)},
    )


def _load_json(text: bytes) -> Any:
    # NaN and Infinity are accepted: tritonclient's encoder (python-rapidjson) writes them for
    # non-finite floats, and a float tensor may hold them
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as err:
        raise InvalidArgument.for_field(
            BODY_FIELD, f"gives the key {err.key[:40]!r} more than once", reason=_REASON_JSON
        ) from None
    except UnicodeDecodeError:
        raise InvalidArgument.for_field(BODY_FIELD, "is not UTF-8", reason=_REASON_JSON) from None
    except json.JSONDecodeError as err:
        description = f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        raise InvalidArgument.for_field(BODY_FIELD, description, reason=_REASON_JSON) from None
    except RecursionError:
        raise InvalidArgument.for_field(BODY_FIELD, "is nested too deeply", reason=_REASON_JSON) from None
    except ValueError as err:  # an integer past Python's digit limit
        raise InvalidArgument.for_field(
            BODY_FIELD, f"is not valid JSON: {err}", reason=_REASON_JSON
        ) from None


def _prefix(where: str, key: str) -> str:
    return f"{where}.{_key(key)}" if where else _key(key)


def _key(key: str) -> str:
    """A JSON key as a violation's field: shortened, and escaped where it could not travel in
    the error's own JSON or protobuf (a lone surrogate)."""
    return key[:40] if _encodable(key) else ascii(key[:40])


def _check_keys(
    document: Mapping[str, Any], allowed: frozenset[str], where: str, violations: list[FieldViolation]
) -> None:
    # unknown keys are refused: a typo ("input", "dtype") would otherwise be silently dropped
    for key in document:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            violations.append(FieldViolation(_prefix(where, key), f"is not a known field (known: {known})"))


def _encodable(text: str) -> bool:
    # JSON can spell lone surrogates ("\ud800"), which no UTF-8 string (nor protobuf) can hold
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any, where: str, violations: list[FieldViolation]) -> str | None:
    if not isinstance(value, str):
        violations.append(FieldViolation(where, f"must be a string, not {_json_type(value)}"))
        return None
    if not _encodable(value):
        violations.append(FieldViolation(where, "is not valid Unicode (it holds a lone surrogate)"))
        return None
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parameter_object(
    document: Mapping[str, Any], where: str, violations: list[FieldViolation]
) -> dict[str, Any] | None:
    """``document["parameters"]`` as a fresh dict (the caller pops what it consumes), or ``None``."""
    if "parameters" not in document:
        return None
    value = document["parameters"]
    if not isinstance(value, dict):
        violations.append(FieldViolation(where, f"must be an object, not {_json_type(value)}"))
        return None
    return dict(value)


def _copy_parameters(
    parameters: Mapping[str, Any], where: str, target: Any, violations: list[FieldViolation]
) -> None:
    """Copies free-form JSON parameters into a protobuf ``map<string, InferParameter>``."""
    for key, value in parameters.items():
        here = _prefix(where, key)
        if key in _UNSUPPORTED_PARAMETERS:
            violations.append(FieldViolation(here, _UNSUPPORTED_PARAMETERS[key]))
        elif not _encodable(key):
            violations.append(FieldViolation(here, "is not valid Unicode (it holds a lone surrogate)"))
        elif isinstance(value, bool):  # before int: bool is an int subclass
            target[key].bool_param = value
        elif isinstance(value, int):
            if -_INT64_MAX - 1 <= value <= _INT64_MAX:
                target[key].int64_param = value
            elif 0 <= value <= _UINT64_MAX:
                target[key].uint64_param = value
            else:
                violations.append(FieldViolation(here, "is outside the 64-bit integer range"))
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str) and _encodable(value):
            target[key].string_param = value
        else:
            violations.append(
                FieldViolation(here, f"must be a string, number or boolean, not {_json_type(value)}")
            )


def _parse_inputs(
    document: Mapping[str, Any], binary: memoryview, request: Any, violations: list[FieldViolation]
) -> list[bytes]:
    """Adds each input to ``request`` and returns its raw contents, in order."""
    if "inputs" not in document:
        violations.append(FieldViolation("inputs", "is required"))
        return []
    inputs = document["inputs"]
    if not isinstance(inputs, list):
        violations.append(FieldViolation("inputs", f"must be a list, not {_json_type(inputs)}"))
        return []
    raw_contents: list[bytes] = []
    # where the next binary tensor starts; None once an earlier size is unusable, since every
    # later offset depends on it
    offset: int | None = 0
    for index, item in enumerate(inputs):
        raw, offset = _parse_input(index, item, binary, offset, request, violations)
        raw_contents.append(raw or b"")
    if offset is not None and offset < len(binary):
        violations.append(
            FieldViolation(
                BODY_FIELD,
                f"has {len(binary) - offset} bytes after the JSON that no input's "
                "parameters.binary_data_size accounts for",
            )
        )
    return raw_contents


def _parse_input(
    index: int,
    item: Any,
    binary: memoryview,
    offset: int | None,
    request: Any,
    violations: list[FieldViolation],
) -> tuple[bytes | None, int | None]:
    """One input: its raw contents (``None`` when it is bad) and the next binary offset."""
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        violations.append(FieldViolation(where, f"must be an object, not {_json_type(item)}"))
        return None, offset
    before = len(violations)
    _check_keys(item, _INPUT_KEYS, where, violations)
    tensor = request.inputs.add()
    tensor.name = _text(item.get("name"), f"{where}.name", violations) or ""
    datatype = _datatype(item.get("datatype"), f"{where}.datatype", violations)
    shape = _shape(item.get("shape"), f"{where}.shape", violations)
    if shape is not None:
        tensor.shape.extend(shape)
    if datatype is not None:
        tensor.datatype = datatype

    size_field = f"{where}.parameters.binary_data_size"
    size: int | None = None
    parameters = _parameter_object(item, f"{where}.parameters", violations)
    if parameters is not None and "binary_data_size" in parameters:
        value = parameters.pop("binary_data_size")
        if _is_int(value) and value >= 0:
            size = value
        else:
            violations.append(FieldViolation(size_field, "must be a non-negative integer byte count"))
            offset = None
    if parameters is not None:
        _copy_parameters(parameters, f"{where}.parameters", tensor.parameters, violations)
    valid = len(violations) == before and datatype is not None and shape is not None

    if size is not None:
        if "data" in item:
            violations.append(
                FieldViolation(f"{where}.data", "is given beside parameters.binary_data_size; send one")
            )
        if offset is None:
            return None, None
        end = offset + size
        if end > len(binary):
            violations.append(
                FieldViolation(
                    size_field,
                    f"is {size}: the input would end at byte {end} of the binary data after the "
                    f"JSON, which has {len(binary)} (is {HEADER_LENGTH} right?)",
                )
            )
            return None, None
        raw = bytes(binary[offset:end])
        if valid and datatype is not None and shape is not None:
            _check_raw(raw, datatype, shape, size_field, violations)
        return raw, end
    if "data" not in item:
        violations.append(
            FieldViolation(f"{where}.data", "is required unless parameters.binary_data_size is given")
        )
        return None, offset
    if not valid or datatype is None or shape is None:
        return None, offset
    return _json_tensor(item["data"], datatype, shape, f"{where}.data", violations), offset


def _datatype(value: Any, where: str, violations: list[FieldViolation]) -> str | None:
    if not isinstance(value, str):
        violations.append(FieldViolation(where, f"must be a string, not {_json_type(value)}"))
        return None
    if value not in NUMPY_DTYPES:
        violations.append(
            FieldViolation(where, f"{value[:40]!r} is not a datatype (known: {', '.join(NUMPY_DTYPES)})")
        )
        return None
    return value


def _shape(value: Any, where: str, violations: list[FieldViolation]) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(_is_int(dim) for dim in value):
        violations.append(FieldViolation(where, "must be a list of integers"))
        return None
    if any(not 0 <= dim <= _INT64_MAX for dim in value):
        violations.append(FieldViolation(where, f"has a dimension outside [0, 2^63-1]: {value[:8]}"))
        return None
    return tuple(value)


def _check_raw(
    raw: bytes, datatype: str, shape: tuple[int, ...], where: str, violations: list[FieldViolation]
) -> None:
    count = math.prod(shape)
    if datatype == BYTES:
        _, problem = split_bytes(raw, count)
        if problem:
            violations.append(FieldViolation(where, f"its {len(raw)} bytes of BYTES elements: {problem}"))
        return
    expected = count * NUMPY_DTYPES[datatype].itemsize
    if len(raw) != expected:
        violations.append(
            FieldViolation(where, f"is {len(raw)}; shape {list(shape)} of {datatype} needs {expected} bytes")
        )


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of nested lists, iteratively: nesting is bounded only by the JSON."""
    if not any(isinstance(value, list) for value in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _json_tensor(
    data: Any, datatype: str, shape: tuple[int, ...], where: str, violations: list[FieldViolation]
) -> bytes | None:
    """JSON ``data`` as raw contents, or ``None`` after adding a violation."""
    if datatype == "BF16":
        # as in Triton and tritonclient: JSON numbers would be rounded, so BF16 travels raw only
        violations.append(FieldViolation(where, "BF16 can only be sent as binary data (binary_data_size)"))
        return None
    if not isinstance(data, list):
        violations.append(FieldViolation(where, f"must be a list, not {_json_type(data)}"))
        return None
    flat = _flatten(data)
    count = math.prod(shape)
    if len(flat) != count:
        violations.append(
            FieldViolation(where, f"has {len(flat)} elements; shape {list(shape)} needs {count}")
        )
        return None
    return _raw(flat, datatype, where, violations)


def _raw(flat: list[Any], datatype: str, where: str, violations: list[FieldViolation]) -> bytes | None:
    """JSON elements as ``datatype``'s raw contents, or ``None`` after adding a violation."""
    dtype = NUMPY_DTYPES[datatype]

    def wrong(index: int, wanted: str) -> None:
        found = _json_type(flat[index])
        violations.append(FieldViolation(where, f"element {index} is {found}; {datatype} takes {wanted}"))

    if datatype == BYTES:
        array = np.empty(len(flat), dtype=object)
        for index, value in enumerate(flat):
            if not isinstance(value, str):
                wrong(index, "strings")
                return None
            try:
                array[index] = value.encode()
            except UnicodeEncodeError:
                violations.append(FieldViolation(where, f"element {index} is not valid Unicode"))
                return None
        return join_bytes(array)
    if datatype == "BOOL":
        takes, wanted = _is_bool, "true or false"
    elif dtype.kind in "iu":
        takes, wanted = _is_int, "integers"
    else:
        takes, wanted = _is_number, "numbers"
    bad = next((i for i, value in enumerate(flat) if not takes(value)), None)
    if bad is not None:
        wrong(bad, wanted)
        return None
    try:
        return pack_values(flat, datatype)
    except (struct.error, OverflowError):  # a value past the datatype's range (inf and NaN pack)
        if dtype.kind in "iu":
            limits = np.iinfo(dtype)
            violations.append(
                FieldViolation(where, f"a value is outside {datatype}'s [{limits.min}, {limits.max}]")
            )
        else:
            violations.append(FieldViolation(where, f"a finite value is outside {datatype}'s range"))
        return None


def _parse_outputs(
    document: Mapping[str, Any], request: Any, violations: list[FieldViolation]
) -> dict[str, bool]:
    """Adds the requested outputs to ``request``; returns each one's ``binary_data`` wish."""
    if "outputs" not in document:
        return {}
    outputs = document["outputs"]
    if not isinstance(outputs, list):
        violations.append(FieldViolation("outputs", f"must be a list, not {_json_type(outputs)}"))
        return {}
    binary: dict[str, bool] = {}
    for index, item in enumerate(outputs):
        where = f"outputs[{index}]"
        if not isinstance(item, dict):
            violations.append(FieldViolation(where, f"must be an object, not {_json_type(item)}"))
            continue
        _check_keys(item, _OUTPUT_KEYS, where, violations)
        tensor = request.outputs.add()
        name = _text(item.get("name"), f"{where}.name", violations)
        tensor.name = name or ""
        parameters = _parameter_object(item, f"{where}.parameters", violations)
        if parameters is None:
            continue
        if "binary_data" in parameters:
            wish = parameters.pop("binary_data")
            if not isinstance(wish, bool):
                violations.append(FieldViolation(f"{where}.parameters.binary_data", "must be true or false"))
            elif name is not None:
                binary[name] = wish
        _copy_parameters(parameters, f"{where}.parameters", tensor.parameters, violations)
    return binary


# Responses


def rows_of(request: pb.ModelInferRequest) -> int:
    """The rows a request scores, for the usage counters: axis 0 of its first input (the
    scoring service refuses inputs whose rows disagree); 1 for a request of scalars."""
    for tensor in request.inputs:
        return int(tensor.shape[0]) if tensor.shape else 1
    return 0


def infer_response_body(
    response: pb.ModelInferResponse, preferences: OutputPreferences
) -> tuple[bytes, dict[str, str]]:
    """The REST body of an inference response and the headers it needs (``Content-Type``, and
    ``Inference-Header-Content-Length`` when binary outputs follow the JSON).

    Each output goes as JSON ``data`` or as binary bytes, as ``preferences`` say, except where
    JSON cannot carry it exactly: BF16 and BYTES that are not UTF-8 always go binary, which
    ``tritonclient.http`` decodes the same way (it reads each output's own
    ``binary_data_size``). The response must be raw-encoded, as the scoring service and Triton
    answer; a response without raw contents for every output raises ``ValueError`` (a bug
    upstream, not bad input)."""
    raw_contents = response.raw_output_contents
    if len(raw_contents) != len(response.outputs):
        raise ValueError(
            f"the response has {len(raw_contents)} raw contents for {len(response.outputs)} outputs"
        )
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor, raw in zip(response.outputs, raw_contents, strict=True):
        shape = list(tensor.shape)
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}
        parameters = _parameters_json(tensor.parameters)
        data = None if preferences.is_binary(tensor.name) else _json_data(raw, tensor.datatype, shape)
        if data is None:
            parameters["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = data
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    parameters = _parameters_json(response.parameters)
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = outputs
    header = _dump(document)
    if not chunks:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    return b"".join([header, *chunks]), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def _json_data(raw: bytes, datatype: str, shape: Sequence[int]) -> list[Any] | None:
    """An output's elements as a flat JSON list, or ``None`` when JSON cannot carry them."""
    if datatype in STRUCT_CODES:
        # Python numbers; a float32's float64 value parses back to the same float32
        return unpack_values(raw, datatype, math.prod(shape))
    if datatype != BYTES:  # BF16, or a datatype JSON has no numbers for
        return None
    array = from_raw(raw, datatype, shape)
    try:
        return [element.decode() for element in array.ravel()]
    except UnicodeDecodeError:
        return None


def _parameters_json(parameters: Any) -> dict[str, Any]:
    if not parameters:  # most messages have none: skip the map's Python iteration
        return {}
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
        for key, value in parameters.items()
    }


# one encoder: json.dumps with options builds a new one per call
_encode: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dump(document: Mapping[str, Any]) -> bytes:
    # NaN and Infinity are written as python-rapidjson (tritonclient's decoder) reads them;
    # strict JSON has no spelling for a non-finite float
    return _encode(document).encode()


# Health and metadata


def server_metadata_json(metadata: pb.ServerMetadataResponse) -> bytes:
    """``GET /v2``: ``{"name", "version", "extensions"}``."""
    return _dump(
        {"name": metadata.name, "version": metadata.version, "extensions": list(metadata.extensions)}
    )


def model_metadata_json(metadata: pb.ModelMetadataResponse) -> bytes:
    """``GET /v2/models/{name}[/versions/{v}]``: ``{"name", "versions", "platform", "inputs",
    "outputs"}``, each tensor ``{"name", "datatype", "shape"}`` with -1 for a variable dimension.

    Written by hand rather than by ``json_format``: proto3 JSON spells int64 shapes as strings,
    and the REST binding (and tritonclient's users) expect numbers."""

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return _dump(
        {
            "name": metadata.name,
            "versions": list(metadata.versions),
            "platform": metadata.platform,
            "inputs": tensors(metadata.inputs),
            "outputs": tensors(metadata.outputs),
        }
    )
