"""REST ↔ gRPC transcoding, driven only by the protos' ``google.api.http`` rules.

Pure functions and one router; no HTTP server, no network. The HTTP server calls, per request:

1. :meth:`Router.match` — (method, path) → the binding and its raw path variables;
2. :func:`build_request` (or :func:`build_upload_messages` for an upload) — path variables,
   query parameters and body → the request message;
3. :func:`response_json` for a unary response, :func:`ndjson_line` per streamed message.

Every problem with the input raises a domain error (``InvalidArgument`` naming the field,
``NotFound``, or a :mod:`services.gateway.http_errors` error): bad input is never a 500.

JSON is proto3 JSON throughout, with fixed options: requests accept proto field names and
lowerCamel JSON names alike and reject unknown fields; responses use lowerCamel names (what
proto3 JSON, Google's APIs and grpc-gateway emit), int64 as strings, enums by name, and print
fields that have no presence even at their default value (``"created": false``,
``"aliases": []``) so that clients need not know proto3's defaults.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn
from urllib.parse import unquote, unquote_to_bytes

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.gateway.http_errors import MethodNotAllowed, Unimplemented, UnsupportedMediaType
from services.gateway.http_rules import HttpBinding, PathTemplate
from services.gateway.strict_json import DuplicateKey, unique_keys
from services.mesh.errors import InvalidArgument, NotFound

__all__ = [
    "MAX_CHUNK_BYTES",
    "RouteMatch",
    "Router",
    "UploadShape",
    "build_request",
    "build_upload_messages",
    "ndjson_line",
    "response_dict",
    "response_json",
    "upload_shape",
]

MAX_CHUNK_BYTES: Final = 1 << 20
"""The largest ``chunk`` an upload sends in one message: well under gRPC's 4 MiB default."""

BODY_FIELD: Final = "body"
"""The field a violation names when the body as a whole is wrong (malformed JSON, not an
object, present where the rule takes none)."""

# fixed json_format options: the gateway's one definition of its JSON
_PRINT_OPTIONS: Final[dict[str, Any]] = {
    "preserving_proto_field_name": False,
    "always_print_fields_with_no_presence": True,
    "use_integers_for_enums": False,
}

# messages that proto3 JSON writes as one string, so a query parameter can set them
_STRING_MESSAGES: Final = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        *(
            f"google.protobuf.{kind}Value"
            for kind in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
        ),
    }
)


# Routing


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The binding a request reached and its path variables (field path → decoded text)."""

    binding: HttpBinding
    path_vars: Mapping[str, str]


def _specificity(template: PathTemplate) -> tuple[bool, tuple[bool, ...]]:
    # A custom verb is a literal too; then, from the left, a literal segment beats a variable:
    # /v1/models/{m}:resolve beats /v1/models/{name}, /v1/models/x/y beats /v1/models/{m}/y.
    return bool(template.verb), tuple(not s.startswith("{") for s in template.segments)


def _match_segments(template: PathTemplate, raw: list[str]) -> dict[str, str] | None:
    """The raw (still percent-encoded) variables if ``raw`` fits the template, else None."""
    if template.verb:
        suffix = ":" + template.verb
        if not raw[-1].endswith(suffix):
            return None
        raw = [*raw[:-1], raw[-1][: -len(suffix)]]
    if len(raw) != len(template.segments):
        return None
    variables: dict[str, str] = {}
    for pattern, segment in zip(template.segments, raw, strict=True):
        if pattern.startswith("{"):
            if not segment:  # a variable is one whole, non-empty segment
                return None
            variables[pattern[1:-1]] = segment
        elif unquote(segment, errors="replace") != pattern:
            return None
    return variables


def _decode_variable(field: str, raw: str) -> str:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument.for_field(field, "is not UTF-8 text once percent-decoded") from None


class Router:
    """Matches (HTTP method, path) to a binding.

    When several templates fit a path, the most specific wins (a custom verb, then literal
    segments from the left). A path that fits only templates of other methods is a 405 with
    ``Allow``; a path that fits none is a 404.
    """

    def __init__(self, bindings: Iterable[HttpBinding]) -> None:
        self._bindings = sorted(bindings, key=lambda b: _specificity(b.path), reverse=True)
        for binding in self._bindings:
            for variable in binding.path.variables:
                try:
                    _resolve(binding.input_type, variable)
                except InvalidArgument as err:
                    # an annotation naming no field is a bug in the proto: fail at start-up
                    raise ValueError(f"{binding.grpc_path}: {binding.path.text}: {err.message}") from None

    @property
    def bindings(self) -> Sequence[HttpBinding]:
        """Every binding, most specific first."""
        return tuple(self._bindings)

    def match(self, method: str, path: str) -> RouteMatch:
        """The binding for ``method`` on ``path`` (the URL path without its query string,
        still percent-encoded) and its percent-decoded path variables.

        Raises NotFound, MethodNotAllowed, or InvalidArgument for a variable that is not
        UTF-8 once decoded."""
        method = method.upper()
        raw = path[1:].split("/")
        allowed: list[str] = []
        for binding in self._bindings if path.startswith("/") else ():
            variables = _match_segments(binding.path, raw)
            if variables is None:
                continue
            if binding.http_method != method:
                allowed.append(binding.http_method)
                continue
            decoded = {field: _decode_variable(field, text) for field, text in variables.items()}
            return RouteMatch(binding, decoded)
        if allowed:
            raise MethodNotAllowed(method, path, allowed)
        raise NotFound(f"no route for {method} {path}", reason="ROUTE_NOT_FOUND", metadata={"path": path})


# Field paths


def _field_named(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    field = descriptor.fields_by_name.get(name)
    return field if field is not None else next((f for f in descriptor.fields if f.json_name == name), None)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _resolve(descriptor: Descriptor, dotted: str) -> list[FieldDescriptor]:
    """The fields along ``dotted`` (proto or lowerCamel names); every step but the last must
    be a singular message field."""
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    for name in dotted.split("."):
        if current is None:
            # fields[-1] is a scalar, a repeated or a map field: nothing inside it has a path
            description = f"{fields[-1].name} is not a singular message, so it has no field {name!r}"
            raise InvalidArgument.for_field(dotted, description, reason="UNKNOWN_FIELD")
        field = _field_named(current, name)
        if field is None:
            description = f"no such field in {current.full_name}"
            raise InvalidArgument.for_field(dotted, description, reason="UNKNOWN_FIELD")
        fields.append(field)
        singular_message = field.message_type is not None and not field.is_repeated
        current = field.message_type if singular_message else None
    return fields


def _proto_path(fields: Sequence[FieldDescriptor]) -> str:
    return ".".join(f.name for f in fields)


# Errors from json_format


_FAILED_FIELD: Final = re.compile(r"Failed to parse (\S+) field: ")
_UNKNOWN_FIELD: Final = re.compile(r'has no field named "([^"]*)"')
_ONEOF: Final = re.compile(r'multiple "([^"]*)" oneof fields')
_LOCATION: Final = re.compile(r"\s+at \S+$")
# json_format passes int()'s own complaint through; say it in the API's words
_PYTHON_INT: Final = re.compile(r"invalid literal for int\(\) with base 10: (.*)")


def _named_path(descriptor: Descriptor, names: Sequence[str]) -> str:
    """``names`` (as the JSON spelled them) as proto field names, as far as they resolve."""
    parts: list[str] = []
    current: Descriptor | None = descriptor
    for name in names:
        field = _field_named(current, name) if current is not None else None
        parts.append(field.name if field is not None else name)
        current = field.message_type if field is not None else None
    return ".".join(parts)


# what json_format raises for bad input: ParseError, and a few built-in errors on odd shapes
_PARSE_ERRORS: Final = (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError)


def _refuses(document: Any, descriptor: Descriptor) -> bool:
    try:
        json_format.ParseDict(document, _new_message(descriptor), ignore_unknown_fields=False)
    except _PARSE_ERRORS:
        return True
    return False


def _culprit(document: Any, descriptor: Descriptor) -> list[str]:
    """The proto path of the first field of ``document`` that json_format refuses on its own,
    or ``[]`` when none does alone.

    json_format's message names each field on the way except a member of a oneof ("Failed to
    parse feedback field: Failed to parse shape field" for ``feedback.tensor.shape``), so the
    path is found again by parsing piece by piece, in the order json_format reads and stops."""
    if not isinstance(document, dict):
        return []
    for key, value in document.items():
        field = _field_named(descriptor, key)
        if field is None:
            return [key]
        if not _refuses({key: value}, descriptor):
            continue
        nested = field.message_type
        if nested is None or _is_map(field) or nested.full_name.startswith("google.protobuf."):
            return [field.name]
        items = value if field.is_repeated and isinstance(value, list) else [value]
        bad = next((item for item in items if _refuses(item, nested)), None)
        return [field.name, *_culprit(bad, nested)]
    return []


def _invalid(
    error: json_format.ParseError, descriptor: Descriptor, document: Mapping[str, Any]
) -> InvalidArgument:
    """json_format's ParseError as InvalidArgument naming the field. json_format reports the
    field only in its message ("Failed to parse model field: Failed to parse name field: ..."),
    where a oneof member's name is missing, so the path is found in ``document`` (see
    :func:`_culprit`) and the description read from the message."""
    text = str(error)
    names = _FAILED_FIELD.findall(text)
    detail = text[text.rfind(" field: ") + len(" field: ") :] if names else text
    detail = _LOCATION.sub("", detail.split("\n", 1)[0].rstrip(".")).rstrip(".")
    unknown = _UNKNOWN_FIELD.search(text)
    oneof = None if unknown else _ONEOF.search(text)
    if unknown:
        names.append(unknown.group(1))
        detail = "unknown field"
    elif oneof:
        names.append(oneof.group(1))
        detail = "sets more than one field of the oneof"
    # two members of a oneof: the oneof is named, though each member may be fine alone
    path = [] if oneof else _culprit(document, descriptor)
    field = ".".join(path) or (_named_path(descriptor, names) if names else BODY_FIELD)
    detail = _PYTHON_INT.sub(r"expected an integer, got \1", detail)
    return InvalidArgument.for_field(field, detail or "invalid value")


def _parse_dict(document: Mapping[str, Any], message: Message, descriptor: Descriptor) -> None:
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False)
    except json_format.ParseError as err:
        raise _invalid(err, descriptor, document) from None
    except (ValueError, TypeError, AttributeError, RecursionError) as err:
        # json_format lets a few built-in errors through on odd shapes (deep nesting above
        # all); they are still bad input, never a 500
        raise InvalidArgument.for_field(BODY_FIELD, f"cannot be read: {type(err).__name__}") from None


# Request bodies


def _no_constants(name: str) -> NoReturn:
    # NaN and Infinity are not JSON; proto3 JSON spells them as the strings "NaN", "Infinity"
    raise ValueError(f"{name} is not JSON (proto3 JSON writes it as a string)")


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=_no_constants)
    except DuplicateKey as err:
        raise InvalidArgument.for_field(err.key, "is given more than once", reason="INVALID_JSON") from None
    except UnicodeDecodeError:
        raise InvalidArgument.for_field(BODY_FIELD, "is not UTF-8", reason="INVALID_JSON") from None
    except json.JSONDecodeError as err:
        description = f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        raise InvalidArgument.for_field(BODY_FIELD, description, reason="INVALID_JSON") from None
    except RecursionError:
        raise InvalidArgument.for_field(BODY_FIELD, "is nested too deeply", reason="INVALID_JSON") from None
    except ValueError as err:  # NaN, or an integer past Python's digit limit
        description = f"is not valid JSON: {err}"
        raise InvalidArgument.for_field(BODY_FIELD, description, reason="INVALID_JSON") from None


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _check_json_type(content_type: str | None) -> None:
    media = _media_type(content_type)
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(media, "application/json")


def _merge_body(binding: HttpBinding, message: Message, body: bytes | None) -> None:
    if binding.body == "":
        if body:
            where = f"{binding.http_method} {binding.path.text}"
            raise InvalidArgument.for_field(BODY_FIELD, f"must be empty: {where} takes no request body")
        return
    if not body:  # an absent body leaves every body field at its default
        return
    document = _load_json(body)
    if binding.body == "*":
        if not isinstance(document, dict):
            raise InvalidArgument.for_field(BODY_FIELD, "must be a JSON object", reason="INVALID_JSON")
        _parse_dict(document, message, binding.input_type)
    else:
        field = _field_named(binding.input_type, binding.body)
        nested = field.message_type if field is not None and not field.is_repeated else None
        # a message (not one that proto3 JSON spells otherwise, as Timestamp) is an object:
        # json_format would read [] as an empty message, and "text" as unknown fields t, e, x…
        plain = nested is not None and not nested.full_name.startswith("google.protobuf.")
        if plain and not isinstance(document, dict):
            raise InvalidArgument.for_field(binding.body, "must be a JSON object", reason="INVALID_JSON")
        # wrapping the body under its field name lets json_format check it whatever the
        # field's type, and puts the field's name in front of every error path
        _parse_dict({binding.body: document}, message, binding.input_type)


# Path variables and query parameters


def _json_leaf(key: str, field: FieldDescriptor, text: str) -> Any:
    """A path or query text as the JSON value json_format expects for ``field``."""
    wrapped = field.message_type.full_name if field.message_type is not None else ""
    if field.type == FieldDescriptor.TYPE_BOOL or wrapped == "google.protobuf.BoolValue":
        if text not in ("true", "false"):
            raise InvalidArgument.for_field(key, f"expected true or false, got {text!r}")
        return text == "true"
    if wrapped and wrapped not in _STRING_MESSAGES:
        raise InvalidArgument.for_field(key, "is a message: set its fields one by one (name.field=value)")
    # proto3 JSON reads every other scalar from a string: integers, floats, enum names, base64
    return text


def _put(tree: dict[str, Any], fields: Sequence[FieldDescriptor], key: str, text: str) -> None:
    """Sets ``fields``' path in the JSON ``tree`` to ``text``; repeated fields gather values."""
    node = tree
    for field in fields[:-1]:
        node = node.setdefault(field.name, {})
    leaf = fields[-1]
    value = _json_leaf(key, leaf, text)
    if leaf.is_repeated:
        node.setdefault(leaf.name, []).append(value)
    elif leaf.name in node:
        raise InvalidArgument.for_field(key, "is given more than once but is not repeated")
    else:
        node[leaf.name] = value


def _overlaps(path: str, bound: str) -> bool:
    return path == bound or path.startswith(bound + ".") or bound.startswith(path + ".")


@dataclass(frozen=True, slots=True)
class _Binding:
    """What of the request the path and the body already set."""

    bound: tuple[str, ...]
    whole_body: bool
    default_prefix: str = ""
    """Query keys that name no field of the request are read under this field (uploads)."""


def _fill(
    message: Message,
    descriptor: Descriptor,
    path_vars: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    binding: _Binding,
) -> None:
    """Sets path variables and query parameters (AIP-127) on ``message``. Path variables
    override a body's value for the same field, as grpc-gateway's do."""
    tree: dict[str, Any] = {}
    for variable, text in path_vars.items():
        fields = _resolve(descriptor, variable)
        _put(tree, fields, _proto_path(fields), text)
    for key, text in query:
        name = key
        if binding.default_prefix and _field_named(descriptor, key.split(".", 1)[0]) is None:
            name = f"{binding.default_prefix}.{key}"
        fields = _resolve(descriptor, name)
        path = _proto_path(fields)
        # violations name proto field paths, whichever spelling the client used
        if binding.whole_body or any(_overlaps(path, b) for b in binding.bound):
            raise InvalidArgument.for_field(path, "is set by the path or the body, not the query")
        _put(tree, fields, path, text)
    _parse_dict(tree, message, descriptor)


def _new_message(descriptor: Descriptor) -> Message:
    return message_factory.GetMessageClass(descriptor)()


def build_request(
    binding: HttpBinding,
    path_vars: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: bytes | None,
    content_type: str | None,
) -> Message:
    """The request message of a unary or server-streaming RPC.

    ``query`` is the decoded query string, a key repeated for each value; the caller removes
    its own parameters (API keys) first. ``body`` is read as the rule says: ``*`` the whole
    message, a field name that field, none an empty body. Path variables set (nested) fields;
    query parameters set any field neither the path nor the body sets, by proto or lowerCamel
    name (AIP-127: dotted paths, a repeated key for a repeated field, enums by name, base64
    bytes). Raises InvalidArgument naming the field, UnsupportedMediaType, or Unimplemented
    for a client-streaming RPC (see :func:`build_upload_messages`).
    """
    if binding.client_streaming:
        raise Unimplemented(
            f"{binding.grpc_path} streams its requests: only uploads are served over REST",
            metadata={"method": binding.grpc_path},
        )
    message = _new_message(binding.input_type)
    if body:
        _check_json_type(content_type)
    _merge_body(binding, message, body)
    path_bound = tuple(_proto_path(_resolve(binding.input_type, v)) for v in path_vars)
    body_bound = (binding.body,) if binding.body not in ("", "*") else ()
    _fill(
        message, binding.input_type, path_vars, query, _Binding(path_bound + body_bound, binding.body == "*")
    )
    return message


# Uploads


@dataclass(frozen=True, slots=True)
class UploadShape:
    """A client-streaming request that is a oneof of metadata (a message, sent first) and a
    ``bytes`` chunk (sent after), like ``UploadVersionRequest {metadata | chunk}``."""

    metadata: FieldDescriptor
    chunk: FieldDescriptor


def upload_shape(binding: HttpBinding) -> UploadShape | None:
    """The upload shape of a client-streaming binding's request, or None if it has none."""
    if not binding.client_streaming:
        return None
    for oneof in binding.input_type.oneofs:
        messages = [f for f in oneof.fields if f.message_type is not None and not f.is_repeated]
        chunks = [f for f in oneof.fields if f.type == FieldDescriptor.TYPE_BYTES and not f.is_repeated]
        if len(oneof.fields) == 2 and len(messages) == 1 and len(chunks) == 1:
            return UploadShape(messages[0], chunks[0])
    return None


def build_upload_messages(
    binding: HttpBinding,
    path_vars: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body_stream: AsyncIterable[bytes],
    *,
    content_type: str | None = None,
) -> AsyncIterator[Message]:
    """The request stream of an upload: first the metadata, from path variables and query
    parameters (``metadata.sha256`` or just ``sha256``), then the raw body
    (``application/octet-stream``) in ``chunk`` messages of at most :data:`MAX_CHUNK_BYTES`.

    The metadata is checked now, so that bad input raises InvalidArgument before any call
    starts; Unimplemented for a client-streaming RPC that is not an upload."""
    shape = upload_shape(binding)
    if shape is None:
        raise Unimplemented(
            f"{binding.grpc_path} streams its requests in a shape the gateway cannot build from "
            "one HTTP body (an upload is a oneof of a metadata message and a bytes chunk)",
            metadata={"method": binding.grpc_path},
        )
    media = _media_type(content_type)
    if media and media != "application/octet-stream":
        raise UnsupportedMediaType(media, "application/octet-stream")
    first = _new_message(binding.input_type)
    getattr(first, shape.metadata.name).SetInParent()  # sent even when path and query are empty
    path_bound = tuple(_proto_path(_resolve(binding.input_type, v)) for v in path_vars)
    _fill(
        first,
        binding.input_type,
        path_vars,
        query,
        _Binding((*path_bound, shape.chunk.name), False, shape.metadata.name),
    )
    return _upload_stream(first, binding.input_type, shape.chunk.name, body_stream)


async def _upload_stream(
    first: Message, descriptor: Descriptor, chunk_field: str, body_stream: AsyncIterable[bytes]
) -> AsyncIterator[Message]:
    yield first
    cls = message_factory.GetMessageClass(descriptor)
    pending = bytearray()
    # gather small reads into full chunks: fewer, larger messages for the same bytes
    async for piece in body_stream:
        pending += piece
        while len(pending) >= MAX_CHUNK_BYTES:
            yield cls(**{chunk_field: bytes(pending[:MAX_CHUNK_BYTES])})
            del pending[:MAX_CHUNK_BYTES]
    if pending:
        yield cls(**{chunk_field: bytes(pending)})


# Responses


def response_dict(binding: HttpBinding, message: Message) -> Any:
    """The response as proto3 JSON values (lowerCamel names): the whole message, or only its
    ``response_body`` field when the rule names one."""
    if not binding.response_body:
        return json_format.MessageToDict(message, **_PRINT_OPTIONS)
    field = binding.output_type.fields_by_name[binding.response_body]
    if field.message_type is not None and not field.is_repeated:
        return json_format.MessageToDict(getattr(message, field.name), **_PRINT_OPTIONS)
    return json_format.MessageToDict(message, **_PRINT_OPTIONS).get(field.json_name)


def response_json(binding: HttpBinding, message: Message) -> bytes:
    """The body of a unary response: compact UTF-8 JSON."""
    return json.dumps(response_dict(binding, message), separators=(",", ":"), ensure_ascii=False).encode()


def ndjson_line(binding: HttpBinding, message: Message) -> bytes:
    """One message of a server-streaming response (``application/x-ndjson``): its JSON on one
    line. Compact JSON escapes newlines inside strings, so a line is always one message."""
    return response_json(binding, message) + b"\n"
