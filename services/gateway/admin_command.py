"""``scoremesh keys`` and ``scoremesh usage``: the gateway's Admin service from a terminal.

The commands call the gateway's gRPC Admin service with the mesh's internal credential
(``SCOREMESH_INTERNAL_TOKEN`` or ``$SCOREMESH_HOME/internal.token``) as an operator holding
the admin scope: whoever can read that credential runs the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc.aio
from scoremesh.gateway.v1 import admin_pb2 as pb
from scoremesh.gateway.v1 import admin_pb2_grpc

from services.gateway.keys import Scope
from services.mesh.conversions import timestamp
from services.mesh.identity import DEFAULT_TENANT, Caller


class AdminClient:
    """The Admin service's calls, as ``principal`` with the admin scope."""

    def __init__(self, channel: grpc.aio.Channel, principal: str) -> None:
        self._stub = admin_pb2_grpc.AdminStub(channel)
        caller = Caller(tenant=DEFAULT_TENANT, principal=principal, scopes=frozenset({Scope.ADMIN.value}))
        self._metadata = caller.metadata()

    async def create_key(
        self,
        tenant: str,
        scopes: Sequence[str],
        *,
        description: str = "",
        rate: pb.RateLimit | None = None,
    ) -> pb.CreateKeyResponse:
        request = pb.CreateKeyRequest(tenant=tenant, scopes=scopes, description=description, rate=rate)
        response: pb.CreateKeyResponse = await self._stub.CreateKey(request, metadata=self._metadata)
        return response

    async def list_keys(self, tenant: str = "", *, include_revoked: bool = False) -> list[pb.ApiKey]:
        """Every page of the listing."""
        keys: list[pb.ApiKey] = []
        token = ""
        while True:
            request = pb.ListKeysRequest(tenant=tenant, include_revoked=include_revoked, page_token=token)
            page = await self._stub.ListKeys(request, metadata=self._metadata)
            keys.extend(page.keys)
            token = page.next_page_token
            if not token:
                return keys

    async def revoke_key(self, key_id: str) -> pb.ApiKey:
        key: pb.ApiKey = await self._stub.RevokeKey(pb.RevokeKeyRequest(id=key_id), metadata=self._metadata)
        return key

    async def usage(
        self,
        *,
        key_id: str = "",
        tenant: str = "",
        model: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        hourly: bool = False,
    ) -> list[pb.Usage]:
        request = pb.GetUsageRequest(
            key_id=key_id,
            tenant=tenant,
            model=model,
            start_time=timestamp(since),
            end_time=timestamp(until),
            hourly=hourly,
        )
        response = await self._stub.GetUsage(request, metadata=self._metadata)
        return list(response.usage)


def _time(message: Any, field: str) -> str:
    if not message.HasField(field):
        return "-"
    return str(getattr(message, field).ToDatetime().strftime("%Y-%m-%d %H:%M"))


def key_lines(keys: Sequence[pb.ApiKey]) -> list[str]:
    """A table of keys for a terminal."""
    header = f"{'ID':<12}  {'TENANT':<16} {'STATE':<7} {'CREATED':<16}  {'LAST USED':<16}"
    lines = [f"{header}  SCOPES  DESCRIPTION"]
    for key in keys:
        state = "revoked" if key.HasField("revoke_time") else "active"
        lines.append(
            f"{key.id:<12}  {key.tenant:<16} {state:<7} {_time(key, 'create_time'):<16}"
            f"  {_time(key, 'last_used_time'):<16}  {','.join(key.scopes)}  {key.description}"
        )
    return lines


def usage_lines(usage: Sequence[pb.Usage], *, hourly: bool) -> list[str]:
    """A table of usage counters for a terminal, with a total line."""
    hour = f"{'HOUR':<16}  " if hourly else ""
    lines = [f"{hour}{'KEY':<12}  {'TENANT':<16} {'MODEL':<32} {'REQUESTS':>10} {'ROWS':>12}"]
    for row in usage:
        hour = f"{_time(row, 'hour'):<16}  " if hourly else ""
        counts = f"{row.requests:>10} {row.rows:>12}"
        lines.append(f"{hour}{row.key_id:<12}  {row.tenant:<16} {row.model or '-':<32} {counts}")
    total = (sum(r.requests for r in usage), sum(r.rows for r in usage))
    pad = " " * 18 if hourly else ""
    lines.append(f"{pad}{'total':<12}  {'':<16} {'':<32} {total[0]:>10} {total[1]:>12}")
    return lines
