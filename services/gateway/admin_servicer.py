"""``scoremesh.gateway.v1.Admin`` over gRPC: protobuf in, a call on the KeyStore or the usage
recorder, protobuf out. Domain errors become statuses in the mesh's server interceptor."""

from __future__ import annotations

from typing import Any, Final

import grpc
from scoremesh.gateway.v1 import admin_pb2 as pb
from scoremesh.gateway.v1 import admin_pb2_grpc

from services.gateway import converters as conv
from services.gateway.keys import KeyStore, Scope
from services.gateway.quotas import UsageRecorder
from services.mesh.conversions import datetime_of
from services.mesh.errors import PermissionDenied
from services.mesh.identity import Caller, caller_from_metadata

SERVICE_NAME: Final = "scoremesh.gateway.v1.Admin"
Context = grpc.aio.ServicerContext[Any, Any]


def _admin(context: Context) -> Caller:
    """The caller, once it holds the admin scope (PERMISSION_DENIED, MISSING_SCOPE, if not)."""
    caller = caller_from_metadata(context.invocation_metadata())
    if Scope.ADMIN.value not in caller.scopes:
        raise PermissionDenied(
            f"{caller.principal} lacks the scope 'admin'",
            reason="MISSING_SCOPE",
            metadata={"scope": Scope.ADMIN.value},
        )
    return caller


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, keys: KeyStore, usage: UsageRecorder) -> None:
        self._keys = keys
        self._usage = usage

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        caller = _admin(context)
        key, token = await self._keys.create(
            request.tenant,
            list(request.scopes),
            description=request.description,
            created_by=caller.principal,
            rate=conv.rate_from_pb(request),
        )
        return pb.CreateKeyResponse(key=conv.key_to_pb(key), token=token)

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        _admin(context)
        page = await self._keys.list(
            request.tenant or None,
            include_revoked=request.include_revoked,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListKeysResponse(
            keys=[conv.key_to_pb(k) for k in page.keys], next_page_token=page.next_page_token
        )

    async def GetKey(self, request: pb.GetKeyRequest, context: Context) -> pb.ApiKey:
        _admin(context)
        return conv.key_to_pb(await self._keys.get(request.id))

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Context) -> pb.ApiKey:
        _admin(context)
        return conv.key_to_pb(await self._keys.revoke(request.id))

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        _admin(context)
        rows = await self._usage.usage(
            key_id=request.key_id or None,
            tenant=request.tenant or None,
            model=request.model or None,
            since=datetime_of(request, "start_time"),
            until=datetime_of(request, "end_time"),
            hourly=request.hourly,
        )
        return pb.GetUsageResponse(usage=[conv.usage_to_pb(row) for row in rows])
