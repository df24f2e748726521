"""The one mapping between domain errors and gRPC status, in both directions.

Servers turn a :class:`~services.mesh.errors.MeshError` into a status code (``CODES``) plus a
``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer, carrying one ``ErrorInfo``
(reason, domain ``scoremesh``, metadata) and, for bad input, a ``BadRequest`` with every field
violation. Clients (the CLI, services calling each other) turn a failed call back into the
same domain error with :func:`from_rpc_error`.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.mesh.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "CODES",
    "DETAILS_KEY",
    "DOMAIN",
    "RemoteError",
    "abort",
    "describe",
    "from_rpc_error",
    "status_code",
    "to_status",
]

log = logging.getLogger(__name__)

DOMAIN = "scoremesh"
"""``ErrorInfo.domain`` of every error the mesh reports."""

DETAILS_KEY = "grpc-status-details-bin"

CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""Domain ``code_name`` → gRPC code, following ``google/rpc/code.proto``."""

_DOMAIN_CLASSES: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


class RemoteError(MeshError):
    """A peer's failure whose code has no domain class (INTERNAL, UNKNOWN, CANCELLED,
    UNIMPLEMENTED, ABORTED, …). ``code_name`` is that code, so passing the error on keeps it."""

    def __init__(
        self,
        message: str,
        *,
        code_name: str,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason or code_name, metadata=metadata)
        self.code_name = code_name


def status_code(err: MeshError) -> grpc.StatusCode:
    """The gRPC code for a domain error; UNKNOWN for a code name outside the table."""
    code = CODES.get(err.code_name)
    if code is None:
        code = getattr(grpc.StatusCode, err.code_name, grpc.StatusCode.UNKNOWN)
    return code


def to_status(err: MeshError) -> grpc.Status:
    """The rich status for ``err``: its code and message, with ErrorInfo and, for
    InvalidArgument, a BadRequest listing every field violation."""
    code = status_code(err)
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    rich = status_pb2.Status(code=code.value[0], message=err.message)
    rich.details.add().Pack(info)
    if isinstance(err, InvalidArgument) and err.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in err.violations
            ]
        )
        rich.details.add().Pack(bad_request)
    return rpc_status.to_status(rich)


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: MeshError) -> None:
    """Ends the call with ``err``'s rich status. Raises grpc.aio.AbortError, as context.abort does."""
    status = to_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _rich_status(error: grpc.RpcError) -> Any:
    trailers: Any = error.trailing_metadata() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
    for key, value in trailers or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a peer's garbage trailer must not hide its status code
                log.debug("unparseable %s trailer", DETAILS_KEY, exc_info=True)
                return None
    return None


def _code_and_message(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return error.code(), error.details() or ""
    # a bare RpcError (a channel-level failure) carries neither
    return grpc.StatusCode.UNKNOWN, str(error)


def from_rpc_error(error: grpc.RpcError) -> MeshError:
    """The domain error a failed call stands for, with the reason, metadata and field
    violations its details carried. A code without a domain class gives a RemoteError."""
    code, message = _code_and_message(error)
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    rich = _rich_status(error)
    if rich is not None:
        for detail in rich.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or None
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    cls = _DOMAIN_CLASSES.get(code)
    if cls is InvalidArgument:
        return InvalidArgument(message, violations=violations, reason=reason, metadata=metadata)
    if cls is not None:
        return cls(message, reason=reason, metadata=metadata)
    return RemoteError(message, code_name=code.name, reason=reason, metadata=metadata)


def describe(error: MeshError | grpc.RpcError) -> str:
    """One line for people: ``NOT_FOUND: model "x" not found [MODEL_NOT_FOUND]`` followed by
    any field violations."""
    err = error if isinstance(error, MeshError) else from_rpc_error(error)
    line = f"{err.code_name}: {err.message or '(no message)'}"
    if err.reason and err.reason != err.code_name:
        line += f" [{err.reason}]"
    if isinstance(err, InvalidArgument):
        # the message often is the single violation already; don't say it twice
        extra = [
            f"{v.field}: {v.description}"
            for v in err.violations
            if f"{v.field}: {v.description}" != err.message
        ]
        if extra:
            line += " (" + "; ".join(extra) + ")"
    return line
