"""The scoring data plane: route → validate → cache → batch → backend → split → respond.

Everything here works on the Open Inference Protocol's messages as parsed (they are the
transport's data, converted once by ``services.scoring.tensors``) and on domain types; the
servicer only reads the caller and deadline off the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from opentelemetry import propagate, trace
from opentelemetry.util.types import AttributeValue

import services
from services.mesh.errors import DeadlineExceeded, MeshError, NotFound, Unavailable
from services.mesh.identity import Caller
from services.scoring import tensors
from services.scoring.backend import Array, Backend, LoadedVersion
from services.scoring.backends import BackendSet
from services.scoring.batcher import Batcher
from services.scoring.cache import CacheKey, ResponseCache
from services.scoring.oip import pb
from services.scoring.predictions import PredictionLog
from services.scoring.router import ModelRouter

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

SERVER_NAME = "scoremesh"
REQUEST_ID_PARAMETER = "request_id"
"""The response parameter carrying the id a request is logged under when it had none."""


@dataclass(frozen=True)
class ScoringLimits:
    max_request_bytes: int
    default_deadline_s: float
    canary_interval_s: float


@dataclass(frozen=True, slots=True)
class Served:
    """A request's outputs and the backend that computed them."""

    outputs: Mapping[str, Array]
    backend: str


# the cache stores arrays only: the backend rides along as one more, under a name that
# starts with NUL, which no exporter gives a tensor
_BACKEND_KEY = "\0backend"


@dataclass
class _Canary:
    ok: bool
    at: float


class ScoringService:
    def __init__(
        self,
        router: ModelRouter,
        backends: BackendSet,
        batcher: Batcher,
        cache: ResponseCache,
        prediction_log: PredictionLog | None,
        limits: ScoringLimits,
    ) -> None:
        self._router = router
        self._backends = backends
        self._batcher = batcher
        self._cache = cache
        self._prediction_log = prediction_log
        self._limits = limits
        self._canaries: dict[tuple[str, int], _Canary] = {}

    # inference

    async def infer(
        self, caller: Caller, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> pb.ModelInferResponse:
        loop = asyncio.get_running_loop()
        budget = self._limits.default_deadline_s if time_remaining is None else time_remaining
        deadline = loop.time() + min(budget, self._limits.default_deadline_s)
        async with self._router.lease(caller, request.model_name, request.model_version) as version:
            decoded = tensors.decode_request(
                request, version.signature, max_bytes=self._limits.max_request_bytes
            )
            inputs, outputs = decoded.inputs, decoded.outputs
            if self._cache.enabled:
                served = await self._cached(version, inputs, outputs, deadline)
            else:
                served = await self._execute(version, inputs, outputs, deadline)
        request_id = request.id or uuid.uuid4().hex
        parameters = {} if request.id else {REQUEST_ID_PARAMETER: request_id}
        response = tensors.encode_response(
            served.outputs,
            outputs,
            model_name=version.model,
            model_version=version.version,
            request_id=request.id,
            backend=served.backend,
            parameters=parameters,
        )
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "scoremesh.model": version.model,
                    "scoremesh.version": version.version,
                    "scoremesh.backend": served.backend,
                }
            )
        if self._prediction_log is not None:
            self._prediction_log.record(
                caller, request_id, version.model, version.version, served.backend, inputs, served.outputs
            )
        return response

    async def _cached(
        self, version: LoadedVersion, inputs: dict[str, Array], outputs: Sequence[str], deadline: float
    ) -> Served:
        """Identical requests share one execution and later ones are answered from the cache;
        a cached answer reports the backend that computed it."""

        computed = False

        async def compute() -> dict[str, Array]:
            nonlocal computed
            computed = True
            served = await self._execute(version, inputs, outputs, deadline)
            return {**served.outputs, _BACKEND_KEY: np.array(served.backend)}

        key = CacheKey(version.model, version.version, tensors.canonical_key(inputs, outputs))
        with _tracer.start_as_current_span("cache", attributes=_version_attributes(version)) as span:
            cached = dict(await self._cache.get_or_compute(key, compute))
            span.set_attribute("scoremesh.cache.hit", not computed)
        backend = str(cached.pop(_BACKEND_KEY))
        return Served(cached, backend)

    async def _execute(
        self, version: LoadedVersion, inputs: dict[str, Array], outputs: Sequence[str], deadline: float
    ) -> Served:
        backend = self._backends.choose(version)
        try:
            return await self._submit(backend, version, inputs, outputs, deadline)
        except Unavailable:
            fallback = self._backends.fallback_for(backend)
            if fallback is None:
                raise
            # the batch failed on the primary (it died under us): the request runs again
            # in-process instead of failing
            return await self._submit(fallback, version, inputs, outputs, deadline)

    async def _submit(
        self,
        backend: Backend,
        version: LoadedVersion,
        inputs: dict[str, Array],
        outputs: Sequence[str],
        deadline: float,
    ) -> Served:
        attributes = {**_version_attributes(version), "scoremesh.backend": backend.name}

        async def execute(batch: dict[str, Array], timeout_s: float) -> dict[str, Array]:
            with _tracer.start_as_current_span(f"backend {backend.name}", attributes=attributes):
                # Triton continues this context: its spans join the trace under this one when
                # it is sampled, and it records nothing when it is not
                headers: dict[str, str] = {}
                propagate.inject(headers)
                return await self._backends.run(
                    backend, version, batch, outputs, timeout_s, trace_headers=headers or None
                )

        if version.max_batch_size:
            key = (backend.name, version.key, tuple(outputs), _batch_shape(inputs))
            rows, limit = tensors.batch_rows(inputs), version.max_batch_size
            if rows <= limit:
                result = await self._batcher.submit(
                    key, inputs, deadline, execute=execute, attributes=attributes
                )
            else:
                # no backend call may carry more than max_batch_size rows (Triton refuses
                # them): a large request goes as several parts, each batched like any other
                parts = [
                    {name: array[start : start + limit] for name, array in inputs.items()}
                    for start in range(0, rows, limit)
                ]
                results = await asyncio.gather(
                    *(
                        self._batcher.submit(key, part, deadline, execute=execute, attributes=attributes)
                        for part in parts
                    )
                )
                result = {name: np.concatenate([r[name] for r in results]) for name in results[0]}
        else:
            # a graph without a batch axis runs alone
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise DeadlineExceeded("the deadline passed before the request ran")
            result = await execute(inputs, remaining)
        return Served(result, backend.name)

    # readiness and metadata

    async def server_ready(self) -> bool:
        """Ready when requests can be served: the primary answers, or a fallback stands in."""
        if self._backends.fallback:
            return True
        return await self._backends.healthy()

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=services.version(), extensions=["parameters"]
        )

    async def model_ready(self, caller: Caller, model: str, model_version: str) -> bool:
        """Whether the model can be scored now, confirmed by a real inference (a recent
        canary counts): Triton can say a model is ready while every inference fails."""
        try:
            async with self._router.lease(caller, model, model_version) as version:
                return await self.canary(version)
        except NotFound:
            return False
        except Unavailable:
            return False

    async def canary(self, version: LoadedVersion, *, max_age_s: float | None = None) -> bool:
        """Runs a generated input through whichever backend would serve now; a failure counts
        against the primary's breaker like any other."""
        max_age = self._limits.canary_interval_s if max_age_s is None else max_age_s
        now = time.monotonic()
        last = self._canaries.get(version.key)
        if last is not None and now - last.at < max_age:
            return last.ok
        try:
            backend = self._backends.choose(version)
            await self._backends.run(backend, version, tensors.sample_inputs(version.signature), (), 10.0)
            ok = True
        except MeshError as error:
            log.warning("canary of %s v%d failed: %s", version.model, version.version, error.message)
            ok = False
        self._canaries[version.key] = _Canary(ok, now)
        return ok

    async def model_metadata(
        self, caller: Caller, model: str, model_version: str
    ) -> pb.ModelMetadataResponse:
        async with self._router.lease(caller, model, model_version) as version:
            return tensors.model_metadata(version)

    async def check_loaded(self) -> None:
        """One round of canaries over every loaded version (run periodically)."""
        for version in self._router.loaded():
            await self.canary(version, max_age_s=0)


def _version_attributes(version: LoadedVersion) -> dict[str, AttributeValue]:
    return {"scoremesh.model": version.model, "scoremesh.version": version.version}


def _batch_shape(inputs: Mapping[str, Array]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What requests must share to be stacked along axis 0: each input's dtype and the
    dimensions after the batch axis."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))
