"""Runs the mesh's services as child processes for ``scoremesh up``: starts them, waits for
their grpc.health.v1 status, restarts one that crashes, and stops them all in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.children import child_env, dying_with_parent
from services.mesh.settings import TlsSettings
from services.mesh.tls import open_grpc_channel

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
# a child that ran this long before crashing starts its backoff over
STABLE_AFTER_S = 30.0


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised service: how to start it, and the file where it announces the address
    it bound (so services may listen on port 0)."""

    name: str
    argv: Sequence[str]
    address_file: Path | None
    """None for a process that serves nothing (a worker): it counts as up once started."""
    health_service: str = ""
    http_health_path: str | None = None
    """For an HTTP service (the gateway): the path that answers 200 once it is ready; its
    health is then polled over HTTP instead of grpc.health.v1."""
    env: Mapping[str, str] = field(default_factory=dict)


class Supervisor:
    """``tls``: the mesh's TLS settings, which the children's servers use too, so that the
    health checks can reach them."""

    def __init__(self, *, stop_timeout_s: float = 15.0, tls: TlsSettings | None = None) -> None:
        self._stop_timeout_s = stop_timeout_s
        self._tls = tls
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    async def start(self, spec: ProcessSpec) -> None:
        await self._spawn(spec)
        self._watchers[spec.name] = asyncio.create_task(self._watch(spec), name=f"supervise-{spec.name}")

    async def _spawn(self, spec: ProcessSpec) -> None:
        if spec.address_file is not None:
            spec.address_file.unlink(missing_ok=True)
        env = {**child_env(threads=None), **spec.env}
        process = await asyncio.create_subprocess_exec(
            *dying_with_parent(spec.argv), env=env, stdin=asyncio.subprocess.DEVNULL
        )
        self._processes[spec.name] = process
        log.info("started %s (pid %s)", spec.name, process.pid)

    async def _watch(self, spec: ProcessSpec) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            code = await self._processes[spec.name].wait()
            if self._stopping:
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                attempt = 0
            delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
            log.error("%s exited with %s; restarting in %.1f s", spec.name, code, delay)
            await asyncio.sleep(delay)
            attempt += 1
            if self._stopping:
                return
            await self._spawn(spec)

    async def wait_healthy(self, spec: ProcessSpec, timeout_s: float) -> str:
        """Waits for the service's address, then polls its health until SERVING; returns the
        address ("" for a process without one). Raises TimeoutError past ``timeout_s``."""
        if spec.address_file is None:
            return ""
        deadline = time.monotonic() + timeout_s
        while not spec.address_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{spec.name} did not start within {timeout_s:.0f} s")
            await asyncio.sleep(0.02)
        address = spec.address_file.read_text().strip()
        if spec.http_health_path is not None:
            return await _wait_http_healthy(spec, address, deadline, timeout_s)
        async with open_grpc_channel(address, self._tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{spec.name} did not become healthy within {timeout_s:.0f} s")
                try:
                    response = await stub.Check(
                        health_pb2.HealthCheckRequest(service=spec.health_service),
                        timeout=min(1.0, remaining),
                        wait_for_ready=True,
                    )
                except grpc.aio.AioRpcError:
                    continue  # not listening yet (or restarting): wait_for_ready paced this
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return address
                await asyncio.sleep(0.05)

    async def stop_all(self) -> None:
        """SIGTERM to every child in reverse start order, SIGKILL to any still running after
        the timeout."""
        self._stopping = True
        for watcher in self._watchers.values():
            watcher.cancel()
        for name, process in reversed(list(self._processes.items())):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), self._stop_timeout_s)
                except TimeoutError:
                    log.warning("%s did not stop within %.0f s; killing it", name, self._stop_timeout_s)
                    process.kill()
                    await process.wait()
            log.info("stopped %s (exit %s)", name, process.returncode)
        for watcher in self._watchers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _wait_http_healthy(spec: ProcessSpec, address: str, deadline: float, timeout_s: float) -> str:
    url = f"http://{address}{spec.http_health_path}"
    async with aiohttp.ClientSession() as session:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{spec.name} did not become healthy within {timeout_s:.0f} s")
            try:
                async with session.get(
                    url, timeout=aiohttp.ClientTimeout(total=min(1.0, remaining))
                ) as response:
                    if response.status == 200:
                        return address
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            await asyncio.sleep(0.05)
