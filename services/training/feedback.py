"""Datasets from feedback: the scoring service's logged predictions that users labelled,
turned into features (the logged input) and targets (the labels).

A prediction's first input holds its rows. Its feedback (the latest, when several were given)
is either a label, which applies to every row and must be a whole number (a class index, as
the built-in classifiers predict), or a tensor with one value per row. Predictions whose
feedback cannot be used are skipped and counted, never guessed at.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc.aio
import numpy as np
from scoremesh.scoring.v1 import scoring_pb2 as pb
from scoremesh.scoring.v1 import scoring_pb2_grpc

from services.mesh.errors import FailedPrecondition
from services.mesh.identity import Caller

PAGE_SIZE: Final = 1000
MAX_ROWS: Final = 1_000_000


@dataclass
class FeedbackRows:
    features: list[np.ndarray[Any, Any]] = field(default_factory=list)
    labels: list[np.ndarray[Any, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    rows: int = 0

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def add(self, prediction: pb.Prediction) -> None:
        from services.scoring.tensors import from_raw  # the one codec for logged tensors

        if not prediction.inputs or not prediction.feedback:
            self.skip("no input or no feedback")
            return
        tensor = prediction.inputs[0]
        try:
            inputs = np.asarray(from_raw(tensor.raw_contents, tensor.datatype, list(tensor.shape)))
        except (KeyError, ValueError):
            self.skip("an input that cannot be read")
            return
        if inputs.ndim == 1:
            inputs = inputs.reshape(1, -1)
        if inputs.ndim != 2 or inputs.dtype.kind not in "fiub":
            self.skip("an input that is not a numeric table")
            return
        feedback = prediction.feedback[-1]
        rows = inputs.shape[0]
        if feedback.WhichOneof("value") == "label":
            try:
                label = int(feedback.label.strip())
            except ValueError:
                self.skip("a label that is not a class number")
                return
            labels = np.full(rows, label, dtype=np.int64)
        elif feedback.WhichOneof("value") == "tensor":
            try:
                value = np.asarray(
                    from_raw(
                        feedback.tensor.raw_contents, feedback.tensor.datatype, list(feedback.tensor.shape)
                    )
                ).reshape(-1)
            except (KeyError, ValueError):
                self.skip("a feedback tensor that cannot be read")
                return
            if value.size != rows:
                self.skip("a feedback tensor without one value per row")
                return
            labels = value
        else:
            self.skip("empty feedback")
            return
        if self.features and self.features[0].shape[1] != inputs.shape[1]:
            self.skip("inputs of another width than the first prediction's")
            return
        self.features.append(inputs.astype(np.float32))
        self.labels.append(labels)
        self.rows += rows

    def npz(self) -> bytes:
        """The dataset as NPZ bytes (arrays X and y)."""
        buffer = io.BytesIO()
        np.savez(buffer, X=np.concatenate(self.features), y=np.concatenate(self.labels))
        return buffer.getvalue()


async def labelled_predictions(
    channel: grpc.aio.Channel, caller: Caller, model: str, version: int, *, timeout_s: float
) -> AsyncIterator[pb.Prediction]:
    """Every prediction of ``model`` (``version``; 0: all) that got feedback, as ``caller``."""
    stub = scoring_pb2_grpc.ScoringStub(channel)
    token = ""
    while True:
        request = pb.ListPredictionsRequest(
            model=model, version=version, with_feedback_only=True, page_size=PAGE_SIZE, page_token=token
        )
        page = await stub.ListPredictions(request, metadata=caller.metadata(), timeout=timeout_s)
        for prediction in page.predictions:
            yield prediction
        token = page.next_page_token
        if not token:
            return


def require_rows(rows: FeedbackRows, model: str) -> None:
    """FAILED_PRECONDITION when there is nothing to train on (saying what was skipped)."""
    if rows.rows == 0:
        skipped = ", ".join(f"{n} with {why}" for why, n in rows.skipped.items()) or "none"
        raise FailedPrecondition(
            f"model {model!r} has no logged predictions with usable feedback (skipped: {skipped})",
            reason="NO_FEEDBACK",
            metadata={"model": model},
        )
    if rows.rows > MAX_ROWS:
        raise FailedPrecondition(
            f"model {model!r} has {rows.rows} labelled rows, more than {MAX_ROWS}", reason="TOO_MANY_ROWS"
        )
