"""What Triton is told about a registry version: its model name, its ``config.pbtxt`` (as the
JSON that ``load_model`` takes) and the files that make it up.

Pure functions, no I/O. The model never exists on Triton's disk: ``TritonBackend.load`` sends
the config and the files with the ``RepositoryModelLoad`` call, and Triton writes them to a
private temporary repository of its own.

Two ways to run an ONNX graph are generated:

* ``python`` backend (the default, and the only one the ``nvidia-pytriton`` wheel ships): a
  ``model.py`` (:data:`PYTHON_MODEL_SOURCE`) opens ``model.onnx`` with onnxruntime, CUDA
  provider when available, and runs what Triton's dynamic batcher hands it;
* ``onnxruntime`` backend (``platform: onnxruntime_onnx``), for a full Triton build such as
  the NGC container, where Triton runs the graph itself.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Final

from services.registry.domain import TensorSpec
from services.scoring.backend import LoadedVersion

__all__ = [
    "PYTHON_MODEL_SOURCE",
    "TRITON_DATATYPES",
    "TritonBackendKind",
    "model_config",
    "model_config_json",
    "model_files",
    "triton_model_name",
]

# Open Inference Protocol datatype -> Triton's model-config data type. "STRING" is accepted as
# a synonym of BYTES (ONNX calls the type STRING; OIP and Triton's wire format say BYTES).
TRITON_DATATYPES: Final[dict[str, str]] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "STRING": "TYPE_STRING",
}

# Triton's version directory for the one version each Triton model holds: a registry version
# becomes a Triton model of its own (see triton_model_name), always at Triton version 1.
TRITON_VERSION: Final = "1"
ONNX_FILE: Final = "model.onnx"
PYTHON_FILE: Final = "model.py"

DEFAULT_QUEUE_DELAY_US: Final = 100
"""How long Triton's dynamic batcher may hold a request to gather more (microseconds)."""


class TritonBackendKind(enum.Enum):
    """How Triton runs the ONNX graph."""

    PYTHON = "python"
    """The python backend running ``model.py`` (onnxruntime in a stub process)."""
    ONNXRUNTIME = "onnxruntime"
    """Triton's own onnxruntime backend (``platform: onnxruntime_onnx``)."""


def triton_model_name(model: str, version: int) -> str:
    """The Triton model that holds one registry version: ``<model>.v<version>``.

    Injective: a registry model name never contains ``..`` and the version's digits contain
    no ``.v``, so splitting at the last ``.v`` gives back (model, version). Each version is a
    Triton model of its own so that two versions of one model load, warm up and unload
    independently during a rollout."""
    if version < 1:
        raise ValueError(f"version must be positive, got {version}")
    return f"{model}.v{version}"


def model_config(
    version: LoadedVersion,
    *,
    gpu: bool,
    kind: TritonBackendKind = TritonBackendKind.PYTHON,
    instance_count: int = 1,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> dict[str, Any]:
    """Triton's ``ModelConfig`` for ``version``, as the dict that its JSON form parses to.

    When ``version.max_batch_size`` > 0 the first dimension of every tensor is the batch: it
    is left out of ``dims`` (Triton adds it back) and dynamic batching is on. ``gpu`` picks
    ``KIND_GPU`` instances over ``KIND_CPU``."""
    batching = version.max_batch_size > 0
    if kind is TritonBackendKind.PYTHON:
        bf16 = [t.name for t in version.signature.inputs + version.signature.outputs if t.datatype == "BF16"]
        if bf16:
            # the python backend hands tensors over as numpy arrays, and numpy has no bfloat16
            raise ValueError(f"Triton's python backend cannot pass BF16 tensors ({', '.join(bf16)})")
    config: dict[str, Any] = {
        "name": triton_model_name(version.model, version.version),
        "max_batch_size": max(0, version.max_batch_size),
        "input": [_tensor_config(spec, batching) for spec in version.signature.inputs],
        "output": [_tensor_config(spec, batching) for spec in version.signature.outputs],
        "instance_group": [{"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": instance_count}],
        # one Triton model per registry version, at Triton version 1 (see triton_model_name)
        "version_policy": {"specific": {"versions": [int(TRITON_VERSION)]}},
    }
    if kind is TritonBackendKind.PYTHON:
        config["backend"] = "python"
    else:
        config["backend"] = "onnxruntime"
        config["platform"] = "onnxruntime_onnx"
    if batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": queue_delay_us}
    return config


def model_config_json(
    version: LoadedVersion,
    *,
    gpu: bool,
    kind: TritonBackendKind = TritonBackendKind.PYTHON,
    instance_count: int = 1,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> str:
    """:func:`model_config` as the JSON string that ``load_model(config=...)`` takes."""
    return json.dumps(
        model_config(
            version, gpu=gpu, kind=kind, instance_count=instance_count, queue_delay_us=queue_delay_us
        ),
        sort_keys=True,
    )


def model_files(
    version: LoadedVersion, kind: TritonBackendKind = TritonBackendKind.PYTHON
) -> dict[str, bytes]:
    """The files of ``load_model(files=...)``: keys are ``file:<path in the model directory>``."""
    files = {f"file:{TRITON_VERSION}/{ONNX_FILE}": version.onnx_bytes}
    if kind is TritonBackendKind.PYTHON:
        files[f"file:{TRITON_VERSION}/{PYTHON_FILE}"] = PYTHON_MODEL_SOURCE.encode()
    return files


def batch_dims(spec: TensorSpec, batching: bool) -> list[int]:
    """The dims Triton's config lists for ``spec``: without the batch dimension when batching."""
    if not batching:
        return list(spec.shape)
    if not spec.shape:
        raise ValueError(f"tensor {spec.name!r} is a scalar but the model batches")
    return list(spec.shape[1:])


def needs_unit_axis(spec: TensorSpec, batching: bool) -> bool:
    """True when ``spec`` has no dims besides the batch (or none at all): on the wire to
    Triton it then carries a trailing axis of size 1, which the caller adds to inputs and
    removes from outputs."""
    return not batch_dims(spec, batching)


def _tensor_config(spec: TensorSpec, batching: bool) -> dict[str, Any]:
    try:
        data_type = TRITON_DATATYPES[spec.datatype]
    except KeyError:
        raise ValueError(
            f"tensor {spec.name!r} has a datatype Triton cannot carry: {spec.datatype}"
        ) from None
    dims = batch_dims(spec, batching)
    config: dict[str, Any] = {"name": spec.name, "data_type": data_type, "dims": dims}
    if needs_unit_axis(spec, batching):
        # Triton wants at least one dim: a scalar, or a tensor of one value per row, travels
        # with a trailing axis of 1 that Triton reshapes away before the model sees it
        config["dims"] = [1]
        config["reshape"] = {"shape": []}
    return config


# The python backend's model: it runs in Triton's stub process, with the venv's python3.
# It must import only numpy, onnxruntime and triton_python_backend_utils.
PYTHON_MODEL_SOURCE: Final = '''\
"""Generated by scoremesh (services/scoring/triton_config.py): runs model.onnx with onnxruntime."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _error(message, invalid):
    code = None
    if invalid:
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


def _invalid(exc):
    # onnxruntime reports bad inputs (shapes, values) as these; anything else is the model's fault
    return type(exc).__name__ in ("InvalidArgument", "Fail", "InvalidGraph") or isinstance(
        exc, (ValueError, UnicodeDecodeError)
    )


def _decoded(array):
    flat = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return np.array(flat, dtype=object).reshape(array.shape)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.batching = int(config.get("max_batch_size", 0)) > 0
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        providers = ["CPUExecutionProvider"]
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if args.get("model_instance_kind") == "GPU" and cuda:
            device = int(args.get("model_instance_device_id", 0))
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # spinning intra-op threads would take CPU that Triton's own threads need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.string_inputs = {i.name for i in self.session.get_inputs() if i.type == "tensor(string)"}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _feeds(self, request):
        feeds = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError("missing input " + name)
            array = tensor.as_numpy()
            if name in self.string_inputs:
                # Triton hands BYTES as bytes objects; onnxruntime wants str
                array = _decoded(array)
            feeds[name] = array
        return feeds

    def _wanted(self, request):
        names = list(request.requested_output_names())
        return names or self.outputs

    def _respond(self, results, wanted):
        tensors = []
        for name, value in zip(self.outputs, results):
            if name in wanted:
                value = np.asarray(value)
                if value.dtype.kind == "U":
                    value = value.astype(object)
                tensors.append(pb_utils.Tensor(name, value))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run_one(self, request):
        try:
            results = self.session.run(None, self._feeds(request))
            return self._respond(results, self._wanted(request))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, not raised
            return pb_utils.InferenceResponse(error=_error(str(exc), _invalid(exc)))

    def _run_group(self, group):
        # several requests with the same row shape: one session run over their rows
        try:
            feeds_per_request = [self._feeds(r) for r in group]
            rows = [len(next(iter(f.values()))) if f else 0 for f in feeds_per_request]
            feeds = {n: np.concatenate([f[n] for f in feeds_per_request], axis=0) for n in self.inputs}
            results = self.session.run(None, feeds)
        except Exception:  # noqa: BLE001 - one bad request must not fail the others
            return [self._run_one(r) for r in group]
        responses = []
        start = 0
        for request, count in zip(group, rows):
            part = [np.asarray(value)[start : start + count] for value in results]
            responses.append(self._respond(part, self._wanted(request)))
            start += count
        return responses

    def execute(self, requests):
        if not self.batching or len(requests) == 1:
            return [self._run_one(r) for r in requests]
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            key = []
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                key.append(None if tensor is None else tuple(tensor.as_numpy().shape[1:]))
            groups.setdefault(tuple(key), []).append(index)
        for indexes in groups.values():
            if len(indexes) == 1:
                responses[indexes[0]] = self._run_one(requests[indexes[0]])
                continue
            for index, response in zip(indexes, self._run_group([requests[i] for i in indexes])):
                responses[index] = response
        return responses

    def finalize(self):
        self.session = None
'''
