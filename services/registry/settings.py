"""The registry's settings, read once from ``SCOREMESH_*`` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.postgres import resolve_database_url
from services.mesh.settings import MeshSettings, env_bytes, env_float, env_int, env_str
from services.registry.verification import VerificationLimits


@dataclass(frozen=True)
class RegistrySettings:
    mesh: MeshSettings
    host: str
    """SCOREMESH_REGISTRY_HOST: the address to listen on (default 127.0.0.1)."""
    port: int
    """SCOREMESH_REGISTRY_PORT: the gRPC port (default 50051; 0 lets the OS choose)."""
    database_url: str | None
    """SCOREMESH_DATABASE_URL or DATABASE_URL; unset: a private PostgreSQL under SCOREMESH_HOME."""
    max_upload_bytes: int
    """SCOREMESH_MAX_UPLOAD_BYTES: the largest artifact accepted (default 2GiB)."""
    verify_concurrency: int
    """SCOREMESH_VERIFY_CONCURRENCY: verifications run at once, each in its own process (default 2)."""
    limits: VerificationLimits
    """SCOREMESH_VERIFY_TIMEOUT_S (60), SCOREMESH_VERIFY_CHECK_TIMEOUT_S (300),
    SCOREMESH_VERIFY_MEMORY_BYTES (8GiB), SCOREMESH_VERIFY_MAX_TENSOR_BYTES (4GiB): the trial
    inference's time limit, the static checks' time limit, the verification process's memory
    limit and the largest declared tensor."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistrySettings:
        env = os.environ if env is None else env
        defaults = VerificationLimits()
        return cls(
            mesh=MeshSettings.from_env(env),
            host=env_str(env, "SCOREMESH_REGISTRY_HOST", "127.0.0.1"),
            port=env_int(env, "SCOREMESH_REGISTRY_PORT", 50051, minimum=0, maximum=65535),
            database_url=resolve_database_url(env),
            max_upload_bytes=env_bytes(env, "SCOREMESH_MAX_UPLOAD_BYTES", 2 * 1024**3),
            verify_concurrency=env_int(env, "SCOREMESH_VERIFY_CONCURRENCY", 2, minimum=1, maximum=64),
            limits=VerificationLimits(
                max_tensor_bytes=env_bytes(
                    env, "SCOREMESH_VERIFY_MAX_TENSOR_BYTES", defaults.max_tensor_bytes
                ),
                trial_timeout_s=env_float(
                    env, "SCOREMESH_VERIFY_TIMEOUT_S", defaults.trial_timeout_s, minimum=0.1
                ),
                check_timeout_s=env_float(
                    env, "SCOREMESH_VERIFY_CHECK_TIMEOUT_S", defaults.check_timeout_s, minimum=0.1
                ),
                # onnxruntime needs about 3.3x the file to load it: room for a 2 GiB upload
                trial_memory_bytes=env_bytes(
                    env, "SCOREMESH_VERIFY_MEMORY_BYTES", 8 * 1024**3, minimum=64 * 1024**2
                ),
            ),
        )
