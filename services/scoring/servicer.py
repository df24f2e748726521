"""``inference.GRPCInferenceService`` over the scoring service: the caller and deadline are
read from the call, everything else is the data plane's (``services.scoring.service``).

Domain errors raised below are turned into statuses by the mesh's server interceptor.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.mesh.identity import Caller, caller_from_metadata
from services.scoring.oip import pb, pb_grpc
from services.scoring.service import ScoringService

Context = grpc.aio.ServicerContext[Any, Any]


def _caller(context: Context) -> Caller:
    return caller_from_metadata(context.invocation_metadata())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, service: ScoringService) -> None:
        self._service = service

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._service.server_ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return self._service.server_metadata()

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        ready = await self._service.model_ready(_caller(context), request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        return await self._service.model_metadata(_caller(context), request.name, request.version)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return await self._service.infer(_caller(context), request, context.time_remaining())
