"""The gateway's settings, read once from ``SCOREMESH_*`` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.postgres import resolve_database_url
from services.mesh.settings import MeshSettings, env_bytes, env_float, env_int, env_str


@dataclass(frozen=True)
class GatewaySettings:
    mesh: MeshSettings
    host: str
    """SCOREMESH_GATEWAY_HOST: the address to listen on (default 127.0.0.1)."""
    port: int
    """SCOREMESH_GATEWAY_PORT: the HTTP port (default 8080; 0 lets the OS choose)."""
    grpc_port: int
    """SCOREMESH_GATEWAY_GRPC_PORT: the gRPC port of the gateway's Admin service (API keys and
    usage), on the same host (default 50054; 0 lets the OS choose)."""
    registry_addr: str
    """SCOREMESH_REGISTRY_ADDR: the registry (default 127.0.0.1:50051)."""
    scoring_addr: str
    """SCOREMESH_SCORING_ADDR: the scoring service (default 127.0.0.1:50052)."""
    training_addr: str
    """SCOREMESH_TRAINING_ADDR: the training service (default 127.0.0.1:50053)."""
    database_url: str | None
    """SCOREMESH_DATABASE_URL or DATABASE_URL: where API keys and usage live; unset: a private
    PostgreSQL under SCOREMESH_HOME."""
    max_body_bytes: int
    """SCOREMESH_GATEWAY_MAX_BODY_BYTES: the largest JSON body (default 16MiB; uploads stream
    and are bounded by the registry's SCOREMESH_MAX_UPLOAD_BYTES); larger ones get 413."""
    rate_per_second: float
    """SCOREMESH_GATEWAY_RATE: requests per second a key may make unless it has its own rate
    (default 50)."""
    burst: int
    """SCOREMESH_GATEWAY_BURST: the burst above that rate (default 100)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        env = os.environ if env is None else env
        return cls(
            mesh=MeshSettings.from_env(env),
            host=env_str(env, "SCOREMESH_GATEWAY_HOST", "127.0.0.1"),
            port=env_int(env, "SCOREMESH_GATEWAY_PORT", 8080, minimum=0, maximum=65535),
            grpc_port=env_int(env, "SCOREMESH_GATEWAY_GRPC_PORT", 50054, minimum=0, maximum=65535),
            registry_addr=env_str(env, "SCOREMESH_REGISTRY_ADDR", "127.0.0.1:50051"),
            scoring_addr=env_str(env, "SCOREMESH_SCORING_ADDR", "127.0.0.1:50052"),
            training_addr=env_str(env, "SCOREMESH_TRAINING_ADDR", "127.0.0.1:50053"),
            database_url=resolve_database_url(env),
            max_body_bytes=env_bytes(env, "SCOREMESH_GATEWAY_MAX_BODY_BYTES", 16 * 1024**2, minimum=1024),
            rate_per_second=env_float(env, "SCOREMESH_GATEWAY_RATE", 50.0, minimum=0.001),
            burst=env_int(env, "SCOREMESH_GATEWAY_BURST", 100, minimum=1),
        )
