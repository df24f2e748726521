"""The in-process onnxruntime backend: one ``InferenceSession`` per loaded version.

Sessions live in an LRU cache bounded in bytes. A session's cost is estimated, not measured
(process RSS moves with every concurrent request): ``SESSION_MEMORY_FACTOR`` times its ONNX
file, since a session holds the initializers, optimized copies of some and its arenas. A
version evicted to make room is not forgotten: the next ``infer`` for it loads it again
(``load`` says "this version should be served"; only ``unload`` says "no longer").

Session creation and runs go to a bounded thread pool, never the event loop. A run that
outlives its ``timeout_s`` (or whose caller is cancelled) is stopped through
``RunOptions.terminate``, so an abandoned request does not keep a worker busy.

Errors (see ``Backend``): onnxruntime's complaints about an input, and any failure of the
graph while running one (a Gather index out of range, a Reshape that cannot hold), are
``InvalidArgument``: the model loaded and answers its canary, so a run that fails on this
input is the request's fault, and counting it as ``Unavailable`` would let one caller's bad
inputs open the breaker for everyone. An allocation failure is ``ResourceExhausted``; an
execution-provider failure (CUDA) and a session that cannot be built are ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from services.mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.scoring.backend import Array, LoadedVersion
from services.scoring.tensors import NUMPY_DTYPES, sample_inputs

log = logging.getLogger(__name__)

SESSION_MEMORY_FACTOR: Final = 2.0
"""A session's estimated memory, as a multiple of its ONNX file's size."""
DEFAULT_WORKERS: Final = 2
"""Threads of the pool the backend makes when it is not given one."""
CANARY_TIMEOUT_S: Final = 10.0

_CPU: Final = "CPUExecutionProvider"
_CUDA: Final = "CUDAExecutionProvider"
_BF16: Final = NUMPY_DTYPES["BF16"]
_ONNX_BFLOAT16: Final = 16  # onnx.TensorProto.BFLOAT16
_ALLOCATION_FAILURES: Final = ("Failed to allocate memory", "bad_alloc", "bad allocation")


@dataclass(frozen=True, slots=True)
class _Session:
    session: Any  # ort.InferenceSession (onnxruntime ships no type hints)
    sha256: str
    cost: int
    outputs: tuple[str, ...]
    bf16_outputs: frozenset[str]
    """Outputs numpy cannot receive from ``session.run``: they are read from OrtValues."""


class OnnxRuntimeBackend:
    """A ``Backend`` that runs ONNX graphs in this process.

    ``max_bytes`` bounds the sessions kept (a version larger than the bound still loads,
    alone); ``executor`` runs session creation and inference (the backend makes and owns a
    pool of ``DEFAULT_WORKERS`` threads when none is given); ``gpu`` True requires CUDA, False
    forbids it, None uses it when onnxruntime offers it and it works; ``intra_op_threads``
    (0: onnxruntime's default) sets each session's thread pool."""

    name = "onnxruntime"

    def __init__(
        self,
        *,
        max_bytes: int,
        executor: Executor | None = None,
        gpu: bool | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        self._max_bytes = max_bytes
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(DEFAULT_WORKERS, thread_name_prefix="onnxruntime")
        self._gpu = gpu
        self._cuda = gpu is not False and _CUDA in ort.get_available_providers()
        self._intra_op_threads = intra_op_threads
        self._wanted: set[tuple[str, int]] = set()
        self._sessions: OrderedDict[tuple[str, int], _Session] = OrderedDict()
        self._loading: dict[tuple[str, int, str], asyncio.Task[_Session]] = {}
        self._closed = False
        self._running: set[Any] = set()  # RunOptions of runs in flight, stopped by close()
        if gpu and not self._cuda:
            raise Unavailable("CUDA was required but onnxruntime offers no CUDA provider")

    @property
    def used_bytes(self) -> int:
        """The estimated memory of the sessions held now."""
        return sum(entry.cost for entry in self._sessions.values())

    def cached(self) -> list[tuple[str, int]]:
        """The (model, version) of each session held, least recently used first."""
        return list(self._sessions)

    async def load(self, version: LoadedVersion) -> None:
        self._wanted.add(version.key)
        try:
            await self._session(version)
        except MeshError:
            # a version that cannot load is not served: later calls say NotFound, not retry
            self._wanted.discard(version.key)
            raise

    async def unload(self, model: str, version: int) -> None:
        key = (model, version)
        self._wanted.discard(key)
        # a run in flight keeps its own reference: the session is freed when it ends
        self._sessions.pop(key, None)

    async def infer(
        self,
        version: LoadedVersion,
        inputs: Mapping[str, Array],
        outputs: Sequence[str],
        *,
        timeout_s: float | None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Array]:
        """Runs one batch (see ``Backend.infer``); ``trace_headers`` are not used in process."""
        if version.key not in self._wanted:
            raise NotFound(
                f"model {version.model!r} version {version.version} is not loaded in onnxruntime",
                reason="MODEL_NOT_LOADED",
            )
        loop = asyncio.get_running_loop()
        run_options = ort.RunOptions()
        # failures are translated and reported to the caller; onnxruntime's own log of each
        # failed kernel would only repeat them at ERROR level
        run_options.log_severity_level = 4
        self._running.add(run_options)
        try:
            async with asyncio.timeout(timeout_s):
                entry = await self._session(version)  # evicted versions load again, in time
                names = tuple(outputs) or entry.outputs
                return await loop.run_in_executor(self._executor, _run, entry, inputs, names, run_options)
        except TimeoutError as error:
            raise DeadlineExceeded(
                f"model {version.model!r} version {version.version} did not answer in {timeout_s}s",
                reason="INFERENCE_TIMEOUT",
            ) from error
        finally:
            # stops the run if it is still going: timed out, or its caller was cancelled
            run_options.terminate = True
            self._running.discard(run_options)

    async def healthy(self) -> bool:
        """In process there is nothing to reach: healthy until closed."""
        return not self._closed

    async def canary(
        self, version: LoadedVersion, *, timeout_s: float = CANARY_TIMEOUT_S
    ) -> dict[str, Array]:
        """Runs zeros shaped like the signature's inputs (one row) through ``version``: a
        warm-up after loading, and a probe that readiness can trust."""
        return await self.infer(version, sample_inputs(version.signature), (), timeout_s=timeout_s)

    @property
    def running(self) -> int:
        """Runs in flight (submitted to the executor and not yet finished)."""
        return len(self._running)

    async def close(self) -> None:
        self._closed = True
        for run_options in self._running:
            run_options.terminate = True
        loading = list(self._loading.values())
        for task in loading:
            task.cancel()
        await asyncio.gather(*loading, return_exceptions=True)
        self._sessions.clear()
        self._wanted.clear()
        if self._owns_executor:
            # waits for the threads off the loop: a run stops soon once terminated
            await asyncio.shield(asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True))

    # Sessions

    async def _session(self, version: LoadedVersion) -> _Session:
        key = version.key
        entry = self._sessions.get(key)
        if entry is not None and entry.sha256 != version.sha256:
            # versions are immutable, but a registry rebuilt from scratch reuses numbers
            self._sessions.pop(key)
            entry = None
        if entry is not None:
            self._sessions.move_to_end(key)
            return entry
        loading = (*key, version.sha256)
        task = self._loading.get(loading)
        if task is None:
            task = asyncio.create_task(self._create(version), name=f"onnxruntime-load-{key}")
            self._loading[loading] = task
            task.add_done_callback(lambda done: self._loaded(loading, done))
        # shielded: one caller giving up must not cancel a load that others wait for
        return await asyncio.shield(task)

    def _loaded(self, loading: tuple[str, int, str], task: asyncio.Task[_Session]) -> None:
        self._loading.pop(loading, None)
        if not task.cancelled():
            task.exception()  # retrieved: when every waiter gave up, nobody else will

    async def _create(self, version: LoadedVersion) -> _Session:
        cost = int(len(version.onnx_bytes) * SESSION_MEMORY_FACTOR)
        self._evict(room_for=cost)  # before building, so the bound holds at the peak too
        loop = asyncio.get_running_loop()
        entry = await loop.run_in_executor(self._executor, self._build, version, cost)
        if version.key in self._wanted:
            self._sessions[version.key] = entry
            self._evict(room_for=0, keep=version.key)  # others may have loaded meanwhile
        return entry

    def _evict(self, *, room_for: int, keep: tuple[str, int] | None = None) -> None:
        used = self.used_bytes
        for key in list(self._sessions):
            if used + room_for <= self._max_bytes:
                break
            if key == keep:
                continue
            evicted = self._sessions.pop(key)
            used -= evicted.cost
            log.info("evicted onnxruntime session %s version %s (%s bytes)", key[0], key[1], evicted.cost)

    def _build(self, version: LoadedVersion, cost: int) -> _Session:
        """Creates a session (on a worker thread)."""
        options = ort.SessionOptions()
        # idle intra-op threads spin by default, taking the CPU the event loop needs to
        # accept and batch the next requests
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self._intra_op_threads:
            options.intra_op_num_threads = self._intra_op_threads
        providers = [_CUDA, _CPU] if self._cuda else [_CPU]
        try:
            session = ort.InferenceSession(version.onnx_bytes, options, providers=providers)
        except Exception as error:
            raise Unavailable(
                f"onnxruntime cannot load model {version.model!r} version {version.version}: {error}",
                reason="MODEL_LOAD_FAILED",
            ) from error
        if self._cuda and _CUDA not in session.get_providers():
            # listed but unusable (no GPU, or CUDA libraries missing): onnxruntime fell back
            # to the CPU and logged why; stop asking so that it does not log it every time
            self._cuda = False
            if self._gpu:
                raise Unavailable("CUDA was required but onnxruntime could not use it", reason="NO_GPU")
            log.warning("onnxruntime's CUDA provider is unusable here; running on the CPU")
        outputs = session.get_outputs()
        return _Session(
            session=session,
            sha256=version.sha256,
            cost=cost,
            outputs=tuple(output.name for output in outputs),
            bf16_outputs=frozenset(output.name for output in outputs if output.type == "tensor(bfloat16)"),
        )


# Runs (on a worker thread)


def _run(
    entry: _Session, inputs: Mapping[str, Array], names: tuple[str, ...], run_options: Any
) -> dict[str, Array]:
    try:
        feeds = {name: _feed(name, array) for name, array in inputs.items()}
        if entry.bf16_outputs.intersection(names):
            values = _run_with_ort_values(entry, feeds, names, run_options)
        else:
            values = [
                _from_onnxruntime(name, value)
                for name, value in zip(names, entry.session.run(names, feeds, run_options), strict=True)
            ]
        return dict(zip(names, values, strict=True))
    except MeshError:
        raise
    except Exception as error:
        translated = _translate(error)
        if translated is None:
            raise
        raise translated from error


def _feed(name: str, array: Array) -> Any:
    """What onnxruntime takes for one input: numpy, except BF16 (an OrtValue, which numpy
    cannot become) and BYTES (onnxruntime's strings are ``str``: it would store ``str(b"…")``)."""
    if array.dtype == _BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), _ONNX_BFLOAT16
        )
    if array.dtype.kind == "O":
        try:
            return _map_objects(
                array, lambda element: element.decode() if isinstance(element, bytes) else element
            )
        except UnicodeDecodeError as error:
            raise InvalidArgument.for_field(
                name, f"input {name!r}: onnxruntime strings must be UTF-8 ({error})"
            ) from error
    return array


def _from_onnxruntime(name: str, value: Any) -> Array:
    if not isinstance(value, np.ndarray):
        raise Unavailable(
            f"output {name!r} is a {type(value).__name__}, not a tensor; onnxruntime cannot serve it here",
            reason="OUTPUT_NOT_A_TENSOR",
        )
    if value.dtype.kind == "O":
        return _map_objects(value, lambda element: element.encode() if isinstance(element, str) else element)
    return value


def _run_with_ort_values(
    entry: _Session, feeds: Mapping[str, Any], names: tuple[str, ...], run_options: Any
) -> list[Array]:
    """Runs through OrtValues, the only way to receive a BF16 output from onnxruntime's Python
    API; BYTES inputs cannot travel that way."""
    values = {
        name: feed
        if isinstance(feed, ort.OrtValue)
        else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feed))
        for name, feed in feeds.items()
    }
    results = entry.session.run_with_ort_values(list(names), values, run_options)
    return [
        _bf16_array(result) if name in entry.bf16_outputs else result.numpy()
        for name, result in zip(names, results, strict=True)
    ]


def _bf16_array(value: Any) -> Array:
    # numpy knows no bfloat16, so onnxruntime will not hand one over: copy its bytes instead
    if value.device_name().lower() != "cpu":
        raise Unavailable("a BF16 output was left on the device", reason="OUTPUT_NOT_ON_CPU")
    shape = tuple(value.shape())
    raw = ctypes.string_at(value.data_ptr(), math.prod(shape) * _BF16.itemsize)
    return np.frombuffer(raw, dtype=_BF16).reshape(shape)


def _map_objects(array: Array, convert: Any) -> Array:
    converted = np.empty(array.size, dtype=object)
    converted[:] = [convert(element) for element in array.ravel()]
    return converted.reshape(array.shape)


def _translate(error: Exception) -> MeshError | None:
    """The domain error for an onnxruntime failure; None (let it become INTERNAL) for anything
    else, which would be a bug here."""
    message = str(error)
    if any(marker in message for marker in _ALLOCATION_FAILURES):
        return ResourceExhausted(
            f"onnxruntime ran out of memory on this input: {message}", reason="OUT_OF_MEMORY"
        )
    if isinstance(error, ort_errors.EPFail):
        return Unavailable(
            f"onnxruntime's execution provider failed: {message}", reason="EXECUTION_PROVIDER_FAILED"
        )
    if isinstance(error, ort_errors.InvalidArgument | ValueError):
        # ValueError: onnxruntime's Python layer, e.g. a required input missing from the feed
        return InvalidArgument(f"onnxruntime rejected the input: {message}", reason="MODEL_REJECTED_INPUT")
    if isinstance(error, ort_errors.Fail | ort_errors.RuntimeException | ort_errors.NotImplemented):
        return InvalidArgument(f"the model failed on this input: {message}", reason="MODEL_EXECUTION_FAILED")
    return None
