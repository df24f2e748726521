"""The one place where registry protobuf messages and domain objects meet."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from scoremesh.registry.v1 import registry_pb2 as pb

from services.mesh.conversions import timestamp
from services.mesh.errors import InvalidArgument
from services.registry.domain import (
    Alias,
    AliasChange,
    EventType,
    Model,
    ModelCard,
    ModelEvent,
    ModelVersion,
    Signature,
    TensorSpec,
    Threshold,
    VerificationReport,
    VersionStatus,
    Visibility,
)
from services.registry.service import UploadRequest

_VISIBILITY_TO_PB = {Visibility.PRIVATE: pb.PRIVATE, Visibility.PUBLIC: pb.PUBLIC}
_VISIBILITY_FROM_PB = {value: key for key, value in _VISIBILITY_TO_PB.items()}
_STATUS_TO_PB = {VersionStatus.READY: pb.READY, VersionStatus.FAILED: pb.FAILED}
_EVENT_TO_PB = {
    EventType.VERSION_CREATED: pb.VERSION_CREATED,
    EventType.ALIAS_SET: pb.ALIAS_SET,
    EventType.ALIAS_DELETED: pb.ALIAS_DELETED,
}


def visibility_from_pb(value: int, field: str) -> Visibility | None:
    """None for UNSPECIFIED; INVALID_ARGUMENT for a number the enum does not have."""
    if value == pb.VISIBILITY_UNSPECIFIED:
        return None
    try:
        return _VISIBILITY_FROM_PB[value]
    except KeyError:
        raise InvalidArgument.for_field(field, f"unknown visibility {value}") from None


def model_to_pb(model: Model) -> pb.Model:
    return pb.Model(
        name=model.name,
        tenant=model.tenant,
        description=model.description,
        visibility=_VISIBILITY_TO_PB[model.visibility],
        create_time=timestamp(model.create_time),
        created_by=model.created_by,
        latest_version=model.latest_version,
    )


def _tensor_to_pb(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def signature_to_pb(signature: Signature) -> pb.Signature:
    return pb.Signature(
        inputs=[_tensor_to_pb(t) for t in signature.inputs],
        outputs=[_tensor_to_pb(t) for t in signature.outputs],
    )


def signature_from_pb(signature: pb.Signature) -> Signature:
    """The registry's signature as the scoring service reads it from ResolveModel."""
    return Signature(
        inputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in signature.inputs),
        outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in signature.outputs),
    )


def report_to_pb(report: VerificationReport) -> pb.VerificationReport:
    return pb.VerificationReport(
        passed=report.passed,
        checks=[pb.VerificationCheck(name=c.name, passed=c.passed, detail=c.detail) for c in report.checks],
        opset=report.opset,
    )


def version_to_pb(version: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        model=version.model,
        version=version.version,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        signature=signature_to_pb(version.signature),
        status=_STATUS_TO_PB[version.status],
        verification=report_to_pb(version.report),
        create_time=timestamp(version.create_time),
        created_by=version.created_by,
    )


def alias_to_pb(alias: Alias) -> pb.Alias:
    return pb.Alias(
        model=alias.model,
        alias=alias.alias,
        version=alias.version,
        update_time=timestamp(alias.update_time),
        updated_by=alias.updated_by,
    )


def alias_change_to_pb(change: AliasChange) -> pb.AliasChange:
    return pb.AliasChange(
        model=change.model,
        alias=change.alias,
        from_version=change.from_version,
        to_version=change.to_version,
        actor=change.actor,
        create_time=timestamp(change.create_time),
    )


def card_to_pb(card: ModelCard) -> pb.ModelCard:
    metrics = struct_pb2.Struct()
    metrics.update(dict(card.metrics))
    return pb.ModelCard(
        model=card.model,
        version=card.version,
        metrics=metrics,
        thresholds=[
            pb.Threshold(output=t.output, value=t.value, metrics=dict(t.metrics)) for t in card.thresholds
        ],
        description=card.description,
        update_time=timestamp(card.update_time),
    )


def card_from_pb(card: pb.ModelCard) -> ModelCard:
    metrics: dict[str, Any] = json_format.MessageToDict(card.metrics)
    return ModelCard(
        model=card.model,
        version=card.version,
        metrics=metrics,
        thresholds=tuple(Threshold(t.output, t.value, dict(t.metrics)) for t in card.thresholds),
        description=card.description,
        update_time=None,
    )


def event_to_pb(event: ModelEvent) -> pb.WatchModelsResponse:
    return pb.WatchModelsResponse(
        cursor=str(event.cursor),
        type=_EVENT_TO_PB[event.type],
        model=event.model,
        version=event.version,
        alias=event.alias,
        previous_version=event.previous_version,
        actor=event.actor,
        create_time=timestamp(event.create_time),
    )


def upload_request_from_pb(metadata: pb.UploadVersionMetadata) -> UploadRequest:
    return UploadRequest(
        model=metadata.model,
        sha256=metadata.sha256,
        size_bytes=metadata.size_bytes,
        alias=metadata.alias,
        description=metadata.description,
    )
