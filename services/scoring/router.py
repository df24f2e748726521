"""Which loaded version serves a request, kept current by the registry's change stream.

A *route* maps (tenant, model, reference) — the reference being ``@alias`` or ``:version`` —
to a loaded version. The first request for a route resolves it through the registry (as
the caller, so a private model of another tenant stays NOT_FOUND), downloads the artifact
and loads it; later requests are answered from memory. One WatchModels stream per tenant
with routes follows alias moves: the new version is loaded and warmed first and only then
swapped in, and the old one is unloaded once no route points at it and its in-flight
requests have drained, so no request fails during a rollout. Routes older than the TTL are
checked again in the background (a request never waits for that): it bounds how long a
visibility change or a missed event can go unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
from scoremesh.registry.v1 import registry_pb2 as reg

from services.mesh.errors import InvalidArgument, MeshError, Unavailable
from services.mesh.identity import Caller
from services.mesh.status import from_rpc_error
from services.registry.client import Reference, RegistryClient
from services.registry.converters import signature_from_pb
from services.registry.domain import ALIAS_PATTERN, DEFAULT_ALIAS, Signature
from services.scoring.backend import LoadedVersion

log = logging.getLogger(__name__)

RouteKey = tuple[str, str, str]
"""(tenant, model, reference) with the reference as ``@alias`` or ``:version``."""
VersionKey = tuple[str, int]
T = TypeVar("T")

REGISTRY_TIMEOUT_S = 30.0
WATCH_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class VersionLoader(Protocol):
    """Makes a version servable (load and warm) or frees it; the scoring service's backends."""

    async def load(self, version: LoadedVersion) -> None: ...

    async def unload(self, version: LoadedVersion) -> None: ...


MAX_VERSION = 2**63 - 1
"""Versions are PostgreSQL bigints."""


def parse_reference(model_version: str) -> Reference:
    """``model_version`` of an inference request: empty for the ``production`` alias, a
    number for that version, otherwise an alias."""
    text = model_version.strip()
    if not text:
        return Reference("", alias=DEFAULT_ALIAS)
    # ASCII digits only: str.isdigit() admits superscripts (which int() refuses) and other
    # scripts' digits (which int() reads)
    if text.isascii() and text.isdigit():
        number = int(text)
        if not 1 <= number <= MAX_VERSION:
            raise InvalidArgument.for_field("model_version", f"versions are numbered from 1 to {MAX_VERSION}")
        return Reference("", version=number)
    if not ALIAS_PATTERN.fullmatch(text):
        raise InvalidArgument.for_field("model_version", f"{text!r} is neither a version number nor an alias")
    return Reference("", alias=text)


def batch_size_for(signature: Signature, max_batch_size: int) -> int:
    """Rows per backend call for a graph: ``max_batch_size`` when every input's first
    dimension is variable (the batch axis), else 0 (the graph does not batch)."""
    if max_batch_size <= 0 or not signature.inputs:
        return 0
    batchable = all(spec.shape and spec.shape[0] == -1 for spec in signature.inputs + signature.outputs)
    return max_batch_size if batchable else 0


@dataclass
class _Slot:
    version: LoadedVersion
    routes: int = 0
    in_flight: int = 0


@dataclass
class _Route:
    slot: _Slot
    checked_at: float


@dataclass
class _TenantWatch:
    task: asyncio.Task[None]
    cursor: str = ""


@dataclass
class RouterStats:
    loads: int = 0
    unloads: int = 0
    rollouts: int = 0
    refresh_failures: int = 0
    watch_reconnects: int = 0
    events: int = 0


@dataclass
class ModelRouter:
    registry: Callable[[Caller], RegistryClient]
    """A registry client acting for a caller."""
    loader: VersionLoader
    max_batch_size: int
    ttl_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    stats: RouterStats = field(default_factory=RouterStats)
    _routes: dict[RouteKey, _Route] = field(default_factory=dict)
    _slots: dict[VersionKey, _Slot] = field(default_factory=dict)
    _resolving: dict[RouteKey, asyncio.Future[_Slot]] = field(default_factory=dict)
    _loading: dict[VersionKey, asyncio.Future[_Slot]] = field(default_factory=dict)
    _watches: dict[str, _TenantWatch] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _closed: bool = False

    @contextlib.asynccontextmanager
    async def lease(self, caller: Caller, model: str, model_version: str) -> AsyncIterator[LoadedVersion]:
        """The version that serves ``model``/``model_version`` for ``caller``, held loaded
        until the block exits."""
        reference = parse_reference(model_version)
        key: RouteKey = (caller.tenant, model, _reference_text(reference))
        route = self._routes.get(key)
        if route is None:
            slot = await self._resolve_once(caller, key, reference)
        else:
            slot = route.slot
            if self.clock() - route.checked_at > self.ttl_s and key not in self._resolving:
                route.checked_at = self.clock()
                self._spawn(self._refresh(caller, key, reference))
        slot.in_flight += 1
        try:
            yield slot.version
        finally:
            slot.in_flight -= 1
            if slot.in_flight == 0 and slot.routes == 0:
                self._spawn(self._unload(slot))

    def loaded(self) -> list[LoadedVersion]:
        return [slot.version for slot in self._slots.values()]

    def routed(self, tenant: str, model: str, model_version: str) -> LoadedVersion | None:
        """The version a route currently points at, without resolving (for ModelReady)."""
        reference = parse_reference(model_version)
        route = self._routes.get((tenant, model, _reference_text(reference)))
        return route.slot.version if route else None

    async def close(self) -> None:
        self._closed = True
        for watch in self._watches.values():
            watch.task.cancel()
        tasks = [w.task for w in self._watches.values()] + list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()

    # resolving and loading

    async def _resolve_once(self, caller: Caller, key: RouteKey, reference: Reference) -> _Slot:
        """Concurrent first requests for one route share one resolution, which runs as its
        own task so that a caller that goes away does not cancel it for the others."""
        task = self._resolving.get(key)
        if task is None:
            task = asyncio.ensure_future(self._resolve(caller, key, reference))
            self._resolving[key] = task
            task.add_done_callback(lambda _: self._resolving.pop(key, None))
        return await asyncio.shield(task)

    async def _resolve(self, caller: Caller, key: RouteKey, reference: Reference) -> _Slot:
        self._ensure_watch(caller)
        client = self.registry(caller)
        target = Reference(key[1], reference.version, reference.alias)
        resolved = await _call(client.resolve(target, timeout=REGISTRY_TIMEOUT_S))
        slot = await self._slot_for(client, resolved.version)
        self._point(key, slot)
        return slot

    async def _slot_for(self, client: RegistryClient, version: reg.ModelVersion) -> _Slot:
        vkey: VersionKey = (version.model, version.version)
        slot = self._slots.get(vkey)
        if slot is not None:
            return slot
        task = self._loading.get(vkey)
        if task is None:
            task = asyncio.ensure_future(self._load(client, version))
            self._loading[vkey] = task
            task.add_done_callback(lambda _: self._loading.pop(vkey, None))
        return await asyncio.shield(task)

    async def _load(self, client: RegistryClient, version: reg.ModelVersion) -> _Slot:
        onnx_bytes = await _call(client.download(version, timeout=REGISTRY_TIMEOUT_S))
        signature = signature_from_pb(version.signature)
        loaded = LoadedVersion(
            model=version.model,
            version=version.version,
            sha256=version.sha256,
            signature=signature,
            onnx_bytes=onnx_bytes,
            max_batch_size=batch_size_for(signature, self.max_batch_size),
        )
        await self.loader.load(loaded)
        slot = _Slot(loaded)
        self._slots[loaded.key] = slot
        self.stats.loads += 1
        log.info("loaded %s version %d", loaded.model, loaded.version)
        return slot

    def _point(self, key: RouteKey, slot: _Slot) -> None:
        """Switches a route to ``slot`` in one step, and lets the old version drain."""
        old = self._routes.get(key)
        slot.routes += 1
        self._routes[key] = _Route(slot, self.clock())
        if old is not None:
            old.slot.routes -= 1
            if old.slot is not slot:
                self.stats.rollouts += 1
                log.info(
                    "%s %s now serves version %d (was %d)",
                    key[1],
                    key[2],
                    slot.version.version,
                    old.slot.version.version,
                )
            if old.slot.routes == 0 and old.slot.in_flight == 0:
                self._spawn(self._unload(old.slot))

    def _drop(self, key: RouteKey) -> None:
        old = self._routes.pop(key, None)
        if old is not None:
            old.slot.routes -= 1
            if old.slot.routes == 0 and old.slot.in_flight == 0:
                self._spawn(self._unload(old.slot))

    async def _refresh(self, caller: Caller, key: RouteKey, reference: Reference) -> None:
        """Resolves a route again; the current version keeps serving until the new one is
        loaded and warm. A route that no longer resolves (alias deleted, model made private)
        is dropped; a failure to load the new version leaves the old one in place."""
        if key in self._resolving:
            return
        try:
            await self._resolve_once(caller, key, reference)
        except MeshError as error:
            if error.code_name in ("NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED"):
                log.info("route %s/%s %s dropped: %s", key[0], key[1], key[2], error.message)
                self._drop(key)
            else:
                self.stats.refresh_failures += 1
                log.warning("route %s/%s %s not refreshed: %s", key[0], key[1], key[2], error.message)
        except Exception:
            self.stats.refresh_failures += 1
            log.exception("route %s/%s %s not refreshed", key[0], key[1], key[2])

    async def _unload(self, slot: _Slot) -> None:
        vkey = slot.version.key
        if self._slots.get(vkey) is not slot or slot.routes or slot.in_flight:
            return
        del self._slots[vkey]
        self.stats.unloads += 1
        try:
            await self.loader.unload(slot.version)
            log.info("unloaded %s version %d", vkey[0], vkey[1])
        except Exception:
            log.exception("unloading %s version %d failed", vkey[0], vkey[1])

    # following the registry

    def _ensure_watch(self, caller: Caller) -> None:
        if caller.tenant not in self._watches and not self._closed:
            # in a context of its own: the request that happens to open the stream would
            # otherwise hold it, and the registry's queries under it, in its trace for good
            follow = self._follow(caller)
            watch = _TenantWatch(
                task=asyncio.get_running_loop().create_task(follow, context=contextvars.Context())
            )
            self._watches[caller.tenant] = watch

    async def _follow(self, caller: Caller) -> None:
        """Follows one tenant's view of the registry for as long as the router lives,
        reconnecting with its cursor so that no event is missed."""
        watch_caller = Caller(tenant=caller.tenant, principal="scoring")
        failures = 0
        while True:
            watch = self._watches[caller.tenant]
            try:
                async for event in self.registry(watch_caller).watch(cursor=watch.cursor):
                    failures = 0
                    watch.cursor = event.cursor
                    self.stats.events += 1
                    self._on_event(watch_caller, event)
            except grpc.aio.AioRpcError as error:
                log.warning("registry watch for tenant %s ended: %s", caller.tenant, error.code().name)
            except Exception:
                # following must outlive any one surprise, or aliases would silently go stale
                log.exception("registry watch for tenant %s failed", caller.tenant)
            failures += 1
            self.stats.watch_reconnects += 1
            # the stream ended or failed: anything may have moved while it was down
            self._refresh_tenant(watch_caller)
            await asyncio.sleep(WATCH_RETRY_S[min(failures, len(WATCH_RETRY_S)) - 1])

    def _on_event(self, caller: Caller, event: reg.WatchModelsResponse) -> None:
        if event.type not in (reg.ALIAS_SET, reg.ALIAS_DELETED):
            return
        key: RouteKey = (caller.tenant, event.model, "@" + event.alias)
        if key in self._routes:
            self._spawn(self._refresh(caller, key, Reference(event.model, alias=event.alias)))

    def _refresh_tenant(self, caller: Caller) -> None:
        for key in [k for k in self._routes if k[0] == caller.tenant and k[2].startswith("@")]:
            self._spawn(self._refresh(caller, key, Reference(key[1], alias=key[2][1:])))

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        if self._closed:
            if asyncio.iscoroutine(coroutine):
                coroutine.close()
            return
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _reference_text(reference: Reference) -> str:
    return f":{reference.version}" if reference.version is not None else f"@{reference.alias}"


async def _call(call: Awaitable[T]) -> T:
    """A registry call with its failure as a domain error: the registry's own (NOT_FOUND for
    an unknown or invisible model, FAILED_PRECONDITION for a version that failed
    verification) pass through; anything else means the registry cannot answer now."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        domain = from_rpc_error(error)
        if domain.code_name in ("NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "PERMISSION_DENIED"):
            raise domain from None
        raise Unavailable(
            f"the registry cannot resolve models now: {error.details()}", reason="REGISTRY_UNAVAILABLE"
        ) from None
