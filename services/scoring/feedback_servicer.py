"""``scoremesh.scoring.v1.Scoring`` over gRPC: protobuf in, a call on PredictionStore, protobuf out.

Domain errors raised below are turned into statuses by the mesh's server interceptor.
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from scoremesh.scoring.v1 import scoring_pb2 as pb
from scoremesh.scoring.v1 import scoring_pb2_grpc

from services.mesh.identity import Caller, caller_from_metadata
from services.scoring import converters as conv
from services.scoring.predictions import PredictionStore

SERVICE_NAME: Final = "scoremesh.scoring.v1.Scoring"
Context = grpc.aio.ServicerContext[Any, Any]


def _caller(context: Context) -> Caller:
    return caller_from_metadata(context.invocation_metadata())


class ScoringServicer(scoring_pb2_grpc.ScoringServicer):  # type: ignore[misc]
    def __init__(self, store: PredictionStore) -> None:
        self._store = store

    async def CreateFeedback(self, request: pb.CreateFeedbackRequest, context: Context) -> pb.Feedback:
        label, tensor = conv.feedback_value_from_pb(request.feedback)
        feedback = await self._store.create_feedback(
            _caller(context), request.feedback.request_id, label=label, tensor=tensor
        )
        return conv.feedback_to_pb(feedback)

    async def GetPrediction(self, request: pb.GetPredictionRequest, context: Context) -> pb.Prediction:
        prediction = await self._store.get_prediction(_caller(context), request.request_id)
        return conv.prediction_to_pb(prediction)

    async def ListPredictions(
        self,
        request: pb.ListPredictionsRequest,
        context: Context,
    ) -> pb.ListPredictionsResponse:
        page = await self._store.list_predictions(
            _caller(context),
            request.model,
            version=request.version,
            with_feedback_only=request.with_feedback_only,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListPredictionsResponse(
            predictions=[conv.prediction_to_pb(p) for p in page.predictions],
            next_page_token=page.next_page_token,
        )
