"""Who a call acts for, as the mesh passes it between services in gRPC metadata."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TENANT_HEADER = "x-scoremesh-tenant"
PRINCIPAL_HEADER = "x-scoremesh-principal"
DEFAULT_TENANT = "default"
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    """The tenant a call acts for and the principal (user or API key id) behind it."""

    tenant: str
    principal: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TENANT_HEADER, self.tenant), (PRINCIPAL_HEADER, self.principal))


def caller_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
    """Reads the caller from invocation metadata; a call without it acts for the default
    tenant. (The gateway sets these headers; checking its internal credential comes with
    the gateway.)"""
    tenant, principal = DEFAULT_TENANT, ANONYMOUS
    for key, value in metadata or ():
        if key == TENANT_HEADER and isinstance(value, str) and value:
            tenant = value
        elif key == PRINCIPAL_HEADER and isinstance(value, str) and value:
            principal = value
    return Caller(tenant=tenant, principal=principal)
