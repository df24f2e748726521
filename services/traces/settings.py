"""The local trace store's and receiver's settings, read once from ``SCOREMESH_TRACES_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.mesh.settings import EnvVar, env_float, env_int

__all__ = ["ENVIRONMENT", "STORE_FILE", "TracesSettings"]

STORE_FILE: Final = "spans.sqlite3"
"""The store's file name in :attr:`TracesSettings.directory`."""

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar("SCOREMESH_TRACES_MAX_SPANS", "200000", "spans kept; the oldest traces go first beyond it"),
    EnvVar("SCOREMESH_TRACES_MAX_AGE_S", "604800", "traces older than this (7 days) are dropped"),
    EnvVar("SCOREMESH_TRACES_GRPC_PORT", "0", "the local receiver's OTLP/gRPC port on 127.0.0.1 (0: any)"),
    EnvVar("SCOREMESH_TRACES_HTTP_PORT", "0", "the local receiver's OTLP/HTTP port on 127.0.0.1 (0: any)"),
)


@dataclass(frozen=True)
class TracesSettings:
    """Where spans are stored and how many are kept; where the local receiver listens."""

    directory: Path
    """``$SCOREMESH_HOME/traces``: the SQLite store (:data:`STORE_FILE`) and its WAL files."""
    max_spans: int
    """SCOREMESH_TRACES_MAX_SPANS: the store keeps about this many spans, dropping whole
    traces, oldest first, beyond it (down to nine tenths, so that it does not prune on every
    export). A span takes roughly 0.5-1 KB on disk. Default 200000."""
    max_age_s: float
    """SCOREMESH_TRACES_MAX_AGE_S: traces that started longer ago are dropped. Default
    604800 (7 days)."""
    grpc_port: int
    """SCOREMESH_TRACES_GRPC_PORT: the receiver's OTLP/gRPC port; it binds 127.0.0.1 only.
    Default 0: the OS picks one, which ``scoremesh up`` prints and passes on."""
    http_port: int
    """SCOREMESH_TRACES_HTTP_PORT: the receiver's OTLP/HTTP port (``POST /v1/traces``),
    on 127.0.0.1 only. Default 0."""

    @property
    def store_path(self) -> Path:
        return self.directory / STORE_FILE

    @classmethod
    def from_env(cls, home: Path, env: Mapping[str, str] | None = None) -> TracesSettings:
        """Reads the ``SCOREMESH_TRACES_*`` variables from ``env`` (default ``os.environ``);
        ``home`` is ``SCOREMESH_HOME`` as the mesh's settings read it."""
        env = os.environ if env is None else env
        return cls(
            directory=home / "traces",
            max_spans=env_int(env, "SCOREMESH_TRACES_MAX_SPANS", 200_000, minimum=1),
            max_age_s=env_float(env, "SCOREMESH_TRACES_MAX_AGE_S", 7 * 24 * 3600.0, minimum=1.0),
            grpc_port=env_int(env, "SCOREMESH_TRACES_GRPC_PORT", 0, minimum=0, maximum=65535),
            http_port=env_int(env, "SCOREMESH_TRACES_HTTP_PORT", 0, minimum=0, maximum=65535),
        )
