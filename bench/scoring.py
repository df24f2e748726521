"""Scoring benchmarks: single-row inference through stock tritonclient, three ways.

(a) tritonclient straight to Triton, (b) tritonclient → scoring → Triton, (c) tritonclient →
scoring on onnxruntime; each at concurrency 1, 16 and 64, once with a tiny model and once with
one whose execution costs milliseconds. Reports req/s, p50/p99, server and client CPU per
request, and the batch sizes Triton achieved.

Run with ``make bench`` (or ``.venv/bin/python -m bench.scoring``). A private PostgreSQL (or
``SCOREMESH_DATABASE_URL``) backs a registry process; every server binds 127.0.0.1 on a port
the OS picks; every loop is bounded in count and time; every process started here is ended by
its pid. Results are printed and written to ``bench/results/scoring.json``; bench/README.md
records them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput

from bench.common import (
    BenchModel,
    bounded_load,
    child_named,
    cpu_delta,
    cpu_snapshot,
    machine_ticks,
    percentile,
    publish,
    scoring_env,
    service_process,
)
from services.mesh.identity import Caller
from services.mesh.postgres import database, resolve_database_url
from services.scoring.backend import LoadedVersion
from services.scoring.main import build_scoring
from services.scoring.oip import pb
from services.scoring.service import ScoringService
from services.scoring.settings import ScoringSettings
from services.scoring.triton_backend import TritonBackend
from services.scoring.triton_config import triton_model_name
from services.scoring.triton_server import LocalTriton, gpu_available, listening_port
from tests import onnx_factory

RESULTS: Final = Path(__file__).parent / "results" / "scoring.json"
CALLER: Final = Caller(tenant="bench", principal="bench")
CALL_TIMEOUT_S: Final = 10.0
# the scoring service's defaults, which (a) copies so that Triton sees the same model config
MAX_BATCH_SIZE: Final = 64
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
DISTINCT_ROWS: Final = 64
SETUPS: Final = {
    "a": "tritonclient -> Triton",
    "b": "tritonclient -> scoring -> Triton",
    "c": "tritonclient -> scoring (onnxruntime)",
    "d": "the scoring data plane on onnxruntime, called in process (no gRPC)",
}


def bench_models() -> list[BenchModel]:
    # mlp 1024x12 costs about 1.3 ms (2.5 ms of CPU over two threads) per single row in
    # onnxruntime here, and its 48 MiB still fit in one 64 MiB load_model message to Triton
    return [
        BenchModel("tiny", "bench-tiny", "tiny_classifier(4 -> 3)", onnx_factory.tiny_classifier(4, 3), 4),
        BenchModel(
            "heavy", "bench-heavy", "mlp_model(width=1024, layers=12)", onnx_factory.mlp_model(1024, 12), 1024
        ),
    ]


@dataclass(frozen=True)
class Limits:
    requests: int
    time_limit_s: float
    warmup_requests: int
    warmup_s: float
    concurrencies: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """One way to reach a model: where, as whom, and whose CPU counts as the server's."""

    setup: str
    url: str
    server_pids: tuple[int, ...]
    """Roots of the process trees whose CPU is the server side (children included)."""
    triton_pid: int | None
    """The tritonserver among them, if any: its tree's CPU is also reported on its own, and
    its per-model statistics give the achieved batch sizes."""
    headers: Mapping[str, str]
    direct: bool

    @property
    def stats_url(self) -> str | None:
        if self.triton_pid is None:
            return None
        return f"127.0.0.1:{listening_port(self.triton_pid)}"

    def model_name(self, version: LoadedVersion) -> str:
        return triton_model_name(version.model, version.version) if self.direct else version.model


@dataclass(frozen=True)
class TritonCounts:
    rows: int
    executions: int
    requests: int


@dataclass(frozen=True)
class Run:
    model: str
    setup: str
    concurrency: int
    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_req: float
    triton_cpu_us_per_req: float | None
    """The part of the server's CPU spent in tritonserver and its python backend stubs."""
    client_cpu_us_per_req: float
    batch_size: float | None
    """Rows per Triton model execution (inference count / execution count); None without Triton."""
    rows_per_triton_request: float | None
    """Rows per request that reached Triton: how much the scoring service coalesced."""
    steal_pct: float
    """The share of the machine's CPU time the hypervisor gave to others during the run: a
    noisy neighbour makes every other number worse."""


# load generation


def row_inputs(model: BenchModel) -> tuple[list[InferInput], list[np.ndarray[Any, Any]]]:
    """DISTINCT_ROWS single-row requests, built once: what is measured is the serving path,
    not the client building protobufs (the client shares the two cores with the servers)."""
    rows = np.random.default_rng(7).standard_normal((DISTINCT_ROWS, 1, model.features)).astype(np.float32)
    inputs = []
    for row in rows:
        infer_input = InferInput("input", list(row.shape), "FP32")
        infer_input.set_data_from_numpy(row)
        inputs.append(infer_input)
    return inputs, list(rows)


async def load(
    client: triton_grpc.InferenceServerClient,
    target: Target,
    version: LoadedVersion,
    inputs: list[InferInput],
    concurrency: int,
    requests: int,
    time_limit_s: float,
) -> list[float]:
    """``concurrency`` coroutines share one client and send single-row requests until
    ``requests`` were sent or ``time_limit_s`` passed; returns each request's latency."""
    name = target.model_name(version)
    headers = dict(target.headers)

    async def send(index: int) -> None:
        infer_input = inputs[index % len(inputs)]
        await client.infer(
            name, [infer_input], model_version="", headers=headers, client_timeout=CALL_TIMEOUT_S
        )

    return await bounded_load(send, concurrency, requests, time_limit_s)


async def check_answers(
    client: triton_grpc.InferenceServerClient,
    target: Target,
    version: LoadedVersion,
    inputs: list[InferInput],
    rows: list[np.ndarray[Any, Any]],
) -> None:
    """A few answers must match onnxruntime run here: a fast wrong answer is no result."""
    session = ort.InferenceSession(version.onnx_bytes, providers=["CPUExecutionProvider"])
    output = version.signature.outputs[0].name
    for infer_input, row in list(zip(inputs, rows, strict=True))[:4]:
        result = await client.infer(
            target.model_name(version),
            [infer_input],
            model_version="",
            headers=dict(target.headers),
            client_timeout=60,  # the first request may load the model
        )
        expected = session.run([output], {"input": row})[0]
        np.testing.assert_allclose(result.as_numpy(output), expected, rtol=1e-3, atol=1e-5)


async def triton_counts(client: triton_grpc.InferenceServerClient | None, name: str) -> TritonCounts | None:
    if client is None:
        return None
    response = await client.get_inference_statistics(name, client_timeout=CALL_TIMEOUT_S)
    stats = response.model_stats[0]
    return TritonCounts(
        rows=int(stats.inference_count),
        executions=int(stats.execution_count),
        requests=int(stats.inference_stats.success.count),
    )


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 2) if denominator else None


async def measure(
    client: triton_grpc.InferenceServerClient,
    stats_client: triton_grpc.InferenceServerClient | None,
    target: Target,
    version: LoadedVersion,
    model_key: str,
    inputs: list[InferInput],
    concurrency: int,
    limits: Limits,
) -> Run:
    # a warm-up at the same concurrency, so that queues, channels and allocators settle
    await load(client, target, version, inputs, concurrency, limits.warmup_requests, limits.warmup_s)
    name = triton_model_name(version.model, version.version)
    counts_before = await triton_counts(stats_client, name)
    server_before = cpu_snapshot(target.server_pids)
    triton_pids = () if target.triton_pid is None else (target.triton_pid,)
    triton_before = cpu_snapshot(triton_pids)
    ticks_before = machine_ticks()
    client_started = time.process_time()
    started = time.perf_counter()
    latencies = await load(client, target, version, inputs, concurrency, limits.requests, limits.time_limit_s)
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - client_started
    ticks_after = machine_ticks()
    server_cpu = cpu_delta(server_before, cpu_snapshot(target.server_pids))
    triton_cpu = cpu_delta(triton_before, cpu_snapshot(triton_pids)) if triton_pids else None
    counts_after = await triton_counts(stats_client, name)
    batch_size = per_request = None
    if counts_before is not None and counts_after is not None:
        rows = counts_after.rows - counts_before.rows
        batch_size = _ratio(rows, counts_after.executions - counts_before.executions)
        per_request = _ratio(rows, counts_after.requests - counts_before.requests)
    count = len(latencies)
    return Run(
        model=model_key,
        setup=target.setup,
        concurrency=concurrency,
        requests=count,
        seconds=round(elapsed, 2),
        req_per_s=round(count / elapsed, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 3),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 3),
        server_cpu_us_per_req=round(server_cpu / count * 1e6, 1),
        triton_cpu_us_per_req=None if triton_cpu is None else round(triton_cpu / count * 1e6, 1),
        client_cpu_us_per_req=round(client_cpu / count * 1e6, 1),
        batch_size=batch_size,
        rows_per_triton_request=per_request,
        steal_pct=round(
            100 * (ticks_after.steal - ticks_before.steal) / max(1, ticks_after.total - ticks_before.total), 1
        ),
    )


@contextlib.asynccontextmanager
async def triton_client(url: str | None) -> AsyncIterator[triton_grpc.InferenceServerClient | None]:
    if url is None:
        yield None
        return
    client = triton_grpc.InferenceServerClient(url)
    try:
        yield client
    finally:
        await client.close()


async def bench_target(
    target: Target, models: list[BenchModel], versions: list[LoadedVersion], limits: Limits
) -> list[Run]:
    runs = []
    async with triton_client(target.url) as client, triton_client(target.stats_url) as stats_client:
        assert client is not None
        for model, version in zip(models, versions, strict=True):
            inputs, rows = row_inputs(model)
            await check_answers(client, target, version, inputs, rows)
            for concurrency in limits.concurrencies:
                run = await measure(
                    client, stats_client, target, version, model.key, inputs, concurrency, limits
                )
                print(format_row(run), flush=True)
                runs.append(run)
    return runs


# the three setups


async def bench_direct(
    workdir: Path, models: list[BenchModel], versions: list[LoadedVersion], limits: Limits
) -> list[Run]:
    """(a): the Triton build and model config the scoring service uses, loaded here.

    tritonserver is a child of this process, but this process does nothing for it while the
    load runs (its supervisor waits on the child), so this process's CPU stays the client's."""
    async with LocalTriton(workdir / "triton-direct") as triton:
        assert triton.pid is not None
        backend = TritonBackend(
            triton.url,
            max_message_bytes=MAX_MESSAGE_BYTES,
            admin_headers=triton.admin_headers,
            gpu=gpu_available(),
            kind=None,  # what the scoring service's "auto" picks
        )
        try:
            for version in versions:
                await backend.load(version)
            target = Target("a", triton.url, (triton.pid,), triton.pid, {}, direct=True)
            return await bench_target(target, models, versions, limits)
        finally:
            await backend.close()


async def bench_scoring(
    setup: str,
    backend: str,
    workdir: Path,
    database_url: str,
    registry_address: str,
    models: list[BenchModel],
    versions: list[LoadedVersion],
    limits: Limits,
) -> list[Run]:
    """(b) or (c): a scoring process; with Triton, its tritonserver child and stubs count too."""
    env = scoring_env(database_url, registry_address, backend, MAX_BATCH_SIZE)
    async with service_process("scoring", workdir / f"scoring-{backend}", env) as scoring:
        # the scoring service's own tritonserver: its child, found by pid, not by name
        triton_pid = child_named(scoring.pid, "tritonserver") if backend == "triton" else None
        target = Target(setup, scoring.address, (scoring.pid,), triton_pid, dict(CALLER.metadata()), False)
        return await bench_target(target, models, versions, limits)


async def bench_data_plane(
    workdir: Path, database_url: str, registry_address: str, models: list[BenchModel], limits: Limits
) -> dict[str, Any]:
    """(d) what the scoring service's own Python costs, without gRPC in front: the data plane
    (route, validate, batch, onnxruntime, split, respond) called in this process by 64
    coroutines. The difference to (c) is what the gRPC front door costs."""
    env = {
        "SCOREMESH_HOME": str(workdir / "data-plane"),
        "SCOREMESH_DATABASE_URL": database_url,
        "SCOREMESH_SCORING_PORT": "0",
        "SCOREMESH_REGISTRY_ADDR": registry_address,
        "SCOREMESH_SCORING_BACKEND": "onnxruntime",
        "SCOREMESH_PREDICTION_LOG_RATE": "0",
        "SCOREMESH_CANARY_INTERVAL_S": "0",
        "SCOREMESH_LOG_LEVEL": "WARNING",
        "SCOREMESH_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
    }
    settings = ScoringSettings.from_env(env)
    scoring = await build_scoring(settings, database_url)
    results: dict[str, Any] = {}
    try:
        for model in models:
            request = pb.ModelInferRequest(model_name=model.name)
            row = np.ones((1, model.features), np.float32)
            request.inputs.add(name="input", datatype="FP32", shape=row.shape)
            request.raw_input_contents.append(row.tobytes())
            stats = scoring.batcher.stats
            for _ in range(limits.warmup_requests):
                await scoring.service.infer(CALLER, request, 30.0)
            done_before, executions_before = stats.requests, stats.executions
            elapsed, cpu = await _drive(scoring.service, request, limits)
            done = stats.requests - done_before
            results[model.key] = {
                "concurrency": 64,
                "requests": done,
                "req_per_s": round(done / elapsed, 1),
                "cpu_us_per_req": round(cpu / done * 1e6, 1),
                "batch_size": round(done / max(1, stats.executions - executions_before), 2),
            }
            print(f"{model.key:<6} (d)     64 {results[model.key]}", flush=True)
    finally:
        await scoring.close()
    return results


async def _drive(
    service: ScoringService, request: pb.ModelInferRequest, limits: Limits
) -> tuple[float, float]:
    """Sends ``request`` from 64 coroutines until the run's count or time is up; returns the
    wall and CPU seconds it took."""
    remaining = limits.requests
    deadline = time.monotonic() + limits.time_limit_s

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            await service.infer(CALLER, request, 30.0)

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(64)))
    return time.perf_counter() - started, time.process_time() - cpu


# reporting


HEADER: Final = (
    f"{'model':<6} {'setup':<5} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'server µs/req':>13} {'in Triton':>9} {'client µs/req':>13} {'batch':>6} {'rows/Triton req':>15} "
    f"{'steal %':>7}"
)


def _optional(value: float | None, spec: str = "g") -> str:
    return "n/a" if value is None else format(value, spec)


def format_row(run: Run) -> str:
    return (
        f"{run.model:<6} ({run.setup}){'':<2} {run.concurrency:>4} {run.req_per_s:>8.0f} {run.p50_ms:>8.2f} "
        f"{run.p99_ms:>8.2f} {run.server_cpu_us_per_req:>13.0f} "
        f"{_optional(run.triton_cpu_us_per_req, '.0f'):>9} {run.client_cpu_us_per_req:>13.0f} "
        f"{_optional(run.batch_size):>6} {_optional(run.rows_per_triton_request):>15} {run.steal_pct:>7.1f}"
    )


def goals(runs: list[Run], model: str) -> dict[str, Any]:
    """The issue's goals: (b) ≥ 0.9 times (a) in req/s at concurrency 64; (b) adds ≤ 1 ms to p50 at 1."""
    by_key = {(run.setup, run.concurrency): run for run in runs if run.model == model}
    summary: dict[str, Any] = {}
    if ("a", 64) in by_key and ("b", 64) in by_key:
        ratio = by_key["b", 64].req_per_s / by_key["a", 64].req_per_s
        summary["b_over_a_req_per_s_c64"] = round(ratio, 2)
        summary["b_over_a_c64_met"] = ratio >= 0.9
    if ("a", 1) in by_key and ("b", 1) in by_key:
        added = by_key["b", 1].p50_ms - by_key["a", 1].p50_ms
        summary["b_minus_a_p50_ms_c1"] = round(added, 3)
        summary["b_minus_a_p50_c1_met"] = added <= 1.0
    return summary


def print_table(runs: list[Run], models: list[BenchModel], summaries: Mapping[str, Any]) -> None:
    print()
    for key, setup in SETUPS.items():
        print(f"({key}) {setup}")
    for model in models:
        print(f"\n{model.key}: {model.description}")
        print(HEADER)
        for run in runs:
            if run.model == model.key:
                print(format_row(run))
        print(summaries[model.key])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    limits = Limits(
        args.requests, args.time_limit_s, args.warmup_requests, args.warmup_s, tuple(args.concurrency)
    )
    models = [model for model in bench_models() if model.key in args.models]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="scoremesh-bench-") as tmp:
        workdir = Path(tmp)
        async with database(resolve_database_url(os.environ), workdir) as database_url:
            registry_env = {"SCOREMESH_DATABASE_URL": database_url, "SCOREMESH_REGISTRY_PORT": "0"}
            async with service_process("registry", workdir / "registry", registry_env) as registry:
                versions = await publish(
                    registry.address, models, workdir, caller=CALLER, max_batch_size=MAX_BATCH_SIZE
                )
                print(HEADER, flush=True)
                if "a" in args.setups:
                    runs += await bench_direct(workdir, models, versions, limits)
                for setup, backend in (("b", "triton"), ("c", "onnxruntime")):
                    if setup in args.setups:
                        runs += await bench_scoring(
                            setup, backend, workdir, database_url, registry.address, models, versions, limits
                        )
                data_plane = (
                    await bench_data_plane(workdir, database_url, registry.address, models, limits)
                    if "d" in args.setups
                    else {}
                )
    summaries = {model.key: goals(runs, model.key) for model in models}
    print_table(runs, models, summaries)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "limits": asdict(limits),
        "setups": SETUPS,
        "notes": "prediction log off (SCOREMESH_PREDICTION_LOG_RATE=0), response cache off; "
        "server CPU = scoring process + tritonserver + python backend stubs, client CPU = this process",
        "models": {model.key: model.description for model in models},
        "runs": [asdict(run) for run in runs],
        "data_plane": data_plane,
        "goals": summaries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests per measured run (bounded)")
    parser.add_argument("--time-limit-s", type=float, default=15.0, help="upper bound on one measured run")
    parser.add_argument("--warmup-requests", type=int, default=300, help="requests before each run")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="upper bound on one warm-up")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64], help="client coroutines")
    parser.add_argument("--models", nargs="+", default=["tiny", "heavy"], choices=["tiny", "heavy"])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    results = asyncio.run(main_async(parser.parse_args()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
