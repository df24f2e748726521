"""A client of the training service, for the CLI, tests and other services."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

import grpc.aio
from google.protobuf import struct_pb2
from scoremesh.training.v1 import training_pb2 as pb
from scoremesh.training.v1 import training_pb2_grpc

from services.mesh.identity import Caller

UPLOAD_CHUNK_BYTES: Final = 1024 * 1024
WATCH_TIMEOUT_S: Final = 24 * 3600.0
"""WatchJob runs as long as the job does; the mesh's default deadline would cut it short."""


def argument_value(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, int | float):
        message.number_value = value
    else:
        message.string_value = str(value)
    return message


class TrainingClient:
    def __init__(self, channel: grpc.aio.Channel, caller: Caller) -> None:
        self.stub = training_pb2_grpc.TrainingStub(channel)
        self._metadata = caller.metadata()

    async def plugins(self) -> list[pb.Plugin]:
        response = await self.stub.ListPlugins(pb.ListPluginsRequest(), metadata=self._metadata)
        return list(response.plugins)

    async def submit(
        self,
        plugin: str,
        arguments: Mapping[str, Any],
        *,
        model: str = "",
        alias: str = "",
        promote_if: str = "",
        dataset: str = "",
        base_model: str = "",
        idempotency_key: str = "",
        max_attempts: int = 0,
        time_limit_s: int = 0,
    ) -> pb.Job:
        request = pb.SubmitJobRequest(
            plugin=plugin,
            arguments={name: argument_value(value) for name, value in arguments.items()},
            registration=pb.Registration(model=model, alias=alias, promote_if=promote_if),
            dataset=dataset,
            base_model=base_model,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            time_limit_s=time_limit_s,
        )
        job: pb.Job = await self.stub.SubmitJob(request, metadata=self._metadata)
        return job

    async def get(self, job_id: str) -> pb.Job:
        job: pb.Job = await self.stub.GetJob(pb.GetJobRequest(id=job_id), metadata=self._metadata)
        return job

    async def jobs(self, state: int = pb.JOB_STATE_UNSPECIFIED, page_size: int = 0) -> list[pb.Job]:
        response = await self.stub.ListJobs(
            pb.ListJobsRequest(state=state, page_size=page_size), metadata=self._metadata
        )
        return list(response.jobs)

    async def cancel(self, job_id: str) -> pb.Job:
        job: pb.Job = await self.stub.CancelJob(pb.CancelJobRequest(id=job_id), metadata=self._metadata)
        return job

    async def watch(self, job_id: str, after_event: int = 0) -> AsyncIterator[pb.JobEvent]:
        call = self.stub.WatchJob(
            pb.WatchJobRequest(id=job_id, after_event=after_event),
            metadata=self._metadata,
            timeout=WATCH_TIMEOUT_S,
        )
        async for event in call:
            yield event

    async def push_dataset(self, name: str, path: Path, format: str = "") -> pb.Dataset:
        """Uploads ``path`` in chunks with its sha256 declared; the format defaults to the
        file's suffix."""
        chosen = format or path.suffix.lstrip(".").lower()
        digest = hashlib.sha256()
        with path.open("rb") as source:
            while chunk := source.read(UPLOAD_CHUNK_BYTES):
                digest.update(chunk)
        metadata = pb.DatasetMetadata(name=name, format=chosen, sha256=digest.hexdigest())

        async def requests() -> AsyncIterator[pb.UploadDatasetRequest]:
            yield pb.UploadDatasetRequest(metadata=metadata)
            with path.open("rb") as source:
                while chunk := source.read(UPLOAD_CHUNK_BYTES):
                    yield pb.UploadDatasetRequest(chunk=chunk)

        dataset: pb.Dataset = await self.stub.UploadDataset(requests(), metadata=self._metadata)
        return dataset

    async def feedback_dataset(self, name: str, model: str, version: int = 0) -> pb.Dataset:
        request = pb.CreateFeedbackDatasetRequest(name=name, model=model, version=version)
        dataset: pb.Dataset = await self.stub.CreateFeedbackDataset(request, metadata=self._metadata)
        return dataset

    async def datasets(self) -> list[pb.Dataset]:
        found: list[pb.Dataset] = []
        token = ""
        while True:
            page = await self.stub.ListDatasets(
                pb.ListDatasetsRequest(page_token=token), metadata=self._metadata
            )
            found.extend(page.datasets)
            token = page.next_page_token
            if not token:
                return found
