"""Errors as the gateway's REST clients see them: an HTTP status and a JSON body.

The status follows the HTTP twin of ``google/rpc/code.proto`` (``HTTP_STATUS``). The body is
the ``google.rpc.Status`` a gRPC client would have received, in proto3 JSON, the shape
grpc-gateway uses::

    {"code": 3, "message": "version: ...",
     "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": ..., ...},
                 {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [...]}]}

``code`` is the gRPC code number, not the HTTP status. The status and its details come from
``services.mesh.status``, the mesh's one mapping of domain errors, so a REST client and a gRPC
client are told the same thing.

A few failures exist only at HTTP (no route, wrong method, body too large, wrong media type):
they are :class:`GatewayError` subclasses that carry their own HTTP status and the nearest gRPC
code for the body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2

from services.mesh.errors import MeshError
from services.mesh.status import DETAILS_KEY, from_rpc_error, status_code, to_status

__all__ = [
    "HTTP_STATUS",
    "ErrorResponse",
    "GatewayError",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "Unimplemented",
    "UnsupportedMediaType",
    "error_body",
    "error_response",
    "http_status",
    "ndjson_error",
    "payload_too_large",
]

JSON_CONTENT_TYPE: Final = "application/json"

HTTP_STATUS: Final[Mapping[grpc.StatusCode, int]] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""gRPC code → HTTP status, as ``google/rpc/code.proto`` documents each code's HTTP mapping."""


class GatewayError(MeshError):
    """A failure that exists only at HTTP. ``http_status`` overrides the code's usual mapping;
    ``code_name`` is the gRPC code the JSON body reports."""

    http_status: ClassVar[int] = 500
    headers: Mapping[str, str] = {}


class MethodNotAllowed(GatewayError):
    """The path names a route, but not for this method: 405 with ``Allow``. gRPC has no such
    code; the body says UNIMPLEMENTED, as grpc-gateway's does."""

    code_name = "UNIMPLEMENTED"
    default_reason = "METHOD_NOT_ALLOWED"
    http_status = 405

    def __init__(self, method: str, path: str, allow: Sequence[str]) -> None:
        self.allow = tuple(sorted(set(allow)))
        super().__init__(
            f"{method} is not allowed on {path}; allowed: {', '.join(self.allow)}",
            metadata={"method": method, "allow": ",".join(self.allow)},
        )
        self.headers = {"Allow": ", ".join(self.allow)}


class PayloadTooLarge(GatewayError):
    """A request body over the gateway's limit: 413. The body says RESOURCE_EXHAUSTED, the code
    a gRPC server gives a message over its receive limit."""

    code_name = "RESOURCE_EXHAUSTED"
    default_reason = "PAYLOAD_TOO_LARGE"
    http_status = 413

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            f"the request body is larger than the limit of {limit_bytes} bytes",
            metadata={"limit_bytes": str(limit_bytes)},
        )


class UnsupportedMediaType(GatewayError):
    """A request body in a media type the route does not read (JSON for most routes,
    ``application/octet-stream`` for uploads): 415, INVALID_ARGUMENT in the body."""

    code_name = "INVALID_ARGUMENT"
    default_reason = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415

    def __init__(self, content_type: str, expected: str) -> None:
        super().__init__(
            f"content type {content_type!r} is not supported here; send {expected}",
            metadata={"content_type": content_type, "expected": expected},
        )


class Unimplemented(MeshError):
    """A route the protos declare but the gateway cannot serve over REST (a client-streaming
    RPC that is not an upload): 501."""

    code_name = "UNIMPLEMENTED"
    default_reason = "UNIMPLEMENTED"


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """What the HTTP server sends for an error: status, headers and a JSON body."""

    status: int
    body: bytes
    headers: Mapping[str, str]
    content_type: str = JSON_CONTENT_TYPE


def http_status(error: MeshError) -> int:
    """The HTTP status for ``error``: its own for a :class:`GatewayError`, else its gRPC
    code's mapping (500 for a code outside the table)."""
    if isinstance(error, GatewayError):
        return error.http_status
    return HTTP_STATUS.get(status_code(error), 500)


def _rich_status(error: MeshError) -> status_pb2.Status:
    # to_status is the mesh's one builder of code + ErrorInfo + BadRequest; read back the
    # google.rpc.Status it put in the trailer instead of building the details a second time
    status = to_status(error)
    for key, value in status.trailing_metadata:
        if key == DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=status.code.value[0], message=status.details)  # pragma: no cover


def error_body(error: MeshError | grpc.RpcError) -> dict[str, Any]:
    """``{"code", "message", "details"}`` for ``error``: the gRPC code number, the message and
    each ``google.rpc`` detail (ErrorInfo, BadRequest) as proto3 JSON with its ``@type``.
    A failed gRPC call is read back into its domain error first, so its details survive."""
    err = error if isinstance(error, MeshError) else from_rpc_error(error)
    rich = _rich_status(err)
    details = json_format.MessageToDict(rich).get("details", [])
    return {"code": rich.code, "message": rich.message, "details": details}


def _dump(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def error_response(error: MeshError | grpc.RpcError, *, oip: bool = False) -> ErrorResponse:
    """The HTTP response for ``error``: status, headers (``Allow`` on a 405) and JSON body.
    ``oip``: for the Open Inference Protocol's routes, whose clients (tritonclient.http,
    KServe's) read the message from an ``error`` member, which the body then also has."""
    err = error if isinstance(error, MeshError) else from_rpc_error(error)
    headers = err.headers if isinstance(err, GatewayError) else {}
    body = error_body(err)
    if oip:
        body = {"error": body["message"], **body}
    return ErrorResponse(http_status(err), _dump(body), dict(headers))


def payload_too_large(limit_bytes: int, *, oip: bool = False) -> ErrorResponse:
    """The 413 response for a body over ``limit_bytes``."""
    return error_response(PayloadTooLarge(limit_bytes), oip=oip)


def ndjson_error(error: MeshError | grpc.RpcError) -> bytes:
    """The last line of a server-streaming response that failed after its first line (the
    HTTP status is already sent): ``{"error": {"code", "message", "details"}}`` and a newline."""
    return _dump({"error": error_body(error)}) + b"\n"
