"""Open Inference Protocol tensors <-> numpy arrays: the one place the scoring service converts them.

Requests are checked against the model's ``Signature`` before anything runs, and every problem
found is reported at once, in one ``InvalidArgument`` whose field violations name the tensor.
Decoding follows Triton's rules: an input carries its values either in its typed ``contents``
or, for every input of the request, in ``raw_input_contents`` (little-endian, row-major; a
BYTES element is a 4-byte little-endian length followed by its bytes). FP16 and BF16 have no
typed field and travel raw only; BF16 decodes to ``ml_dtypes.bfloat16`` (a dependency of onnx).

Arrays decoded from raw contents are read-only views of the request's bytes, not copies:
nothing downstream may write to an input. BYTES tensors are object arrays of ``bytes``.
Responses are always encoded raw, as Triton answers by default.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import ml_dtypes
import numpy as np

from services.mesh.errors import FieldViolation, InvalidArgument, ResourceExhausted, raise_for_violations
from services.registry.domain import Signature, TensorSpec
from services.scoring.backend import Array, LoadedVersion
from services.scoring.oip import pb

BYTES: Final = "BYTES"

NUMPY_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    BYTES: np.dtype(object),
}
"""Each Open Inference Protocol datatype and the numpy dtype its tensors decode to."""

# The typed contents field each datatype travels in (FP16 and BF16 have none), and the dtype
# protobuf holds that field's values in: narrower integers are widened on the wire.
_CONTENTS_FIELD: Final[Mapping[str, str]] = {
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
    BYTES: "bytes_contents",
}
_FIELD_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "bool_contents": np.dtype(np.bool_),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}
_ALL_CONTENTS_FIELDS: Final = (*_FIELD_DTYPES, "bytes_contents")

_LENGTH_PREFIX = struct.Struct("<I")
_REASON_INVALID = "INVALID_TENSOR"


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    """A checked ``ModelInferRequest``: its inputs as arrays, the outputs to return (the
    requested ones in the request's order, else all of the signature's in its order) and the
    decoded size of the inputs in bytes (for BYTES, the sum of the elements' lengths)."""

    inputs: dict[str, Array]
    outputs: tuple[str, ...]
    nbytes: int


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an Open Inference Protocol datatype (``KeyError`` if unknown)."""
    return NUMPY_DTYPES[datatype]


def datatype_of(array: Array) -> str:
    """The Open Inference Protocol datatype of an array: object, ``bytes_`` and ``str_`` arrays
    are BYTES; ``ml_dtypes.bfloat16`` is BF16."""
    dtype = array.dtype
    if dtype.kind in "OSU":
        return BYTES
    if dtype == NUMPY_DTYPES["BF16"]:
        return "BF16"
    # looked up without byte order: a big-endian FP32 is FP32 too, swapped when encoded
    datatype = _DATATYPES_BY_KIND.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise TypeError(f"no Open Inference Protocol datatype for numpy dtype {dtype}")
    return datatype


_DATATYPES_BY_KIND: Final[Mapping[tuple[str, int], str]] = {
    (dtype.kind, dtype.itemsize): datatype
    for datatype, dtype in NUMPY_DTYPES.items()
    if datatype not in (BYTES, "BF16")
}


# Requests


def decode_request(
    request: pb.ModelInferRequest, signature: Signature, *, max_bytes: int | None = None
) -> DecodedRequest:
    """Checks ``request`` against ``signature`` and decodes its inputs.

    Raises ``InvalidArgument`` listing every problem (unknown, missing or repeated inputs,
    datatype or shape mismatches, contents that disagree with the shape, typed and raw contents
    mixed, unknown requested outputs, an empty batch), then ``ResourceExhausted`` when the
    decoded inputs would exceed ``max_bytes``. Nothing is allocated for a request's values
    before both checks have passed, except the element list of a raw BYTES tensor."""
    violations: list[FieldViolation] = []
    plans = _plan_inputs(request, signature, violations)
    outputs = _requested_outputs(request, signature, violations)
    raise_for_violations(violations, reason=_REASON_INVALID)
    nbytes = sum(plan.nbytes for plan in plans)
    if max_bytes is not None and nbytes > max_bytes:
        raise ResourceExhausted(
            f"the request's inputs take {nbytes} bytes decoded; the limit is {max_bytes}",
            reason="REQUEST_TOO_LARGE",
            metadata={"bytes": str(nbytes), "limit": str(max_bytes)},
        )
    inputs = {plan.name: plan.decode(violations) for plan in plans}
    raise_for_violations(violations, reason=_REASON_INVALID)
    return DecodedRequest(inputs=inputs, outputs=outputs, nbytes=nbytes)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One input that passed the structural checks, with what it takes to decode it."""

    name: str
    nbytes: int
    decode: Callable[[list[FieldViolation]], Array]
    """Decodes the values, adding a violation for any value the datatype cannot hold."""


def _plan_inputs(
    request: pb.ModelInferRequest, signature: Signature, violations: list[FieldViolation]
) -> list[_Plan]:
    specs = {spec.name: spec for spec in signature.inputs}
    raw_contents = request.raw_input_contents
    use_raw = len(raw_contents) > 0
    if use_raw and len(raw_contents) != len(request.inputs):
        violations.append(
            FieldViolation(
                "raw_input_contents",
                f"has {len(raw_contents)} entries for {len(request.inputs)} inputs; "
                "raw contents need exactly one entry per input, in order",
            )
        )
    plans: list[_Plan] = []
    seen: set[str] = set()
    for index, tensor in enumerate(request.inputs):
        where = f"inputs[{index}]"
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(repr(s.name) for s in signature.inputs) or "none"
            violations.append(
                FieldViolation(
                    f"{where}.name", f"{name!r} is not an input of the model (its inputs: {known})"
                )
            )
            continue
        if name in seen:
            violations.append(FieldViolation(f"{where}.name", f"input {name!r} is given more than once"))
            continue
        seen.add(name)
        raw = raw_contents[index] if use_raw and index < len(raw_contents) else None
        plan = _plan_input(index, tensor, spec, use_raw, raw, violations)
        if plan is not None:
            plans.append(plan)
    for spec in signature.inputs:
        if spec.name not in seen:
            violations.append(FieldViolation("inputs", f"input {spec.name!r} is missing"))
    return plans


def _plan_input(
    index: int,
    tensor: pb.ModelInferRequest.InferInputTensor,
    spec: TensorSpec,
    use_raw: bool,
    raw: bytes | None,
    violations: list[FieldViolation],
) -> _Plan | None:
    where = f"inputs[{index}]"
    name = tensor.name
    before = len(violations)
    if tensor.datatype != spec.datatype:
        violations.append(
            FieldViolation(
                f"{where}.datatype",
                f"input {name!r} is {tensor.datatype or '(unset)'}; the model takes {spec.datatype}",
            )
        )
    elif spec.datatype not in NUMPY_DTYPES:
        violations.append(
            FieldViolation(f"{where}.datatype", f"input {name!r}: datatype {spec.datatype} is not supported")
        )
    shape = tuple(tensor.shape)
    violations.extend(_shape_violations(f"{where}.shape", name, shape, spec.shape))
    typed_fields = [f for f in _ALL_CONTENTS_FIELDS if len(getattr(tensor.contents, f)) > 0]
    if use_raw and typed_fields:
        violations.append(
            FieldViolation(
                f"{where}.contents",
                f"input {name!r} has typed contents ({', '.join(typed_fields)}) while the request "
                "uses raw_input_contents; send every input one way",
            )
        )
    if len(violations) > before:
        return None
    dtype = NUMPY_DTYPES[spec.datatype]
    count = math.prod(shape)
    if raw is not None:
        return _plan_raw(f"raw_input_contents[{index}]", name, dtype, shape, count, raw, violations)
    if use_raw:
        return None  # too few raw entries: reported once for the whole request
    return _plan_typed(where, tensor, spec.datatype, dtype, shape, count, typed_fields, violations)


def _shape_violations(
    field: str, name: str, shape: tuple[int, ...], expected: tuple[int, ...]
) -> list[FieldViolation]:
    if any(dim < 0 for dim in shape):
        return [FieldViolation(field, f"input {name!r} has a negative dimension in {list(shape)}")]
    if len(shape) != len(expected) or any(
        want != -1 and dim != want for dim, want in zip(shape, expected, strict=False)
    ):
        return [
            FieldViolation(
                field,
                f"input {name!r} has shape {list(shape)}; the model takes {list(expected)} (-1: any size)",
            )
        ]
    if shape and shape[0] == 0:
        return [FieldViolation(field, f"input {name!r} has an empty batch (axis 0 is 0)")]
    return []


def _plan_raw(
    field: str,
    name: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
    raw: bytes,
    violations: list[FieldViolation],
) -> _Plan | None:
    if dtype.kind == "O":
        elements, problem = split_bytes(raw, count)
        if problem:
            violations.append(FieldViolation(field, f"input {name!r}: {problem}"))
            return None
        payload = len(raw) - _LENGTH_PREFIX.size * count
        return _Plan(name, payload, lambda _: _object_array(elements, shape))
    expected = count * dtype.itemsize
    if len(raw) != expected:
        violations.append(
            FieldViolation(
                field,
                f"input {name!r} has {len(raw)} bytes; shape {list(shape)} of "
                f"{datatype_of(np.empty(0, dtype))} needs {expected}",
            )
        )
        return None

    def decode(found: list[FieldViolation]) -> Array:
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        # any byte but 0 and 1 would be a bool that C++ kernels are not required to handle
        if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
            found.append(FieldViolation(field, f"input {name!r}: BOOL bytes must be 0 or 1"))
        return array

    return _Plan(name, expected, decode)


def _plan_typed(
    where: str,
    tensor: pb.ModelInferRequest.InferInputTensor,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
    typed_fields: list[str],
    violations: list[FieldViolation],
) -> _Plan | None:
    name = tensor.name
    field = f"{where}.contents"
    expected_field = _CONTENTS_FIELD.get(datatype)
    if expected_field is None:
        violations.append(
            FieldViolation(field, f"input {name!r}: {datatype} has no typed contents; send it raw")
        )
        return None
    stray = [f for f in typed_fields if f != expected_field]
    if stray:
        violations.append(
            FieldViolation(
                field, f"input {name!r} is {datatype}, carried in {expected_field}, not {', '.join(stray)}"
            )
        )
        return None
    values = getattr(tensor.contents, expected_field)
    if len(values) != count:
        violations.append(
            FieldViolation(
                field,
                f"input {name!r} has {len(values)} values in {expected_field}; "
                f"shape {list(shape)} needs {count}",
            )
        )
        return None
    if dtype.kind == "O":
        payload = sum(len(value) for value in values)
        return _Plan(name, payload, lambda _: _object_array(list(values), shape))

    def decode(found: list[FieldViolation]) -> Array:
        # fromiter: about twice as fast as np.asarray on a protobuf repeated field
        wide = np.fromiter(values, dtype=_FIELD_DTYPES[expected_field], count=count)
        if wide.dtype == dtype:
            return wide.reshape(shape)
        limits = np.iinfo(dtype)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            found.append(
                FieldViolation(
                    field, f"input {name!r}: a value is outside {datatype}'s [{limits.min}, {limits.max}]"
                )
            )
        return wide.astype(dtype).reshape(shape)

    return _Plan(name, count * dtype.itemsize, decode)


def _requested_outputs(
    request: pb.ModelInferRequest, signature: Signature, violations: list[FieldViolation]
) -> tuple[str, ...]:
    known = [spec.name for spec in signature.outputs]
    if not request.outputs:
        return tuple(known)
    names: list[str] = []
    for index, output in enumerate(request.outputs):
        if output.name not in known:
            listed = ", ".join(repr(name) for name in known)
            violations.append(
                FieldViolation(
                    f"outputs[{index}].name",
                    f"{output.name!r} is not an output of the model (its outputs: {listed})",
                )
            )
        elif output.name in names:
            violations.append(
                FieldViolation(f"outputs[{index}].name", f"output {output.name!r} is requested twice")
            )
        else:
            names.append(output.name)
    return tuple(names)


# BYTES


def split_bytes(raw: bytes, count: int) -> tuple[list[bytes], str]:
    """Splits Triton's length-prefixed BYTES encoding into exactly ``count`` elements.

    Returns the elements and an empty string, or what is wrong with ``raw``."""
    elements: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if len(elements) == count:
            return elements, f"has bytes after its {count} elements"
        if end - offset < _LENGTH_PREFIX.size:
            return elements, f"element {len(elements)}'s 4-byte length prefix is cut short"
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += _LENGTH_PREFIX.size
        if end - offset < length:
            return elements, f"element {len(elements)} claims {length} bytes; {end - offset} are left"
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        return elements, f"has {len(elements)} BYTES elements; its shape needs {count}"
    return elements, ""


def join_bytes(array: Array) -> bytes:
    """Triton's BYTES encoding of an array of ``bytes`` (``str`` elements are UTF-8 encoded),
    row-major."""
    parts: list[bytes] = []
    for element in array.ravel(order="C"):
        if isinstance(element, str):
            data = element.encode()
        elif isinstance(element, bytes | bytearray | memoryview | np.bytes_):
            data = bytes(element)
        else:  # bytes(3) would be three zero bytes, not an error
            raise TypeError(f"a BYTES element must be bytes or str, not {type(element).__name__}")
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _object_array(elements: Sequence[bytes], shape: tuple[int, ...]) -> Array:
    # filled element by element: np.array(list_of_bytes, dtype=object) is right today, but an
    # empty list or nested sequences would change its shape
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


# Raw encoding, shared by responses and the cache key


STRUCT_CODES: Final[Mapping[str, str]] = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
"""The :mod:`struct` code of each fixed-size datatype's element (BF16 has none)."""


def pack_values(values: Sequence[Any], datatype: str) -> bytes:
    """Python numbers as ``datatype``'s raw contents, rounded as numpy rounds them, without
    building an array (for JSON tensors, mostly a few values). The caller checks their types;
    raises ``struct.error`` or ``OverflowError`` when one is outside ``datatype``'s range."""
    return struct.pack(f"<{len(values)}{STRUCT_CODES[datatype]}", *values)


def unpack_values(raw: bytes, datatype: str, count: int) -> list[Any]:
    """The inverse of :func:`pack_values`: ``count`` Python numbers (floats for FP16 and FP32
    hold their exact value); ``ValueError`` when ``raw`` is not ``count`` elements long."""
    code = STRUCT_CODES[datatype]
    if len(raw) != count * struct.calcsize(code):
        raise ValueError(f"{len(raw)} bytes cannot hold {count} {datatype} values")
    return list(struct.unpack(f"<{count}{code}", raw))


def raw_bytes(array: Array) -> bytes:
    """An array's raw Open Inference Protocol encoding: little-endian, row-major values, or
    length-prefixed elements for BYTES."""
    if datatype_of(array) == BYTES:
        return join_bytes(array)
    return _little_endian(array).tobytes(order="C")


def from_raw(raw: bytes, datatype: str, shape: Sequence[int]) -> Array:
    """The inverse of ``raw_bytes`` (a read-only view for fixed-size datatypes); raises
    ``ValueError`` when ``raw`` does not hold ``shape``'s elements."""
    dtype = NUMPY_DTYPES[datatype]
    count = math.prod(shape)
    if dtype.kind == "O":
        elements, problem = split_bytes(raw, count)
        if problem:
            raise ValueError(problem)
        return _object_array(elements, tuple(shape))
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"{len(raw)} bytes cannot hold {count} {datatype} values")
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def _little_endian(array: Array) -> Array:
    byteorder = array.dtype.byteorder
    if byteorder == ">" or (byteorder == "=" and not np.little_endian):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


# Responses


def encode_response(
    outputs: Mapping[str, Array],
    names: Sequence[str],
    *,
    model_name: str,
    model_version: str | int,
    request_id: str,
    backend: str,
    parameters: Mapping[str, str | int | bool | float] | None = None,
) -> pb.ModelInferResponse:
    """A ``ModelInferResponse`` carrying ``outputs[name]`` for each of ``names``, in that order,
    as raw contents; each output's datatype is its array's. ``backend`` becomes the ``backend``
    string parameter, beside any other ``parameters``. Raises ``KeyError`` for a name that
    ``outputs`` lacks: a backend that drops a requested output is a bug, not bad input."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=str(model_version), id=request_id)
    for key, value in {**(parameters or {}), "backend": backend}.items():
        _set_parameter(response.parameters[key], value)
    raw_contents: list[bytes] = []
    for name in names:
        array = outputs[name]
        response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        raw_contents.append(raw_bytes(array))
    response.raw_output_contents.extend(raw_contents)
    return response


def model_metadata(version: LoadedVersion) -> pb.ModelMetadataResponse:
    """ModelMetadata for a version: its signature, -1 for every variable dimension."""
    metadata = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=version.model,
        versions=[str(version.version)],
        platform="onnxruntime_onnx",
        inputs=[metadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in version.signature.inputs],
        outputs=[
            metadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in version.signature.outputs
        ],
    )


def _set_parameter(parameter: pb.InferParameter, value: str | int | bool | float) -> None:
    # bool before int: bool is an int subclass
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value


# Cache keys, batches and sample inputs


def canonical_key(inputs: Mapping[str, Array], outputs: Sequence[str], *, scope: str = "") -> bytes:
    """A 32-byte BLAKE2b digest of a request, for the response cache.

    It covers ``scope`` (say, the model and version), each input's name, datatype, shape and
    values, in name order (so dict order does not matter), and ``outputs`` in the order given:
    that order is the response's, so it is part of what is cached. Every part is length-prefixed,
    so no two different requests concatenate to the same stream."""
    digest = hashlib.blake2b(digest_size=32, person=b"scoremesh.key.v1")
    _update_text(digest, scope)
    digest.update(len(inputs).to_bytes(8, "little"))
    for name in sorted(inputs):
        array = inputs[name]
        _update_text(digest, name)
        _update_text(digest, datatype_of(array))
        digest.update(len(array.shape).to_bytes(8, "little"))
        digest.update(np.asarray(array.shape, dtype="<i8").tobytes())
        if datatype_of(array) == BYTES:
            payload = join_bytes(array)
            digest.update(len(payload).to_bytes(8, "little"))
            digest.update(payload)
        else:
            # hashed in place: a view of the values' bytes, copied only if not contiguous
            values = np.ascontiguousarray(_little_endian(array)).view(np.uint8)
            digest.update(values.size.to_bytes(8, "little"))
            digest.update(values.data)
    digest.update(len(outputs).to_bytes(8, "little"))
    for name in outputs:
        _update_text(digest, name)
    return digest.digest()


def _update_text(digest: Any, text: str) -> None:
    data = text.encode()
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def batch_rows(inputs: Mapping[str, Array]) -> int:
    """The rows (axis 0) of a batch: the same for every input, or ``InvalidArgument`` naming the
    inputs that disagree or have no axis 0."""
    if not inputs:
        raise InvalidArgument.for_field("inputs", "a batch needs at least one input", reason=_REASON_INVALID)
    violations: list[FieldViolation] = []
    rows: int | None = None
    first = ""
    for name, array in inputs.items():
        if array.ndim == 0:
            violations.append(FieldViolation(name, f"input {name!r} is a scalar: it has no batch axis"))
        elif rows is None:
            rows, first = array.shape[0], name
        elif array.shape[0] != rows:
            violations.append(
                FieldViolation(name, f"input {name!r} has {array.shape[0]} rows; {first!r} has {rows}")
            )
    raise_for_violations(violations, reason=_REASON_INVALID)
    assert rows is not None  # every input was a scalar otherwise, which raised above
    return rows


def sample_inputs(signature: Signature, rows: int = 1) -> dict[str, Array]:
    """Inputs any model with ``signature`` accepts, for warm-ups and canaries: zeros (``b""``
    for BYTES), a variable axis 0 of ``rows`` and every other variable dimension 1."""
    samples: dict[str, Array] = {}
    for spec in signature.inputs:
        shape = tuple((rows if axis == 0 else 1) if dim == -1 else dim for axis, dim in enumerate(spec.shape))
        dtype = NUMPY_DTYPES[spec.datatype]
        samples[spec.name] = (
            np.full(shape, b"", dtype=object) if dtype.kind == "O" else np.zeros(shape, dtype)
        )
    return samples
