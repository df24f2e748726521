"""A small asynchronous client of ModelRegistry for the CLI, benchmarks and other services."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from scoremesh.registry.v1 import registry_pb2 as pb
from scoremesh.registry.v1 import registry_pb2_grpc

from services.mesh.errors import InvalidArgument
from services.mesh.identity import Caller

UPLOAD_CHUNK_BYTES = 1024 * 1024
WATCH_TIMEOUT_S = 365 * 24 * 3600.0
_REFERENCE = re.compile(r"^(?P<model>[^:@]+)(?::(?P<version>\d+)|@(?P<alias>[^:@]+))?$")


@dataclass(frozen=True, slots=True)
class Reference:
    """``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` as users type them."""

    model: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        match = _REFERENCE.fullmatch(text)
        if not match:
            raise InvalidArgument.for_field("reference", f"{text!r} is not NAME, NAME:VERSION or NAME@ALIAS")
        version = match["version"]
        return cls(match["model"], int(version) if version else None, match["alias"])

    def resolve_request(self) -> pb.ResolveModelRequest:
        if self.version is not None:
            return pb.ResolveModelRequest(model=self.model, version=self.version)
        if self.alias is not None:
            return pb.ResolveModelRequest(model=self.model, alias=self.alias)
        return pb.ResolveModelRequest(model=self.model)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as artifact:
        while chunk := artifact.read(UPLOAD_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class RegistryClient:
    def __init__(self, channel: grpc.aio.Channel, caller: Caller | None = None) -> None:
        self.stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self._metadata = caller.metadata() if caller else ()

    async def push(
        self,
        model: str,
        path: Path,
        *,
        alias: str = "",
        description: str = "",
        progress: Callable[[int], None] | None = None,
        timeout: float | None = None,
    ) -> pb.UploadVersionResponse:
        """Uploads ``path`` in chunks with its sha256 and size declared, so the registry
        refuses anything that arrives damaged; ``progress`` gets the bytes sent so far."""
        size = path.stat().st_size
        metadata = pb.UploadVersionMetadata(
            model=model, sha256=file_sha256(path), size_bytes=size, alias=alias, description=description
        )

        async def requests() -> AsyncIterator[pb.UploadVersionRequest]:
            yield pb.UploadVersionRequest(metadata=metadata)
            sent = 0
            with path.open("rb") as artifact:
                while chunk := artifact.read(UPLOAD_CHUNK_BYTES):
                    yield pb.UploadVersionRequest(chunk=chunk)
                    sent += len(chunk)
                    if progress:
                        progress(sent)

        response: pb.UploadVersionResponse = await self.stub.UploadVersion(
            requests(), metadata=self._metadata, timeout=timeout
        )
        return response

    async def pull(
        self, reference: Reference, path: Path, *, timeout: float | None = None
    ) -> pb.ModelVersion:
        """Downloads a version to ``path`` (written beside it, then renamed) and checks its sha256."""
        resolved = await self.stub.ResolveModel(
            reference.resolve_request(), metadata=self._metadata, timeout=timeout
        )
        version: pb.ModelVersion = resolved.version
        partial = path.with_name(path.name + ".partial")
        try:
            with partial.open("wb") as out:
                async for chunk in self._chunks(version, timeout):
                    out.write(chunk)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return version

    async def download(self, version: pb.ModelVersion, *, timeout: float | None = None) -> bytes:
        """A version's artifact in memory, its sha256 checked."""
        return b"".join([chunk async for chunk in self._chunks(version, timeout)])

    async def _chunks(self, version: pb.ModelVersion, timeout: float | None) -> AsyncIterator[bytes]:
        """The artifact's chunks in order; raises after the last one when the bytes do not
        hash to the version's sha256."""
        request = pb.DownloadVersionRequest(model=version.model, version=version.version)
        digest = hashlib.sha256()
        async for response in self.stub.DownloadVersion(request, metadata=self._metadata, timeout=timeout):
            digest.update(response.chunk)
            yield response.chunk
        if digest.hexdigest() != version.sha256:
            raise InvalidArgument(f"downloaded bytes hash to {digest.hexdigest()}, expected {version.sha256}")

    def watch(
        self, cursor: str = "", models: list[str] | None = None
    ) -> AsyncIterator[pb.WatchModelsResponse]:
        """Version and alias events after ``cursor`` (empty: from now), as they happen. The
        stream has no deadline: it lives until the caller cancels it or the server goes away."""
        request = pb.WatchModelsRequest(cursor=cursor, models=models or [])
        # a huge timeout, because the channel's default deadline would end the stream
        stream: AsyncIterator[pb.WatchModelsResponse] = self.stub.WatchModels(
            request, metadata=self._metadata, timeout=WATCH_TIMEOUT_S
        )
        return stream

    async def resolve(self, reference: Reference, *, timeout: float | None = None) -> pb.ResolveModelResponse:
        response: pb.ResolveModelResponse = await self.stub.ResolveModel(
            reference.resolve_request(), metadata=self._metadata, timeout=timeout
        )
        return response

    async def list_models(self) -> list[pb.Model]:
        models: list[pb.Model] = []
        token = ""
        while True:
            page = await self.stub.ListModels(
                pb.ListModelsRequest(page_size=1000, page_token=token), metadata=self._metadata
            )
            models.extend(page.models)
            token = page.next_page_token
            if not token:
                return models

    async def list_versions(self, model: str) -> list[pb.ModelVersion]:
        versions: list[pb.ModelVersion] = []
        token = ""
        while True:
            page = await self.stub.ListVersions(
                pb.ListVersionsRequest(model=model, page_size=1000, page_token=token), metadata=self._metadata
            )
            versions.extend(page.versions)
            token = page.next_page_token
            if not token:
                return versions

    async def get_model(self, name: str) -> pb.Model:
        model: pb.Model = await self.stub.GetModel(pb.GetModelRequest(name=name), metadata=self._metadata)
        return model

    async def list_aliases(self, model: str) -> list[pb.Alias]:
        response = await self.stub.ListAliases(pb.ListAliasesRequest(model=model), metadata=self._metadata)
        return list(response.aliases)

    async def set_alias(self, model: str, alias: str, version: int, expected: int | None = None) -> pb.Alias:
        request = pb.SetAliasRequest(model=model, alias=alias, version=version)
        if expected is not None:
            request.expected_version = expected
        result: pb.Alias = await self.stub.SetAlias(request, metadata=self._metadata)
        return result
