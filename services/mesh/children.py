"""Child Python processes that run this code base (verification, training plugins): the
command and environment that make ``python -m services.…`` import this very code, whatever
the parent's working directory, and limits a child sets on itself before it starts."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import services

_PR_SET_PDEATHSIG = 1
# resolved before any fork: a child must not load libraries between fork and exec
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

CODE_ROOT = Path(services.__file__).resolve().parent.parent
"""The directory holding the ``services`` package."""


def child_env(threads: int | None = 1, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment, with this code base first on PYTHONPATH and, when
    ``threads`` is given, the numeric libraries held to that many threads."""
    env = dict(os.environ)
    root = os.fspath(CODE_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    env.update(extra or {})
    return env


def die_with_parent() -> None:
    """Has this process sent SIGTERM when the process that started it dies (Linux), so that
    a parent killed with SIGKILL leaves no orphans behind. Also a ``preexec_fn``."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


MEMORY_LIMIT_ENV = "SCOREMESH_CHILD_MEMORY_BYTES"
"""Where a parent tells a child the address space it may use (see :func:`apply_own_limits`)."""


def limit_env(memory_bytes: int | None) -> dict[str, str]:
    """The environment entries that make a child calling :func:`apply_own_limits` hold to
    ``memory_bytes``."""
    return {MEMORY_LIMIT_ENV: str(memory_bytes)} if memory_bytes is not None else {}


def apply_own_limits() -> None:
    """Called first thing by a child this code base starts: it dies with its parent, and
    holds its address space to ``$SCOREMESH_CHILD_MEMORY_BYTES`` (allocations beyond fail
    with MemoryError). The child does this itself, after exec: a ``preexec_fn`` would run
    Python between fork and exec in a parent whose gRPC threads may hold locks, which
    aborts the child now and then."""
    die_with_parent()
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM when this process dies, without a ``preexec_fn``
    (see :mod:`services.mesh.exec_child`). Its environment needs :func:`child_env`'s
    PYTHONPATH when this code base is not installed."""
    return [sys.executable, "-m", "services.mesh.exec_child", str(os.getpid()), *argv]
