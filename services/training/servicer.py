"""``scoremesh.training.v1.Training`` over gRPC: protobuf in, a call on the TrainingService,
protobuf out. Domain errors become statuses in the mesh's server interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
from opentelemetry import propagate
from scoremesh.training.v1 import training_pb2 as pb
from scoremesh.training.v1 import training_pb2_grpc

from services.mesh.errors import InvalidArgument
from services.mesh.identity import Caller, caller_from_metadata
from services.training import converters as conv
from services.training.service import Submission, TrainingService

SERVICE_NAME: Final = "scoremesh.training.v1.Training"
Context = grpc.aio.ServicerContext[Any, Any]


def _caller(context: Context) -> Caller:
    return caller_from_metadata(context.invocation_metadata())


def _traceparent() -> str:
    """This call's span as a W3C traceparent, kept on the job so that its spans can link back
    to the request that submitted it ("" when the call is not traced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")[:128]


async def _chunks(requests: AsyncIterator[pb.UploadDatasetRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("payload") != "chunk":
            raise InvalidArgument.for_field("metadata", "only the first message may carry metadata")
        yield request.chunk


class TrainingServicer(training_pb2_grpc.TrainingServicer):  # type: ignore[misc]
    def __init__(self, service: TrainingService) -> None:
        self._service = service

    async def ListPlugins(self, request: pb.ListPluginsRequest, context: Context) -> pb.ListPluginsResponse:
        return pb.ListPluginsResponse(plugins=[conv.plugin_to_pb(p) for p in self._service.plugins()])

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Context) -> pb.Job:
        submission = Submission(
            plugin=request.plugin,
            arguments={name: conv.value_of(value) for name, value in request.arguments.items()},
            registration=conv.registration_from_pb(request.registration),
            dataset=request.dataset,
            base_model=request.base_model,
            idempotency_key=request.idempotency_key,
            max_attempts=request.max_attempts,
            time_limit_s=request.time_limit_s,
            traceparent=_traceparent(),
        )
        job, _ = await self._service.submit(_caller(context), submission)
        return conv.job_to_pb(job)

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.Job:
        return conv.job_to_pb(await self._service.jobs.get(_caller(context), request.id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        page = await self._service.jobs.list(
            _caller(context),
            state=conv.state_from_pb(request.state),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListJobsResponse(
            jobs=[conv.job_to_pb(j) for j in page.jobs], next_page_token=page.next_page_token
        )

    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> pb.Job:
        return conv.job_to_pb(await self._service.jobs.cancel(_caller(context), request.id))

    async def WatchJob(self, request: pb.WatchJobRequest, context: Context) -> AsyncIterator[pb.JobEvent]:
        if request.after_event < 0:
            raise InvalidArgument.for_field("after_event", "must not be negative")
        async for event in self._service.watch(_caller(context), request.id, request.after_event):
            yield conv.event_to_pb(event)

    async def UploadDataset(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: Context
    ) -> pb.Dataset:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise InvalidArgument.for_field("metadata", "the first message must carry the dataset's metadata")
        metadata = first.metadata
        dataset, _ = await self._service.datasets.upload(
            _caller(context),
            metadata.name,
            metadata.format,
            _chunks(request_iterator),
            sha256=metadata.sha256,
        )
        return conv.dataset_to_pb(dataset)

    async def CreateFeedbackDataset(
        self, request: pb.CreateFeedbackDatasetRequest, context: Context
    ) -> pb.Dataset:
        dataset = await self._service.feedback_dataset(
            _caller(context), request.name, request.model, request.version
        )
        return conv.dataset_to_pb(dataset)

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.Dataset:
        return conv.dataset_to_pb(await self._service.datasets.get(_caller(context), request.name))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        page = await self._service.datasets.list(
            _caller(context), page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListDatasetsResponse(
            datasets=[conv.dataset_to_pb(d) for d in page.datasets], next_page_token=page.next_page_token
        )
