"""The feedback loop end to end: a model trained by a job is scored through the scoring
service, a tenant labels the predictions, the labels become a dataset, and a finetune job
makes that tenant's variant, which scores the tenant's data better than the base did."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scoremesh.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from scoremesh.training.v1 import training_pb2 as pb
from sklearn.datasets import load_iris

from tests.integration.registry_harness import RunningRegistry, registry_env, running_registry
from tests.integration.scoring_harness import (
    RunningScoring,
    eventually,
    infer_request,
    outputs_of,
    running_scoring,
    scoring_env,
)
from tests.integration.training_harness import (
    ACME,
    RunningTraining,
    running_training,
    training_env,
    wait_for_state,
    worker_process,
)

pytestmark = pytest.mark.integration

FINISHED = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
# acme names iris's classes differently: its truth is a permutation of the base's labels
ACME_LABELS = np.array([2, 0, 1])


@dataclass
class Loop:
    registry: RunningRegistry
    scoring: RunningScoring
    training: RunningTraining


@pytest.fixture
async def loop(database_url: str, tmp_path: Path) -> AsyncIterator[Loop]:
    async with running_registry(registry_env(tmp_path / "registry", database_url)) as registry:
        env = scoring_env(
            tmp_path / "scoring",
            database_url,
            registry.address,
            SCOREMESH_SCORING_BACKEND="onnxruntime",
            SCOREMESH_RESOLVE_TTL_S="0.2",
        )
        async with running_scoring(env) as scoring:
            train_env = training_env(tmp_path / "training", database_url, registry.address)
            async with running_training(train_env, scoring.channel) as training:
                yield Loop(registry, scoring, training)


async def _labels(loop: Loop, rows: np.ndarray[Any, Any], version: str) -> np.ndarray[Any, Any]:
    request = infer_request("flowers", {"input": rows}, version=version)
    response = await loop.scoring.stub.ModelInfer(request, metadata=ACME.metadata())
    return np.asarray(outputs_of(response)["label"]).reshape(-1)


async def test_feedback_becomes_a_tenant_variant_that_scores_better(loop: Loop) -> None:
    client = loop.training.client()
    base = await client.submit("sklearn-tabular", {"dataset": "iris"}, model="flowers", alias="production")
    async with worker_process(loop.training.env):
        done = await wait_for_state(client, base.id, *FINISHED, timeout_s=120)
        assert done.state == pb.SUCCEEDED, done.error

        iris = load_iris()
        features = iris.data.astype(np.float32)
        truth = ACME_LABELS[iris.target]
        order = np.random.default_rng(7).permutation(len(features))
        labelled, held_out = order[:100], order[100:]

        # acme scores rows one request at a time and says what each should have been
        feedback = scoring_pb2_grpc.ScoringStub(loop.scoring.channel)
        for index in labelled:
            request = infer_request("flowers", {"input": features[index : index + 1]}, request_id=f"r{index}")
            await loop.scoring.stub.ModelInfer(request, metadata=ACME.metadata())
            await feedback.CreateFeedback(
                scoring_pb2.CreateFeedbackRequest(
                    feedback=scoring_pb2.Feedback(request_id=f"r{index}", label=str(truth[index]))
                ),
                metadata=ACME.metadata(),
            )

        async def all_logged() -> bool:
            listed = await feedback.ListPredictions(
                scoring_pb2.ListPredictionsRequest(model="flowers", with_feedback_only=True, page_size=1000),
                metadata=ACME.metadata(),
            )
            return len(listed.predictions) == len(labelled)

        await eventually(all_logged)  # the prediction log is written in the background
        dataset = await client.feedback_dataset("acme-feedback", "flowers")
        assert (dataset.rows, dataset.columns, dataset.source) == (100, 4, "feedback:flowers")

        tuned = await client.submit(
            "finetune", {}, base_model="flowers@production", dataset="acme-feedback", alias="tenant-acme"
        )
        done = await wait_for_state(client, tuned.id, *FINISHED, timeout_s=180)
    assert done.state == pb.SUCCEEDED, done.error
    assert (done.registration.model, done.version, done.promoted) == ("flowers", 2, True)

    rows = features[held_out]
    base_accuracy = float(np.mean(await _labels(loop, rows, "1") == truth[held_out]))
    variant_accuracy = float(np.mean(await _labels(loop, rows, "tenant-acme") == truth[held_out]))
    assert variant_accuracy >= base_accuracy + 0.3, (base_accuracy, variant_accuracy)
    assert variant_accuracy >= 0.8
    # everyone else still gets the base model by default
    assert await _labels(loop, rows[:5], "") == pytest.approx(await _labels(loop, rows[:5], "1"))
