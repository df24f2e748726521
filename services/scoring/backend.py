"""What every inference backend offers the scoring service, and what it is given to load.

A backend runs whole batches: ``infer`` takes one array per input, each with the batch on
axis 0 (or no batch axis for a model that does not batch), and returns one array per
requested output. Batching, caching, routing and fallback live above this interface.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import numpy.typing as npt

from services.registry.domain import Signature

Array: TypeAlias = npt.NDArray[Any]
"""Any numpy array: tensors cross this interface with every dtype."""


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """One registry version as a backend loads it: its ONNX bytes (verified by the registry),
    its signature and how it batches. ``max_batch_size`` 0 means the graph has no batch axis
    (its inputs' first dimension is not variable); otherwise it is the most rows one backend
    call may carry."""

    model: str
    version: int
    sha256: str
    signature: Signature
    onnx_bytes: bytes = field(repr=False)
    max_batch_size: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.model, self.version)


class Backend(Protocol):
    """An inference backend. Errors: ``services.mesh.errors`` types only —
    ``Unavailable`` when the backend cannot run anything right now (the breaker counts
    these), ``InvalidArgument`` when this input cannot run (the request's fault),
    ``DeadlineExceeded`` when ``timeout_s`` ran out, ``NotFound`` when the version is not
    loaded."""

    name: str
    """``triton`` or ``onnxruntime``: what the response's ``backend`` parameter says."""

    async def load(self, version: LoadedVersion) -> None:
        """Makes ``version`` ready to infer (idempotent)."""
        ...

    async def unload(self, model: str, version: int) -> None:
        """Frees what ``load`` took (idempotent; unknown versions are ignored)."""
        ...

    async def infer(
        self,
        version: LoadedVersion,
        inputs: Mapping[str, Array],
        outputs: Sequence[str],
        *,
        timeout_s: float | None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Array]:
        """Runs one batch; ``outputs`` names the outputs wanted (all of the signature's when
        empty). ``trace_headers`` (W3C ``traceparent``…) go along where the backend can take
        them."""
        ...

    async def healthy(self) -> bool:
        """Whether the backend answers at all (a cheap liveness check, not a canary)."""
        ...

    async def close(self) -> None: ...
