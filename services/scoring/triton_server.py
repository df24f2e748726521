"""Runs and supervises a local ``tritonserver``: the one shipped in the ``nvidia-pytriton`` wheel.

Used where no Triton URL is configured (a developer machine, CI, a single-host install). The
server:

* listens for gRPC on 127.0.0.1 only, on a port the kernel picks (``--grpc-port=0``; Triton
  binds it but never says which, so the port is read back from ``/proc/<pid>``); HTTP and
  metrics are off;
* starts with an empty model repository in explicit model-control mode: models arrive with
  ``load_model(config=..., files=...)`` and exist nowhere on disk;
* keeps its load/unload API behind a random secret header
  (``--grpc-restricted-protocol``); :attr:`LocalTriton.admin_headers` carries it;
* is restarted, with backoff, when it dies; after a restart the ``on_restart`` callback is
  awaited with the (possibly new) URL so that models are loaded again. A restart first tries
  the previous port, so clients' channels reconnect by themselves.

Its output goes to ``<work_dir>/tritonserver.log``; :meth:`LocalTriton.log_tail` returns the
last lines for error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException

from services.mesh.children import child_env, dying_with_parent

log = logging.getLogger(__name__)

__all__ = [
    "LocalTriton",
    "TritonInstallation",
    "TritonStartError",
    "find_triton",
    "gpu_available",
    "opentelemetry_trace_args",
]

HOST: Final = "127.0.0.1"
LOG_FILE: Final = "tritonserver.log"
STUB_NAME: Final = "triton_python_backend_stub"
ADMIN_KEY: Final = "scoremesh-admin"
# Triton prefixes the key of --grpc-restricted-protocol with this to name the header it checks
RESTRICTED_HEADER_PREFIX: Final = "triton-grpc-protocol-"
RESTART_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0, 5.0)
# a server that ran this long before dying starts its backoff over
STABLE_AFTER_S: Final = 30.0
_POLL_INTERVAL_S: Final = 0.02
_PROBE_TIMEOUT_S: Final = 1.0
_LOG_TAIL_BYTES: Final = 64 * 1024
_ADDRESS_IN_USE: Final = re.compile(r"already in use|Address already in use")
# /proc/net/tcp* state of a listening socket
_TCP_LISTEN: Final = "0A"

RestartCallback = Callable[[str], Awaitable[None]]
"""Awaited with the server's URL after a restart, once it is ready again."""


class TritonStartError(RuntimeError):
    """tritonserver could not be found or did not become ready; the message ends with the
    last lines of its log."""


@dataclass(frozen=True, slots=True)
class TritonInstallation:
    """Where the wheel keeps tritonserver and what it needs to run."""

    binary: Path
    library_dir: Path
    python_backend_dir: Path
    python_stub: Path


def find_triton() -> TritonInstallation:
    """Finds the ``tritonserver`` of the ``nvidia-pytriton`` wheel, with the python backend
    stub built for the running Python's minor version."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("the nvidia-pytriton wheel is not installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    installation = TritonInstallation(
        binary=server / "bin" / "tritonserver",
        library_dir=package.parent / "nvidia_pytriton.libs",
        python_backend_dir=server / "backends" / "python",
        python_stub=server / "python_backend_stubs" / minor / STUB_NAME,
    )
    for path in (
        installation.binary,
        installation.library_dir,
        installation.python_backend_dir,
        installation.python_stub,
    ):
        if not path.exists():
            raise TritonStartError(f"nvidia-pytriton is incomplete: {path} is missing")
    return installation


def gpu_available(env: Mapping[str, str] | None = None) -> bool:
    """Whether an NVIDIA GPU is usable here (Triton should then run ``KIND_GPU`` instances).

    Looks at the driver's ``/proc/driver/nvidia/gpus``, else asks ``nvidia-smi -L``; an empty
    or ``-1`` ``CUDA_VISIBLE_DEVICES`` hides every GPU. Blocking (``nvidia-smi`` may take a
    moment): call it once at start-up."""
    environ = os.environ if env is None else env
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    with contextlib.suppress(OSError):
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and any(line.startswith("GPU") for line in listing.stdout.splitlines())


def opentelemetry_trace_args(otlp_http_url: str, *, rate: int = 1, level: str = "TIMESTAMPS") -> list[str]:
    """``--trace-config`` arguments that make Triton export OTLP/HTTP spans to
    ``otlp_http_url`` (``host:port/v1/traces``) and continue a W3C ``traceparent`` sent as
    gRPC metadata. ``rate`` 1 traces every request (the caller's sampler already decided)."""
    return [
        "--trace-config",
        "mode=opentelemetry",
        "--trace-config",
        f"opentelemetry,url={otlp_http_url}",
        "--trace-config",
        f"rate={rate}",
        "--trace-config",
        f"level={level}",
    ]


def trace_args_from_env(env: Mapping[str, str]) -> list[str]:
    """Triton's ``--trace-config`` arguments from the standard OpenTelemetry variables the
    mesh's services read: exporting to the same OTLP/HTTP endpoint. Triton traces every
    request (rate 1) and follows the incoming ``traceparent``'s sampled flag, so the mesh's
    sampler decides (the scoring service sends the flag on every call, "not sampled" on
    calls outside a trace). None when tracing is off, or when the endpoint speaks OTLP/gRPC
    (Triton exports OTLP/HTTP only)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() not in ("otlp", ""):
        return []
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        return []
    url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not url:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if not base:
            return []
        url = base.rstrip("/") + "/v1/traces"
    if env.get("OTEL_TRACES_SAMPLER", "").strip().lower() in ("always_off", "parentbased_always_off"):
        return []
    return opentelemetry_trace_args(url.split("://", 1)[-1])


class LocalTriton:
    """A supervised ``tritonserver`` child process. Use as ``async with`` or call
    :meth:`start` and :meth:`stop`.

    ``trace_args`` (e.g. :func:`opentelemetry_trace_args`) and ``extra_args`` are passed to
    tritonserver as given. ``grpc_port`` 0 lets the kernel pick a free port; a fixed port that
    is taken makes the start fail after ``start_attempts`` tries."""

    def __init__(
        self,
        work_dir: Path,
        *,
        on_restart: RestartCallback | None = None,
        grpc_port: int = 0,
        trace_args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        start_attempts: int = 3,
        installation: TritonInstallation | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.on_restart = on_restart
        """Awaited with the URL after each restart, once the server is ready again."""
        self._requested_port = grpc_port
        self._trace_args = list(trace_args)
        self._extra_args = list(extra_args)
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._start_attempts = max(1, start_attempts)
        self._installation = installation
        self._secret = secrets.token_urlsafe(32)
        self._process: asyncio.subprocess.Process | None = None
        self._port = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0
        """How many times the server was restarted after dying."""

    # what callers need

    @property
    def url(self) -> str:
        """``127.0.0.1:<port>`` for ``tritonclient.grpc``; valid once :meth:`start` returned."""
        if not self._port:
            raise RuntimeError("tritonserver is not started")
        return f"{HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The running tritonserver's pid (None when none runs)."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def admin_headers(self) -> dict[str, str]:
        """The gRPC metadata that Triton's model-repository API (load/unload) requires."""
        return {RESTRICTED_HEADER_PREFIX + ADMIN_KEY: self._secret}

    @property
    def log_path(self) -> Path:
        return self.work_dir / LOG_FILE

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of tritonserver's output."""
        try:
            with self.log_path.open("rb") as file:
                file.seek(0, os.SEEK_END)
                file.seek(max(0, file.tell() - _LOG_TAIL_BYTES))
                text = file.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # lifecycle

    async def start(self) -> None:
        """Starts tritonserver and returns once it answers ServerReady; then supervises it."""
        if self._supervisor is not None:
            raise RuntimeError("tritonserver is already started")
        self._stopping = False
        self._prepare()
        await self._launch(self._requested_port)
        self._supervisor = asyncio.create_task(self._supervise(), name="tritonserver-supervisor")

    async def stop(self) -> None:
        """Stops supervising, then SIGTERM to tritonserver and SIGKILL after ``stop_timeout_s``."""
        self._stopping = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        # shielded: an interrupted stop must not leave the server running
        await asyncio.shield(self._terminate())

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_ready(self, timeout_s: float) -> None:
        """Polls ServerReady until it says yes; raises TritonStartError past ``timeout_s`` or
        when the process exits."""
        process = self._process
        if process is None:
            raise TritonStartError("tritonserver is not running")
        await self._wait_ready(process, time.monotonic() + timeout_s)

    # internals

    def _prepare(self) -> None:
        installation = self._installation or find_triton()
        self._installation = installation
        (self.work_dir / "models").mkdir(parents=True, exist_ok=True)
        # Triton looks for the python backend (and its stub, which it runs per model instance)
        # in <backend-directory>/python; the wheel keeps the stubs apart, one per Python minor.
        backend = self.work_dir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for source in installation.python_backend_dir.iterdir():
            if source.is_file():
                shutil.copy2(source, backend / source.name)
        shutil.copy2(installation.python_stub, backend / STUB_NAME)

    def _argv(self, port: int) -> list[str]:
        assert self._installation is not None
        return [
            str(self._installation.binary),
            f"--model-repository={self.work_dir / 'models'}",
            f"--backend-directory={self.work_dir / 'backends'}",
            "--model-control-mode=explicit",
            f"--grpc-address={HOST}",
            f"--grpc-port={port}",
            # never share a port with another server (gRPC would otherwise allow SO_REUSEPORT)
            "--reuse-grpc-port=false",
            "--allow-http=false",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            f"--grpc-restricted-protocol=model-repository:{ADMIN_KEY}={self._secret}",
            # a model that fails to load must not take the server down with it
            "--exit-on-error=false",
            f"--exit-timeout-secs={max(1, int(self._stop_timeout_s) - 1)}",
            "--log-format=ISO8601",
            *self._trace_args,
            *self._extra_args,
        ]

    def _environment(self) -> dict[str, str]:
        assert self._installation is not None
        env = child_env(threads=None)  # the exec_child step imports this code base
        libraries = str(self._installation.library_dir)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libraries, env.get("LD_LIBRARY_PATH")]))
        # the python backend's stub runs `python3` from PATH: it must be this environment's,
        # which has numpy and onnxruntime
        interpreter_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(filter(None, [interpreter_dir, env.get("PATH")]))
        return env

    async def _launch(self, port: int) -> None:
        """Starts the server, retrying a bind failure (another process took the port between
        runs) up to ``start_attempts`` times; a requested port 0 is never taken."""
        attempts = self._start_attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._spawn_and_wait(port)
                return
            except _PortInUse:
                if port and port != self._requested_port:
                    # a restart that lost its previous port: take any free one
                    log.warning("port %s was taken while tritonserver restarted; picking another", port)
                    port = self._requested_port
                elif attempt == attempts:
                    raise TritonStartError(
                        f"tritonserver could not bind {HOST}:{port}\n{self.log_tail()}"
                    ) from None
                else:
                    # a fixed port someone else holds: give them a moment before trying again
                    await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S)) - 1])

    async def _spawn_and_wait(self, port: int) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        with self.log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *dying_with_parent(self._argv(port)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self._environment(),
            )
        self._process = process
        log.info("started tritonserver (pid %s), log in %s", process.pid, self.log_path)
        try:
            # Always read the port back from /proc, even a fixed one: a probe sent before our
            # process listens could be answered by whoever holds the port (then we exit).
            bound = await self._discover_port(process, deadline)
            if port and bound != port:
                raise TritonStartError(f"tritonserver listens on {bound}, not on {port}\n{self.log_tail()}")
            self._port = bound
            await self._wait_ready(process, deadline)
        except BaseException:
            await self._terminate()
            raise
        log.info("tritonserver (pid %s) ready at %s", process.pid, self.url)

    async def _discover_port(self, process: asyncio.subprocess.Process, deadline: float) -> int:
        # Triton binds port 0 but logs "127.0.0.1:0": read its listening socket from /proc
        while True:
            self._check_alive(process)
            port = listening_port(process.pid)
            if port:
                return port
            if time.monotonic() > deadline:
                raise TritonStartError(f"tritonserver opened no gRPC port\n{self.log_tail()}")
            await asyncio.sleep(_POLL_INTERVAL_S)

    async def _wait_ready(self, process: asyncio.subprocess.Process, deadline: float) -> None:
        client = triton_grpc.InferenceServerClient(self.url)
        try:
            while True:
                self._check_alive(process)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TritonStartError(
                        f"tritonserver was not ready within {self._start_timeout_s:.0f} s\n{self.log_tail()}"
                    )
                try:
                    if await client.is_server_ready(client_timeout=min(_PROBE_TIMEOUT_S, remaining)):
                        return
                except InferenceServerException:
                    pass  # not listening yet
                await asyncio.sleep(_POLL_INTERVAL_S)
        finally:
            await client.close()

    def _check_alive(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            return
        tail = self.log_tail()
        if _ADDRESS_IN_USE.search("\n".join(tail.splitlines()[-3:])):
            raise _PortInUse()
        raise TritonStartError(f"tritonserver exited with {process.returncode}\n{tail}")

    async def _supervise(self) -> None:
        attempt = 0
        while not self._stopping:
            process = self._process
            assert process is not None
            started = time.monotonic()
            code = await process.wait()
            if self._stopping:
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                attempt = 0
            delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
            attempt += 1
            reap_orphaned_stubs(self.work_dir / "backends" / "python" / STUB_NAME, process.pid)
            log.error(
                "tritonserver (pid %s) exited with %s; restarting in %.1f s\n%s",
                process.pid,
                code,
                delay,
                self.log_tail(10),
            )
            await asyncio.sleep(delay)
            try:
                # the old port first: clients' channels then reconnect without being told
                await self._launch(self._port)
            except (TritonStartError, OSError):
                log.exception("tritonserver did not come back; retrying")
                continue
            self.restarts += 1
            if self.on_restart is not None:
                try:
                    await self.on_restart(self.url)
                except Exception:
                    log.exception("the restart callback failed")

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        # our own child, by pid: never a broad kill by name
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self._stop_timeout_s)
        except TimeoutError:
            log.warning("tritonserver (pid %s) ignored SIGTERM; killing it", process.pid)
            process.kill()
            await process.wait()
            reap_orphaned_stubs(self.work_dir / "backends" / "python" / STUB_NAME, process.pid)


class _PortInUse(Exception):
    """tritonserver exited because its gRPC port was taken."""


def listening_port(pid: int) -> int:
    """The TCP port a process listens on (the first one found), or 0 while it has none.

    Matches the socket inodes among ``/proc/<pid>/fd`` with the listening sockets of
    ``/proc/<pid>/net/tcp`` and ``tcp6``."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return 0
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN and fields[9] in inodes:
                return int(fields[1].rsplit(":", 1)[1], 16)
    return 0


def reap_orphaned_stubs(stub: Path, server_pid: int) -> int:
    """Kills the python backend stubs that a dead tritonserver left behind; returns how many.

    A stub outlives a server killed with SIGKILL (it is reparented and keeps its model and
    shared memory). Ours are told apart exactly: their program is ``stub`` (the copy in our
    work dir) and their command line names ``server_pid`` as the parent, in the position the
    python backend puts it (``stub model.py shm-region shm-size shm-growth parent-pid ...``).
    Their shared-memory region is unlinked too, as the server would have done."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if len(argv) < 6 or argv[0] != os.fsencode(stub) or argv[5] != str(server_pid).encode():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
        region = os.fsdecode(argv[2])
        if region and "/" not in region:
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / region).unlink()
    if killed:
        log.warning("killed %d python backend stubs left by tritonserver (pid %s)", killed, server_pid)
    return killed
