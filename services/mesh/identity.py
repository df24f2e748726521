"""Who a call acts for, as the mesh passes it between services in gRPC metadata."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TENANT_HEADER = "x-scoremesh-tenant"
PRINCIPAL_HEADER = "x-scoremesh-principal"
SCOPES_HEADER = "x-scoremesh-scopes"
INTERNAL_HEADER = "x-scoremesh-internal"
"""The mesh's shared secret (MeshSettings.internal_token), on every call inside the mesh."""
DEFAULT_TENANT = "default"
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    """The tenant a call acts for, the principal (user or API key id) behind it, and the
    scopes the gateway granted it (empty for calls that did not come through the gateway)."""

    tenant: str
    principal: str
    scopes: frozenset[str] = frozenset()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs: tuple[tuple[str, str], ...] = (
            (TENANT_HEADER, self.tenant),
            (PRINCIPAL_HEADER, self.principal),
        )
        if self.scopes:
            pairs += ((SCOPES_HEADER, ",".join(sorted(self.scopes))),)
        return pairs


def caller_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
    """Reads the caller from invocation metadata; a call without it acts for the default
    tenant. (The gateway sets these headers; checking its internal credential comes with
    the gateway.)"""
    tenant, principal, scopes = DEFAULT_TENANT, ANONYMOUS, frozenset[str]()
    for key, value in metadata or ():
        if key == TENANT_HEADER and isinstance(value, str) and value:
            tenant = value
        elif key == PRINCIPAL_HEADER and isinstance(value, str) and value:
            principal = value
        elif key == SCOPES_HEADER and isinstance(value, str) and value:
            scopes = frozenset(scope for scope in value.split(",") if scope)
    return Caller(tenant=tenant, principal=principal, scopes=scopes)
