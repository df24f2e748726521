"""The onnxruntime backend against real onnxruntime sessions, on the CPU provider."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from services.mesh.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.registry.domain import Signature, TensorSpec
from services.scoring.backend import Backend, LoadedVersion
from services.scoring.onnxruntime_backend import SESSION_MEMORY_FACTOR, OnnxRuntimeBackend
from services.scoring.tensors import NUMPY_DTYPES
from tests import onnx_factory

pytestmark = pytest.mark.timeout(60)

Array = np.ndarray[Any, Any]


def loaded(
    onnx_bytes: bytes,
    inputs: dict[str, tuple[str, tuple[int, ...]]],
    outputs: dict[str, tuple[str, tuple[int, ...]]],
    *,
    model: str = "m",
    version: int = 1,
) -> LoadedVersion:
    return LoadedVersion(
        model=model,
        version=version,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        signature=Signature(
            inputs=tuple(TensorSpec(name, dt, shape) for name, (dt, shape) in inputs.items()),
            outputs=tuple(TensorSpec(name, dt, shape) for name, (dt, shape) in outputs.items()),
        ),
        onnx_bytes=onnx_bytes,
        max_batch_size=8,
    )


def identity(datatype: str, *, model: str = "identity", version: int = 1) -> LoadedVersion:
    return loaded(
        onnx_factory.identity_model(datatype),
        {"input": (datatype, (-1, 2))},
        {"output": (datatype, (-1, 2))},
        model=model,
        version=version,
    )


def classifier() -> LoadedVersion:
    return loaded(
        onnx_factory.tiny_classifier(),
        {"input": ("FP32", (-1, 4))},
        {"probabilities": ("FP32", (-1, 3))},
        model="clf",
    )


def embedding(model: str, size_bytes: int = 64 * 1024) -> LoadedVersion:
    return loaded(
        onnx_factory.large_model(size_bytes),
        {"ids": ("INT64", (-1,))},
        {"embeddings": ("FP32", (-1, 64))},
        model=model,
    )


def two_outputs() -> LoadedVersion:
    """``double = 2x`` and ``negated = -x``."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["double"]), helper.make_node("Neg", ["x"], ["negated"])],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [
            helper.make_tensor_value_info("double", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("negated", TensorProto.FLOAT, ["batch"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return loaded(
        model.SerializeToString(),
        {"x": ("FP32", (-1,))},
        {"double": ("FP32", (-1,)), "negated": ("FP32", (-1,))},
        model="two",
    )


def sample(datatype: str) -> Array:
    if datatype == "BYTES":
        return np.array([[b"caf\xc3\xa9", b""], [b"x", b"yz"]], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False], [False, True]])
    return np.array([[1, 2], [3, 4]]).astype(NUMPY_DTYPES[datatype])


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-onnxruntime")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
async def backend(executor: ThreadPoolExecutor) -> AsyncIterator[OnnxRuntimeBackend]:
    instance = OnnxRuntimeBackend(max_bytes=1 << 30, executor=executor, gpu=False)
    yield instance
    await instance.close()


def test_is_a_backend() -> None:
    instance: Backend = OnnxRuntimeBackend(max_bytes=1, gpu=False)
    assert instance.name == "onnxruntime"


async def test_outputs_equal_onnxruntime_run_directly(backend: OnnxRuntimeBackend) -> None:
    version = classifier()
    batch = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    await backend.load(version)

    outputs = await backend.infer(version, {"input": batch}, [], timeout_s=5)

    direct = ort.InferenceSession(version.onnx_bytes, providers=["CPUExecutionProvider"])
    expected = direct.run(["probabilities"], {"input": batch})[0]
    assert list(outputs) == ["probabilities"]
    np.testing.assert_array_equal(outputs["probabilities"], expected)


@pytest.mark.parametrize(
    "datatype", [d for d in NUMPY_DTYPES if d not in ("BYTES", "BOOL")] + ["BOOL", "BYTES"]
)
async def test_every_datatype_round_trips(backend: OnnxRuntimeBackend, datatype: str) -> None:
    version = identity(datatype)
    array = sample(datatype)
    await backend.load(version)

    output = (await backend.infer(version, {"input": array}, ["output"], timeout_s=5))["output"]

    assert output.dtype == NUMPY_DTYPES[datatype]
    assert output.tolist() == array.tolist()


async def test_bf16_output_keeps_its_bits(backend: OnnxRuntimeBackend) -> None:
    version = identity("BF16")
    array = np.array([[1.0, -2.5], [3.140625, 1e30]], dtype=ml_dtypes.bfloat16)
    await backend.load(version)

    output = (await backend.infer(version, {"input": array}, [], timeout_s=5))["output"]

    assert output.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(output.view(np.uint16), array.view(np.uint16))


async def test_read_only_inputs_are_accepted(backend: OnnxRuntimeBackend) -> None:
    version = identity("FP32")
    array = np.frombuffer(np.arange(4, dtype="<f4").tobytes(), "<f4").reshape(2, 2)
    await backend.load(version)

    output = (await backend.infer(version, {"input": array}, [], timeout_s=5))["output"]

    np.testing.assert_array_equal(output, array)


async def test_only_requested_outputs_come_back(backend: OnnxRuntimeBackend) -> None:
    version = two_outputs()
    await backend.load(version)
    x = np.array([1.0, -3.0], np.float32)

    only = await backend.infer(version, {"x": x}, ["negated"], timeout_s=5)
    both = await backend.infer(version, {"x": x}, [], timeout_s=5)

    assert list(only) == ["negated"]
    np.testing.assert_array_equal(only["negated"], -x)
    assert list(both) == ["double", "negated"]


async def test_canary_runs_generated_inputs(backend: OnnxRuntimeBackend) -> None:
    for version in (classifier(), identity("BYTES", model="s"), identity("BF16", model="h"), two_outputs()):
        await backend.load(version)
        outputs = await backend.canary(version)
        assert set(outputs) == {spec.name for spec in version.signature.outputs}


# Errors


async def test_not_loaded_is_not_found(backend: OnnxRuntimeBackend) -> None:
    version = identity("FP32")

    with pytest.raises(NotFound):
        await backend.infer(version, {"input": sample("FP32")}, [], timeout_s=5)
    await backend.load(version)
    await backend.unload(version.model, version.version)
    await backend.unload(version.model, version.version)  # idempotent
    with pytest.raises(NotFound):
        await backend.infer(version, {"input": sample("FP32")}, [], timeout_s=5)


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        ({"input": np.zeros((1, 3), np.float32)}, "MODEL_REJECTED_INPUT"),
        ({"input": np.zeros((1, 2), np.float64)}, "MODEL_REJECTED_INPUT"),
        ({"other": np.zeros((1, 2), np.float32)}, "MODEL_REJECTED_INPUT"),
    ],
    ids=["shape", "dtype", "missing"],
)
async def test_input_onnxruntime_rejects_is_invalid_argument(
    backend: OnnxRuntimeBackend, inputs: dict[str, Array], reason: str
) -> None:
    version = identity("FP32")
    await backend.load(version)

    with pytest.raises(InvalidArgument) as error:
        await backend.infer(version, inputs, [], timeout_s=5)

    assert error.value.reason == reason


async def test_unknown_output_is_invalid_argument(backend: OnnxRuntimeBackend) -> None:
    version = identity("FP32")
    await backend.load(version)

    with pytest.raises(InvalidArgument):
        await backend.infer(version, {"input": sample("FP32")}, ["nope"], timeout_s=5)


async def test_graph_failing_on_an_input_is_invalid_argument(backend: OnnxRuntimeBackend) -> None:
    version = embedding("emb", size_bytes=4096)  # 16 rows
    await backend.load(version)

    with pytest.raises(InvalidArgument, match="out of data bounds"):
        await backend.infer(version, {"ids": np.array([1_000_000], np.int64)}, [], timeout_s=5)


async def test_non_utf8_bytes_are_invalid_argument(backend: OnnxRuntimeBackend) -> None:
    version = identity("BYTES")
    await backend.load(version)

    with pytest.raises(InvalidArgument) as error:
        await backend.infer(version, {"input": np.array([[b"\xff", b"a"]], dtype=object)}, [], timeout_s=5)

    assert error.value.violations[0].field == "input"


async def test_allocation_failure_is_resource_exhausted(backend: OnnxRuntimeBackend) -> None:
    # 2**40 FP32 values (4 TiB): no allocator hands that out, so nothing is touched
    version = loaded(
        onnx_factory.memory_bomb_model(2**40), {"input": ("FP32", (-1,))}, {"output": ("FP32", ())}
    )
    await backend.load(version)

    with pytest.raises(ResourceExhausted):
        await backend.infer(version, {"input": np.zeros(1, np.float32)}, [], timeout_s=5)


async def test_timeout_is_deadline_exceeded_and_stops_the_run() -> None:
    # one worker: if the timed-out run kept going, the next call could not start
    with ThreadPoolExecutor(1) as pool:
        backend = OnnxRuntimeBackend(max_bytes=1 << 30, executor=pool, gpu=False)
        slow = loaded(onnx_factory.slow_model(), {"input": ("FP32", (1,))}, {"output": ("FP32", (1,))})
        fast = identity("FP32")
        await backend.load(slow)
        await backend.load(fast)

        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await backend.infer(slow, {"input": np.zeros(1, np.float32)}, [], timeout_s=0.2)
        assert time.monotonic() - started < 2

        outputs = await backend.infer(fast, {"input": sample("FP32")}, [], timeout_s=5)
        np.testing.assert_array_equal(outputs["output"], sample("FP32"))
        await backend.close()


async def test_cancelled_caller_stops_the_run() -> None:
    with ThreadPoolExecutor(1) as pool:
        backend = OnnxRuntimeBackend(max_bytes=1 << 30, executor=pool, gpu=False)
        slow = loaded(onnx_factory.slow_model(), {"input": ("FP32", (1,))}, {"output": ("FP32", (1,))})
        fast = identity("FP32")
        await backend.load(slow)
        await backend.load(fast)
        task = asyncio.create_task(
            backend.infer(slow, {"input": np.zeros(1, np.float32)}, [], timeout_s=None)
        )
        # wait until the run is in flight and the one worker has taken it off the queue: the
        # cancellation of a run inside onnxruntime is the thing under test
        deadline = time.monotonic() + 10
        while backend.running == 0 or pool._work_queue.qsize():
            assert time.monotonic() < deadline, "the run never reached the worker"
            await asyncio.sleep(0.01)

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        await backend.infer(fast, {"input": sample("FP32")}, [], timeout_s=5)
        await backend.close()


# Session cache


async def test_least_recently_used_session_is_evicted_over_the_bound(executor: ThreadPoolExecutor) -> None:
    versions = {name: embedding(name) for name in "abcd"}
    cost = int(len(versions["a"].onnx_bytes) * SESSION_MEMORY_FACTOR)
    backend = OnnxRuntimeBackend(max_bytes=3 * cost, executor=executor, gpu=False)
    ids = {"ids": np.array([0, 1], np.int64)}
    for name in "abc":
        await backend.load(versions[name])
    await backend.infer(versions["a"], ids, [], timeout_s=5)  # a is now the most recent

    await backend.load(versions["d"])

    assert backend.cached() == [("c", 1), ("a", 1), ("d", 1)]
    assert backend.used_bytes == 3 * cost
    # evicted is not unloaded: b loads again when asked for, and c makes room
    outputs = await backend.infer(versions["b"], ids, [], timeout_s=5)
    assert outputs["embeddings"].shape == (2, 64)
    assert backend.cached() == [("a", 1), ("d", 1), ("b", 1)]
    await backend.close()


async def test_version_bigger_than_the_bound_loads_alone(executor: ThreadPoolExecutor) -> None:
    small, big = embedding("small"), embedding("big", size_bytes=256 * 1024)
    backend = OnnxRuntimeBackend(
        max_bytes=int(len(small.onnx_bytes) * SESSION_MEMORY_FACTOR) * 2, executor=executor, gpu=False
    )
    await backend.load(small)

    await backend.load(big)

    assert backend.cached() == [("big", 1)]
    outputs = await backend.infer(big, {"ids": np.array([3], np.int64)}, [], timeout_s=5)
    np.testing.assert_array_equal(outputs["embeddings"][0], np.arange(64, dtype=np.float32))
    await backend.close()


async def test_same_key_with_other_bytes_gets_a_new_session(backend: OnnxRuntimeBackend) -> None:
    # registry versions are immutable; a reset registry reusing (model, version) must not be
    # answered by the old graph
    first, second = identity("FP32"), identity("INT64")
    await backend.load(first)

    await backend.load(second)
    output = (await backend.infer(second, {"input": sample("INT64")}, [], timeout_s=5))["output"]

    assert output.dtype == np.int64
    assert backend.cached() == [("identity", 1)]


async def test_concurrent_loads_share_one_session(backend: OnnxRuntimeBackend) -> None:
    version = classifier()

    await asyncio.gather(*(backend.load(version) for _ in range(5)))

    assert backend.cached() == [("clf", 1)]
    assert backend.used_bytes == int(len(version.onnx_bytes) * SESSION_MEMORY_FACTOR)


async def test_gpu_when_offered_falls_back_to_the_cpu_when_unusable(executor: ThreadPoolExecutor) -> None:
    # onnxruntime-gpu lists CUDA even on machines without a GPU; the backend must still serve
    backend = OnnxRuntimeBackend(max_bytes=1 << 30, executor=executor, gpu=None)
    version = classifier()
    await backend.load(version)
    await backend.load(identity("FP32"))

    outputs = await backend.infer(version, {"input": np.ones((1, 4), np.float32)}, [], timeout_s=5)

    np.testing.assert_allclose(outputs["probabilities"].sum(), 1.0, rtol=1e-5)
    await backend.close()


async def test_backend_owns_the_pool_it_makes() -> None:
    backend = OnnxRuntimeBackend(max_bytes=1 << 30, gpu=False)
    version = identity("INT64")
    await backend.load(version)
    await backend.infer(version, {"input": sample("INT64")}, [], timeout_s=5)

    await backend.close()

    assert backend.cached() == []


async def test_version_onnxruntime_cannot_load_is_unavailable_and_not_served(
    backend: OnnxRuntimeBackend,
) -> None:
    version = loaded(
        onnx_factory.custom_op_model(), {"input": ("FP32", (-1, 2))}, {"output": ("FP32", (-1, 2))}
    )

    with pytest.raises(Unavailable) as error:
        await backend.load(version)

    assert error.value.reason == "MODEL_LOAD_FAILED"
    with pytest.raises(NotFound):
        await backend.infer(version, {"input": sample("FP32")}, [], timeout_s=5)
