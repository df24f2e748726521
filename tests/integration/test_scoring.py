"""The scoring service end to end: a real registry on a real PostgreSQL, a real local Triton
(from the nvidia-pytriton wheel), real onnxruntime, real gRPC servers on loopback, and stock
``tritonclient`` as a caller."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scoremesh.registry.v1 import registry_pb2 as reg
from scoremesh.scoring.v1 import scoring_pb2, scoring_pb2_grpc

from services.mesh.errors import InvalidArgument
from services.mesh.status import from_rpc_error
from services.scoring import tensors
from services.scoring.backend import Array
from services.scoring.oip import pb
from tests import onnx_factory
from tests.conftest import fresh_database
from tests.integration.registry_harness import ALICE, BOB, RunningRegistry, registry_env, running_registry
from tests.integration.scoring_harness import (
    RunningScoring,
    eventually,
    infer_request,
    outputs_of,
    publish,
    running_scoring,
    scoring_env,
)

pytestmark = pytest.mark.integration

CLASSIFIER = onnx_factory.tiny_classifier(n_features=4, n_classes=3, seed=1)


def _direct(model: bytes, inputs: dict[str, Array]) -> dict[str, Array]:
    """What onnxruntime itself answers (BYTES go in as str: given bytes, onnxruntime stores
    their repr)."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    feeds = {
        k: np.vectorize(bytes.decode, otypes=[object])(v) if v.dtype == object else v
        for k, v in inputs.items()
    }
    results = session.run(None, feeds)
    return {
        name: np.vectorize(str.encode, otypes=[object])(r) if r.dtype == object else r
        for name, r in zip(names, results, strict=True)
    }


@pytest.fixture(scope="module")
async def module_db(postgres_dsn: str) -> AsyncIterator[str]:
    async with fresh_database(postgres_dsn) as url:
        yield url


@pytest.fixture(scope="module")
async def registry(
    module_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningRegistry]:
    env = registry_env(tmp_path_factory.mktemp("registry"), module_db)
    async with running_registry(env) as running:
        yield running


@pytest.fixture(scope="module")
async def scoring(
    registry: RunningRegistry, module_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningScoring]:
    """Triton (local, supervised) as the primary, onnxruntime as the fallback."""
    env = scoring_env(
        tmp_path_factory.mktemp("scoring"), module_db, registry.address, SCOREMESH_MAX_REQUEST_BYTES="1MiB"
    )
    async with running_scoring(env) as running:
        yield running


@pytest.fixture(scope="module")
async def classifier(registry: RunningRegistry) -> str:
    await publish(registry, ALICE, "classifier", CLASSIFIER)
    return "classifier"


async def _infer(
    scoring: RunningScoring, request: pb.ModelInferRequest, **kwargs: object
) -> pb.ModelInferResponse:
    response: pb.ModelInferResponse = await scoring.stub.ModelInfer(
        request, metadata=ALICE.metadata(), timeout=60, **kwargs
    )
    return response


async def _expect(
    scoring: RunningScoring, request: pb.ModelInferRequest, code: grpc.StatusCode
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _infer(scoring, request)
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def _assert_ready(scoring: RunningScoring) -> None:
    ready = await scoring.stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
    assert ready.ready
    health = await health_pb2_grpc.HealthStub(scoring.channel).Check(
        health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# stock clients


async def test_stock_tritonclient_reads_metadata_and_scores(scoring: RunningScoring, classifier: str) -> None:
    client = triton_aio.InferenceServerClient(scoring.address)
    try:
        assert await client.is_server_live(headers=dict(ALICE.metadata()))
        assert await client.is_server_ready(headers=dict(ALICE.metadata()))
        metadata = await client.get_model_metadata(classifier, headers=dict(ALICE.metadata()))
        assert metadata.name == classifier
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 4])]
        assert await client.is_model_ready(classifier, headers=dict(ALICE.metadata()))

        rows = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        infer_input = triton_aio.InferInput("input", [3, 4], "FP32")
        infer_input.set_data_from_numpy(rows)
        result = await client.infer(
            classifier, [infer_input], request_id="r-1", headers=dict(ALICE.metadata()), client_timeout=60
        )
        response = result.get_response()
        assert response.id == "r-1"
        assert response.model_version == "1"
        assert response.parameters["backend"].string_param == "triton"
        expected = _direct(CLASSIFIER, {"input": rows})["probabilities"]
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
    finally:
        await client.close()


async def test_typed_and_raw_contents_give_the_same_answer(scoring: RunningScoring, classifier: str) -> None:
    rows = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    raw = await _infer(scoring, infer_request(classifier, {"input": rows}))
    typed = await _infer(scoring, infer_request(classifier, {"input": rows}, raw=False))
    np.testing.assert_array_equal(outputs_of(raw)["probabilities"], outputs_of(typed)["probabilities"])


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP16", np.array([[1.5, -2.25], [0.0, 65504.0]], np.float16)),
        ("BF16", np.array([[1.5, -2.25], [0.0, 3.0e38]], ml_dtypes.bfloat16)),
        ("FP64", np.array([[1e-300, 2.0]], np.float64)),
        ("INT8", np.array([[-128, 127]], np.int8)),
        ("INT32", np.array([[-(2**31), 2**31 - 1]], np.int32)),
        ("INT64", np.array([[-(2**62), 7]], np.int64)),
        ("UINT8", np.array([[0, 255]], np.uint8)),
        ("UINT64", np.array([[2**64 - 1, 3]], np.uint64)),
        ("BOOL", np.array([[True, False], [False, True]], np.bool_)),
        ("BYTES", np.array([[b"caf\xc3\xa9", b""], [b"\x00\x01", b"x" * 300]], dtype=object)),
    ],
)
async def test_triton_outputs_equal_onnxruntime_for_every_dtype(
    scoring: RunningScoring, registry: RunningRegistry, datatype: str, values: Array
) -> None:
    model = f"identity-{datatype.lower()}"
    data = onnx_factory.identity_model(datatype, ("batch", 2))
    await publish(registry, ALICE, model, data)
    response = await _infer(scoring, infer_request(model, {"input": values}))
    # the python backend of the wheel's Triton cannot pass BF16: such versions run in-process
    expected_backend = "onnxruntime" if datatype == "BF16" else "triton"
    assert response.parameters["backend"].string_param == expected_backend
    assert response.outputs[0].datatype == datatype
    got = outputs_of(response)["output"]
    # an identity: onnxruntime's Python API cannot take BF16 numpy arrays to check it directly
    expected = values if datatype == "BF16" else _direct(data, {"input": values})["output"]
    assert got.shape == expected.shape
    assert got.tolist() == expected.tolist()


async def test_a_model_that_computes_matches_onnxruntime_within_tolerance(
    scoring: RunningScoring, registry: RunningRegistry
) -> None:
    data = onnx_factory.mlp_model(width=64, layers=3, seed=4)
    await publish(registry, ALICE, "mlp", data)
    rows = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    response = await _infer(scoring, infer_request("mlp", {"input": rows}))
    np.testing.assert_allclose(
        outputs_of(response)["output"], _direct(data, {"input": rows})["output"], rtol=1e-4, atol=1e-5
    )


# versions, aliases, outputs


async def test_model_version_takes_a_number_an_alias_or_nothing(
    scoring: RunningScoring, registry: RunningRegistry
) -> None:
    first = onnx_factory.tiny_classifier(seed=10)
    second = onnx_factory.tiny_classifier(seed=11)
    await publish(registry, ALICE, "versions", first)
    await publish(registry, ALICE, "versions", second, alias="staging")
    rows = np.ones((1, 4), np.float32)
    by_default = await _infer(scoring, infer_request("versions", {"input": rows}))
    by_number = await _infer(scoring, infer_request("versions", {"input": rows}, version="2"))
    by_alias = await _infer(scoring, infer_request("versions", {"input": rows}, version="staging"))
    assert (by_default.model_version, by_number.model_version, by_alias.model_version) == ("1", "2", "2")
    np.testing.assert_allclose(
        outputs_of(by_alias)["probabilities"], _direct(second, {"input": rows})["probabilities"], rtol=1e-5
    )


async def test_a_request_larger_than_the_batch_limit_runs_in_parts(
    scoring: RunningScoring, classifier: str
) -> None:
    rows = np.random.default_rng(5).standard_normal((150, 4)).astype(np.float32)
    response = await _infer(scoring, infer_request(classifier, {"input": rows}))
    np.testing.assert_allclose(
        outputs_of(response)["probabilities"],
        _direct(CLASSIFIER, {"input": rows})["probabilities"],
        rtol=1e-5,
        atol=1e-6,
    )


async def test_requested_outputs_and_the_request_id_are_honoured(
    scoring: RunningScoring, classifier: str
) -> None:
    request = infer_request(classifier, {"input": np.zeros((1, 4), np.float32)}, request_id="abc")
    request.outputs.add(name="probabilities")
    response = await _infer(scoring, request)
    assert response.id == "abc"
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert "request_id" not in response.parameters  # the caller's id is the log's id


async def test_another_tenants_private_model_is_not_found(scoring: RunningScoring, classifier: str) -> None:
    request = infer_request(classifier, {"input": np.zeros((1, 4), np.float32)})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.stub.ModelInfer(request, metadata=BOB.metadata(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# bad input


def _bad_requests(model: str) -> list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]]:
    good = np.zeros((1, 4), np.float32)
    wrong_dtype = infer_request(model, {"input": good.astype(np.float64)})
    wrong_shape = infer_request(model, {"input": np.zeros((1, 5), np.float32)})
    missing = pb.ModelInferRequest(model_name=model)
    extra = infer_request(model, {"input": good, "surplus": good})
    disagreeing = infer_request(model, {"input": good})
    disagreeing.raw_input_contents[0] = disagreeing.raw_input_contents[0][:-4]
    typed_short = infer_request(model, {"input": good}, raw=False)
    del typed_short.inputs[0].contents.fp32_contents[-1]
    over_limit = infer_request(model, {"input": np.zeros((70_000, 4), np.float32)})
    unknown_output = infer_request(model, {"input": good})
    unknown_output.outputs.add(name="nope")
    return [
        ("wrong dtype", wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "input"),
        ("wrong shape", wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "input"),
        ("missing input", missing, grpc.StatusCode.INVALID_ARGUMENT, "input"),
        ("extra input", extra, grpc.StatusCode.INVALID_ARGUMENT, "surplus"),
        ("raw contents disagree with the shape", disagreeing, grpc.StatusCode.INVALID_ARGUMENT, "input"),
        ("typed contents disagree with the shape", typed_short, grpc.StatusCode.INVALID_ARGUMENT, "input"),
        ("unknown output", unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "nope"),
        ("over the size limit", over_limit, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("unknown model", infer_request("no-such-model", {"input": good}), grpc.StatusCode.NOT_FOUND, ""),
        (
            "unknown version",
            infer_request(model, {"input": good}, version="99"),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        (
            "unknown alias",
            infer_request(model, {"input": good}, version="canary"),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        (
            "bad version text",
            infer_request(model, {"input": good}, version="v 1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "",
        ),
        ("bad model name", infer_request("../etc", {"input": good}), grpc.StatusCode.INVALID_ARGUMENT, ""),
    ]


async def test_bad_requests_get_clear_errors_and_the_service_stays_ready(
    scoring: RunningScoring, classifier: str
) -> None:
    for label, request, code, tensor in _bad_requests(classifier):
        error = await _expect(scoring, request, code)
        if tensor:
            domain = from_rpc_error(error)
            assert isinstance(domain, InvalidArgument), label
            assert any(tensor in v.field or tensor in v.description for v in domain.violations), (
                label,
                domain.violations,
            )
    await _assert_ready(scoring)
    good = await _infer(scoring, infer_request(classifier, {"input": np.zeros((1, 4), np.float32)}))
    assert good.model_version == "1"


async def test_one_failing_request_among_31_good_ones_fails_alone(
    scoring: RunningScoring, registry: RunningRegistry
) -> None:
    """Every request passes validation; one carries an index past the embedding table, which
    only the backend can find. Its 31 neighbours in the same batches must all succeed."""
    data = onnx_factory.large_model(64 * 1024, width=4)  # 4096 rows
    await publish(registry, ALICE, "lookup", data)
    await _infer(scoring, infer_request("lookup", {"ids": np.array([0], np.int64)}))  # loaded
    ids = [np.array([i], np.int64) for i in range(32)]
    ids[13] = np.array([10**9], np.int64)
    results = await asyncio.gather(
        *(_infer(scoring, infer_request("lookup", {"ids": row})) for row in ids), return_exceptions=True
    )
    failed = [i for i, result in enumerate(results) if isinstance(result, BaseException)]
    assert failed == [13]
    error = results[13]
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for i, result in enumerate(results):
        if i != 13:
            assert isinstance(result, pb.ModelInferResponse)
            np.testing.assert_array_equal(
                outputs_of(result)["embeddings"], np.arange(4, dtype=np.float32)[None, :]
            )
    await _assert_ready(scoring)


async def test_concurrent_requests_are_coalesced_into_batches(
    scoring: RunningScoring, classifier: str
) -> None:
    stats = scoring.scoring.batcher.stats
    before_requests, before_batches = stats.requests, stats.executions
    rows = np.random.default_rng(3).standard_normal((64, 4)).astype(np.float32)
    responses = await asyncio.gather(
        *(_infer(scoring, infer_request(classifier, {"input": rows[i : i + 1]})) for i in range(64))
    )
    expected = _direct(CLASSIFIER, {"input": rows})["probabilities"]
    for i, response in enumerate(responses):
        np.testing.assert_allclose(
            outputs_of(response)["probabilities"][0], expected[i], rtol=1e-5, atol=1e-6
        )
    assert stats.requests - before_requests == 64
    assert stats.executions - before_batches < 64


# rollouts


async def test_an_alias_move_under_load_fails_no_request(
    scoring: RunningScoring, registry: RunningRegistry
) -> None:
    old = onnx_factory.tiny_classifier(seed=20)
    new = onnx_factory.tiny_classifier(seed=21)
    await publish(registry, ALICE, "rollout", old)
    second = await publish(registry, ALICE, "rollout", new, alias="candidate")
    rows = np.ones((1, 4), np.float32)
    versions_seen: set[str] = set()
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def load() -> None:
        for _ in range(2000):  # bounded: the test ends the loop long before
            if stop.is_set():
                return
            try:
                response = await _infer(scoring, infer_request("rollout", {"input": rows}))
                versions_seen.add(response.model_version)
            except grpc.aio.AioRpcError as error:
                failures.append(error)

    workers = [asyncio.ensure_future(load()) for _ in range(8)]
    await eventually(lambda: _true(bool(versions_seen)))
    await registry.stub.SetAlias(
        reg.SetAliasRequest(model="rollout", alias="production", version=second),
        metadata=ALICE.metadata(),
    )
    await eventually(lambda: _true(str(second) in versions_seen))
    stop.set()
    await asyncio.gather(*workers)
    assert failures == []
    assert versions_seen == {"1", "2"}
    # the old version drained and was unloaded
    await eventually(lambda: _true(("rollout", 1) not in {v.key for v in scoring.scoring.router.loaded()}))


async def _true(value: bool) -> bool:
    return value


# feedback


async def test_feedback_lands_beside_the_logged_prediction(scoring: RunningScoring, classifier: str) -> None:
    response = await _infer(scoring, infer_request(classifier, {"input": np.ones((1, 4), np.float32)}))
    request_id = response.parameters["request_id"].string_param
    assert request_id
    feedback_stub = scoring_pb2_grpc.ScoringStub(scoring.channel)
    await feedback_stub.CreateFeedback(
        scoring_pb2.CreateFeedbackRequest(
            feedback=scoring_pb2.Feedback(request_id=request_id, label="setosa")
        ),
        metadata=ALICE.metadata(),
        timeout=30,
    )

    async def logged() -> bool:
        try:
            await feedback_stub.GetPrediction(
                scoring_pb2.GetPredictionRequest(request_id=request_id), metadata=ALICE.metadata(), timeout=10
            )
            return True
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False

    await eventually(logged)
    prediction = await feedback_stub.GetPrediction(
        scoring_pb2.GetPredictionRequest(request_id=request_id), metadata=ALICE.metadata(), timeout=10
    )
    assert (prediction.model, prediction.version, prediction.backend) == (classifier, 1, "triton")
    assert [f.label for f in prediction.feedback] == ["setosa"]
    assert [t.name for t in prediction.inputs] == ["input"]
    assert tensors.from_raw(prediction.outputs[0].raw_contents, "FP32", [1, 3]).shape == (1, 3)


# the CLI


async def test_the_score_command_prints_outputs(
    scoring: RunningScoring, classifier: str, tmp_path: Path
) -> None:
    rows = np.full((2, 4), 0.5, np.float32)
    np.save(tmp_path / "x.npy", rows)
    env = {
        **os.environ,
        "SCOREMESH_SCORING_ADDR": scoring.address,
        "SCOREMESH_TENANT": ALICE.tenant,
        "SCOREMESH_HOME": str(tmp_path),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "score", f"{classifier}@production",
        "--input", f"input={tmp_path / 'x.npy'}", "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    assert (result["model"], result["version"], result["backend"]) == (classifier, 1, "triton")
    np.testing.assert_allclose(
        np.array(result["outputs"][0]["data"]),
        _direct(CLASSIFIER, {"input": rows})["probabilities"],
        rtol=1e-5,
    )

    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "score", "no-such-model",
        "--input", f"input={tmp_path / 'x.npy'}",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode == 1
    assert len(err.decode().strip().splitlines()) == 1
    assert "not found" in err.decode().lower()


# the in-process backend, the cache


async def test_onnxruntime_backend_and_the_response_cache(
    registry: RunningRegistry, module_db: str, tmp_path: Path
) -> None:
    data = onnx_factory.tiny_classifier(seed=30)
    await publish(registry, ALICE, "in-process", data)
    env = scoring_env(
        tmp_path,
        module_db,
        registry.address,
        SCOREMESH_SCORING_BACKEND="onnxruntime",
        SCOREMESH_CACHE_BYTES="1MiB",
    )
    async with running_scoring(env) as running:
        rows = np.full((1, 4), 0.25, np.float32)
        responses = await asyncio.gather(
            *(_infer(running, infer_request("in-process", {"input": rows})) for _ in range(10))
        )
        for response in responses:
            assert response.parameters["backend"].string_param == "onnxruntime"
            np.testing.assert_allclose(
                outputs_of(response)["probabilities"],
                _direct(data, {"input": rows})["probabilities"],
                rtol=1e-6,
            )
        again = await _infer(running, infer_request("in-process", {"input": rows}))
        assert again.parameters["backend"].string_param == "onnxruntime"
        assert running.scoring.batcher.stats.requests == 1  # nine shared the first, one hit the cache
        await _assert_ready(running)


# Triton failures


async def _served_by_triton(scoring: RunningScoring, request: pb.ModelInferRequest) -> bool:
    """Whether Triton serves ``request`` now; UNAVAILABLE (still recovering) is a no."""
    try:
        response = await _infer(scoring, request)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    backend: str = response.parameters["backend"].string_param
    return backend == "triton"


async def _kill(pid: int | None) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


async def test_killing_triton_under_load_with_fallback_fails_no_request(
    registry: RunningRegistry, module_db: str, tmp_path: Path
) -> None:
    data = onnx_factory.tiny_classifier(seed=40)
    await publish(registry, ALICE, "survivor", data)
    env = scoring_env(tmp_path, module_db, registry.address, SCOREMESH_FALLBACK="onnxruntime")
    async with running_scoring(env) as running:
        triton = running.scoring.local_triton
        assert triton is not None
        rows = np.ones((1, 4), np.float32)
        backends: list[str] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def load() -> None:
            for _ in range(5000):  # bounded
                if stop.is_set():
                    return
                try:
                    response = await _infer(running, infer_request("survivor", {"input": rows}))
                    backends.append(response.parameters["backend"].string_param)
                except grpc.aio.AioRpcError as error:
                    failures.append(error)

        workers = [asyncio.ensure_future(load()) for _ in range(8)]
        await eventually(lambda: _true(len(backends) > 20))
        restarts = triton.restarts
        await _kill(triton.pid)
        await eventually(lambda: _true("onnxruntime" in backends))
        await eventually(lambda: _true(triton.restarts > restarts), timeout_s=60)
        # the breaker closes again once Triton is back with the model reloaded
        mark = len(backends)
        await eventually(lambda: _true("triton" in backends[mark:]), timeout_s=60)
        stop.set()
        await asyncio.gather(*workers)
        assert failures == []


async def test_killing_triton_without_fallback_fails_fast_then_recovers(
    registry: RunningRegistry, module_db: str, tmp_path: Path
) -> None:
    data = onnx_factory.tiny_classifier(seed=41)
    await publish(registry, ALICE, "fail-fast", data)
    env = scoring_env(tmp_path, module_db, registry.address, SCOREMESH_FALLBACK="none")
    async with running_scoring(env) as running:
        triton = running.scoring.local_triton
        assert triton is not None
        request = infer_request("fail-fast", {"input": np.ones((1, 4), np.float32)})
        await _infer(running, request)
        await _kill(triton.pid)
        slowest = 0.0
        for _ in range(5):
            started = time.perf_counter()
            error = await _expect(running, request, grpc.StatusCode.UNAVAILABLE)
            slowest = max(slowest, time.perf_counter() - started)
            assert "triton" in (error.details() or "").lower()
        assert slowest < 0.1

        await eventually(lambda: _served_by_triton(running, request), timeout_s=60)


def _children(pid: int | None) -> list[int]:
    assert pid is not None
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


async def test_a_dead_python_stub_makes_the_model_unready_until_it_is_reloaded(
    registry: RunningRegistry, module_db: str, tmp_path: Path
) -> None:
    """Triton keeps saying model-ready while every inference fails once the python backend's
    stub died; the scoring service's readiness runs a real inference, and the version is
    reloaded into Triton."""
    data = onnx_factory.tiny_classifier(seed=42)
    await publish(registry, ALICE, "stub", data)
    env = scoring_env(tmp_path, module_db, registry.address, SCOREMESH_FALLBACK="none")
    async with running_scoring(env) as running:
        triton = running.scoring.local_triton
        assert triton is not None
        request = infer_request("stub", {"input": np.ones((1, 4), np.float32)})
        await _infer(running, request)
        ready = pb.ModelReadyRequest(name="stub")
        assert (await running.stub.ModelReady(ready, metadata=ALICE.metadata(), timeout=30)).ready
        stubs = _children(triton.pid)
        assert stubs, "the python backend runs the model in a stub process"
        for pid in stubs:
            os.kill(pid, signal.SIGKILL)

        assert not (await running.stub.ModelReady(ready, metadata=ALICE.metadata(), timeout=30)).ready

        await eventually(lambda: _served_by_triton(running, request), timeout_s=60)
        assert (await running.stub.ModelReady(ready, metadata=ALICE.metadata(), timeout=30)).ready
