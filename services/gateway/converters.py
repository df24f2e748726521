"""The one place where ``scoremesh.gateway.v1`` messages and the gateway's domain objects meet."""

from __future__ import annotations

from scoremesh.gateway.v1 import admin_pb2 as pb

from services.gateway.keys import ApiKey, RateLimit, UsageRow
from services.mesh.conversions import timestamp


def rate_to_pb(rate: RateLimit | None) -> pb.RateLimit | None:
    if rate is None:
        return None
    return pb.RateLimit(requests_per_second=rate.requests_per_second, burst=rate.burst)


def rate_from_pb(message: pb.CreateKeyRequest) -> RateLimit | None:
    if not message.HasField("rate"):
        return None
    return RateLimit(message.rate.requests_per_second, message.rate.burst)


def key_to_pb(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        id=key.id,
        tenant=key.tenant,
        scopes=sorted(s.value for s in key.scopes),
        description=key.description,
        created_by=key.created_by,
        create_time=timestamp(key.create_time),
        revoke_time=timestamp(key.revoke_time),
        last_used_time=timestamp(key.last_used_time),
        rate=rate_to_pb(key.rate),
    )


def usage_to_pb(row: UsageRow) -> pb.Usage:
    return pb.Usage(
        key_id=row.key_id,
        tenant=row.tenant,
        model=row.model,
        hour=timestamp(row.bucket),
        requests=row.requests,
        rows=row.rows,
    )
