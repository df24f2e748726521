"""Gateway benchmark: single-row scoring as REST through the gateway versus gRPC straight to
the scoring service.

Two paths to one scoring process (onnxruntime in-process, a tiny model):

* ``grpc``: ``inference.GRPCInferenceService/ModelInfer`` on the scoring service, as a mesh
  client calls it (the internal token and a tenant in metadata);
* ``rest``: ``POST /v2/models/{name}/infer`` with a KServe v2 JSON body on the gateway, with
  the admin key as Bearer key; the gateway checks the key and its rate, turns the JSON into a
  ``ModelInferRequest``, calls the same scoring service and writes the answer back as JSON.

Each path runs at concurrency 16 and 64, the same number of requests: a warm-up, then
``--requests`` requests or ``--time-limit-s``, whichever ends first; the whole round is
repeated ``--repeats`` times, paths alternating. Every client is its own process (so neither
steals the other's CPU, and its CPU is measured apart); it checks a few answers against
onnxruntime first, and reads the CPU time of the gateway, scoring, registry and PostgreSQL
process trees, and of the whole machine, from /proc around its measured run. The goal (the
issue's): REST keeps at least 70% of the gRPC throughput, judged on the repeats that other
work on the machine left quiet (see :func:`goals`).

Run with ``make bench`` (or ``.venv/bin/python -m bench.gateway``). A private PostgreSQL (or
``SCOREMESH_DATABASE_URL``) backs registry and gateway; every server binds 127.0.0.1 on a port
the OS picks; every loop is bounded in count and time; every process started here is ended by
its pid. Results are printed and written to ``bench/results/gateway.json``; bench/README.md
records them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import grpc
import grpc.aio
import numpy as np
import onnxruntime as ort

from bench.common import (
    CLOCK_TICKS,
    BenchModel,
    bounded_load,
    cpu_delta,
    cpu_snapshot,
    machine_ticks,
    percentile,
    postmaster_pid,
    publish,
    scoring_env,
    service_process,
    stop_process,
)
from services.gateway.keys import ADMIN_KEY_FILE
from services.mesh.identity import DEFAULT_TENANT, INTERNAL_HEADER, Caller
from services.mesh.postgres import database, resolve_database_url
from services.scoring.oip import SERVICE_NAME, pb
from tests import onnx_factory

RESULTS: Final = Path(__file__).parent / "results" / "gateway.json"
MODEL: Final = BenchModel(
    "tiny", "bench-gateway", "tiny_classifier(4 -> 3)", onnx_factory.tiny_classifier(4, 3), 4
)
CALLER: Final = Caller(tenant=DEFAULT_TENANT, principal="bench")
"""The tenant of the admin key the gateway creates: both paths must reach the same model."""
BACKEND: Final = "onnxruntime"
MAX_BATCH_SIZE: Final = 64
CALL_TIMEOUT_S: Final = 10.0
FIRST_CALL_TIMEOUT_S: Final = 60.0
"""The first request loads the model."""
DISTINCT_ROWS: Final = 64
CHECKED_ROWS: Final = 4
MODEL_INFER: Final = f"/{SERVICE_NAME}/ModelInfer"
RATE_UNLIMITED: Final = "1000000"
"""SCOREMESH_GATEWAY_RATE and _BURST: high enough that no request is refused."""
GOAL: Final = 0.7
"""REST req/s ÷ gRPC req/s at each concurrency."""
QUIET_PCT: Final = 5.0
"""A run during which other processes used more than this share of the machine is noisy."""
PATHS: Final = {
    "grpc": "gRPC client -> scoring",
    "rest": "REST client -> gateway -> scoring",
}
ROLES: Final = ("gateway", "scoring", "postgres", "registry")
"""The server processes whose CPU each run reports, as trees (PostgreSQL's backends are
children of its postmaster)."""


@dataclass(frozen=True)
class Limits:
    requests: int
    time_limit_s: float
    warmup_requests: int
    warmup_s: float


@dataclass(frozen=True)
class Plan:
    """What one bench run measures: every path at every concurrency, ``repeats`` times over,
    alternating paths so that a noisy moment on the shared machine hits both."""

    paths: Sequence[str]
    concurrencies: Sequence[int]
    repeats: int
    limits: Limits


@dataclass(frozen=True)
class ClientJob:
    """What one client process does: which path, where to, with which credential, how hard,
    and whose CPU to account."""

    repeat: int
    path: str
    target: str
    """The gateway's base URL (rest) or the scoring service's host:port (grpc)."""
    credential: str
    """The API key (rest) or the mesh's internal token (grpc)."""
    concurrency: int
    limits: Limits
    servers: Mapping[str, Sequence[int]]
    """Roots of the process trees of each role in ROLES (empty where unknown)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientJob:
        fields = json.loads(text)
        return cls(**{**fields, "limits": Limits(**fields["limits"])})


@dataclass(frozen=True)
class Run:
    repeat: int
    path: str
    concurrency: int
    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: dict[str, float]
    """Server CPU (user + system) per request, by role."""
    client_cpu_us_per_req: float
    other_cpu_pct: float
    """CPU that processes other than these used during the run, in % of the machine (other
    work on a shared machine)."""
    steal_pct: float
    """The share of the machine's CPU time the hypervisor gave to other tenants."""

    @property
    def total_cpu_us_per_req(self) -> float:
        return round(sum(self.cpu_us_per_req.values()) + self.client_cpu_us_per_req, 1)


# what the clients send


def bench_rows() -> np.ndarray[Any, Any]:
    """DISTINCT_ROWS single rows, the same in every process."""
    rng = np.random.default_rng(7)
    rows: np.ndarray[Any, Any] = rng.standard_normal((DISTINCT_ROWS, 1, MODEL.features)).astype(np.float32)
    return rows


def rest_body(row: np.ndarray[Any, Any]) -> bytes:
    tensor = {"name": "input", "shape": list(row.shape), "datatype": "FP32", "data": row.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def grpc_request(row: np.ndarray[Any, Any]) -> bytes:
    request = pb.ModelInferRequest(model_name=MODEL.name)
    request.inputs.add(name="input", datatype="FP32", shape=row.shape)
    request.raw_input_contents.append(row.tobytes())
    serialized: bytes = request.SerializeToString()
    return serialized


class Client(Protocol):
    """One path's client: requests are built once, so what is measured is the serving path,
    not the client building them."""

    async def send(self, index: int) -> None:
        """Sends row ``index`` (modulo DISTINCT_ROWS); raises unless it succeeded."""

    async def answer(self, index: int, timeout: float) -> np.ndarray[Any, Any]:
        """Row ``index``'s first output, decoded."""


class RestClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, rows: np.ndarray[Any, Any]) -> None:
        self._session = session
        self._url = url
        self._bodies = [rest_body(row) for row in rows]

    async def _post(self, index: int, timeout: float) -> bytes:
        body = self._bodies[index % len(self._bodies)]
        async with self._session.post(
            self._url, data=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
            return payload

    async def send(self, index: int) -> None:
        await self._post(index, CALL_TIMEOUT_S)

    async def answer(self, index: int, timeout: float) -> np.ndarray[Any, Any]:
        output = json.loads(await self._post(index, timeout))["outputs"][0]
        return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


class GrpcClient:
    def __init__(self, channel: grpc.aio.Channel, token: str, rows: np.ndarray[Any, Any]) -> None:
        # no (de)serializers: requests go serialized and answers come back as bytes, as the
        # REST client's do
        self._call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        self._requests = [grpc_request(row) for row in rows]
        self._metadata = (*CALLER.metadata(), (INTERNAL_HEADER, token))

    async def _infer(self, index: int, timeout: float) -> bytes:
        request = self._requests[index % len(self._requests)]
        payload: bytes = await self._call(request, metadata=self._metadata, timeout=timeout)
        return payload

    async def send(self, index: int) -> None:
        await self._infer(index, CALL_TIMEOUT_S)

    async def answer(self, index: int, timeout: float) -> np.ndarray[Any, Any]:
        response = pb.ModelInferResponse.FromString(await self._infer(index, timeout))
        output = response.outputs[0]
        raw = response.raw_output_contents[0]
        return np.frombuffer(raw, dtype=np.float32).reshape(list(output.shape))


@contextlib.asynccontextmanager
async def open_client(job: ClientJob, rows: np.ndarray[Any, Any]) -> AsyncIterator[Client]:
    if job.path == "rest":
        headers = {"Authorization": f"Bearer {job.credential}", "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=job.concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            yield RestClient(session, f"{job.target}/v2/models/{MODEL.name}/infer", rows)
    elif job.path == "grpc":
        async with grpc.aio.insecure_channel(job.target) as channel:
            yield GrpcClient(channel, job.credential, rows)
    else:
        raise ValueError(f"unknown path {job.path!r}")


# one client process


async def check_answers(client: Client, rows: np.ndarray[Any, Any]) -> None:
    """A few answers must match onnxruntime run here: a fast wrong answer is no result."""
    session = ort.InferenceSession(MODEL.onnx, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    for index in range(CHECKED_ROWS):
        expected = session.run([output], {"input": rows[index]})[0]
        answer = await client.answer(index, FIRST_CALL_TIMEOUT_S)
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)


def _server_cpu(servers: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
    return {role: cpu_snapshot(pids) for role, pids in servers.items()}


async def run_client(job: ClientJob) -> Run:
    rows = bench_rows()
    limits = job.limits
    async with open_client(job, rows) as client:
        await check_answers(client, rows)
        # a warm-up at the same concurrency, so that connections, queues and allocators settle
        await bounded_load(client.send, job.concurrency, limits.warmup_requests, limits.warmup_s)
        servers_before = _server_cpu(job.servers)
        ticks_before = machine_ticks()
        client_started = time.process_time()
        started = time.perf_counter()
        latencies = await bounded_load(client.send, job.concurrency, limits.requests, limits.time_limit_s)
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_started
        ticks_after = machine_ticks()
        servers_after = _server_cpu(job.servers)
    count = len(latencies)
    server_cpu = {role: cpu_delta(servers_before[role], servers_after[role]) for role in job.servers}
    busy = (ticks_after.busy - ticks_before.busy) / CLOCK_TICKS
    others = max(0.0, busy - sum(server_cpu.values()) - client_cpu)
    return Run(
        repeat=job.repeat,
        path=job.path,
        concurrency=job.concurrency,
        requests=count,
        seconds=round(elapsed, 2),
        req_per_s=round(count / elapsed, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        cpu_us_per_req={role: round(cpu / count * 1e6, 1) for role, cpu in server_cpu.items()},
        client_cpu_us_per_req=round(client_cpu / count * 1e6, 1),
        other_cpu_pct=round(100 * others / (elapsed * (os.cpu_count() or 1)), 1),
        steal_pct=round(
            100 * (ticks_after.steal - ticks_before.steal) / max(1, ticks_after.total - ticks_before.total), 1
        ),
    )


async def measure(job: ClientJob) -> Run:
    """Runs ``job`` in a client process of its own and returns what it measured."""
    # the job goes through stdin: it holds the API key and the internal token, which a
    # command line would show to every user of the machine
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.gateway",
        "--client",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    limits = job.limits
    timeout = FIRST_CALL_TIMEOUT_S + limits.warmup_s + limits.time_limit_s + 60
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(job.to_json().encode()), timeout)
    finally:
        await asyncio.shield(stop_process(process))
    if process.returncode != 0:
        raise RuntimeError(
            f"the {job.path} client at concurrency {job.concurrency} exited with {process.returncode}"
        )
    fields = json.loads(stdout.decode().strip().splitlines()[-1])
    return Run(**fields)


# the mesh


async def bench_mesh(workdir: Path, plan: Plan) -> list[Run]:
    token = secrets.token_urlsafe(32)
    shared = {"SCOREMESH_INTERNAL_TOKEN": token}
    async with database(resolve_database_url(os.environ), workdir) as database_url:
        postgres = await postmaster_pid(database_url)
        registry_env = {**shared, "SCOREMESH_DATABASE_URL": database_url, "SCOREMESH_REGISTRY_PORT": "0"}
        async with service_process("registry", workdir / "registry", registry_env) as registry:
            await publish(
                registry.address,
                [MODEL],
                workdir,
                caller=CALLER,
                max_batch_size=MAX_BATCH_SIZE,
                internal_token=token,
            )
            env = {**shared, **scoring_env(database_url, registry.address, BACKEND, MAX_BATCH_SIZE)}
            async with service_process("scoring", workdir / "scoring", env) as scoring:
                gateway_env = {
                    **shared,
                    "SCOREMESH_DATABASE_URL": database_url,
                    "SCOREMESH_GATEWAY_PORT": "0",
                    "SCOREMESH_GATEWAY_GRPC_PORT": "0",
                    "SCOREMESH_REGISTRY_ADDR": registry.address,
                    "SCOREMESH_SCORING_ADDR": scoring.address,
                    "SCOREMESH_GATEWAY_RATE": RATE_UNLIMITED,
                    "SCOREMESH_GATEWAY_BURST": RATE_UNLIMITED,
                }
                gateway_home = workdir / "gateway"
                async with service_process(
                    "gateway", gateway_home, gateway_env, stdout=asyncio.subprocess.DEVNULL
                ) as gateway:
                    # written before the gateway announces its address
                    admin_key = (gateway_home / ADMIN_KEY_FILE).read_text().strip()
                    servers = {
                        "gateway": [gateway.pid],
                        "scoring": [scoring.pid],
                        "postgres": [] if postgres is None else [postgres],
                        "registry": [registry.pid],
                    }
                    targets = {
                        "grpc": (scoring.address, token),
                        "rest": (f"http://{gateway.address}", admin_key),
                    }
                    runs = []
                    print(HEADER, flush=True)
                    for repeat in range(1, plan.repeats + 1):
                        for concurrency in plan.concurrencies:
                            for path in plan.paths:
                                target, credential = targets[path]
                                job = ClientJob(
                                    repeat, path, target, credential, concurrency, plan.limits, servers
                                )
                                run = await measure(job)
                                print(format_row(run), flush=True)
                                runs.append(run)
                    return runs


# reporting


HEADER: Final = (
    f"{'#':>2} {'path':<5} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
    + " ".join(f"{role + ' µs':>11}" for role in ROLES)
    + f" {'client µs':>9} {'total µs':>8} {'others %':>8} {'steal %':>7}"
)


def format_row(run: Run) -> str:
    return (
        f"{run.repeat:>2} {run.path:<5} {run.concurrency:>4} {run.req_per_s:>7.0f}"
        f" {run.p50_ms:>7.2f} {run.p99_ms:>7.2f} "
        + " ".join(f"{run.cpu_us_per_req.get(role, 0.0):>11.0f}" for role in ROLES)
        + f" {run.client_cpu_us_per_req:>9.0f} {run.total_cpu_us_per_req:>8.0f}"
        f" {run.other_cpu_pct:>8.1f} {run.steal_pct:>7.1f}"
    )


def goals(runs: Sequence[Run]) -> dict[str, Any]:
    """Whether REST keeps GOAL of the gRPC req/s at each concurrency.

    Other work on the shared machine moves req/s by ±40%, so the verdict is the median ratio
    of the quiet pairs (gRPC and REST of one repeat, neither above QUIET_PCT), or of all pairs
    when none was quiet (then ``noisy``). Beside it, the ratio that CPU alone predicts when
    the two cores are the limit: gRPC's total CPU per request ÷ REST's, which noise moves
    little."""
    summary: dict[str, Any] = {}
    for concurrency in sorted({run.concurrency for run in runs}):
        pairs: list[tuple[Run, Run]] = []
        for repeat in sorted({run.repeat for run in runs}):
            pair = {run.path: run for run in runs if (run.repeat, run.concurrency) == (repeat, concurrency)}
            if "grpc" in pair and "rest" in pair:
                pairs.append((pair["grpc"], pair["rest"]))
        if not pairs:
            continue
        quiet = [(g, r) for g, r in pairs if max(g.other_cpu_pct, r.other_cpu_pct) <= QUIET_PCT]
        ratio = statistics.median(r.req_per_s / g.req_per_s for g, r in quiet or pairs)
        cpu_ratio = statistics.median(g.total_cpu_us_per_req for g, _ in pairs) / statistics.median(
            r.total_cpu_us_per_req for _, r in pairs
        )
        summary[f"c{concurrency}"] = {
            "rest_over_grpc_per_repeat": [round(r.req_per_s / g.req_per_s, 2) for g, r in pairs],
            "quiet_repeats": [g.repeat for g, _ in quiet],
            "rest_over_grpc": round(ratio, 3),
            "noisy": not quiet,
            "met": ratio >= GOAL,
            "rest_over_grpc_cpu_bound": round(cpu_ratio, 2),
            "gateway_cpu_us_per_req": statistics.median(r.cpu_us_per_req["gateway"] for _, r in pairs),
        }
    return summary


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    limits = Limits(args.requests, args.time_limit_s, args.warmup_requests, args.warmup_s)
    plan = Plan(args.paths, args.concurrency, args.repeats, limits)
    with tempfile.TemporaryDirectory(prefix="scoremesh-bench-") as tmp:
        runs = await bench_mesh(Path(tmp), plan)
    summary = goals(runs)
    for concurrency, result in summary.items():
        print(concurrency, result)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "limits": asdict(limits),
        "paths": PATHS,
        "model": MODEL.description,
        "notes": f"scoring backend {BACKEND} in-process for both paths; prediction log, response "
        "cache and canaries off; each client in its own process; CPU in µs per request",
        "runs": [{**asdict(run), "total_cpu_us_per_req": run.total_cpu_us_per_req} for run in runs],
        "goals": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests per measured run (bounded)")
    parser.add_argument("--time-limit-s", type=float, default=30.0, help="upper bound on one measured run")
    parser.add_argument("--warmup-requests", type=int, default=300, help="requests before each run")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="upper bound on one warm-up")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64], help="client coroutines")
    parser.add_argument(
        "--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="what to measure"
    )
    parser.add_argument("--repeats", type=int, default=5, help="times every path and concurrency is measured")
    # what the bench process starts for each run: one client, its job as JSON on stdin
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run = asyncio.run(run_client(ClientJob.from_json(sys.stdin.read())))
        print(json.dumps(asdict(run)), flush=True)
        return
    results = asyncio.run(main_async(args))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
