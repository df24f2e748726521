"""Builds and runs a mesh service's gRPC server: one interceptor, equal message limits,
bounded concurrency, ``grpc.health.v1`` per service, reflection, mutual TLS when the settings
carry it, and graceful shutdown.

``MeshServer`` is what tests start on ``127.0.0.1:0``; :func:`serve` is the production run
loop around it, and stops in the fixed order SIGTERM → health NOT_SERVING → ``stop(grace)``
(in-flight calls finish, new ones are refused) → the service's cleanups → telemetry flush.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from services.mesh.channels import KEEPALIVE_TIME_MS
from services.mesh.interceptors import MeshServerInterceptor
from services.mesh.metrics import MetricsServer, serve_metrics
from services.mesh.settings import MeshSettings, TlsSettings
from services.mesh.tls import add_port

__all__ = [
    "HEALTH_SERVICE",
    "REFLECTION_SERVICE",
    "MeshServer",
    "Registration",
    "address_file",
    "announce",
    "health_only_server",
    "serve",
]

log = logging.getLogger(__name__)

HEALTH_SERVICE: Final = "grpc.health.v1.Health"
REFLECTION_SERVICE: Final[str] = reflection.SERVICE_NAME

_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Registration:
    """One gRPC service a server exposes: its full name (``scoremesh.registry.v1.ModelRegistry``,
    used for health and reflection), the generated ``add_*Servicer_to_server`` function and
    the servicer it registers."""

    service_name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object


def address_file(home: Path, name: str) -> Path:
    """Where the service ``name`` announces the ``host:port`` it bound
    (``$SCOREMESH_HOME/run/<name>.addr``), so that it may listen on port 0."""
    return home / "run" / f"{name}.addr"


def health_only_server(name: str, settings: MeshSettings, host: str) -> MeshServer | None:
    """For a process with no gRPC service of its own (the training worker): a server that
    answers ``grpc.health.v1`` (and reflection) in plaintext on ``settings.health_port``, as
    the services' health ports do, so that probes reach it; None without a health port."""
    if settings.health_port is None:
        return None
    plain = dataclasses.replace(settings, tls=None, health_port=None)
    return MeshServer(name, [], plain, host=host, port=settings.health_port)


def local_host(host: str) -> str:
    """The host a client on this machine dials for a server bound to ``host``."""
    return _WILDCARD_HOSTS.get(host, host)


_WILDCARD_HOSTS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class MeshServer:
    """A grpc.aio server for ``registrations``, configured from ``settings``.

    ``start()`` binds ``host:port`` (port 0: the OS picks) and returns the bound port;
    ``stop()`` flips every health status to NOT_SERVING, then lets in-flight calls finish
    for the grace period while refusing new ones. ``tracer_provider`` defaults to the
    global one (tests pass their own).
    """

    def __init__(
        self,
        name: str,
        registrations: Sequence[Registration],
        settings: MeshSettings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._registrations = tuple(registrations)
        self._host = host
        self._port = port
        self._tracer_provider = tracer_provider
        self._health = HealthServicer()
        # "" is the whole server; a service may be set NOT_SERVING before start() to stay
        # out of rotation until it is warm
        self._serving: dict[str, bool] = {"": True, **{r.service_name: True for r in self._registrations}}
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._bound_port: int | None = None
        self._health_port: int | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def host(self) -> str:
        return self._host

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port; only after start()."""
        if self._bound_port is None:
            raise RuntimeError(f"{self.name} has not started")
        return self._bound_port

    @property
    def health_port(self) -> int | None:
        """The bound port of the plaintext health-only server (``settings.health_port``), or
        None without one; only after start()."""
        return self._health_port

    @property
    def address(self) -> str:
        """``host:port`` as bound (``[::1]:port`` for IPv6); only after start()."""
        return _format_address(self._host, self.port)

    @property
    def local_address(self) -> str:
        """Where a client on this host reaches the server: :attr:`address`, with a wildcard
        host (``0.0.0.0``, ``::``) replaced by loopback, a name that TLS certificates carry
        (``scoremesh certs create`` puts 127.0.0.1 in every one)."""
        return _format_address(local_host(self._host), self.port)

    def _options(self) -> list[tuple[str, Any]]:
        limit = self.settings.max_message_bytes
        return [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # two servers must never share a port silently (gRPC sets SO_REUSEPORT by default)
            ("grpc.so_reuseport", 0),
            # mesh channels ping every 30 s, idle or not; without these the server answers a
            # few such pings with GOAWAY "too_many_pings" and drops the connection
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ]

    async def start(self) -> int:
        """Builds the server, registers every service plus health and reflection, binds and
        starts it; returns the bound port."""
        if self._server is not None:
            raise RuntimeError(f"{self.name} already started")
        server = grpc.aio.server(
            interceptors=[
                MeshServerInterceptor(
                    tracer_provider=self._tracer_provider, internal_token=self.settings.internal_token
                )
            ],
            options=self._options(),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        for registration in self._registrations:
            registration.add_to_server(registration.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for service, serving in self._serving.items():
            await self._health.set(service, _SERVING if serving else _NOT_SERVING)
        reflection.enable_server_reflection(
            [*(r.service_name for r in self._registrations), HEALTH_SERVICE, REFLECTION_SERVICE], server
        )
        port = self._bind(server, self._port, self.settings.tls)
        await server.start()
        if self.settings.health_port is not None:
            try:
                await self._start_health_server(self.settings.health_port)
            except BaseException:
                await server.stop(0)
                raise
        self._server = server
        self._bound_port = port
        self._started.set()
        log.info("%s listening on %s", self.name, self.address)
        return port

    def _bind(self, server: grpc.aio.Server, port: int, tls: TlsSettings | None) -> int:
        bind = _format_address(self._host, port)
        try:
            bound = add_port(server, bind, tls)
        except RuntimeError as error:
            raise OSError(f"{self.name} cannot listen on {bind}: {error}") from error
        if bound == 0:  # older grpcio reported a failed bind this way
            raise OSError(f"{self.name} cannot listen on {bind}")
        return bound

    async def _start_health_server(self, port: int) -> None:
        # Probes such as kubelet's cannot present a client certificate: this port answers
        # grpc.health.v1 alone, in plaintext, from the same servicer (so it turns NOT_SERVING
        # with the server), and serves nothing else.
        server = grpc.aio.server(
            options=self._options(), maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self._health_port = self._bind(server, port, None)
        await server.start()
        self._health_server = server
        log.info("%s answers health checks in plaintext on port %s", self.name, self._health_port)

    async def wait_started(self) -> str:
        """Waits until start() has bound and started the server (for whoever runs it under
        :func:`serve`, such as tests); returns its address."""
        await self._started.wait()
        return self.address

    async def set_serving(self, service_name: str, serving: bool) -> None:
        """Sets a service's health status (``""`` is the whole server). Ignored once stop()
        began: a stopping server stays NOT_SERVING."""
        self._serving[service_name] = serving
        if self._server is not None:
            await self._health.set(service_name, _SERVING if serving else _NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING for every service, then ``server.stop(grace)``: calls in flight
        get ``grace`` seconds (default ``settings.shutdown_grace_s``; 0 cancels them now),
        new calls are refused at once. Safe to call more than once, and finishes even if the
        caller is cancelled."""
        if self._server is None:
            return
        if self._stopping is None:
            seconds = self.settings.shutdown_grace_s if grace is None else grace
            self._stopping = asyncio.create_task(self._stop(self._server, seconds), name=f"stop-{self.name}")
        await asyncio.shield(self._stopping)

    async def _stop(self, server: grpc.aio.Server, grace: float) -> None:
        log.info("%s stopping (grace %.1f s)", self.name, grace)
        await self._health.enter_graceful_shutdown()
        await server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        log.info("%s stopped", self.name)


async def serve(
    server: MeshServer,
    *,
    cleanup: Sequence[Callable[[], Awaitable[None]]] = (),
    stop_event: asyncio.Event | None = None,
) -> None:
    """Runs ``server`` (starting it unless it was started already) until SIGTERM or SIGINT
    (or until ``stop_event`` is set, or this task is cancelled), then shuts down in order:
    health NOT_SERVING and ``stop`` with ``settings.shutdown_grace_s``, each of ``cleanup`` in
    order, a flush of the telemetry SDK if one is installed. Every shutdown step runs to its
    end even if this task is cancelled meanwhile, and a failing step is logged without
    skipping the next ones.

    While serving, the bound address is announced in :func:`address_file`, and Prometheus's
    ``/metrics`` is served on ``settings.metrics_port`` (announced as ``<name>-metrics``).
    """
    stop = stop_event if stop_event is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    restore_signals = _install_signal_handlers(loop, stop)
    announced: list[Path] = []
    exporter: MetricsServer | None = None
    try:
        if not server.started:
            await server.start()
        exporter = serve_metrics(server.host, server.settings.metrics_port)
        home = server.settings.home
        announced.append(announce(address_file(home, f"{server.name}-metrics"), exporter.address))
        announced.append(announce(address_file(home, server.name), server.address))
        await stop.wait()
    finally:
        cancelled = False
        try:
            for path in announced:
                path.unlink(missing_ok=True)
            if exporter is not None:
                exporter.close()
            cancelled |= await _run_to_end(f"stopping {server.name}", server.stop())
            for step in cleanup:
                cancelled |= await _run_to_end(f"cleanup {getattr(step, '__qualname__', step)!s}", step())
            cancelled |= await _run_to_end("flushing telemetry", _flush_telemetry())
        finally:
            restore_signals()
        if cancelled:
            raise asyncio.CancelledError


def announce(path: Path, address: str) -> Path:
    """Writes ``address`` to ``path`` atomically (see :func:`address_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside and renamed, so that a reader never sees half an address
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(address + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


async def _run_to_end(what: str, step: Awaitable[None]) -> bool:
    """Awaits ``step`` to its end even through cancellation; logs its failure. Returns
    whether the caller was cancelled meanwhile (it must re-raise that once it is done)."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                cancelled = True
                continue
            log.error("%s was cancelled", what)
        except Exception:
            log.exception("%s failed", what)
        return cancelled


async def _flush_telemetry() -> None:
    # the SDK's TracerProvider has force_flush; the API's default one has nothing to flush
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if callable(flush):
        await asyncio.to_thread(flush)


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Callable[[], None]:
    installed: list[tuple[signal.Signals, Any]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, _on_signal, sig, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            # not the main thread, or no signals here: the stop event still works
            log.debug("cannot handle %s here", sig.name)
            continue
        installed.append((sig, previous))

    def restore() -> None:
        for sig, previous in installed:
            loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)

    return restore


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.info("received %s again; still shutting down", sig.name)
        return
    log.info("received %s; shutting down", sig.name)
    stop.set()
