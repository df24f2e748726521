"""What every benchmark needs: servers started as child processes and their announced
addresses, models published to a registry, CPU accounting from /proc, and percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import asyncpg

from services.mesh.channels import open_channel
from services.mesh.identity import Caller
from services.mesh.server import address_file
from services.mesh.settings import MeshSettings
from services.registry.client import RegistryClient
from services.registry.converters import signature_from_pb
from services.scoring.backend import LoadedVersion
from services.scoring.router import batch_size_for

START_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 30.0
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def wait_for_file(
    path: Path, process: asyncio.subprocess.Process, timeout: float = START_TIMEOUT_S
) -> str:
    """The address a server started as ``process`` announced in ``path`` (see
    ``services.mesh.server.address_file``), polled until it appears."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.returncode is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        await asyncio.sleep(0.02)
    return path.read_text().strip()


async def bounded_load(
    send: Callable[[int], Awaitable[object]], concurrency: int, requests: int, time_limit_s: float
) -> list[float]:
    """``concurrency`` coroutines call ``send(n)`` (n counting down from ``requests - 1``)
    until ``requests`` calls were made or ``time_limit_s`` passed; returns each call's latency
    in seconds."""
    latencies: list[float] = []
    deadline = time.monotonic() + time_limit_s
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            started = time.perf_counter()
            await send(remaining)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


# processes


async def stop_process(process: asyncio.subprocess.Process, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL if the process outlives ``timeout``; by pid, never by name."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


@dataclass(frozen=True)
class Service:
    address: str
    pid: int


@contextlib.asynccontextmanager
async def service_process(
    name: str, home: Path, env: Mapping[str, str], *, stdout: int | None = None
) -> AsyncIterator[Service]:
    """``scoremesh serve <name>`` as a child process, until it announces its address;
    ``stdout`` as for ``asyncio.create_subprocess_exec`` (DEVNULL keeps what the service
    prints, such as the gateway's first admin key, out of the benchmark's output)."""
    environment = {
        **os.environ,
        "SCOREMESH_HOME": str(home),
        "SCOREMESH_LOG_LEVEL": "WARNING",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "serve", name, env=environment, stdout=stdout
    )
    try:
        address = await wait_for_file(address_file(home, name), process)
        yield Service(address, process.pid)
    finally:
        await asyncio.shield(stop_process(process))


def scoring_env(
    database_url: str, registry_address: str, backend: str, max_batch_size: int
) -> dict[str, str]:
    """The scoring service as the benchmarks run it: on a port the OS picks, with ``backend``
    (``triton`` or ``onnxruntime``), and without the prediction log, the response cache and
    canaries, which a bare Triton does not do either."""
    return {
        "SCOREMESH_DATABASE_URL": database_url,
        "SCOREMESH_SCORING_PORT": "0",
        "SCOREMESH_REGISTRY_ADDR": registry_address,
        "SCOREMESH_SCORING_BACKEND": backend,
        "SCOREMESH_PREDICTION_LOG_RATE": "0",
        "SCOREMESH_CACHE_BYTES": "0",
        "SCOREMESH_CANARY_INTERVAL_S": "0",
        "SCOREMESH_MAX_BATCH_SIZE": str(max_batch_size),
    }


# models


@dataclass(frozen=True)
class BenchModel:
    key: str
    name: str
    description: str
    onnx: bytes
    features: int


async def publish(
    registry_address: str,
    models: list[BenchModel],
    workdir: Path,
    *,
    caller: Caller,
    max_batch_size: int,
    internal_token: str | None = None,
) -> list[LoadedVersion]:
    """Pushes every model as ``caller`` with alias ``production``; returns them as a backend
    loads them (batches of at most ``max_batch_size`` rows, the scoring service's setting)."""
    versions = []
    settings = MeshSettings.from_env({"SCOREMESH_INTERNAL_TOKEN": internal_token or ""})
    async with open_channel(registry_address, settings) as channel:
        client = RegistryClient(channel, caller)
        for model in models:
            path = workdir / f"{model.name}.onnx"
            path.write_bytes(model.onnx)
            pushed = (await client.push(model.name, path, alias="production", timeout=300)).version
            assert pushed.verification.passed, pushed.verification
            signature = signature_from_pb(pushed.signature)
            versions.append(
                LoadedVersion(
                    model=model.name,
                    version=int(pushed.version),
                    sha256=pushed.sha256,
                    signature=signature,
                    onnx_bytes=model.onnx,
                    max_batch_size=batch_size_for(signature, max_batch_size),
                )
            )
    return versions


# process accounting


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in task.read_text().split())
    return found


def process_tree(roots: Iterable[int]) -> list[int]:
    """The pids of ``roots`` and all their descendants (tritonserver, python backend stubs,
    PostgreSQL backends)."""
    pids: list[int] = []
    pending = list(roots)
    while pending:
        pid = pending.pop()
        pids.append(pid)
        pending.extend(_children(pid))
    return pids


def _stat_seconds(roots: Iterable[int], first: int) -> dict[int, float]:
    """Fields ``first`` and ``first + 1`` of /proc/PID/stat, as CPU seconds, for every process in
    the trees of ``roots``. Fields are counted after the parenthesised command (which may hold
    spaces): 11 and 12 are utime and stime, 13 and 14 cutime and cstime."""
    snapshot: dict[int, float] = {}
    for pid in process_tree(roots):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        snapshot[pid] = (int(fields[first]) + int(fields[first + 1])) / CLOCK_TICKS
    return snapshot


def cpu_snapshot(roots: Iterable[int]) -> dict[int, float]:
    """CPU seconds (user + system, all threads) of every process in the trees of ``roots``."""
    return _stat_seconds(roots, 11)


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def child_named(pid: int, command: str) -> int:
    """The child of ``pid`` whose command is ``command`` (one of our own processes)."""
    for child in _children(pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == command:
                return child
    raise RuntimeError(f"process {pid} has no child {command}")


class MachineTicks(NamedTuple):
    """Clock ticks of the whole machine so far, from the first line of /proc/stat."""

    busy: int
    """user + nice + system + irq + softirq: what every process on the machine ran."""
    steal: int
    """What the hypervisor gave to other tenants."""
    total: int


def machine_ticks() -> MachineTicks:
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return MachineTicks(busy=user + nice + system + irq + softirq, steal=steal, total=total)


def reaped_cpu_snapshot(roots: Iterable[int]) -> dict[int, float]:
    """CPU seconds (user + system) of the children each process in the trees of ``roots`` has
    waited for (``cutime`` + ``cstime``). Short-lived children (a training worker's plugin
    processes, the registry's verification processes, PostgreSQL's closed backends) are gone
    from the tree by the time :func:`cpu_snapshot` looks; their CPU shows only here."""
    return _stat_seconds(roots, 13)


async def postmaster_pid(database_url: str) -> int | None:
    """The PostgreSQL server's pid when it runs on this machine (its data directory is here)
    and the URL's role may read where that is, else None."""
    connection = await asyncpg.connect(database_url)
    try:
        data_directory = await connection.fetchval("SHOW data_directory")
    except asyncpg.PostgresError:
        return None  # not a superuser
    finally:
        await connection.close()
    try:
        return int((Path(data_directory) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
