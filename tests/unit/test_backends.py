"""The fallback policy between the primary backend and onnxruntime in-process, with fakes that
implement the Backend interface (the real backends are tested against Triton and onnxruntime)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.mesh.errors import InvalidArgument, MeshError, NotFound, Unavailable
from services.registry.domain import Signature, TensorSpec
from services.scoring.backend import Array, LoadedVersion
from services.scoring.backends import BackendSet
from services.scoring.breaker import BreakerState, CircuitBreaker

VERSION = LoadedVersion(
    "m",
    1,
    "0" * 64,
    Signature((TensorSpec("x", "FP32", (-1, 1)),), (TensorSpec("y", "FP32", (-1, 1)),)),
    b"",
    8,
)


class FakeBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.loaded: set[tuple[str, int]] = set()
        self.load_error: MeshError | None = None
        self.infer_error: MeshError | None = None
        self.calls = 0

    async def load(self, version: LoadedVersion) -> None:
        if self.load_error is not None:
            raise self.load_error
        self.loaded.add(version.key)

    async def unload(self, model: str, version: int) -> None:
        self.loaded.discard((model, version))

    async def infer(
        self,
        version: LoadedVersion,
        inputs: Mapping[str, Array],
        outputs: Sequence[str],
        *,
        timeout_s: float | None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Array]:
        self.calls += 1
        if self.infer_error is not None:
            raise self.infer_error
        if version.key not in self.loaded:
            raise NotFound("not loaded")
        return {"y": np.asarray(inputs["x"]) * 2}

    async def healthy(self) -> bool:
        return self.infer_error is None

    async def close(self) -> None:
        pass


def _set(*, fallback: bool = True) -> tuple[BackendSet, FakeBackend, FakeBackend]:
    primary, in_process = FakeBackend("triton"), FakeBackend("onnxruntime")
    return BackendSet(primary, in_process, fallback, CircuitBreaker(2, 60.0)), primary, in_process


INPUTS = {"x": np.ones((1, 1), np.float32)}


def _state(backends: BackendSet) -> BreakerState:
    assert backends.breaker is not None
    return backends.breaker.state


async def test_the_primary_serves_while_it_works() -> None:
    backends, primary, _ = _set()
    await backends.load(VERSION)
    backend = backends.choose(VERSION)
    assert backend is primary
    assert (await backends.run(backend, VERSION, INPUTS, (), 1.0))["y"].tolist() == [[2.0]]


async def test_failures_open_the_breaker_and_the_fallback_takes_over() -> None:
    backends, primary, in_process = _set()
    await backends.load(VERSION)
    primary.infer_error = Unavailable("down")
    for _ in range(2):
        with pytest.raises(Unavailable):
            await backends.run(primary, VERSION, INPUTS, (), 1.0)
    assert _state(backends) is BreakerState.OPEN
    backend = backends.choose(VERSION)
    assert backend is in_process
    # the fallback had never loaded the version: it is loaded on first use
    assert (await backends.run(backend, VERSION, INPUTS, (), 1.0))["y"].tolist() == [[2.0]]
    assert backends.fallback_for(primary) is in_process


async def test_without_a_fallback_an_open_breaker_fails_fast() -> None:
    backends, primary, _ = _set(fallback=False)
    await backends.load(VERSION)
    primary.infer_error = Unavailable("down")
    for _ in range(2):
        with pytest.raises(Unavailable):
            await backends.run(primary, VERSION, INPUTS, (), 1.0)
    calls = primary.calls
    with pytest.raises(Unavailable, match="fail fast"):
        backends.choose(VERSION)
    assert primary.calls == calls
    assert backends.fallback_for(primary) is None


async def test_bad_input_does_not_count_against_the_primary() -> None:
    backends, primary, _ = _set()
    await backends.load(VERSION)
    primary.infer_error = InvalidArgument("bad row")
    for _ in range(5):
        with pytest.raises(InvalidArgument):
            await backends.run(primary, VERSION, INPUTS, (), 1.0)
    assert _state(backends) is BreakerState.CLOSED


async def test_a_version_the_primary_refuses_is_served_in_process() -> None:
    backends, primary, in_process = _set(fallback=False)
    primary.load_error = InvalidArgument("BF16 is not supported")
    await backends.load(VERSION)
    assert backends.choose(VERSION) is in_process
    assert VERSION.key in in_process.loaded
    assert _state(backends) is BreakerState.CLOSED
    await backends.unload(VERSION)
    assert VERSION.key not in in_process.loaded


async def test_a_primary_that_cannot_load_now_hands_the_version_to_the_fallback() -> None:
    backends, primary, in_process = _set()
    primary.load_error = Unavailable("down")
    await backends.load(VERSION)
    assert VERSION.key in in_process.loaded


async def test_without_a_fallback_a_failed_load_fails() -> None:
    backends, primary, _ = _set(fallback=False)
    primary.load_error = Unavailable("down")
    with pytest.raises(Unavailable):
        await backends.load(VERSION)
