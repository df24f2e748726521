"""The Triton backend against a real tritonserver (the nvidia-pytriton wheel's), on 127.0.0.1.

Every model is loaded through ``load_model`` with generated config and files, and its answers
are compared with onnxruntime run directly on the same graph.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from services.mesh.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.registry.domain import Signature, TensorSpec
from services.scoring.backend import Array, LoadedVersion
from services.scoring.triton_backend import TritonBackend, translate_error
from services.scoring.triton_config import TritonBackendKind, triton_model_name
from services.scoring.triton_server import (
    STUB_NAME,
    LocalTriton,
    listening_port,
    opentelemetry_trace_args,
    reap_orphaned_stubs,
)
from tests import onnx_factory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MAX_MESSAGE_BYTES = 64 * 1024**2
RECOVERY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
async def triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalTriton]:
    async with LocalTriton(tmp_path_factory.mktemp("triton")) as server:
        yield server


@pytest.fixture(scope="module")
async def backend(triton: LocalTriton) -> AsyncIterator[TritonBackend]:
    backend = TritonBackend(
        triton.url, max_message_bytes=MAX_MESSAGE_BYTES, admin_headers=triton.admin_headers
    )
    triton.on_restart = backend.reload_all
    try:
        yield backend
    finally:
        await backend.close()


def _version(
    model: str,
    onnx_bytes: bytes,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    max_batch_size: int = 32,
    version: int = 1,
) -> LoadedVersion:
    return LoadedVersion(
        model=model,
        version=version,
        sha256=f"{hash(onnx_bytes) & 0xFFFFFFFF:064x}",
        signature=Signature(inputs, outputs),
        onnx_bytes=onnx_bytes,
        max_batch_size=max_batch_size,
    )


def _identity(model: str, datatype: str, shape: tuple[int, ...] = (-1, 2)) -> LoadedVersion:
    factory_shape = tuple(
        "batch" if dim < 0 and i == 0 else ("n" if dim < 0 else dim) for i, dim in enumerate(shape)
    )
    return _version(
        model,
        onnx_factory.identity_model(datatype, factory_shape),
        (TensorSpec("input", datatype, shape),),
        (TensorSpec("output", datatype, shape),),
    )


def _classifier(model: str = "classifier") -> LoadedVersion:
    return _version(
        model,
        onnx_factory.tiny_classifier(n_features=4, n_classes=3, seed=7),
        (TensorSpec("input", "FP32", (-1, 4)),),
        (TensorSpec("probabilities", "FP32", (-1, 3)),),
    )


def _direct(version: LoadedVersion, inputs: dict[str, Array]) -> dict[str, Any]:
    session = ort.InferenceSession(version.onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = {
        name: (np.vectorize(bytes.decode, otypes=[object])(a) if a.dtype == object else a)
        for name, a in inputs.items()
    }
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


async def _until(
    attempt: Callable[[], Awaitable[dict[str, Array]]], timeout_s: float = RECOVERY_TIMEOUT_S
) -> dict[str, Array]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await attempt()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# answers


async def test_classifier_matches_onnxruntime_for_a_batch_of_rows(backend: TritonBackend) -> None:
    version = _classifier()
    await backend.load(version)
    rows = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)

    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    result = await backend.infer(
        version, {"input": rows}, [], timeout_s=10, trace_headers={"traceparent": traceparent}
    )

    assert set(result) == {"probabilities"}
    assert result["probabilities"].shape == (7, 3)
    np.testing.assert_allclose(
        result["probabilities"], _direct(version, {"input": rows})["probabilities"], rtol=1e-5
    )


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP32", np.array([[0.5, -1.25], [3.0, 1e-7]], np.float32)),
        ("FP16", np.array([[0.5, -1.25], [65504.0, 1e-3]], np.float16)),
        ("INT64", np.array([[1, -(2**62)], [2**62, 0]], np.int64)),
        ("INT32", np.array([[7, -7], [2**31 - 1, 0]], np.int32)),
        ("UINT8", np.array([[0, 255], [1, 2]], np.uint8)),
        ("FP64", np.array([[np.pi, -np.e], [1e300, 0.0]], np.float64)),
        ("BOOL", np.array([[True, False], [False, True]])),
    ],
)
async def test_identity_round_trips_each_datatype(
    backend: TritonBackend, datatype: str, values: Array
) -> None:
    version = _identity(f"identity-{datatype.lower()}", datatype)
    await backend.load(version)

    result = await backend.infer(version, {"input": values}, ["output"], timeout_s=10)

    assert result["output"].dtype == values.dtype
    np.testing.assert_array_equal(result["output"], _direct(version, {"input": values})["output"])
    np.testing.assert_array_equal(result["output"], values)


async def test_bytes_identity_round_trips_utf8_and_empty_strings(backend: TritonBackend) -> None:
    version = _identity("identity-bytes", "BYTES")
    await backend.load(version)
    values = np.array([["a", "bc"], ["día", ""]], dtype=object)
    encoded = np.vectorize(str.encode, otypes=[object])(values)

    result = await backend.infer(version, {"input": encoded}, [], timeout_s=10)

    assert result["output"].tolist() == encoded.tolist()
    direct = _direct(version, {"input": encoded})["output"]
    assert [[item.decode() for item in row] for row in result["output"]] == direct.tolist()


async def test_one_value_per_row_tensors_keep_their_shape(backend: TritonBackend) -> None:
    version = _version(
        "per-row",
        onnx_factory.identity_model("INT64", ("batch",)),
        (TensorSpec("input", "INT64", (-1,)),),
        (TensorSpec("output", "INT64", (-1,)),),
    )
    await backend.load(version)
    values = np.arange(5, dtype=np.int64)

    result = await backend.infer(version, {"input": values}, [], timeout_s=10)

    np.testing.assert_array_equal(result["output"], values)


async def test_concurrent_requests_batched_by_triton_come_back_to_their_callers(triton: LocalTriton) -> None:
    # a long queue delay, so that Triton gathers the requests whatever this machine's speed;
    # rows of two widths: Triton batches only consecutive requests of one width
    backend = TritonBackend(
        triton.url,
        max_message_bytes=MAX_MESSAGE_BYTES,
        admin_headers=triton.admin_headers,
        queue_delay_us=50_000,
    )
    version = _identity("identity-batched", "FP32", (-1, -1))
    rng = np.random.default_rng(3)
    requests = [rng.standard_normal((1 + i % 4, 2 + i // 12)).astype(np.float32) for i in range(24)]
    try:
        await backend.load(version)
        results = await asyncio.gather(
            *(backend.infer(version, {"input": rows}, [], timeout_s=30) for rows in requests)
        )
        for rows, result in zip(requests, results, strict=True):
            np.testing.assert_array_equal(result["output"], rows)
        stats = await _statistics(triton, triton_model_name("identity-batched", 1))
        await backend.unload("identity-batched", 1)
    finally:
        await backend.close()
    # Triton did batch them: fewer executions than requests (the canary is one of each)
    assert stats.inference_stats.success.count == len(requests) + 1
    assert stats.execution_count < stats.inference_stats.success.count


async def _statistics(triton: LocalTriton, name: str) -> Any:
    client = triton_grpc.InferenceServerClient(triton.url)
    try:
        return (await client.get_inference_statistics(name, client_timeout=5)).model_stats[0]
    finally:
        await client.close()


async def test_two_versions_of_one_model_serve_side_by_side(backend: TritonBackend) -> None:
    first = _classifier("rollout")
    second = _version(
        "rollout",
        onnx_factory.tiny_classifier(seed=8),
        first.signature.inputs,
        first.signature.outputs,
        version=2,
    )
    await asyncio.gather(backend.load(first), backend.load(second))
    rows = np.ones((2, 4), np.float32)

    one = await backend.infer(first, {"input": rows}, [], timeout_s=10)
    two = await backend.infer(second, {"input": rows}, [], timeout_s=10)

    assert not np.allclose(one["probabilities"], two["probabilities"])
    np.testing.assert_allclose(
        two["probabilities"], _direct(second, {"input": rows})["probabilities"], rtol=1e-5
    )
    assert {("rollout", 1), ("rollout", 2)} <= backend.loaded


# errors


async def test_without_an_onnxruntime_backend_models_run_in_the_python_backend(triton: LocalTriton) -> None:
    """Asked to choose (``kind=None``), the backend tries Triton's onnxruntime backend, which
    the wheel's Triton lacks, and settles on the python backend for this and later loads."""
    backend = TritonBackend(
        triton.url, max_message_bytes=MAX_MESSAGE_BYTES, admin_headers=triton.admin_headers, kind=None
    )
    try:
        version = _classifier(model="auto-kind")
        await backend.load(version)
        rows = {"input": np.ones((2, 4), np.float32)}
        got = await backend.infer(version, rows, (), timeout_s=30)
        np.testing.assert_allclose(got["probabilities"], _direct(version, rows)["probabilities"], rtol=1e-5)
        assert backend.kind is TritonBackendKind.PYTHON
    finally:
        await backend.unload("auto-kind", 1)
        await backend.close()


async def test_unloaded_version_is_not_found(backend: TritonBackend, triton: LocalTriton) -> None:
    version = _identity("short-lived", "FP32")
    await backend.load(version)
    await backend.unload("short-lived", 1)
    await backend.unload("short-lived", 1)  # idempotent

    with pytest.raises(NotFound):
        await backend.infer(version, {"input": np.zeros((1, 2), np.float32)}, [], timeout_s=10)
    # Triton itself no longer has it either
    client = triton_grpc.InferenceServerClient(triton.url)
    try:
        assert not await client.is_model_ready(triton_model_name("short-lived", 1), client_timeout=5)
    finally:
        await client.close()


async def test_triton_not_found_maps_to_not_found_or_to_an_outage(triton: LocalTriton) -> None:
    client = triton_grpc.InferenceServerClient(triton.url)
    request = InferInput("input", [1, 2], "FP32").set_data_from_numpy(np.zeros((1, 2), np.float32))
    try:
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("nowhere.v1", [request], client_timeout=5)
    finally:
        await client.close()

    assert isinstance(translate_error(caught.value, "nowhere.v1", loaded=False), NotFound)
    # a version we loaded that Triton lost (it restarted): an outage, not a missing version
    assert isinstance(translate_error(caught.value, "nowhere.v1", loaded=True), Unavailable)


async def test_loading_without_the_admin_header_is_refused(triton: LocalTriton) -> None:
    version = _identity("intruder", "FP32")
    client = triton_grpc.InferenceServerClient(triton.url)
    try:
        for headers in (None, {next(iter(triton.admin_headers)): "wrong-secret"}):
            with pytest.raises(InferenceServerException, match="restricted") as caught:
                await client.load_model("intruder.v1", config="{}", headers=headers, client_timeout=10)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert not await client.is_model_ready("intruder.v1", client_timeout=5)
        with pytest.raises(InferenceServerException, match="restricted"):
            await client.unload_model(triton_model_name(version.model, 1), client_timeout=10)
    finally:
        await client.close()


async def test_wrong_dtype_is_invalid_argument(backend: TritonBackend) -> None:
    version = _classifier("typed")
    await backend.load(version)

    with pytest.raises(InvalidArgument, match="FP32"):
        await backend.infer(version, {"input": np.ones((2, 4), np.int64)}, [], timeout_s=10)


async def test_wrong_shape_is_invalid_argument(backend: TritonBackend) -> None:
    version = _classifier("shaped")
    await backend.load(version)

    with pytest.raises(InvalidArgument, match="shape"):
        await backend.infer(version, {"input": np.ones((2, 5), np.float32)}, [], timeout_s=10)


async def test_input_the_model_itself_rejects_is_invalid_argument(backend: TritonBackend) -> None:
    # passes Triton's checks, fails inside model.py: not UTF-8
    version = _identity("identity-text", "BYTES")
    await backend.load(version)

    with pytest.raises(InvalidArgument, match="utf-8"):
        await backend.infer(version, {"input": np.array([[b"\xff", b"ok"]], dtype=object)}, [], timeout_s=10)
    # the model still serves
    result = await backend.infer(version, {"input": np.array([[b"x", b"y"]], dtype=object)}, [], timeout_s=10)
    assert result["output"].tolist() == [[b"x", b"y"]]


async def test_timeout_is_deadline_exceeded(backend: TritonBackend) -> None:
    # about 1.5 s of work: long enough to miss a 0.2 s deadline, short enough not to keep a
    # core busy for the rest of the module
    version = _version(
        "slow",
        onnx_factory.slow_model(iterations=10**6),
        (TensorSpec("input", "FP32", (1,)),),
        (TensorSpec("output", "FP32", (1,)),),
        max_batch_size=0,
    )
    await backend.load(version)
    started = time.monotonic()

    with pytest.raises(DeadlineExceeded):
        await backend.infer(version, {"input": np.zeros(1, np.float32)}, [], timeout_s=0.2)

    assert time.monotonic() - started < 1.0
    await backend.unload("slow", 1)


async def test_no_time_left_fails_without_calling_triton(backend: TritonBackend) -> None:
    version = _classifier()
    await backend.load(version)

    with pytest.raises(DeadlineExceeded):
        await backend.infer(version, {"input": np.ones((1, 4), np.float32)}, [], timeout_s=0)


async def test_health(backend: TritonBackend) -> None:
    assert await backend.healthy()


# restarts


async def test_killed_triton_is_unavailable_then_restarted_and_reloaded(tmp_path: Path) -> None:
    async with LocalTriton(tmp_path) as server:
        backend = TritonBackend(
            server.url, max_message_bytes=MAX_MESSAGE_BYTES, admin_headers=server.admin_headers
        )
        server.on_restart = backend.reload_all
        try:
            version = _classifier("survivor")
            await backend.load(version)
            rows = np.ones((3, 4), np.float32)
            before = await backend.infer(version, {"input": rows}, [], timeout_s=10)
            old_pid = server.pid
            assert old_pid is not None

            os.kill(old_pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await backend.infer(version, {"input": rows}, [], timeout_s=10)
            assert time.monotonic() - started < 1.0  # fails fast, does not wait for the deadline

            after = await _until(lambda: backend.infer(version, {"input": rows}, [], timeout_s=10))
            np.testing.assert_allclose(after["probabilities"], before["probabilities"], rtol=1e-6)
            assert server.restarts == 1
            assert server.pid not in (None, old_pid)
            # the dead server's python stub (which SIGKILL orphans) was killed with it
            stub = server.work_dir / "backends" / "python" / STUB_NAME
            assert reap_orphaned_stubs(stub, old_pid) == 0
            assert await backend.healthy()
        finally:
            await backend.close()
    assert server.pid is None


async def test_stop_leaves_no_server_behind(tmp_path: Path) -> None:
    # with tracing on, to show Triton takes the arguments (nothing listens at the collector)
    server = LocalTriton(tmp_path, trace_args=opentelemetry_trace_args("127.0.0.1:9/v1/traces"))
    await server.start()
    pid = server.pid
    assert pid is not None
    assert listening_port(pid) == int(server.url.rsplit(":", 1)[1])

    await server.stop()

    assert server.pid is None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert "Started GRPCInferenceService" in server.log_tail(200)
