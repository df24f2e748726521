"""The prediction log and feedback end to end: real PostgreSQL, a real gRPC server on
127.0.0.1:0 built with MeshServer, and a real channel."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from scoremesh.scoring.v1 import scoring_pb2 as pb
from scoremesh.scoring.v1 import scoring_pb2_grpc

from services.mesh.channels import open_channel
from services.mesh.errors import InvalidArgument, NotFound
from services.mesh.identity import Caller
from services.mesh.server import MeshServer, Registration
from services.mesh.settings import MeshSettings
from services.mesh.status import from_rpc_error
from services.scoring.feedback_servicer import SERVICE_NAME, ScoringServicer
from services.scoring.predictions import (
    MAX_LABEL_CHARS,
    PredictionLog,
    PredictionStore,
    to_numpy,
)
from services.scoring.tensors import join_bytes

pytestmark = pytest.mark.integration

ALICE = Caller(tenant="acme", principal="alice")
CAROL = Caller(tenant="acme", principal="carol")
BOB = Caller(tenant="globex", principal="bob")

X = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
Y = {"y": np.array([0.25, 0.75])}


@dataclass
class Scoring:
    store: PredictionStore
    log: PredictionLog
    stub: scoring_pb2_grpc.ScoringStub

    async def logged(self, caller: Caller, request_id: str, model: str = "m", version: int = 1) -> None:
        """Logs one prediction and waits until it is written."""
        assert self.log.record(caller, request_id, model, version, "onnxruntime", X, Y)
        await self.log.flush()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PredictionStore]:
    store = await PredictionStore.open(database_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def scoring(store: PredictionStore, tmp_path: Path) -> AsyncIterator[Scoring]:
    settings = MeshSettings.from_env({"SCOREMESH_HOME": str(tmp_path), "SCOREMESH_DEFAULT_DEADLINE_S": "10"})
    server = MeshServer(
        "scoring-test",
        [Registration(SERVICE_NAME, scoring_pb2_grpc.add_ScoringServicer_to_server, ScoringServicer(store))],
        settings,
    )
    log = PredictionLog(store, rate=1.0)
    log.start()
    await server.start()
    try:
        async with open_channel(server.address, settings) as channel:
            yield Scoring(store, log, scoring_pb2_grpc.ScoringStub(channel))
    finally:
        await server.stop(0)
        await log.close()


async def _rpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def _violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    domain = from_rpc_error(error)
    assert isinstance(domain, InvalidArgument), domain
    return [v.field for v in domain.violations]


def _arrays_equal(actual: npt.NDArray[Any], expected: npt.NDArray[Any]) -> bool:
    return actual.shape == expected.shape and actual.tobytes() == expected.tobytes()


async def _logged_ids(store: PredictionStore, caller: Caller, model: str = "m") -> list[str]:
    page = await store.list_predictions(caller, model, page_size=1000)
    return [p.request_id for p in page.predictions]


# the log


async def test_a_logged_prediction_reads_back_exactly(store: PredictionStore) -> None:
    inputs: dict[str, npt.NDArray[Any]] = {
        "fp32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fp16": np.array([[1.5, -2.0]], dtype=np.float16),
        "bf16": np.array([1.0, 3.5], dtype=ml_dtypes.bfloat16),
        "int64": np.array([-(2**40), 7], dtype=np.int64),
        "uint8": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "big_endian": np.array([1.0, 2.0], dtype=">f8"),
        "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,
        "bytes": np.array([[b"a", b""], [b"\x00\xff", "é"]], dtype=object),
        "str": np.array(["cat", "dog"]),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    outputs = {"probabilities": np.array([[0.1, 0.9]], dtype=np.float64)}
    log = PredictionLog(store, rate=1.0)
    log.start()
    try:
        assert log.record(ALICE, "r1", "iris", 3, "triton", inputs, outputs)
        await log.flush()
    finally:
        await log.close()

    prediction = await store.get_prediction(ALICE, "r1")
    assert (prediction.model, prediction.version, prediction.backend) == ("iris", 3, "triton")
    assert prediction.feedback == ()
    assert [t.name for t in prediction.inputs] == list(inputs)
    datatypes = {t.name: t.datatype for t in prediction.inputs}
    assert datatypes == {
        "fp32": "FP32",
        "fp16": "FP16",
        "bf16": "BF16",
        "int64": "INT64",
        "uint8": "UINT8",
        "bool": "BOOL",
        "big_endian": "FP64",
        "transposed": "INT32",
        "bytes": "BYTES",
        "str": "BYTES",
        "empty": "FP32",
    }
    read = {t.name: to_numpy(t) for t in prediction.inputs}
    for name in ("fp32", "fp16", "int64", "uint8", "bool", "empty"):
        assert read[name].dtype == inputs[name].dtype, name
        assert _arrays_equal(read[name], inputs[name]), name
    assert read["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert _arrays_equal(read["bf16"], inputs["bf16"])
    np.testing.assert_array_equal(read["big_endian"], [1.0, 2.0])
    np.testing.assert_array_equal(read["transposed"], inputs["transposed"])
    assert read["bytes"].tolist() == [[b"a", b""], [b"\x00\xff", "é".encode()]]
    assert read["str"].tolist() == [b"cat", b"dog"]
    raw_bytes = next(t.raw for t in prediction.inputs if t.name == "bytes")
    assert raw_bytes == join_bytes(inputs["bytes"])
    assert raw_bytes[:5] == b"\x01\x00\x00\x00a"
    [output] = prediction.outputs
    assert (output.name, output.datatype, output.shape) == ("probabilities", "FP64", (1, 2))
    assert _arrays_equal(to_numpy(output), outputs["probabilities"])


@pytest.mark.parametrize("rate", [0.0, 1.0, 0.5])
async def test_sampling_logs_the_share_the_rate_picks(store: PredictionStore, rate: float) -> None:
    log = PredictionLog(store, rate=rate, rng=random.Random(42))
    log.start()
    try:
        queued = [log.record(ALICE, f"r{i:03d}", "m", 1, "onnxruntime", X, Y) for i in range(60)]
        await log.flush()
    finally:
        await log.close()

    replay = random.Random(42)
    expected = {f"r{i:03d}" for i in range(60) if rate == 1.0 or (rate > 0.0 and replay.random() < rate)}
    assert {f"r{i:03d}" for i, q in enumerate(queued) if q} == expected
    assert set(await _logged_ids(store, ALICE)) == expected
    assert log.stats.written == len(expected)
    assert log.stats.sampled_out == 60 - len(expected)
    if rate == 0.5:
        assert 0 < len(expected) < 60


async def test_a_full_queue_drops_and_counts_without_blocking(store: PredictionStore) -> None:
    # the writer is not started: nothing leaves the queue until flush
    log = PredictionLog(store, rate=1.0, max_queue=3)
    queued = [log.record(ALICE, f"r{i}", "m", 1, "onnxruntime", X, Y) for i in range(5)]
    assert queued == [True, True, True, False, False]
    assert (log.stats.queued, log.stats.dropped, log.stats.pending) == (3, 2, 3)

    await log.flush()
    assert (log.stats.written, log.stats.pending) == (3, 0)
    assert sorted(await _logged_ids(store, ALICE)) == ["r0", "r1", "r2"]
    # room again once written
    assert log.record(ALICE, "r5", "m", 1, "onnxruntime", X, Y)
    await log.close()
    assert log.stats.written == 4


async def test_the_queue_is_bounded_in_bytes_too(store: PredictionStore) -> None:
    big = {"x": np.zeros(1000, dtype=np.float64)}  # 8000 bytes
    log = PredictionLog(store, rate=1.0, max_queue_bytes=20_000)
    queued = [log.record(ALICE, f"r{i}", "m", 1, "onnxruntime", big, {}) for i in range(3)]
    assert queued == [True, True, False]
    assert log.stats.dropped == 1
    await log.close()
    assert log.stats.written == 2


async def test_close_writes_what_is_queued_and_refuses_more(store: PredictionStore) -> None:
    log = PredictionLog(store, rate=1.0, batch_size=2)
    log.start()
    for i in range(5):
        assert log.record(ALICE, f"r{i}", "m", 1, "onnxruntime", X, Y)
    await log.close()
    assert log.stats.written == 5
    assert not log.record(ALICE, "late", "m", 1, "onnxruntime", X, Y)
    assert len(await _logged_ids(store, ALICE)) == 5


async def test_a_request_id_is_logged_once(store: PredictionStore) -> None:
    log = PredictionLog(store, rate=1.0)
    assert log.record(ALICE, "r1", "m", 1, "onnxruntime", X, Y)
    assert log.record(ALICE, "r1", "m", 2, "triton", X, Y)
    await log.close()
    prediction = await store.get_prediction(ALICE, "r1")
    assert (prediction.version, prediction.backend) == (1, "onnxruntime")


async def test_write_failures_are_counted_not_raised(database_url: str) -> None:
    store = await PredictionStore.open(database_url)
    log = PredictionLog(store, rate=1.0)
    log.start()
    await store.close()

    assert log.record(ALICE, "r1", "m", 1, "onnxruntime", X, Y)
    await log.flush()
    assert (log.stats.failed, log.stats.written) == (1, 0)
    # a prediction that cannot be encoded fails alone, before the database is asked
    assert log.record(ALICE, "r2", "m", 1, "onnxruntime", {"c": np.array([1j])}, Y)
    await log.close()
    assert log.stats.failed == 2


async def test_an_unencodable_prediction_does_not_sink_its_batch(store: PredictionStore) -> None:
    log = PredictionLog(store, rate=1.0)
    assert log.record(ALICE, "bad\x00id", "m", 1, "onnxruntime", X, Y)
    assert log.record(ALICE, "complex", "m", 1, "onnxruntime", {"c": np.array([1j])}, Y)
    assert log.record(ALICE, "good", "m", 1, "onnxruntime", X, Y)
    await log.close()
    assert (log.stats.written, log.stats.failed) == (1, 2)
    assert await _logged_ids(store, ALICE) == ["good"]


# feedback


async def test_feedback_label_and_tensor_come_back_on_the_prediction(scoring: Scoring) -> None:
    await scoring.logged(ALICE, "r1", model="iris", version=2)
    label = await scoring.stub.CreateFeedback(
        pb.CreateFeedbackRequest(feedback=pb.Feedback(request_id="r1", label="setosa")),
        metadata=ALICE.metadata(),
    )
    assert (label.label, label.model, label.version, label.created_by) == ("setosa", "iris", 2, "alice")
    assert label.create_time.seconds > 0
    target = pb.Tensor(datatype="FP32", shape=[2], raw_contents=np.array([0.5, 1.5], "<f4").tobytes())
    tensor = await scoring.stub.CreateFeedback(
        pb.CreateFeedbackRequest(feedback=pb.Feedback(request_id="r1", tensor=target)),
        metadata=CAROL.metadata(),
    )
    assert tensor.WhichOneof("value") == "tensor"
    assert tensor.tensor == target

    prediction = await scoring.stub.GetPrediction(
        pb.GetPredictionRequest(request_id="r1"), metadata=ALICE.metadata()
    )
    assert (prediction.request_id, prediction.model, prediction.version) == ("r1", "iris", 2)
    assert [f.WhichOneof("value") for f in prediction.feedback] == ["label", "tensor"]
    assert [f.created_by for f in prediction.feedback] == ["alice", "carol"]
    assert prediction.feedback[0].label == "setosa"
    assert prediction.feedback[1].tensor == target
    assert [t.name for t in prediction.inputs] == ["x"]
    assert prediction.inputs[0].raw_contents == X["x"].tobytes()
    assert list(prediction.inputs[0].shape) == [2, 3]

    [record] = (await scoring.store.get_prediction(ALICE, "r1")).feedback[1:]
    assert record.tensor is not None
    np.testing.assert_array_equal(to_numpy(record.tensor), [0.5, 1.5])


async def test_feedback_for_an_unlogged_prediction_joins_it_once_logged(scoring: Scoring) -> None:
    early = await scoring.stub.CreateFeedback(
        pb.CreateFeedbackRequest(feedback=pb.Feedback(request_id="late", label="spam")),
        metadata=ALICE.metadata(),
    )
    assert (early.model, early.version) == ("", 0)
    await _rpc_error(
        scoring.stub.GetPrediction(pb.GetPredictionRequest(request_id="late"), metadata=ALICE.metadata()),
        grpc.StatusCode.NOT_FOUND,
    )

    await scoring.logged(ALICE, "late", model="filter", version=4)
    prediction = await scoring.stub.GetPrediction(
        pb.GetPredictionRequest(request_id="late"), metadata=ALICE.metadata()
    )
    [feedback] = prediction.feedback
    assert (feedback.label, feedback.model, feedback.version) == ("spam", "filter", 4)


async def test_tenants_see_only_their_own_predictions_and_feedback(scoring: Scoring) -> None:
    await scoring.logged(ALICE, "r1")
    missing = await _rpc_error(
        scoring.stub.GetPrediction(pb.GetPredictionRequest(request_id="r1"), metadata=BOB.metadata()),
        grpc.StatusCode.NOT_FOUND,
    )
    unknown = await _rpc_error(
        scoring.stub.GetPrediction(pb.GetPredictionRequest(request_id="nope"), metadata=BOB.metadata()),
        grpc.StatusCode.NOT_FOUND,
    )
    # another tenant's prediction and no prediction look alike
    assert from_rpc_error(missing).reason == from_rpc_error(unknown).reason == "PREDICTION_NOT_FOUND"
    await _rpc_error(
        scoring.stub.CreateFeedback(
            pb.CreateFeedbackRequest(feedback=pb.Feedback(request_id="r1", label="x")),
            metadata=BOB.metadata(),
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    listed = await scoring.stub.ListPredictions(pb.ListPredictionsRequest(model="m"), metadata=BOB.metadata())
    assert list(listed.predictions) == []

    # feedback Bob gave before Alice's prediction was logged stays his: it does not join hers
    await scoring.stub.CreateFeedback(
        pb.CreateFeedbackRequest(feedback=pb.Feedback(request_id="r2", label="bob's")),
        metadata=BOB.metadata(),
    )
    await scoring.logged(ALICE, "r2")
    prediction = await scoring.store.get_prediction(ALICE, "r2")
    assert prediction.feedback == ()
    with pytest.raises(NotFound):
        await scoring.store.get_prediction(BOB, "r2")


# listing


async def test_list_newest_first_by_version_and_with_feedback_only(scoring: Scoring) -> None:
    for i, version in enumerate([1, 1, 2, 2, 2]):
        assert scoring.log.record(ALICE, f"r{i}", "m", version, "onnxruntime", X, Y)
    assert scoring.log.record(ALICE, "other", "n", 1, "onnxruntime", X, Y)
    assert scoring.log.record(BOB, "bobs", "m", 1, "onnxruntime", X, Y)
    await scoring.log.flush()
    for request_id in ("r1", "r3", "r3"):
        await scoring.store.create_feedback(ALICE, request_id, label="yes")

    async def ids(**request: Any) -> list[str]:
        response = await scoring.stub.ListPredictions(
            pb.ListPredictionsRequest(model="m", **request), metadata=ALICE.metadata()
        )
        return [p.request_id for p in response.predictions]

    assert await ids() == ["r4", "r3", "r2", "r1", "r0"]
    assert await ids(version=1) == ["r1", "r0"]
    assert await ids(with_feedback_only=True) == ["r3", "r1"]
    assert await ids(version=2, with_feedback_only=True) == ["r3"]
    response = await scoring.stub.ListPredictions(
        pb.ListPredictionsRequest(model="m", with_feedback_only=True), metadata=ALICE.metadata()
    )
    assert [len(p.feedback) for p in response.predictions] == [2, 1]


async def test_pages_follow_tokens_and_bad_tokens_are_refused(scoring: Scoring) -> None:
    for i in range(7):
        assert scoring.log.record(ALICE, f"r{i}", "m", 1, "onnxruntime", X, Y)
    await scoring.log.flush()

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        response = await scoring.stub.ListPredictions(
            pb.ListPredictionsRequest(model="m", page_size=3, page_token=token), metadata=ALICE.metadata()
        )
        seen += [p.request_id for p in response.predictions]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert seen == [f"r{i}" for i in reversed(range(7))]
    assert pages == 3

    first = await scoring.stub.ListPredictions(
        pb.ListPredictionsRequest(model="m", page_size=3), metadata=ALICE.metadata()
    )
    for request in (
        pb.ListPredictionsRequest(model="m", page_token="not a token"),
        pb.ListPredictionsRequest(model="m", page_token="W10="),  # base64 of []
        pb.ListPredictionsRequest(model="m", version=1, page_token=first.next_page_token),
        pb.ListPredictionsRequest(model="n", page_token=first.next_page_token),
        pb.ListPredictionsRequest(model="m", with_feedback_only=True, page_token=first.next_page_token),
    ):
        error = await _rpc_error(
            scoring.stub.ListPredictions(request, metadata=ALICE.metadata()), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert _violated_fields(error) == ["page_token"]


# bad input


def _tensor(datatype: str, shape: list[int], raw: bytes) -> pb.Tensor:
    return pb.Tensor(datatype=datatype, shape=shape, raw_contents=raw)


_TWO_STRINGS = join_bytes(np.array([b"ab", b"c"], dtype=object))


@pytest.mark.parametrize(
    ("feedback", "field"),
    [
        (pb.Feedback(label="x"), "feedback.request_id"),
        (pb.Feedback(request_id="r" * 257, label="x"), "feedback.request_id"),
        (pb.Feedback(request_id="r"), "feedback.label"),
        (pb.Feedback(request_id="r", label=""), "feedback.label"),
        (pb.Feedback(request_id="r", label="x" * (MAX_LABEL_CHARS + 1)), "feedback.label"),
        (pb.Feedback(request_id="r", label="a\x00b"), "feedback.label"),
        (pb.Feedback(request_id="r", tensor=_tensor("FP128", [1], b"")), "feedback.tensor.datatype"),
        (pb.Feedback(request_id="r", tensor=_tensor("FP32", [-1], b"")), "feedback.tensor.shape"),
        (pb.Feedback(request_id="r", tensor=_tensor("FP32", [1] * 17, b"\0" * 4)), "feedback.tensor.shape"),
        (pb.Feedback(request_id="r", tensor=_tensor("FP32", [2], b"\0" * 7)), "feedback.tensor.raw_contents"),
        (
            pb.Feedback(request_id="r", tensor=_tensor("BYTES", [3], _TWO_STRINGS)),
            "feedback.tensor.raw_contents",
        ),
        (
            pb.Feedback(request_id="r", tensor=_tensor("BYTES", [1], _TWO_STRINGS)),
            "feedback.tensor.raw_contents",
        ),
        (
            pb.Feedback(request_id="r", tensor=_tensor("BYTES", [1], b"\x05\0\0\0ab")),
            "feedback.tensor.raw_contents",
        ),
        (
            pb.Feedback(request_id="r", tensor=_tensor("BYTES", [1], b"\x05\0")),
            "feedback.tensor.raw_contents",
        ),
        (
            pb.Feedback(request_id="r", tensor=pb.Tensor(name="n\x00", datatype="BOOL", shape=[0])),
            "feedback.tensor.name",
        ),
    ],
)
async def test_bad_feedback_is_refused_naming_the_field(
    scoring: Scoring, feedback: pb.Feedback, field: str
) -> None:
    error = await _rpc_error(
        scoring.stub.CreateFeedback(pb.CreateFeedbackRequest(feedback=feedback), metadata=ALICE.metadata()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert _violated_fields(error) == [field]


async def test_good_edge_case_tensors_are_accepted(scoring: Scoring) -> None:
    for tensor in (
        _tensor("BYTES", [2], _TWO_STRINGS),
        _tensor("BYTES", [0], b""),
        _tensor("BF16", [1, 2], b"\0" * 4),
        _tensor("BOOL", [], b"\x01"),  # a scalar
    ):
        created = await scoring.stub.CreateFeedback(
            pb.CreateFeedbackRequest(feedback=pb.Feedback(request_id="r", tensor=tensor)),
            metadata=ALICE.metadata(),
        )
        assert created.tensor == tensor


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("get", "request_id"),
        ("list_without_model", "model"),
        ("list_negative_version", "version"),
        ("list_negative_page_size", "page_size"),
    ],
)
async def test_bad_reads_are_refused_naming_the_field(scoring: Scoring, call: str, field: str) -> None:
    stub, metadata = scoring.stub, ALICE.metadata()
    requests: Mapping[str, Callable[[], Awaitable[Any]]] = {
        "get": lambda: stub.GetPrediction(pb.GetPredictionRequest(), metadata=metadata),
        "list_without_model": lambda: stub.ListPredictions(pb.ListPredictionsRequest(), metadata=metadata),
        "list_negative_version": lambda: stub.ListPredictions(
            pb.ListPredictionsRequest(model="m", version=-1), metadata=metadata
        ),
        "list_negative_page_size": lambda: stub.ListPredictions(
            pb.ListPredictionsRequest(model="m", page_size=-1), metadata=metadata
        ),
    }
    error = await _rpc_error(requests[call](), grpc.StatusCode.INVALID_ARGUMENT)
    assert _violated_fields(error) == [field]
