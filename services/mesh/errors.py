"""Domain errors shared by every service.

They know nothing of gRPC or HTTP: ``services.mesh.status`` maps them to a status code
with ``google.rpc`` details, and the gateway maps those to HTTP. Each class names the
canonical code it stands for (``google/rpc/code.proto``) so that the mapping is one table.

    MeshError
    ├── InvalidArgument        (bad input; carries field violations)
    ├── NotFound
    ├── AlreadyExists
    ├── FailedPrecondition
    ├── ResourceExhausted
    ├── PermissionDenied
    ├── Unauthenticated
    ├── Unavailable
    └── DeadlineExceeded
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: ``field`` is a dotted path (``metadata.sha256``)."""

    field: str
    description: str


class MeshError(Exception):
    """Base of every error a service reports to its callers on purpose.

    ``reason`` is a stable UPPER_SNAKE identifier for machines (``google.rpc.ErrorInfo``);
    ``message`` is for people; ``metadata`` adds structured context to the ErrorInfo.
    """

    code_name = "UNKNOWN"
    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(MeshError):
    code_name = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = tuple(violations)

    @classmethod
    def for_field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        return cls(f"{field}: {description}", violations=[FieldViolation(field, description)], reason=reason)


MESSAGE_VIOLATIONS = 5
"""How many field violations an InvalidArgument's message repeats; its details carry all."""


def raise_for_violations(violations: Sequence[FieldViolation], *, reason: str | None = None) -> None:
    """Raises one InvalidArgument carrying every violation, when there is any."""
    if not violations:
        return
    shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:MESSAGE_VIOLATIONS])
    more = len(violations) - MESSAGE_VIOLATIONS
    message = shown + (f"; and {more} more" if more > 0 else "")
    raise InvalidArgument(message, violations=violations, reason=reason)


class NotFound(MeshError):
    code_name = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(MeshError):
    code_name = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(MeshError):
    code_name = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(MeshError):
    code_name = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(MeshError):
    code_name = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(MeshError):
    code_name = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class Unavailable(MeshError):
    code_name = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(MeshError):
    code_name = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"
