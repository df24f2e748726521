"""``scoremesh score``: one inference through the scoring service, inputs read from .npy files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from services.mesh.channels import open_channel
from services.mesh.errors import InvalidArgument
from services.mesh.identity import Caller
from services.mesh.settings import MeshSettings
from services.registry.client import Reference
from services.scoring import tensors
from services.scoring.oip import pb, pb_grpc


def _load(name: str, path: Path) -> np.ndarray[Any, Any]:
    try:
        array: np.ndarray[Any, Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InvalidArgument.for_field(f"inputs.{name}", f"cannot read {path}: {error}") from None
    return array


def request_for(reference: Reference, inputs: Mapping[str, Path]) -> pb.ModelInferRequest:
    version = str(reference.version) if reference.version is not None else reference.alias or ""
    request = pb.ModelInferRequest(model_name=reference.model, model_version=version)
    for name, path in inputs.items():
        array = _load(name, path)
        request.inputs.add(name=name, datatype=tensors.datatype_of(array), shape=array.shape)
        request.raw_input_contents.append(tensors.raw_bytes(array))
    return request


def _output(response: pb.ModelInferResponse, index: int) -> dict[str, Any]:
    spec = response.outputs[index]
    array = tensors.from_raw(response.raw_output_contents[index], spec.datatype, list(spec.shape))
    data = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in array.ravel()]
    values = (
        np.array(data, dtype=object).reshape(array.shape).tolist()
        if array.dtype.kind == "O"
        else array.tolist()
    )
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape), "data": values}


async def score(
    address: str,
    settings: MeshSettings,
    caller: Caller,
    reference: Reference,
    inputs: Mapping[str, Path],
    *,
    timeout_s: float,
) -> dict[str, Any]:
    request = request_for(reference, inputs)
    async with open_channel(address, settings) as channel:
        response: pb.ModelInferResponse = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=caller.metadata(), timeout=timeout_s
        )
    backend = response.parameters["backend"].string_param
    result: dict[str, Any] = {
        "model": response.model_name,
        "version": int(response.model_version),
        "backend": backend,
        "outputs": [_output(response, i) for i in range(len(response.outputs))],
    }
    if "request_id" in response.parameters:
        result["request_id"] = response.parameters["request_id"].string_param
    return result
