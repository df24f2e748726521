"""The one place where ``scoremesh.training.v1`` messages and the training domain meet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from google.protobuf import json_format, struct_pb2
from scoremesh.training.v1 import training_pb2 as pb

from services.mesh.conversions import timestamp
from services.mesh.errors import InvalidArgument
from services.training.datasets import Dataset
from services.training.jobs import Job, JobEvent, JobState, Registration
from services.training.plugins import PluginInfo

_STATES: Final = {state: pb.JobState.Value(state.value) for state in JobState}
_STATES_FROM_PB: Final = {value: state for state, value in _STATES.items()}


def state_from_pb(value: int) -> JobState | None:
    """None for UNSPECIFIED; INVALID_ARGUMENT for a number the enum does not have."""
    if value == pb.JOB_STATE_UNSPECIFIED:
        return None
    state = _STATES_FROM_PB.get(value)
    if state is None:
        raise InvalidArgument.for_field("state", f"{value} is not a job state")
    return state


def value_of(value: struct_pb2.Value) -> Any:
    """A protobuf Value as the plain JSON value it holds."""
    return json_format.MessageToDict(value)


def _struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(data))
    return struct


def _value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def registration_from_pb(message: pb.Registration) -> Registration:
    return Registration(message.model, message.alias, message.promote_if)


def job_to_pb(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id,
        tenant=job.tenant,
        created_by=job.created_by,
        plugin=job.plugin,
        arguments=_struct(job.arguments),
        dataset=job.dataset,
        base_model=job.base_model,
        registration=pb.Registration(
            model=job.registration.model, alias=job.registration.alias, promote_if=job.registration.promote_if
        ),
        state=_STATES[job.state],
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        progress=job.progress,
        progress_message=job.progress_message,
        metrics=dict(job.metrics),
        error=job.error,
        version=job.version or 0,
        promoted=job.promoted,
        create_time=timestamp(job.create_time),
        start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time),
        idempotency_key=job.idempotency_key,
        traceparent=job.traceparent,
        time_limit_s=job.time_limit_s,
    )


def event_to_pb(event: JobEvent) -> pb.JobEvent:
    message = pb.JobEvent(job_id=event.job_id, sequence=event.id, time=timestamp(event.time))
    data = event.data
    if event.kind == "state":
        message.state.CopyFrom(
            pb.StateChange(
                state=_STATES[JobState(data["state"])],
                detail=str(data.get("detail", "")),
                version=int(data.get("version") or 0),
            )
        )
    elif event.kind == "progress":
        message.progress.CopyFrom(
            pb.Progress(fraction=float(data["fraction"]), message=str(data.get("message", "")))
        )
    elif event.kind == "metric":
        message.metric.CopyFrom(
            pb.Metric(name=str(data["name"]), value=float(data["value"]), step=int(data.get("step") or 0))
        )
    else:
        message.log = str(data.get("message", ""))
    return message


def dataset_to_pb(dataset: Dataset) -> pb.Dataset:
    return pb.Dataset(
        name=dataset.name,
        tenant=dataset.tenant,
        format=dataset.format,
        sha256=dataset.sha256,
        size_bytes=dataset.size_bytes,
        rows=dataset.rows,
        columns=dataset.columns,
        source=dataset.source,
        created_by=dataset.created_by,
        create_time=timestamp(dataset.create_time),
    )


def plugin_to_pb(info: PluginInfo) -> pb.Plugin:
    return pb.Plugin(
        name=info.name,
        version=info.version,
        description=info.description,
        arguments=[
            pb.PluginArgument(
                name=spec.name,
                type=spec.type,
                required=spec.required,
                default_value=_value(spec.default) if spec.default is not None else None,
                description=spec.description,
                choices=list(spec.choices or ()),
            )
            for spec in info.arguments
        ],
        datasets=str(info.datasets),
        dataset_required=info.dataset_required,
        base_model_required=info.needs_base_model,
        output=str(info.output),
    )
