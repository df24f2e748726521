"""Registry benchmarks: upload throughput, ResolveModel latency, ``scoremesh up`` time to ready.

Run with ``make bench`` (or ``.venv/bin/python -m bench.registry``). Every server binds
127.0.0.1 on a port the OS picks; every loop is bounded in count and time. Results are
printed and written to ``bench/results/registry.json``; bench/README.md records them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import START_TIMEOUT_S, percentile, wait_for_file
from services.mesh.channels import open_channel
from services.mesh.identity import Caller
from services.mesh.postgres import database, resolve_database_url
from services.mesh.server import address_file
from services.mesh.settings import MeshSettings
from services.registry.client import Reference, RegistryClient
from tests import onnx_factory

RESULTS = Path(__file__).parent / "results" / "registry.json"
CALLER = Caller(tenant="bench", principal="bench")


@contextlib.asynccontextmanager
async def _registry_process(home: Path, database_url: str) -> AsyncIterator[str]:
    env = {
        **os.environ,
        "SCOREMESH_HOME": str(home),
        "SCOREMESH_DATABASE_URL": database_url,
        "SCOREMESH_REGISTRY_PORT": "0",
        "SCOREMESH_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "serve", "registry", env=env
    )
    try:
        yield await wait_for_file(address_file(home, "registry"), process)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)


async def bench_upload(client: RegistryClient, workdir: Path, size_mb: int) -> dict[str, Any]:
    path = workdir / "large.onnx"
    path.write_bytes(onnx_factory.large_model(size_mb * 1024 * 1024))
    size = path.stat().st_size
    started = time.perf_counter()
    first = await client.push("bench-large", path)
    new_s = time.perf_counter() - started
    assert first.created
    assert first.version.verification.passed, first.version.verification
    # the same bytes again: streamed, hashed and matched, not verified again; the median of
    # three runs, because two cores shared by client, server and PostgreSQL make single runs noisy
    repeats = []
    for _ in range(3):
        started = time.perf_counter()
        again = await client.push("bench-large", path)
        repeats.append(time.perf_counter() - started)
        assert not again.created
    repeat_s = statistics.median(repeats)
    return {
        "artifact_bytes": size,
        "new_version_s": round(new_s, 3),
        "new_version_mb_per_s": round(size / new_s / 1e6, 1),
        "transfer_only_s": round(repeat_s, 3),
        "transfer_only_mb_per_s": round(size / repeat_s / 1e6, 1),
        "transfer_only_runs_s": [round(r, 3) for r in repeats],
    }


async def bench_resolve(
    client: RegistryClient, concurrency: int, requests: int, time_limit_s: float
) -> dict[str, Any]:
    reference = Reference("bench-large", alias="production")
    await client.set_alias("bench-large", "production", 1)
    for _ in range(50):  # warm-up
        await client.resolve(reference)
    latencies: list[float] = []
    deadline = time.monotonic() + time_limit_s
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            started = time.perf_counter()
            await client.resolve(reference, timeout=10)
            latencies.append(time.perf_counter() - started)

    cpu_started = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "client_cpu_s": round(time.process_time() - cpu_started, 2),
    }


def bench_up(workdir: Path) -> dict[str, Any]:
    """Time from starting ``scoremesh up`` to its ready line: first run (initdb) and second."""
    home = workdir / "up-home"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("SCOREMESH_DATABASE_URL", "DATABASE_URL")
    }
    env.update(
        {"SCOREMESH_HOME": str(home), "SCOREMESH_REGISTRY_PORT": "0", "SCOREMESH_LOG_LEVEL": "WARNING"}
    )
    timings = {}
    for run in ("first_start_s", "second_start_s"):
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"], env=env, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                if line.startswith("scoremesh is up"):
                    timings[run] = round(time.perf_counter() - started, 2)
                    break
                if time.perf_counter() - started > START_TIMEOUT_S:
                    raise TimeoutError("scoremesh up did not become ready")
            else:
                raise RuntimeError(f"scoremesh up exited with {process.wait()}")
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    return timings


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="scoremesh-bench-") as tmp:
        workdir = Path(tmp)
        async with (
            database(resolve_database_url(os.environ), workdir) as database_url,
            _registry_process(workdir / "home", database_url) as address,
            open_channel(address, MeshSettings.from_env({})) as channel,
        ):
            client = RegistryClient(channel, CALLER)
            results["upload"] = await bench_upload(client, workdir, args.size_mb)
            print("upload", results["upload"], flush=True)
            results["resolve"] = await bench_resolve(client, 16, args.requests, args.time_limit_s)
            print("resolve", results["resolve"], flush=True)
        results["up"] = bench_up(workdir)
        print("up", results["up"], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200, help="artifact size for the upload benchmark")
    parser.add_argument("--requests", type=int, default=5000, help="ResolveModel calls (bounded)")
    parser.add_argument(
        "--time-limit-s", type=float, default=60.0, help="upper bound on the ResolveModel run"
    )
    results = asyncio.run(main_async(parser.parse_args()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
