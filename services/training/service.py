"""The training service's logic: checking submissions against the plugins' declarations,
watching jobs, and building datasets from feedback. The servicer converts protobuf around it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc.aio

from services.mesh.errors import FieldViolation, InvalidArgument, NotFound, Unavailable, raise_for_violations
from services.mesh.identity import Caller
from services.mesh.notify import EventListener
from services.registry.client import Reference
from services.registry.domain import check_model_name
from services.training import feedback
from services.training.conditions import Condition
from services.training.datasets import Dataset, DatasetStore
from services.training.jobs import Job, JobEvent, JobState, JobStore, NewJob, Registration
from services.training.plugins import PluginInfo, validate_arguments

WATCH_RECHECK_S: Final = 30.0
MAX_ATTEMPTS_CAP: Final = 100
MAX_IDEMPOTENCY_KEY_CHARS: Final = 128


@dataclass(frozen=True, slots=True)
class Submission:
    """A SubmitJob request as plain values (``arguments`` as JSON values)."""

    plugin: str
    arguments: Mapping[str, Any]
    registration: Registration
    dataset: str = ""
    base_model: str = ""
    idempotency_key: str = ""
    max_attempts: int = 0
    time_limit_s: int = 0
    traceparent: str = ""


class TrainingService:
    def __init__(
        self,
        jobs: JobStore,
        datasets: DatasetStore,
        plugins: Mapping[str, PluginInfo],
        events: EventListener,
        scoring: grpc.aio.Channel | None,
        *,
        max_attempts: int,
        time_limit_s: int,
        call_timeout_s: float,
    ) -> None:
        self.jobs = jobs
        self.datasets = datasets
        self._plugins = dict(plugins)
        self._events = events
        self._scoring = scoring
        self._max_attempts = max_attempts
        self._time_limit_s = time_limit_s
        self._call_timeout_s = call_timeout_s

    def plugins(self) -> list[PluginInfo]:
        return [self._plugins[name] for name in sorted(self._plugins)]

    def plugin(self, name: str) -> PluginInfo:
        info = self._plugins.get(name)
        if info is None:
            known = ", ".join(sorted(self._plugins)) or "none"
            raise NotFound(
                f"no plugin {name!r} (known: {known})",
                reason="PLUGIN_NOT_FOUND",
                metadata={"plugin": name[:128]},
            )
        return info

    async def submit(self, caller: Caller, submission: Submission) -> tuple[Job, bool]:
        """Queues a job once every part of ``submission`` checks out; INVALID_ARGUMENT lists
        every violation at once, NOT_FOUND names an unknown plugin."""
        info = self.plugin(submission.plugin)
        violations: list[FieldViolation] = []
        arguments: dict[str, Any] = {}
        try:
            arguments = validate_arguments(info, submission.arguments)
        except InvalidArgument as error:
            violations += error.violations
        violations += await self._check_dataset(caller, info, submission.dataset)
        model = submission.registration.model
        if submission.base_model:
            try:
                base = Reference.parse(submission.base_model)
                model = model or base.model
            except InvalidArgument:
                violations.append(
                    FieldViolation("base_model", "must read MODEL, MODEL:VERSION or MODEL@ALIAS")
                )
        elif info.needs_base_model:
            violations.append(FieldViolation("base_model", f"plugin {info.name} starts from a model version"))
        violations += _check_registration(submission.registration, model)
        max_attempts = submission.max_attempts or self._max_attempts
        if not 1 <= max_attempts <= MAX_ATTEMPTS_CAP:
            violations.append(
                FieldViolation("max_attempts", f"must be 0 (the default) or 1 to {MAX_ATTEMPTS_CAP}")
            )
        time_limit_s = submission.time_limit_s or self._time_limit_s
        if not 1 <= time_limit_s <= self._time_limit_s:
            violations.append(
                FieldViolation("time_limit_s", f"must be 0 (the limit) or 1 to {self._time_limit_s} seconds")
            )
        if (
            len(submission.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS
            or "\x00" in submission.idempotency_key
        ):
            violations.append(
                FieldViolation("idempotency_key", f"must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters")
            )
        raise_for_violations(violations)
        new = NewJob(
            plugin=info.name,
            plugin_version=info.version,
            arguments=arguments,
            registration=Registration(
                model, submission.registration.alias, submission.registration.promote_if
            ),
            max_attempts=max_attempts,
            time_limit_s=time_limit_s,
            dataset=submission.dataset,
            base_model=submission.base_model,
            idempotency_key=submission.idempotency_key,
            traceparent=submission.traceparent,
        )
        return await self.jobs.submit(caller, new)

    async def _check_dataset(self, caller: Caller, info: PluginInfo, name: str) -> list[FieldViolation]:
        if not name:
            if info.dataset_required:
                needs = f"plugin {info.name} needs a dataset: {info.datasets}"
                return [FieldViolation("dataset", needs)]
            return []
        try:
            await self.datasets.get(caller, name)
        except NotFound:
            return [FieldViolation("dataset", f"there is no dataset {name!r}")]
        return []

    async def watch(self, caller: Caller, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        """The job's events after ``after``, as they happen, until it has finished."""
        job = await self.jobs.get(caller, job_id)
        cursor = after
        while True:
            announced = self._events.latest
            events = await self.jobs.events_after(job.id, cursor)
            for event in events:
                cursor = event.id
                yield event
            if events:
                continue
            job = await self.jobs.get(caller, job_id)
            if job.state.finished:
                return
            await self._events.wait_beyond(announced, WATCH_RECHECK_S)

    async def feedback_dataset(self, caller: Caller, name: str, model: str, version: int) -> Dataset:
        """Dataset ``name`` from the feedback on ``model``'s logged predictions."""
        if self._scoring is None:
            raise Unavailable("the training service has no scoring service to read feedback from")
        violations = _check_name(model, "model")
        if version < 0:
            violations.append(FieldViolation("version", "must not be negative"))
        raise_for_violations(violations)
        rows = feedback.FeedbackRows()
        async for prediction in feedback.labelled_predictions(
            self._scoring, caller, model, version, timeout_s=self._call_timeout_s
        ):
            rows.add(prediction)
            if rows.rows > feedback.MAX_ROWS:
                break
        feedback.require_rows(rows, model)
        data = await asyncio.to_thread(rows.npz)

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        dataset, _ = await self.datasets.upload(caller, name, "npz", chunks(), source=f"feedback:{model}")
        return dataset


def _check_name(name: str, field: str) -> list[FieldViolation]:
    try:
        check_model_name(name, field)
    except InvalidArgument as error:
        return list(error.violations)
    return []


def _check_registration(registration: Registration, model: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not model:
        violations.append(
            FieldViolation("registration.model", "is required (the model the new version joins)")
        )
    else:
        violations += _check_name(model, "registration.model")
    if registration.promote_if:
        try:
            Condition.parse(registration.promote_if)
        except InvalidArgument as error:
            violations += error.violations
        if not registration.alias:
            violations.append(FieldViolation("registration.alias", "is required with promote_if"))
    return violations


__all__ = ["JobState", "Submission", "TrainingService"]
