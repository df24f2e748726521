"""The scoring service's settings, read once from ``SCOREMESH_*`` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.postgres import resolve_database_url
from services.mesh.settings import MeshSettings, env_bool, env_bytes, env_float, env_int, env_str
from services.scoring.triton_server import ADMIN_KEY

BACKENDS = ("triton", "onnxruntime")
FALLBACKS = ("onnxruntime", "none")


@dataclass(frozen=True)
class ScoringSettings:
    mesh: MeshSettings
    host: str
    """SCOREMESH_SCORING_HOST: the address to listen on (default 127.0.0.1)."""
    port: int
    """SCOREMESH_SCORING_PORT: the gRPC port (default 50052; 0 lets the OS choose)."""
    registry_addr: str
    """SCOREMESH_REGISTRY_ADDR: the registry to resolve and follow models from (default
    127.0.0.1:50051)."""
    database_url: str | None
    """SCOREMESH_DATABASE_URL or DATABASE_URL: where the prediction log and feedback go; unset:
    a private PostgreSQL under SCOREMESH_HOME."""
    backend: str
    """SCOREMESH_SCORING_BACKEND: ``triton`` (default) or ``onnxruntime`` (in-process only)."""
    triton_url: str | None
    """SCOREMESH_TRITON_URL: a remote Triton's gRPC ``host:port``; unset: the service starts and
    supervises a local ``tritonserver`` on 127.0.0.1 (from the nvidia-pytriton wheel). With
    ``SCOREMESH_TLS_*`` set, the channel to a remote Triton is mutual TLS with the mesh's
    certificate and CA; the local one stays plaintext on loopback."""
    triton_repository_secret: str | None
    """SCOREMESH_TRITON_REPOSITORY_SECRET: for a remote Triton started with
    ``--grpc-restricted-protocol=model-repository:<key>=<secret>``, that secret. A local
    Triton gets a random one."""
    triton_repository_key: str
    """SCOREMESH_TRITON_REPOSITORY_KEY: that ``<key>`` (default ``scoremesh-admin``); Triton
    checks it in the ``triton-grpc-protocol-<key>`` header."""
    triton_model_backend: str
    """SCOREMESH_TRITON_MODEL_BACKEND: how Triton runs models: ``onnxruntime`` (Triton's own
    backend), ``python`` (a generated python model running onnxruntime), or ``auto`` (the
    default: onnxruntime where the server has that backend, as NGC images do; python
    otherwise, as in the nvidia-pytriton wheel)."""
    fallback: str
    """SCOREMESH_FALLBACK: ``onnxruntime`` (default): while the breaker around Triton is open,
    onnxruntime in-process serves; ``none``: requests fail fast with UNAVAILABLE."""
    breaker_failures: int
    """SCOREMESH_BREAKER_FAILURES: consecutive backend failures that open the breaker (default 3)."""
    breaker_open_s: float
    """SCOREMESH_BREAKER_OPEN_S: how long the breaker stays open before one probe (default 2)."""
    max_batch_size: int
    """SCOREMESH_MAX_BATCH_SIZE: rows in one backend call (default 64; 0 disables batching)."""
    max_concurrent_batches: int
    """SCOREMESH_MAX_CONCURRENT_BATCHES: backend calls in flight per model version (default 1:
    requests that arrive while one runs form the next batch, so batches grow with load)."""
    max_queue_delay_s: float
    """SCOREMESH_MAX_QUEUE_DELAY_MS (read in ms): the most a small batch is held open while the
    backend is free and requests keep arriving; it closes at the first moment none arrives
    (default 0: an idle backend runs at once; under load requests coalesce while the previous
    batch runs)."""
    max_request_bytes: int
    """SCOREMESH_MAX_REQUEST_BYTES: the largest decoded request (default 16MiB); larger ones
    get RESOURCE_EXHAUSTED."""
    cache_bytes: int
    """SCOREMESH_CACHE_BYTES: the response cache's bound (default 0: off)."""
    session_cache_bytes: int
    """SCOREMESH_SESSION_CACHE_BYTES: onnxruntime sessions kept in memory (LRU, default 2GiB)."""
    prediction_log_rate: float
    """SCOREMESH_PREDICTION_LOG_RATE: the share of predictions logged with their inputs and
    outputs, in [0, 1] (default 1)."""
    resolve_ttl_s: float
    """SCOREMESH_RESOLVE_TTL_S: how long a resolved (tenant, model, reference) is used before
    it is checked again in the background (default 10; the registry's change stream moves
    aliases at once, this bounds visibility changes)."""
    canary_interval_s: float
    """SCOREMESH_CANARY_INTERVAL_S: how often each loaded version runs a canary inference on
    its backend so that readiness tells the truth (default 10; 0 disables)."""
    gpu: bool | None
    """SCOREMESH_GPU: force (1) or forbid (0) GPU instances; unset: detected."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ScoringSettings:
        env = os.environ if env is None else env
        gpu_raw = env.get("SCOREMESH_GPU")
        return cls(
            mesh=MeshSettings.from_env(env),
            host=env_str(env, "SCOREMESH_SCORING_HOST", "127.0.0.1"),
            port=env_int(env, "SCOREMESH_SCORING_PORT", 50052, minimum=0, maximum=65535),
            registry_addr=env_str(env, "SCOREMESH_REGISTRY_ADDR", "127.0.0.1:50051"),
            database_url=resolve_database_url(env),
            backend=env_str(env, "SCOREMESH_SCORING_BACKEND", "triton", choices=BACKENDS),
            triton_url=env.get("SCOREMESH_TRITON_URL") or None,
            triton_repository_secret=env.get("SCOREMESH_TRITON_REPOSITORY_SECRET") or None,
            triton_repository_key=env_str(env, "SCOREMESH_TRITON_REPOSITORY_KEY", ADMIN_KEY),
            triton_model_backend=env_str(
                env, "SCOREMESH_TRITON_MODEL_BACKEND", "auto", choices=("auto", "python", "onnxruntime")
            ),
            fallback=env_str(env, "SCOREMESH_FALLBACK", "onnxruntime", choices=FALLBACKS),
            breaker_failures=env_int(env, "SCOREMESH_BREAKER_FAILURES", 3, minimum=1),
            breaker_open_s=env_float(env, "SCOREMESH_BREAKER_OPEN_S", 2.0, minimum=0.01),
            max_batch_size=env_int(env, "SCOREMESH_MAX_BATCH_SIZE", 64, minimum=0, maximum=65536),
            max_concurrent_batches=env_int(env, "SCOREMESH_MAX_CONCURRENT_BATCHES", 1, minimum=1, maximum=64),
            max_queue_delay_s=env_float(env, "SCOREMESH_MAX_QUEUE_DELAY_MS", 0.0, minimum=0.0) / 1000,
            max_request_bytes=env_bytes(env, "SCOREMESH_MAX_REQUEST_BYTES", 16 * 1024**2, minimum=1024),
            cache_bytes=env_bytes(env, "SCOREMESH_CACHE_BYTES", 0),
            session_cache_bytes=env_bytes(env, "SCOREMESH_SESSION_CACHE_BYTES", 2 * 1024**3),
            prediction_log_rate=env_float(
                env, "SCOREMESH_PREDICTION_LOG_RATE", 1.0, minimum=0.0, maximum=1.0
            ),
            resolve_ttl_s=env_float(env, "SCOREMESH_RESOLVE_TTL_S", 10.0, minimum=0.0),
            canary_interval_s=env_float(env, "SCOREMESH_CANARY_INTERVAL_S", 10.0, minimum=0.0),
            gpu=None if gpu_raw in (None, "") else env_bool(env, "SCOREMESH_GPU", False),
        )
