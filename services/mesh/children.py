"""Child Python processes that run this code base (verification, training plugins): the
command and environment that make ``python -m services.…`` import this very code, whatever
the parent's working directory, and limits a child sets on itself before it starts."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping
from pathlib import Path

import services
from services.mesh.supervisor import die_with_parent

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


def limited(memory_bytes: int | None) -> Callable[[], None]:
    """A ``preexec_fn``: the child dies with its parent and, with ``memory_bytes``, may not
    grow its address space beyond it (allocations fail with MemoryError/ENOMEM)."""

    def apply() -> None:
        die_with_parent()
        if memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return apply
