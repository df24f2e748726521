"""The gateway's OpenAPI document, generated from the same ``google.api.http`` bindings that route
its requests, and a self-contained page that renders it.

Pure: :func:`openapi_document` turns :class:`~services.gateway.http_rules.HttpBinding` values
into an OpenAPI 3.1 document (a dict ready for ``json.dumps``); :func:`docs_html` returns the
docs page. Nothing here touches the network or the file system.

What the document says follows what :mod:`services.gateway.transcoding` does:

* JSON is proto3 JSON with lowerCamel names (``FieldDescriptor.json_name``), int64 as strings,
  bytes as base64, enums by name, Timestamp as RFC 3339 text, FieldMask as one string;
* path variables keep the template's names (``{model}``, ``{request_id}``); fields that neither
  the path nor the body sets are query parameters (top-level and one level of nesting, dotted);
* server-streaming responses are NDJSON (``application/x-ndjson``), one message per line;
  an upload (a client stream of metadata then bytes) takes a raw ``application/octet-stream``
  body, its metadata from the path and the query.

The Open Inference Protocol's REST binding (``/v2``) and the gateway's own routes are not
described by any proto: they are a small hand-written part of the document, tagged as such
(``x-scoremesh-hand-written``).

Descriptions come from the protos' comments when the caller passes them (see
:func:`source_comments`; the generated modules carry no comments), otherwise from the names.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from services.gateway.http_rules import HttpBinding
from services.gateway.transcoding import upload_shape

__all__ = [
    "ERROR_STATUSES",
    "OPENAPI_VERSION",
    "UNAUTHENTICATED_PATHS",
    "docs_html",
    "openapi_document",
    "source_comments",
]

OPENAPI_VERSION: Final = "3.1.0"
"""3.1 rather than 3.0: its schemas are JSON Schema 2020-12, so a ``$ref`` may carry its own
description, bytes say ``contentEncoding: base64`` and int64 can be a string with a format."""

ERROR_STATUSES: Final[Mapping[int, str]] = {
    400: "The request is malformed or names a bad field (INVALID_ARGUMENT, FAILED_PRECONDITION, "
    "OUT_OF_RANGE).",
    401: "No API key, or an unknown one (UNAUTHENTICATED).",
    403: "The key may not do this (PERMISSION_DENIED).",
    404: "No such resource, or one the caller may not see (NOT_FOUND), or no such route.",
    409: "The resource exists already, or changed meanwhile (ALREADY_EXISTS, ABORTED).",
    413: "The request body is larger than the gateway accepts.",
    429: "The key's quota is spent (RESOURCE_EXHAUSTED); Retry-After says when to try again.",
    503: "A service behind the gateway is unavailable (UNAVAILABLE); retrying may succeed.",
    504: "The call ran out of time (DEADLINE_EXCEEDED).",
}
"""The error statuses every operation documents, each with the same ``Error`` body."""

UNAUTHENTICATED_PATHS: Final = frozenset(
    {"/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs", "/healthz"}
)
"""The routes that take no API key; every other operation needs ``Authorization: Bearer``."""

NDJSON: Final = "application/x-ndjson"
OCTET_STREAM: Final = "application/octet-stream"
JSON: Final = "application/json"

_SECURITY_SCHEME: Final = "bearerAuth"
_HAND_WRITTEN: Final = "x-scoremesh-hand-written"
_OIP_TAG: Final = "OpenInferenceProtocol"
_GATEWAY_TAG: Final = "Gateway"

# Well-known types that proto3 JSON writes as something other than an object of their fields.
_WELL_KNOWN: Final[Mapping[str, Mapping[str, Any]]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated lowerCamel field paths (`description,visibility`).",
    },
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": {"type": ["number", "null"]},
    "google.protobuf.FloatValue": {"type": ["number", "null"]},
    "google.protobuf.Int64Value": {"type": ["string", "null"], "format": "int64"},
    "google.protobuf.UInt64Value": {"type": ["string", "null"], "format": "uint64"},
    "google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"], "format": "uint32"},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
}
# ...and of those, the ones a query parameter or a path variable can carry as one text
_TEXT_MESSAGES: Final = frozenset(
    name for name, schema in _WELL_KNOWN.items() if schema.get("type") not in ("object", "array", None)
)

_T = FieldDescriptor
_INT64_TYPES: Final = frozenset({_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64})
_UINT64_TYPES: Final = frozenset({_T.TYPE_UINT64, _T.TYPE_FIXED64})
_INT32_TYPES: Final = frozenset({_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32})
_UINT32_TYPES: Final = frozenset({_T.TYPE_UINT32, _T.TYPE_FIXED32})


# Descriptions


def _words(name: str) -> str:
    """``GetModel`` or ``page_size`` as words: ``Get model``, ``Page size``."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ").strip()
    return spaced[:1].upper() + spaced[1:].lower()


def _normalize_comment(text: str) -> str:
    # protoc keeps the comment's line breaks and the space after "//"; paragraphs survive
    paragraphs = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def source_comments(file_set: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """The leading comment of every service, method, message, field, oneof, enum and enum value
    in ``file_set`` (built with source info: ``protoc --include_source_info
    --descriptor_set_out``), by full name; an enum value as ``package.Enum.VALUE``."""
    comments: dict[str, str] = {}
    for file in file_set.file:
        names: dict[tuple[int, ...], str] = {}
        prefix = f"{file.package}." if file.package else ""
        # field numbers of FileDescriptorProto: message_type 4, enum_type 5, service 6
        for i, message in enumerate(file.message_type):
            _message_names(names, (4, i), prefix + message.name, message)
        for i, enum in enumerate(file.enum_type):
            _enum_names(names, (5, i), prefix + enum.name, enum)
        for i, service in enumerate(file.service):
            names[(6, i)] = prefix + service.name
            for j, method in enumerate(service.method):
                names[(6, i, 2, j)] = f"{prefix}{service.name}.{method.name}"
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            if name is not None and location.leading_comments.strip():
                comments[name] = _normalize_comment(location.leading_comments)
    return comments


def _message_names(
    names: dict[tuple[int, ...], str],
    path: tuple[int, ...],
    full: str,
    message: descriptor_pb2.DescriptorProto,
) -> None:
    # field numbers of DescriptorProto: field 2, nested_type 3, enum_type 4, oneof_decl 8
    names[path] = full
    for i, field in enumerate(message.field):
        names[(*path, 2, i)] = f"{full}.{field.name}"
    for i, oneof in enumerate(message.oneof_decl):
        names[(*path, 8, i)] = f"{full}.{oneof.name}"
    for i, nested in enumerate(message.nested_type):
        _message_names(names, (*path, 3, i), f"{full}.{nested.name}", nested)
    for i, enum in enumerate(message.enum_type):
        _enum_names(names, (*path, 4, i), f"{full}.{enum.name}", enum)


def _enum_names(
    names: dict[tuple[int, ...], str],
    path: tuple[int, ...],
    full: str,
    enum: descriptor_pb2.EnumDescriptorProto,
) -> None:
    names[path] = full
    for i, value in enumerate(enum.value):  # EnumDescriptorProto.value is field 2
        names[(*path, 2, i)] = f"{full}.{value.name}"


# Schemas from descriptors


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


class _Schemas:
    """Component schemas, built on demand from message and enum descriptors. A component is
    registered before its fields are visited, so a recursive message is a ``$ref`` to itself
    instead of an endless expansion."""

    def __init__(self, comments: Mapping[str, str]) -> None:
        self.components: dict[str, Any] = {}
        self._comments = comments

    def comment(self, full_name: str) -> str | None:
        return self._comments.get(full_name)

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        """A schema for a whole message: inline for a well-known type, a ``$ref`` otherwise."""
        known = _WELL_KNOWN.get(descriptor.full_name)
        if known is not None:
            return copy.deepcopy(dict(known))  # callers add descriptions to it
        name = descriptor.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder first: recursion stops here
            self.components[name] = self._message_component(descriptor)
        return _ref(name)

    def _message_component(self, descriptor: Descriptor) -> dict[str, Any]:
        properties = {field.json_name: self.field(field) for field in descriptor.fields}
        schema: dict[str, Any] = {
            "type": "object",
            "description": self.comment(descriptor.full_name) or f"The `{descriptor.name}` message.",
            "properties": properties,
            # proto3 JSON parsers reject unknown fields, and so does the gateway
            "additionalProperties": False,
        }
        oneofs = {
            oneof.name: [f.json_name for f in oneof.fields]
            for oneof in descriptor.oneofs
            # a proto3 `optional` is a synthetic oneof of one field: nothing to choose between
            if not (len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}")
        }
        if oneofs:
            schema["x-oneofs"] = oneofs
            lines = [
                f"Oneof `{name}`: at most one of {', '.join(f'`{f}`' for f in fields)}."
                + (f" {comment}" if (comment := self.comment(f"{descriptor.full_name}.{name}")) else "")
                for name, fields in oneofs.items()
            ]
            schema["description"] += "\n\n" + "\n".join(lines)
        return schema

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        name = descriptor.full_name
        if name not in self.components:
            values = [
                f"* `{v.name}`" + (f": {c}" if (c := self.comment(f"{name}.{v.name}")) else "")
                for v in descriptor.values
            ]
            intro = self.comment(name) or f"The `{descriptor.name}` enum."
            self.components[name] = {
                "type": "string",
                "enum": [v.name for v in descriptor.values],
                "description": intro + "\n\n" + "\n".join(values),
            }
        return _ref(name)

    def _single(self, field: FieldDescriptor, *, in_url: bool) -> dict[str, Any]:
        """The schema of one value of ``field`` (an element, if the field is repeated).
        ``in_url``: a path or query text, where int64 is just digits, not a JSON string."""
        kind = field.type
        if kind == _T.TYPE_MESSAGE:
            return self.message(field.message_type)
        if kind == _T.TYPE_ENUM:
            return self.enum(field.enum_type)
        if kind in _INT64_TYPES or kind in _UINT64_TYPES:
            fmt = "int64" if kind in _INT64_TYPES else "uint64"
            if in_url:
                return {"type": "integer", "format": fmt}
            # proto3 JSON writes 64-bit integers as strings: a double loses digits past 2^53
            return {"type": "string", "format": fmt, "pattern": r"^-?[0-9]+$"}
        if kind in _INT32_TYPES:
            return {"type": "integer", "format": "int32"}
        if kind in _UINT32_TYPES:
            return {"type": "integer", "format": "uint32", "minimum": 0}
        if kind in (_T.TYPE_DOUBLE, _T.TYPE_FLOAT):
            return {"type": "number", "format": "double" if kind == _T.TYPE_DOUBLE else "float"}
        if kind == _T.TYPE_BOOL:
            return {"type": "boolean"}
        if kind == _T.TYPE_BYTES:
            return {"type": "string", "format": "byte", "contentEncoding": "base64"}
        return {"type": "string"}

    def field(self, field: FieldDescriptor, *, in_url: bool = False) -> dict[str, Any]:
        """The schema of ``field``'s JSON value, with its description."""
        if _is_map(field):
            value = field.message_type.fields_by_name["value"]
            values = self._single(value, in_url=False)
            schema: dict[str, Any] = {"type": "object", "additionalProperties": values}
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single(field, in_url=in_url)}
        else:
            schema = self._single(field, in_url=in_url)
        comment = self.comment(field.full_name)
        schema["description"] = comment or f"{_words(field.name)}."
        if field.containing_oneof is not None and len(field.containing_oneof.fields) > 1:
            oneof = field.containing_oneof
            others = ", ".join(f"`{f.json_name}`" for f in oneof.fields if f is not field)
            schema["description"] += f" (Oneof `{oneof.name}`: not with {others}.)"
        if comment and re.search(r"\boutput only\b", comment, re.IGNORECASE):
            schema["readOnly"] = True
        return schema


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == _T.TYPE_MESSAGE and bool(field.message_type.GetOptions().map_entry)


def _is_text(field: FieldDescriptor) -> bool:
    """Whether a path or query text can set ``field``: a scalar, an enum, a repeated one of
    those, or a well-known message that proto3 JSON writes as one string or number."""
    if _is_map(field):
        return False
    return field.type != _T.TYPE_MESSAGE or field.message_type.full_name in _TEXT_MESSAGES


# Operations


def _service_name(binding: HttpBinding) -> str:
    return binding.service.rsplit(".", 1)[-1]


def _shape(binding: HttpBinding) -> tuple[tuple[str, ...], str]:
    """The template with its variable names erased: OpenAPI holds two templates that differ
    only in those names to be the same path, which MUST NOT appear twice."""
    segments = tuple("{}" if s.startswith("{") else s for s in binding.path.segments)
    return segments, binding.path.verb


def _path_key(segments: Sequence[str], verb: str) -> str:
    return "/" + "/".join(segments) + (f":{verb}" if verb else "")


def _query_parameters(
    schemas: _Schemas, descriptor: Descriptor, bound: Sequence[str]
) -> list[dict[str, Any]]:
    """Query parameters for the fields of ``descriptor`` that ``bound`` (proto field paths set
    by the path or the body) leaves free: scalars at the top level and one level down, dotted
    (``card.description``), by lowerCamel name as the responses spell them; the gateway
    accepts proto names too."""

    def covered(path: str) -> bool:
        return any(path == b or path.startswith(f"{b}.") for b in bound)

    parameters: list[dict[str, Any]] = []

    def add(name: str, field: FieldDescriptor) -> None:
        schema = schemas.field(field, in_url=True)
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": False,
            "description": schema.pop("description"),
            "schema": schema,
        }
        if field.is_repeated:
            parameter.update(style="form", explode=True)  # ?models=a&models=b
        parameters.append(parameter)

    for field in descriptor.fields:
        if covered(field.name):
            continue
        if _is_text(field):
            add(field.json_name, field)
        elif not field.is_repeated and not _is_map(field) and field.message_type.full_name not in _WELL_KNOWN:
            for sub in field.message_type.fields:
                if _is_text(sub) and not covered(f"{field.name}.{sub.name}"):
                    add(f"{field.json_name}.{sub.json_name}", sub)
    return parameters


def _error_responses() -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in ERROR_STATUSES}


class _Builder:
    def __init__(self, comments: Mapping[str, str]) -> None:
        self.schemas = _Schemas(comments)
        self.paths: dict[str, dict[str, Any]] = {}
        # shape -> the path key that holds it, so that later templates reuse its names
        self._keys: dict[tuple[tuple[str, ...], str], tuple[str, tuple[str, ...]]] = {}
        self._operation_ids: set[str] = set()

    def add(self, binding: HttpBinding) -> None:
        shape = _shape(binding)
        if shape not in self._keys:
            self._keys[shape] = (
                _path_key(binding.path.segments, binding.path.verb),
                tuple(binding.path.variables),
            )
        key, names = self._keys[shape]
        item = self.paths.setdefault(key, {})
        method = binding.http_method.lower()
        if method in item:
            raise ValueError(f"two bindings for {binding.http_method} {key}: {binding.grpc_path}")
        item[method] = self._operation(binding, names)

    def _operation_id(self, binding: HttpBinding) -> str:
        base = f"{_service_name(binding)}_{binding.method}"
        candidate, n = base, 1
        while candidate in self._operation_ids:  # additional bindings of one method
            n += 1
            candidate = f"{base}_{n}"
        self._operation_ids.add(candidate)
        return candidate

    def _operation(self, binding: HttpBinding, names: Sequence[str]) -> dict[str, Any]:
        schemas = self.schemas
        method_comment = schemas.comment(f"{binding.service}.{binding.method}")
        operation: dict[str, Any] = {
            "operationId": self._operation_id(binding),
            "tags": [_service_name(binding)],
            "summary": _words(binding.method),
            "description": (method_comment + "\n\n" if method_comment else "")
            + f"gRPC: `{binding.grpc_path}`.",
        }
        parameters = [
            self._path_parameter(binding.input_type, variable, name)
            for variable, name in zip(binding.path.variables, names, strict=True)
        ]
        bound = list(binding.path.variables)
        request_body: dict[str, Any] | None = None
        shape = upload_shape(binding)
        if shape is not None:
            # the metadata comes from the path and bare query names; the body is the bytes
            metadata = shape.metadata.name
            inner = [v.removeprefix(f"{metadata}.") for v in bound if v.startswith(f"{metadata}.")]
            parameters += _query_parameters(schemas, shape.metadata.message_type, inner)
            request_body = {
                "required": True,
                "description": f"The raw bytes of `{shape.chunk.name}`, streamed to the service in chunks.",
                "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
            }
        elif binding.client_streaming:
            operation["description"] += (
                "\n\nThis RPC streams its requests in a shape one HTTP body cannot carry: "
                "the gateway answers 501 (use gRPC)."
            )
        else:
            if binding.body:
                bound.append(binding.body)
            if binding.body != "*":
                parameters += _query_parameters(schemas, binding.input_type, bound)
            if binding.body:
                request_body = self._request_body(binding)
        if parameters:
            operation["parameters"] = parameters
        if request_body is not None:
            operation["requestBody"] = request_body
        operation["responses"] = {"200": self._response(binding), **_error_responses()}
        return operation

    def _path_parameter(self, descriptor: Descriptor, variable: str, name: str) -> dict[str, Any]:
        fields = _resolve(descriptor, variable)
        schema = self.schemas.field(fields[-1], in_url=True)
        description = schema.pop("description")
        if name != variable:
            description += f" (Sets `{variable}`.)"
        return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}

    def _request_body(self, binding: HttpBinding) -> dict[str, Any]:
        if binding.body == "*":
            schema = self.schemas.message(binding.input_type)
            description = "The request message; path variables override its fields."
        else:
            field = binding.input_type.fields_by_name[binding.body]
            schema = self.schemas.field(field)
            description = schema.pop("description")
        return {"required": True, "description": description, "content": {JSON: {"schema": schema}}}

    def _response(self, binding: HttpBinding) -> dict[str, Any]:
        if binding.response_body:
            schema = self.schemas.field(binding.output_type.fields_by_name[binding.response_body])
            schema.pop("description")
        else:
            schema = self.schemas.message(binding.output_type)
        if binding.server_streaming:
            return {
                "description": "A stream of messages, one JSON object per line; an error after the "
                'stream started arrives as a last line `{"error": Error}`.',
                "content": {NDJSON: {"schema": schema}},
            }
        return {"description": "OK.", "content": {JSON: {"schema": schema}}}


def _resolve(descriptor: Descriptor, dotted: str) -> list[FieldDescriptor]:
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    for name in dotted.split("."):
        if current is None or name not in current.fields_by_name:
            raise ValueError(f"path variable {dotted!r} names no field of {descriptor.full_name}")
        field = current.fields_by_name[name]
        fields.append(field)
        current = field.message_type
    return fields


# The hand-written part: the error body, the Open Inference Protocol, the gateway's own routes


def _error_components() -> tuple[dict[str, Any], dict[str, Any]]:
    schemas = {
        "Error": {
            "type": "object",
            "description": "A `google.rpc.Status` in proto3 JSON, as a gRPC client would have received it.",
            "properties": {
                "code": {
                    "type": "integer",
                    "format": "int32",
                    "description": "The gRPC code (google.rpc.Code), not the HTTP status.",
                },
                "message": {"type": "string", "description": "What went wrong, for developers."},
                "details": {
                    "type": "array",
                    "description": "`google.rpc.ErrorInfo`, `BadRequest` and other details, "
                    "each with its `@type`.",
                    "items": {
                        "type": "object",
                        "properties": {"@type": {"type": "string"}},
                        "additionalProperties": True,
                    },
                },
            },
            "required": ["code", "message", "details"],
        }
    }
    responses: dict[str, Any] = {}
    for status, text in ERROR_STATUSES.items():
        response: dict[str, Any] = {"description": text, "content": {JSON: {"schema": _ref("Error")}}}
        if status in (429, 503):
            response["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before trying again.",
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
        responses[f"Error{status}"] = response
    return schemas, responses


_OIP_DATATYPES: Final = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)


def _oip_schemas() -> dict[str, Any]:
    """KServe v2 (Open Inference Protocol) JSON bodies, after the protocol's REST document."""
    parameters = {
        "type": "object",
        "description": "Free-form parameters: string, number or boolean values.",
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    }
    shape = {"type": "array", "items": {"type": "integer", "format": "int64"}}
    datatype = {"type": "string", "enum": list(_OIP_DATATYPES)}
    tensor_data = {
        "description": "The elements in row-major order, flat or nested as the shape; "
        "BYTES elements as strings.",
        "type": "array",
        "items": {"type": ["number", "boolean", "string", "array"]},
    }
    return {
        "oip.Parameters": parameters,
        "oip.TensorData": tensor_data,
        "oip.MetadataTensor": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "datatype": datatype, "shape": shape},
            "required": ["name", "datatype", "shape"],
        },
        "oip.ModelMetadataResponse": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("oip.MetadataTensor")},
                "outputs": {"type": "array", "items": _ref("oip.MetadataTensor")},
            },
            "required": ["name", "platform"],
        },
        "oip.RequestInput": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "shape": shape,
                "datatype": datatype,
                "parameters": _ref("oip.Parameters"),
                "data": _ref("oip.TensorData"),
            },
            "required": ["name", "shape", "datatype", "data"],
        },
        "oip.RequestOutput": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "parameters": _ref("oip.Parameters")},
            "required": ["name"],
        },
        "oip.InferenceRequest": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "parameters": _ref("oip.Parameters"),
                "inputs": {"type": "array", "items": _ref("oip.RequestInput")},
                "outputs": {"type": "array", "items": _ref("oip.RequestOutput")},
            },
            "required": ["inputs"],
        },
        "oip.ResponseOutput": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "shape": shape,
                "datatype": datatype,
                "parameters": _ref("oip.Parameters"),
                "data": _ref("oip.TensorData"),
            },
            "required": ["name", "shape", "datatype", "data"],
        },
        "oip.InferenceResponse": {
            "type": "object",
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": _ref("oip.Parameters"),
                "outputs": {"type": "array", "items": _ref("oip.ResponseOutput")},
            },
            "required": ["model_name", "outputs"],
        },
    }


def _plain_operation(
    operation_id: str,
    tag: str,
    summary: str,
    ok: dict[str, Any],
    *,
    parameters: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if parameters:
        operation["parameters"] = list(parameters)
    operation["responses"] = {"200": ok, **_error_responses()}
    return operation


def _oip_paths() -> dict[str, dict[str, Any]]:
    name = {
        "name": "model_name",
        "in": "path",
        "required": True,
        "description": "The model's name.",
        "schema": {"type": "string"},
    }
    version = {
        "name": "model_version",
        "in": "path",
        "required": True,
        "description": "A version number or an alias; without it, the `production` alias.",
        "schema": {"type": "string"},
    }
    empty_ok = {"description": "Yes (the body may be empty).", "content": {JSON: {"schema": {}}}}

    def json_ok(schema: str) -> dict[str, Any]:
        return {"description": "OK.", "content": {JSON: {"schema": _ref(schema)}}}

    paths: dict[str, dict[str, Any]] = {
        "/v2/health/live": {
            "get": _plain_operation("OIP_ServerLive", _OIP_TAG, "Whether the server is live", empty_ok)
        },
        "/v2/health/ready": {
            "get": _plain_operation("OIP_ServerReady", _OIP_TAG, "Whether the server is ready", empty_ok)
        },
        "/v2": {
            "get": _plain_operation(
                "OIP_ServerMetadata",
                _OIP_TAG,
                "The server's name, version and protocol extensions",
                {
                    "description": "OK.",
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "version": {"type": "string"},
                                    "extensions": {"type": "array", "items": {"type": "string"}},
                                },
                                "required": ["name", "version", "extensions"],
                            }
                        }
                    },
                },
            )
        },
    }
    for prefix, params, suffix in (
        ("/v2/models/{model_name}", [name], ""),
        ("/v2/models/{model_name}/versions/{model_version}", [name, version], "Version"),
    ):
        paths[prefix] = {
            "get": _plain_operation(
                f"OIP_Model{suffix}Metadata",
                _OIP_TAG,
                "A model's inputs, outputs and versions",
                json_ok("oip.ModelMetadataResponse"),
                parameters=params,
            )
        }
        paths[f"{prefix}/ready"] = {
            "get": _plain_operation(
                f"OIP_Model{suffix}Ready",
                _OIP_TAG,
                "Whether a model is ready to infer",
                empty_ok,
                parameters=params,
            )
        }
        infer = _plain_operation(
            f"OIP_Model{suffix}Infer",
            _OIP_TAG,
            "Runs an inference with JSON tensors",
            json_ok("oip.InferenceResponse"),
            parameters=params,
        )
        infer["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref("oip.InferenceRequest")}}}
        paths[f"{prefix}/infer"] = {"post": infer}
    return paths


def _gateway_paths() -> dict[str, dict[str, Any]]:
    return {
        "/healthz": {
            "get": _plain_operation(
                "Gateway_Health",
                _GATEWAY_TAG,
                "Whether the gateway is serving",
                {"description": "Serving.", "content": {JSON: {"schema": {"type": "object"}}}},
            )
        },
        "/openapi.json": {
            "get": _plain_operation(
                "Gateway_OpenApi",
                _GATEWAY_TAG,
                "This document",
                {"description": "OpenAPI 3.1.", "content": {JSON: {"schema": {"type": "object"}}}},
            )
        },
        "/docs": {
            "get": _plain_operation(
                "Gateway_Docs",
                _GATEWAY_TAG,
                "A page that renders this document",
                {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}},
            )
        },
    }


# The document


def openapi_document(
    bindings: Iterable[HttpBinding],
    *,
    title: str,
    version: str,
    server_url: str | None = None,
    comments: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The gateway's OpenAPI 3.1 document: one operation per binding (path items keyed by the
    template, custom verbs kept), then the hand-written Open Inference Protocol and gateway
    routes. Every operation documents the error statuses of :data:`ERROR_STATUSES` and needs a
    bearer API key, except :data:`UNAUTHENTICATED_PATHS`.

    ``comments`` (full proto name → text, see :func:`source_comments`) become descriptions;
    names stand in where there are none. Raises ValueError for two bindings of one method and
    path, or a path variable that names no field.
    """
    builder = _Builder(comments or {})
    bindings = list(bindings)
    for binding in bindings:
        builder.add(binding)
    hand_written = {**_oip_paths(), **_gateway_paths()}
    for path, item in hand_written.items():
        if path in builder.paths:
            raise ValueError(f"{path} is both bound by a proto and hand-written")
        for operation in item.values():
            if path in UNAUTHENTICATED_PATHS:
                operation["security"] = []  # overrides the document's bearer requirement
        item[_HAND_WRITTEN] = True
    error_schemas, error_responses = _error_components()
    services = list(dict.fromkeys(b.service for b in bindings))
    tags = [
        {
            "name": service.rsplit(".", 1)[-1],
            "description": (builder.schemas.comment(service) or f"The `{service}` service.")
            + f"\n\nGenerated from `{service}`'s `google.api.http` rules.",
        }
        for service in services
    ]
    tags += [
        {
            "name": _OIP_TAG,
            "description": "The Open Inference Protocol's REST binding (KServe v2), with JSON tensors. "
            "Hand-written: no proto describes it.",
        },
        {"name": _GATEWAY_TAG, "description": "The gateway's own routes. Hand-written."},
    ]
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "REST over the mesh's gRPC services. JSON is proto3 JSON: lowerCamel "
            "field names (proto names are accepted in requests), 64-bit integers as strings, "
            "bytes as base64, enums by name. Errors are `google.rpc.Status` objects.",
        },
    }
    if server_url is not None:
        document["servers"] = [{"url": server_url}]
    document.update(
        {
            "tags": tags,
            "security": [{_SECURITY_SCHEME: []}],
            "paths": {**builder.paths, **hand_written},
            "components": {
                "schemas": {**builder.schemas.components, **error_schemas, **_oip_schemas()},
                "responses": error_responses,
                "securitySchemes": {
                    _SECURITY_SCHEME: {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "An API key: `Authorization: Bearer <key>`.",
                    }
                },
            },
        }
    )
    return document


# The docs page

_DOCS_PAGE: Final = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>API reference</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
main{max-width:1100px;margin:0 auto;padding:1.5rem}
h1{margin:.2rem 0}h2{border-bottom:2px solid #dde;padding-bottom:.2rem;margin-top:2rem}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
details.op{background:#fff;border:1px solid #dde;border-radius:6px;margin:.4rem 0}
details.op>summary{cursor:pointer;padding:.45rem .6rem;display:flex;gap:.7rem;align-items:baseline}
details.op>div{padding:.2rem .9rem .8rem}
.method{font-weight:700;min-width:4.2rem;text-align:center;border-radius:4px;color:#fff;padding:0 .3rem}
.get{background:#2b7bb9}.post{background:#3a9c4a}.put{background:#b57b12}
.patch{background:#7b55b3}.delete{background:#c0392b}
.muted{color:#667}.lock{color:#a60}
table{border-collapse:collapse;width:100%;margin:.3rem 0}
th,td{border-bottom:1px solid #eee;text-align:left;padding:.25rem .4rem;vertical-align:top}
th{font-weight:600;background:#f3f4f7}
.desc{white-space:pre-wrap}
#filter{width:100%;padding:.4rem;font-size:1rem;margin:.6rem 0}
</style>
</head>
<body>
<main>
<h1 id="title">API reference</h1>
<p id="about" class="muted">Loading the OpenAPI document&hellip;</p>
<input id="filter" type="search" placeholder="Filter by path, operation or schema">
<div id="content"></div>
</main>
<script>
"use strict";
const SPEC_URL = __SPEC_URL__;

// Builds an element; strings become text nodes, so nothing in the document is parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const refName = (ref) => ref.split("/").pop();
const anchor = (name) => "schema-" + name.replace(/[^A-Za-z0-9_.-]/g, "_");

// A short, linked rendering of a schema's type: Model, array of string (int64), map of number...
function typeOf(schema) {
  if (!schema || Object.keys(schema).length === 0) return "any";
  if (schema.$ref) {
    const name = refName(schema.$ref);
    return el("a", {href: "#" + anchor(name)}, name.split(".").pop());
  }
  if (schema.type === "array") return el("span", {}, "array of ", typeOf(schema.items));
  if (schema.type === "object" && schema.additionalProperties && schema.additionalProperties !== true) {
    return el("span", {}, "map of ", typeOf(schema.additionalProperties));
  }
  let text = Array.isArray(schema.type) ? schema.type.join(" | ") : (schema.type || "any");
  if (schema.format) text += " (" + schema.format + ")";
  if (schema.enum) text += ": " + schema.enum.join(", ");
  return text;
}

function propertiesTable(schema) {
  const required = new Set(schema.required || []);
  const rows = Object.entries(schema.properties || {}).map(([name, prop]) =>
    el("tr", {},
      el("td", {class: "mono"}, name, required.has(name) ? " *" : "", prop.readOnly ? " (read-only)" : ""),
      el("td", {}, typeOf(prop)),
      el("td", {class: "desc"}, prop.description || "")));
  if (rows.length === 0) return el("p", {class: "muted"}, "No fields.");
  const head = el("tr", {}, el("th", {}, "Field"), el("th", {}, "Type"), el("th", {}, "Description"));
  return el("table", {}, head, rows);
}

function contentList(content) {
  return Object.entries(content || {}).map(([type, media]) =>
    el("div", {}, el("code", {}, type), " \u2014 ", typeOf(media.schema)));
}

function resolveResponse(spec, response) {
  return response.$ref ? spec.components.responses[refName(response.$ref)] : response;
}

function operationView(spec, path, method, op, item) {
  const secured = (op.security || spec.security || []).length > 0;
  const body = el("div", {});
  if (op.description) body.append(el("p", {class: "desc"}, op.description));
  if (op.parameters) {
    body.append(el("h4", {}, "Parameters"), el("table", {},
      el("tr", {}, el("th", {}, "Name"), el("th", {}, "In"), el("th", {}, "Type"),
        el("th", {}, "Description")),
      op.parameters.map((p) => el("tr", {},
        el("td", {class: "mono"}, p.name, p.required ? " *" : ""), el("td", {}, p.in),
        el("td", {}, typeOf(p.schema)), el("td", {class: "desc"}, p.description || "")))));
  }
  if (op.requestBody) {
    body.append(el("h4", {}, "Request body"), op.requestBody.description
      ? el("p", {class: "desc"}, op.requestBody.description) : null, contentList(op.requestBody.content));
  }
  body.append(el("h4", {}, "Responses"), el("table", {},
    Object.entries(op.responses).map(([status, raw]) => {
      const response = resolveResponse(spec, raw);
      return el("tr", {}, el("td", {class: "mono"}, status),
        el("td", {class: "desc"}, response.description || ""), el("td", {}, contentList(response.content)));
    })));
  return el("details", {class: "op", "data-search": (path + " " + (op.operationId || "")).toLowerCase()},
    el("summary", {}, el("span", {class: "method " + method}, method.toUpperCase()),
      el("code", {}, path), el("span", {class: "muted"}, op.summary || ""),
      secured ? el("span", {class: "lock", title: "Needs Authorization: Bearer <key>"}, "key") : null,
      item["x-scoremesh-hand-written"] ? el("span", {class: "muted"}, "(hand-written)") : null),
    body);
}

function render(spec) {
  document.title = spec.info.title;
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  document.getElementById("about").textContent = spec.info.description || "";
  const content = document.getElementById("content");
  const byTag = new Map((spec.tags || []).map((t) => [t.name, []]));
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const method of ["get", "put", "post", "delete", "patch"]) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags || ["default"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(operationView(spec, path, method, op, item));
    }
  }
  const tagText = new Map((spec.tags || []).map((t) => [t.name, t.description || ""]));
  for (const [tag, views] of byTag) {
    if (views.length === 0) continue;
    content.append(el("section", {class: "tag"}, el("h2", {}, tag),
      el("p", {class: "desc muted"}, tagText.get(tag) || ""), views));
  }
  const schemas = Object.entries((spec.components || {}).schemas || {});
  content.append(el("h2", {}, "Schemas"), schemas.map(([name, schema]) =>
    el("details", {class: "op", id: anchor(name), "data-search": name.toLowerCase()},
      el("summary", {}, el("code", {}, name), el("span", {class: "muted"}, typeOf(schema))),
      el("div", {}, schema.description ? el("p", {class: "desc"}, schema.description) : null,
        schema.properties ? propertiesTable(schema) : null))));
}

// Opens the schema a type link points at.
window.addEventListener("hashchange", () => {
  const target = document.getElementById(location.hash.slice(1));
  if (target && target.tagName === "DETAILS") target.open = true;
});

document.getElementById("filter").addEventListener("input", (event) => {
  const needle = event.target.value.trim().toLowerCase();
  for (const node of document.querySelectorAll("[data-search]")) {
    node.hidden = needle !== "" && !node.dataset.search.includes(needle);
  }
});

fetch(SPEC_URL, {headers: {Accept: "application/json"}})
  .then((response) => {
    if (!response.ok) throw new Error(response.status + " " + response.statusText);
    return response.json();
  })
  .then(render)
  .catch((error) => {
    document.getElementById("about").textContent = "Could not load " + SPEC_URL + ": " + error.message;
  });
</script>
</body>
</html>
"""


def docs_html(openapi_url: str = "/openapi.json") -> str:
    """A self-contained docs page (inline CSS and JavaScript, no external fetch besides
    ``openapi_url`` on the same origin) that renders the document's paths, parameters,
    bodies, responses and schemas."""
    # a JSON string is a JS string literal; "<" escaped so the URL cannot close the script
    literal = json.dumps(openapi_url).replace("<", "\\u003c")
    return _DOCS_PAGE.replace("__SPEC_URL__", literal)
