"""A scoring service built by the production factory on 127.0.0.1:0, beside a registry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.mesh.channels import open_channel
from services.mesh.identity import Caller
from services.scoring import tensors
from services.scoring.backend import Array
from services.scoring.main import Scoring, build_scoring
from services.scoring.oip import pb, pb_grpc
from services.scoring.settings import ScoringSettings
from tests.integration.registry_harness import RunningRegistry, push


@dataclass
class RunningScoring:
    scoring: Scoring
    settings: ScoringSettings
    channel: grpc.aio.Channel
    address: str

    @property
    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)


def scoring_env(home: Path, database_url: str, registry_address: str, **overrides: str) -> dict[str, str]:
    return {
        "SCOREMESH_HOME": str(home),
        "SCOREMESH_DATABASE_URL": database_url,
        "SCOREMESH_SCORING_PORT": "0",
        "SCOREMESH_REGISTRY_ADDR": registry_address,
        "SCOREMESH_LOG_FORMAT": "text",
        "SCOREMESH_CANARY_INTERVAL_S": "0",
        "SCOREMESH_BREAKER_OPEN_S": "0.5",
        **overrides,
    }


@contextlib.asynccontextmanager
async def running_scoring(env: Mapping[str, str]) -> AsyncIterator[RunningScoring]:
    settings = ScoringSettings.from_env(env)
    assert settings.database_url
    scoring = await build_scoring(settings, settings.database_url)
    try:
        port = await scoring.server.start()
        address = f"127.0.0.1:{port}"
        async with open_channel(address, settings.mesh) as channel:
            yield RunningScoring(scoring, settings, channel, address)
    finally:
        await scoring.server.stop(0)
        await scoring.close()


def infer_request(
    model: str, inputs: Mapping[str, Array], *, version: str = "", request_id: str = "", raw: bool = True
) -> pb.ModelInferRequest:
    """A request as a stock client builds it: raw contents (Triton's default), or typed."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        tensor = request.inputs.add(name=name, datatype=tensors.datatype_of(array), shape=array.shape)
        if raw:
            request.raw_input_contents.append(tensors.raw_bytes(array))
        else:
            _set_typed(tensor.contents, array)
    return request


def _set_typed(contents: pb.InferTensorContents, array: Array) -> None:
    flat = array.ravel()
    kind = array.dtype.kind
    if kind == "b":
        contents.bool_contents.extend(flat.tolist())
    elif kind == "f" and array.dtype.itemsize == 8:
        contents.fp64_contents.extend(flat.tolist())
    elif kind == "f":
        contents.fp32_contents.extend(flat.tolist())
    elif kind == "i" and array.dtype.itemsize == 8:
        contents.int64_contents.extend(flat.tolist())
    elif kind == "i":
        contents.int_contents.extend(flat.tolist())
    elif kind == "u" and array.dtype.itemsize == 8:
        contents.uint64_contents.extend(flat.tolist())
    elif kind == "u":
        contents.uint_contents.extend(flat.tolist())
    else:
        contents.bytes_contents.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)


def outputs_of(response: pb.ModelInferResponse) -> dict[str, Array]:
    return {
        spec.name: tensors.from_raw(raw, spec.datatype, list(spec.shape))
        for spec, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


async def publish(
    registry: RunningRegistry, caller: Caller, model: str, data: bytes, *, alias: str = "production"
) -> int:
    """Pushes ``data`` as a version of ``model`` and points ``alias`` at it; returns the version."""
    response = await push(registry.stub, caller, model, data, alias=alias)
    assert response.version.status == 1, response.version.verification  # READY
    return int(response.version.version)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 30.0) -> None:
    """Polls ``check`` until it holds, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)
