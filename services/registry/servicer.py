"""ModelRegistry over gRPC: protobuf in, a call on RegistryService, protobuf out.

Domain errors raised below are turned into statuses by the mesh's server interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from scoremesh.registry.v1 import registry_pb2 as pb
from scoremesh.registry.v1 import registry_pb2_grpc

from services.mesh.errors import InvalidArgument
from services.mesh.identity import Caller, caller_from_metadata
from services.registry import converters as conv
from services.registry.domain import Visibility
from services.registry.service import RegistryService

SERVICE_NAME = "scoremesh.registry.v1.ModelRegistry"
Context = grpc.aio.ServicerContext[Any, Any]
_MODEL_FIELDS = {"description", "visibility"}


def _caller(context: Context) -> Caller:
    return caller_from_metadata(context.invocation_metadata())


async def _chunks(requests: AsyncIterator[pb.UploadVersionRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("payload") != "chunk":
            raise InvalidArgument.for_field("metadata", "only the first message may carry metadata")
        yield request.chunk


class RegistryServicer(registry_pb2_grpc.ModelRegistryServicer):  # type: ignore[misc]
    def __init__(self, service: RegistryService) -> None:
        self._service = service

    async def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.Model:
        model = request.model
        visibility = conv.visibility_from_pb(model.visibility, "model.visibility") or Visibility.PRIVATE
        created = await self._service.create_model(
            _caller(context), model.name, model.description, visibility
        )
        return conv.model_to_pb(created)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.Model:
        return conv.model_to_pb(await self._service.get_model(_caller(context), request.name))

    async def ListModels(
        self,
        request: pb.ListModelsRequest,
        context: Context,
    ) -> pb.ListModelsResponse:
        page = await self._service.list_models(_caller(context), request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[conv.model_to_pb(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Context) -> pb.Model:
        paths = set(request.update_mask.paths) or _MODEL_FIELDS
        unknown = paths - _MODEL_FIELDS
        if unknown:
            raise InvalidArgument.for_field("update_mask", f"cannot update {', '.join(sorted(unknown))}")
        description = request.model.description if "description" in paths else None
        visibility = (
            conv.visibility_from_pb(request.model.visibility, "model.visibility")
            if "visibility" in paths
            else None
        )
        updated = await self._service.update_model(
            _caller(context), request.model.name, description, visibility
        )
        return conv.model_to_pb(updated)

    async def UploadVersion(
        self,
        request_iterator: AsyncIterator[pb.UploadVersionRequest],
        context: Context,
    ) -> pb.UploadVersionResponse:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise InvalidArgument.for_field("metadata", "the first message must carry the upload's metadata")
        result = await self._service.upload_version(
            _caller(context), conv.upload_request_from_pb(first.metadata), _chunks(request_iterator)
        )
        return pb.UploadVersionResponse(version=conv.version_to_pb(result.version), created=result.created)

    async def GetVersion(self, request: pb.GetVersionRequest, context: Context) -> pb.ModelVersion:
        return conv.version_to_pb(
            await self._service.get_version(_caller(context), request.model, request.version)
        )

    async def ListVersions(
        self,
        request: pb.ListVersionsRequest,
        context: Context,
    ) -> pb.ListVersionsResponse:
        page = await self._service.list_versions(
            _caller(context), request.model, request.page_size, request.page_token
        )
        return pb.ListVersionsResponse(
            versions=[conv.version_to_pb(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def DownloadVersion(
        self,
        request: pb.DownloadVersionRequest,
        context: Context,
    ) -> AsyncIterator[pb.DownloadVersionResponse]:
        version, chunks = await self._service.download_version(
            _caller(context), request.model, request.version
        )
        first = True
        async for chunk in chunks:
            if first:
                yield pb.DownloadVersionResponse(chunk=chunk, version=conv.version_to_pb(version))
                first = False
            else:
                yield pb.DownloadVersionResponse(chunk=chunk)

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.Alias:
        expected = request.expected_version if request.HasField("expected_version") else None
        alias = await self._service.set_alias(
            _caller(context), request.model, request.alias, request.version, expected
        )
        return conv.alias_to_pb(alias)

    async def DeleteAlias(
        self,
        request: pb.DeleteAliasRequest,
        context: Context,
    ) -> pb.DeleteAliasResponse:
        expected = request.expected_version if request.HasField("expected_version") else None
        await self._service.delete_alias(_caller(context), request.model, request.alias, expected)
        return pb.DeleteAliasResponse()

    async def ListAliases(
        self,
        request: pb.ListAliasesRequest,
        context: Context,
    ) -> pb.ListAliasesResponse:
        aliases = await self._service.list_aliases(_caller(context), request.model)
        return pb.ListAliasesResponse(aliases=[conv.alias_to_pb(a) for a in aliases])

    async def ListAliasChanges(
        self,
        request: pb.ListAliasChangesRequest,
        context: Context,
    ) -> pb.ListAliasChangesResponse:
        page = await self._service.list_alias_changes(
            _caller(context), request.model, request.alias, request.page_size, request.page_token
        )
        return pb.ListAliasChangesResponse(
            changes=[conv.alias_change_to_pb(c) for c in page.items], next_page_token=page.next_page_token
        )

    async def GetModelCard(self, request: pb.GetModelCardRequest, context: Context) -> pb.ModelCard:
        card = await self._service.get_card(_caller(context), request.model, request.version)
        return conv.card_to_pb(card)

    async def UpdateModelCard(
        self,
        request: pb.UpdateModelCardRequest,
        context: Context,
    ) -> pb.ModelCard:
        card = await self._service.update_card(_caller(context), conv.card_from_pb(request.card))
        return conv.card_to_pb(card)

    async def ResolveModel(
        self,
        request: pb.ResolveModelRequest,
        context: Context,
    ) -> pb.ResolveModelResponse:
        reference = request.WhichOneof("reference")
        resolved = await self._service.resolve(
            _caller(context),
            request.model,
            request.version if reference == "version" else None,
            request.alias if reference == "alias" else None,
        )
        return pb.ResolveModelResponse(
            version=conv.version_to_pb(resolved.version),
            alias=resolved.alias,
            artifact_uri=resolved.artifact_uri,
        )

    async def WatchModels(
        self,
        request: pb.WatchModelsRequest,
        context: Context,
    ) -> AsyncIterator[pb.WatchModelsResponse]:
        events = self._service.watch(
            _caller(context), request.cursor, list(request.models), request.from_beginning
        )
        async for event in events:
            yield conv.event_to_pb(event)
