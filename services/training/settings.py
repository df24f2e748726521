"""The training service's and its workers' settings, read once from ``SCOREMESH_*`` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.postgres import resolve_database_url
from services.mesh.settings import MeshSettings, env_bytes, env_float, env_int, env_path, env_str


@dataclass(frozen=True)
class TrainingSettings:
    mesh: MeshSettings
    host: str
    """SCOREMESH_TRAINING_HOST: the address to listen on (default 127.0.0.1)."""
    port: int
    """SCOREMESH_TRAINING_PORT: the gRPC port (default 50053; 0 lets the OS choose)."""
    database_url: str | None
    """SCOREMESH_DATABASE_URL or DATABASE_URL; unset: a private PostgreSQL under SCOREMESH_HOME."""
    registry_addr: str
    """SCOREMESH_REGISTRY_ADDR: where workers register models (default 127.0.0.1:50051)."""
    scoring_addr: str
    """SCOREMESH_SCORING_ADDR: where feedback datasets are read (default 127.0.0.1:50052)."""
    store_dir: Path
    """SCOREMESH_TRAINING_STORE: datasets and trained models, content-addressed; the service
    and every worker must see the same directory (default $SCOREMESH_HOME/training)."""
    plugins_dir: Path | None
    """SCOREMESH_TRAINING_PLUGINS_DIR: a folder of plugin modules (*.py) beside the
    installed ones (default: none)."""
    max_dataset_bytes: int
    """SCOREMESH_TRAINING_MAX_DATASET_BYTES: the largest dataset upload (default 256MiB)."""
    max_attempts: int
    """SCOREMESH_TRAINING_MAX_ATTEMPTS: how often a job may start unless it says (default 3)."""
    time_limit_s: int
    """SCOREMESH_TRAINING_TIME_LIMIT_S: the longest a plugin may run per attempt, and the
    default for jobs that name none (default 3600)."""
    memory_bytes: int
    """SCOREMESH_TRAINING_MEMORY_BYTES: the address space a plugin process may use (default 8GiB)."""
    lease_s: float
    """SCOREMESH_TRAINING_LEASE_S: how long a job stays a worker's without a heartbeat;
    heartbeats come every third of it (default 15)."""
    worker_concurrency: int
    """SCOREMESH_TRAINING_WORKER_CONCURRENCY: jobs one worker process runs at once (default 1)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainingSettings:
        env = os.environ if env is None else env
        mesh = MeshSettings.from_env(env)
        plugins = env_str(env, "SCOREMESH_TRAINING_PLUGINS_DIR", "")
        return cls(
            mesh=mesh,
            host=env_str(env, "SCOREMESH_TRAINING_HOST", "127.0.0.1"),
            port=env_int(env, "SCOREMESH_TRAINING_PORT", 50053, minimum=0, maximum=65535),
            database_url=resolve_database_url(env),
            registry_addr=env_str(env, "SCOREMESH_REGISTRY_ADDR", "127.0.0.1:50051"),
            scoring_addr=env_str(env, "SCOREMESH_SCORING_ADDR", "127.0.0.1:50052"),
            store_dir=env_path(env, "SCOREMESH_TRAINING_STORE", mesh.home / "training"),
            plugins_dir=Path(plugins).expanduser() if plugins else None,
            max_dataset_bytes=env_bytes(env, "SCOREMESH_TRAINING_MAX_DATASET_BYTES", 256 * 1024**2),
            max_attempts=env_int(env, "SCOREMESH_TRAINING_MAX_ATTEMPTS", 3, minimum=1, maximum=100),
            time_limit_s=env_int(env, "SCOREMESH_TRAINING_TIME_LIMIT_S", 3600, minimum=1),
            memory_bytes=env_bytes(
                env, "SCOREMESH_TRAINING_MEMORY_BYTES", 8 * 1024**3, minimum=256 * 1024**2
            ),
            lease_s=env_float(env, "SCOREMESH_TRAINING_LEASE_S", 15.0, minimum=0.3),
            worker_concurrency=env_int(
                env, "SCOREMESH_TRAINING_WORKER_CONCURRENCY", 1, minimum=1, maximum=64
            ),
        )
