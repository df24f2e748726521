"""The primary backend, the in-process fallback, and the circuit breaker between them.

Triton (or onnxruntime alone) is the primary. While the breaker around it is open, requests
go to onnxruntime in-process when a fallback is configured, or fail fast with UNAVAILABLE.
A version is loaded into the primary when it is routed; the fallback loads it on first use,
from the bytes the version carries. A backend that reports NOT_FOUND for a version this
service routes (Triton restarted and has not reloaded yet, or a fallback that never saw it)
gets it loaded and the call retried once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.mesh.errors import InvalidArgument, NotFound, Unavailable
from services.scoring.backend import Array, Backend, LoadedVersion
from services.scoring.breaker import BreakerState, CircuitBreaker

log = logging.getLogger(__name__)


@dataclass
class BackendStats:
    fallback_batches: int = 0
    failed_loads: int = 0
    canary_failures: int = 0


@dataclass
class BackendSet:
    primary: Backend
    in_process: Backend
    """onnxruntime in this process; the same object as ``primary`` when it is the primary."""
    fallback: bool
    """Whether ``in_process`` serves while the primary's breaker is open
    (SCOREMESH_FALLBACK=onnxruntime); otherwise requests fail fast."""
    breaker: CircuitBreaker | None
    """None when onnxruntime in-process is the primary: nothing to fail over to."""
    stats: BackendStats = field(default_factory=BackendStats)
    _pinned: set[tuple[str, int]] = field(default_factory=set)
    """Versions the primary cannot run at all (a signature it does not support): they are
    served in-process, whatever the breaker says."""

    def choose(self, version: LoadedVersion) -> Backend:
        """The backend for the next request: the primary unless its breaker is open."""
        if version.key in self._pinned:
            return self.in_process
        if self.breaker is None or self.breaker.allow():
            return self.primary
        if not self.fallback:
            raise Unavailable(
                f"the {self.primary.name} backend is failing; requests fail fast until it recovers",
                reason="BACKEND_UNAVAILABLE",
                metadata={"backend": self.primary.name},
            )
        return self.in_process

    def fallback_for(self, backend: Backend) -> Backend | None:
        """Where a batch that ``backend`` could not run goes next, if anywhere."""
        if self.fallback and backend is self.primary and backend is not self.in_process:
            return self.in_process
        return None

    @property
    def degraded(self) -> bool:
        return self.breaker is not None and self.breaker.state is not BreakerState.CLOSED

    async def load(self, version: LoadedVersion) -> None:
        """Loads and warms ``version`` on the primary. A version the primary cannot run is
        served in-process instead; with a fallback, a primary that cannot load now (it is
        down) does not stop the version from being served either: the fallback takes it and
        the breaker hears of the failure."""
        try:
            await self.primary.load(version)
            self._record(self.primary, ok=True)
        except InvalidArgument as refusal:
            if self.primary is self.in_process:
                raise
            log.info("%s v%d runs in-process: %s", *version.key, refusal.message)
            await self.in_process.load(version)
            self._pinned.add(version.key)
        except Unavailable:
            self.stats.failed_loads += 1
            self._record(self.primary, ok=False)
            if not self.fallback:
                raise
            log.warning("%s cannot load %s v%d now; serving it in-process", self.primary.name, *version.key)
            await self.in_process.load(version)

    async def unload(self, version: LoadedVersion) -> None:
        self._pinned.discard(version.key)
        for backend in {id(b): b for b in (self.primary, self.in_process)}.values():
            try:
                await backend.unload(version.model, version.version)
            except Exception as error:  # the version is gone from routing either way
                log.warning("%s could not unload %s v%d: %s", backend.name, *version.key, error)

    async def run(
        self,
        backend: Backend,
        version: LoadedVersion,
        inputs: Mapping[str, Array],
        outputs: Sequence[str],
        timeout_s: float,
        trace_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Array]:
        """One batch on ``backend``; what it says about the primary's health goes to the
        breaker (UNAVAILABLE counts against it; any answer, even a refusal of the input,
        shows that it works)."""
        if backend is not self.primary:
            self.stats.fallback_batches += 1  # pinned versions count too
        try:
            try:
                result = await backend.infer(
                    version, inputs, outputs, timeout_s=timeout_s, trace_headers=trace_headers
                )
            except NotFound:
                await backend.load(version)
                result = await backend.infer(
                    version, inputs, outputs, timeout_s=timeout_s, trace_headers=trace_headers
                )
        except Unavailable:
            self._record(backend, ok=False)
            raise
        except InvalidArgument:
            self._record(backend, ok=True)
            raise
        self._record(backend, ok=True)
        return result

    def _record(self, backend: Backend, *, ok: bool) -> None:
        if self.breaker is None or backend is not self.primary:
            return
        if ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()

    async def healthy(self) -> bool:
        return await self.primary.healthy()

    async def close(self) -> None:
        for backend in {id(b): b for b in (self.primary, self.in_process)}.values():
            await backend.close()
