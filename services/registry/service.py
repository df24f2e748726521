"""The registry's use cases: who may see and change what, uploads, verification, resolution.

Plain Python on domain objects: no protobuf, no asyncpg. The servicer converts requests into
calls here; the store and the artifact store are passed in.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from services.mesh import paging
from services.mesh.artifacts import ArtifactStore
from services.mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from services.mesh.identity import Caller
from services.mesh.notify import EventListener
from services.registry.domain import (
    DEFAULT_ALIAS,
    SHA256_PATTERN,
    Alias,
    AliasChange,
    Model,
    ModelCard,
    ModelEvent,
    ModelVersion,
    Page,
    Resolved,
    VersionStatus,
    Visibility,
    check_alias_name,
    check_model_name,
)
from services.registry.store import RegistryStore
from services.registry.verification import VerificationLimits, VerificationResult, verify_onnx

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# how often an idle watcher re-reads the events table, in case a notification was lost
WATCH_RECHECK_S = 5.0
WATCH_BATCH = 500


@dataclass(frozen=True, slots=True)
class UploadRequest:
    """An upload's metadata, as the first message of UploadVersion carries it."""

    model: str
    sha256: str = ""
    size_bytes: int = 0
    alias: str = ""
    description: str = ""


@dataclass(frozen=True, slots=True)
class UploadResult:
    version: ModelVersion
    created: bool


def _page(items: Sequence[T], limit: int, key: Callable[[T], str]) -> Page[T]:
    """A page of ``limit`` items from a query that asked for ``limit + 1``: the extra one
    only tells that there is a next page, which starts after the last item kept."""
    kept = tuple(items[:limit])
    return Page(kept, _encode_token(key(kept[-1])) if len(items) > limit else "")


def _encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        key = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise InvalidArgument.for_field("page_token", "is not a token this service issued") from error
    if not key:
        raise InvalidArgument.for_field("page_token", "is not a token this service issued")
    return key


def _decode_int_token(token: str) -> int | None:
    if not token:
        return None
    try:
        return int(_decode_token(token))
    except ValueError as error:
        raise InvalidArgument.for_field("page_token", "is not a token this service issued") from error


def _check_version_number(version: int, field: str = "version") -> int:
    if version <= 0:
        raise InvalidArgument.for_field(field, "must be a positive version number")
    return version


def _check_expected(expected: int | None) -> int | None:
    if expected is not None and expected < 0:
        raise InvalidArgument.for_field("expected_version", "must be 0 (absent) or a version number")
    return expected


class RegistryService:
    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        events: EventListener,
        *,
        max_upload_bytes: int,
        limits: VerificationLimits,
        executor: Executor | None = None,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._events = events
        self._max_upload_bytes = max_upload_bytes
        self._limits = limits
        self._executor = executor
        # concurrent pushes of the same bytes share one verification
        self._verifying: dict[tuple[str, str], asyncio.Future[VerificationResult]] = {}

    # models

    async def _visible_model(self, caller: Caller, name: str, field: str = "model") -> Model:
        check_model_name(name, field)
        model = await self._store.get_model(name)
        if model is None or not model.visible_to(caller):
            # another tenant's private model is indistinguishable from a missing one
            raise NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND", metadata={"model": name})
        return model

    async def _owned_model(self, caller: Caller, name: str, field: str = "model") -> Model:
        model = await self._visible_model(caller, name, field)
        _require_owner(caller, model)
        return model

    async def create_model(
        self, caller: Caller, name: str, description: str, visibility: Visibility
    ) -> Model:
        check_model_name(name, "model.name")
        return await self._store.create_model(name, caller.tenant, description, visibility, caller.principal)

    async def get_model(self, caller: Caller, name: str) -> Model:
        return await self._visible_model(caller, name, "name")

    async def list_models(self, caller: Caller, page_size: int, page_token: str) -> Page[Model]:
        limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else ""
        models = await self._store.list_models(caller.tenant, after, limit + 1)
        return _page(models, limit, lambda model: model.name)

    async def update_model(
        self, caller: Caller, name: str, description: str | None, visibility: Visibility | None
    ) -> Model:
        await self._owned_model(caller, name, "model.name")
        return await self._store.update_model(name, description, visibility)

    # versions

    async def upload_version(
        self, caller: Caller, request: UploadRequest, chunks: AsyncIterator[bytes]
    ) -> UploadResult:
        """Streams an artifact in, verifies it and records it as the model's next version.

        Nothing becomes visible unless every step succeeds: the bytes sit in a private
        temporary file until the row that names them is about to be written."""
        self._check_upload(request)
        existing_model = await self._store.get_model(request.model)
        if existing_model is not None:
            if not existing_model.visible_to(caller):
                raise NotFound(f"model {request.model!r} not found", reason="MODEL_NOT_FOUND")
            _require_owner(caller, existing_model)
        async with self._artifacts.upload() as upload:
            async for chunk in chunks:
                if upload.size + len(chunk) > self._max_upload_bytes:
                    raise ResourceExhausted(
                        f"upload exceeds the limit of {self._max_upload_bytes} bytes",
                        reason="UPLOAD_TOO_LARGE",
                        metadata={"limit_bytes": str(self._max_upload_bytes)},
                    )
                await upload.write(chunk)
            if upload.size == 0:
                raise InvalidArgument.for_field("chunk", "the upload holds no bytes", reason="EMPTY_UPLOAD")
            if request.size_bytes and upload.size != request.size_bytes:
                raise InvalidArgument.for_field(
                    "metadata.size_bytes",
                    f"declared {request.size_bytes} bytes but {upload.size} arrived",
                    reason="SIZE_MISMATCH",
                )
            digest = upload.sha256()
            if request.sha256 and digest != request.sha256:
                raise InvalidArgument.for_field(
                    "metadata.sha256",
                    f"declared {request.sha256} but the bytes hash to {digest}",
                    reason="SHA256_MISMATCH",
                )
            existing = await self._store.find_version_by_sha256(request.model, digest)
            if existing is not None:
                return UploadResult(existing, created=False)
            await upload.flush()
            result = await self._verify_once(request.model, digest, upload.path)
            await upload.commit()
        version, created = await self._store.create_version(
            model=request.model,
            tenant=caller.tenant,
            description=request.description,
            actor=caller.principal,
            sha256=digest,
            size_bytes=upload.size,
            signature=result.signature,
            status=VersionStatus.READY if result.report.passed else VersionStatus.FAILED,
            report=result.report,
            check_owner=lambda model: _require_owner(caller, model),
        )
        log.info(
            "model %s version %s %s (%s, %s bytes)",
            version.model,
            version.version,
            "created" if created else "already existed",
            version.status.value,
            version.size_bytes,
        )
        if created and request.alias and version.status is VersionStatus.READY:
            await self._store.set_alias(version.model, request.alias, version.version, None, caller.principal)
        return UploadResult(version, created)

    def _check_upload(self, request: UploadRequest) -> None:
        """Every problem of the metadata at once; a single one keeps its own reason."""
        errors: list[InvalidArgument] = []
        try:
            check_model_name(request.model, "metadata.model")
        except InvalidArgument as error:
            errors.append(error)
        if request.alias:
            try:
                check_alias_name(request.alias, "metadata.alias")
            except InvalidArgument as error:
                errors.append(error)
        if request.sha256 and not SHA256_PATTERN.fullmatch(request.sha256):
            errors.append(InvalidArgument.for_field("metadata.sha256", "must be 64 lowercase hex characters"))
        if request.size_bytes < 0:
            errors.append(InvalidArgument.for_field("metadata.size_bytes", "must not be negative"))
        if len(errors) == 1:
            raise errors[0]
        if errors:
            violations = [violation for error in errors for violation in error.violations]
            raise InvalidArgument(
                "invalid upload metadata: " + "; ".join(f"{v.field}: {v.description}" for v in violations),
                violations=violations,
            )
        if request.size_bytes > self._max_upload_bytes:
            raise ResourceExhausted(
                f"declared size {request.size_bytes} exceeds the limit of {self._max_upload_bytes} bytes",
                reason="UPLOAD_TOO_LARGE",
                metadata={"limit_bytes": str(self._max_upload_bytes)},
            )

    async def _verify_once(self, model: str, digest: str, path: Path) -> VerificationResult:
        key = (model, digest)
        pending = self._verifying.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, verify_onnx, path, self._limits)
        self._verifying[key] = future
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._verifying.pop(key, None)
            else:
                future.add_done_callback(lambda _: self._verifying.pop(key, None))

    async def get_version(self, caller: Caller, model: str, version: int) -> ModelVersion:
        await self._visible_model(caller, model)
        _check_version_number(version)
        found = await self._store.get_version(model, version)
        if found is None:
            raise NotFound(f"model {model!r} has no version {version}", reason="VERSION_NOT_FOUND")
        return found

    async def list_versions(
        self, caller: Caller, model: str, page_size: int, page_token: str
    ) -> Page[ModelVersion]:
        await self._visible_model(caller, model)
        limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        versions = await self._store.list_versions(model, _decode_int_token(page_token), limit + 1)
        return _page(versions, limit, lambda version: str(version.version))

    async def download_version(
        self, caller: Caller, model: str, version: int
    ) -> tuple[ModelVersion, AsyncIterator[bytes]]:
        found = await self.get_version(caller, model, version)
        return found, self._artifacts.read(found.sha256)

    async def resolve(self, caller: Caller, model: str, version: int | None, alias: str | None) -> Resolved:
        """A version number, an alias, or (neither) the ``production`` alias, to a servable
        version. One round trip to the database: scoring calls this on every cache miss."""
        check_model_name(model)
        resolved_alias = "" if version is not None else check_alias_name(alias or DEFAULT_ALIAS)
        if version is not None:
            _check_version_number(version)
        owner, found = await self._store.resolve(model, version, resolved_alias)
        if owner is None or not owner.visible_to(caller):
            raise NotFound(f"model {model!r} not found", reason="MODEL_NOT_FOUND", metadata={"model": model})
        if found is None and version is None:
            raise NotFound(
                f"model {model!r} has no alias {resolved_alias!r}",
                reason="ALIAS_NOT_FOUND",
                metadata={"model": model, "alias": resolved_alias},
            )
        if found is None:
            raise NotFound(f"model {model!r} has no version {version}", reason="VERSION_NOT_FOUND")
        if found.status is not VersionStatus.READY:
            raise _not_servable(found)
        return Resolved(found, resolved_alias, self._artifacts.uri(found.sha256))

    # aliases

    async def set_alias(
        self, caller: Caller, model: str, alias: str, version: int, expected_version: int | None
    ) -> Alias:
        await self._owned_model(caller, model)
        check_alias_name(alias)
        _check_version_number(version)
        return await self._store.set_alias(
            model, alias, version, _check_expected(expected_version), caller.principal
        )

    async def delete_alias(
        self, caller: Caller, model: str, alias: str, expected_version: int | None
    ) -> None:
        await self._owned_model(caller, model)
        check_alias_name(alias)
        await self._store.delete_alias(model, alias, _check_expected(expected_version), caller.principal)

    async def list_aliases(self, caller: Caller, model: str) -> list[Alias]:
        await self._visible_model(caller, model)
        return await self._store.list_aliases(model)

    async def list_alias_changes(
        self, caller: Caller, model: str, alias: str, page_size: int, page_token: str
    ) -> Page[AliasChange]:
        await self._visible_model(caller, model)
        if alias:
            check_alias_name(alias)
        limit = paging.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        rows = await self._store.list_alias_changes(model, alias, _decode_int_token(page_token), limit + 1)
        page = _page(rows, limit, lambda row: str(row[0]))
        return Page(tuple(change for _, change in page.items), page.next_page_token)

    # model cards

    async def get_card(self, caller: Caller, model: str, version: int) -> ModelCard:
        await self.get_version(caller, model, version)
        card = await self._store.get_card(model, version)
        return card or ModelCard(model, version, {}, (), "", None)

    async def update_card(self, caller: Caller, card: ModelCard) -> ModelCard:
        await self._owned_model(caller, card.model, "card.model")
        _check_version_number(card.version, "card.version")
        return await self._store.put_card(card, caller.principal)

    # events

    async def watch(
        self, caller: Caller, cursor: str, models: list[str], from_beginning: bool
    ) -> AsyncIterator[ModelEvent]:
        """Events after ``cursor`` (or from now), then live ones, forever. Events of models
        the caller cannot see are skipped."""
        for index, name in enumerate(models):
            check_model_name(name, f"models[{index}]")
        if from_beginning:
            position = 0
        elif cursor:
            try:
                position = int(cursor)
            except ValueError:
                position = -1
            if position < 0:
                raise InvalidArgument.for_field("cursor", "is not a cursor this service issued")
        else:
            position = await self._store.head_cursor()
        visible: dict[str, bool] = {}
        while True:
            events = await self._store.events_after(position, models, WATCH_BATCH)
            for event in events:
                position = event.cursor
                if event.model not in visible:
                    model = await self._store.get_model(event.model)
                    visible[event.model] = model is not None and model.visible_to(caller)
                if visible[event.model]:
                    yield event
            if len(events) < WATCH_BATCH:
                await self._events.wait_beyond(position, WATCH_RECHECK_S)


def _require_owner(caller: Caller, model: Model) -> None:
    if model.tenant != caller.tenant:
        if not model.visible_to(caller):
            raise NotFound(f"model {model.name!r} not found", reason="MODEL_NOT_FOUND")
        raise PermissionDenied(
            f"model {model.name!r} belongs to another tenant; only its owner may change it",
            reason="NOT_MODEL_OWNER",
        )


def _not_servable(version: ModelVersion) -> FailedPrecondition:
    reasons = "; ".join(f"{c.name}: {c.detail}" for c in version.report.failures) or "verification failed"
    return FailedPrecondition(
        f"version {version.version} of {version.model!r} failed verification ({reasons})",
        reason="VERSION_NOT_READY",
    )
