"""The child process that verifies one ONNX artifact; started only by ``verify_onnx``.

    python -m services.registry.verify_worker --limits '{"min_opset": 7, ...}' MODEL.onnx

It limits its own memory first, then parses the model, runs the static checks and, when all
of them passed, one trial inference. It writes one JSON object per line on the stdout it was
given: a ``check`` line per check in ``CHECK_NAMES`` order, a ``model`` line (opset and
signature) before the trial, or a single ``not_onnx`` line. Everything else, including
whatever native libraries print, goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import onnx
import onnx.checker
import onnx.shape_inference
import onnxruntime as ort
from onnx import TensorProto

from services.registry.domain import TensorSpec
from services.registry.verification import CHECK_NAMES, STATIC_CHECK_NAMES, VerificationLimits

log = logging.getLogger(__name__)

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
DEFAULT_DOMAINS = ("", "ai.onnx")

OIP_DATATYPES: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
}

# Bits per element as onnxruntime holds them; a string is a std::string (32 bytes) plus its
# characters, which a declared shape cannot tell.
_ELEMENT_BITS: dict[int, int] = {
    TensorProto.BOOL: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT8: 8,
    TensorProto.UINT16: 16,
    TensorProto.INT16: 16,
    TensorProto.FLOAT16: 16,
    TensorProto.BFLOAT16: 16,
    TensorProto.UINT32: 32,
    TensorProto.INT32: 32,
    TensorProto.FLOAT: 32,
    TensorProto.UINT64: 64,
    TensorProto.INT64: 64,
    TensorProto.DOUBLE: 64,
    TensorProto.COMPLEX64: 64,
    TensorProto.COMPLEX128: 128,
    TensorProto.STRING: 256,
    TensorProto.UINT4: 4,
    TensorProto.INT4: 4,
    TensorProto.FLOAT4E2M1: 4,
}
_DEFAULT_ELEMENT_BITS = 8  # the float8 family and anything newer

# Initializers above this size are swapped for typed graph inputs before shape inference,
# which copies the whole model twice; inference needs the values only of small tensors
# (shapes, axes, pads), never of weights.
_SHAPE_INFERENCE_VALUE_BYTES = 64 * 1024
_DETAIL_CHARS = 600
_NAME_CHARS = 80
_LISTED = 5
_MEMORY_HINTS = ("bad_alloc", "Failed to allocate memory", "Cannot allocate memory", "out of memory")


class NotOnnx(Exception):
    """The bytes are no ONNX model at all."""


class CheckFailed(Exception):
    """A check's verdict: the artifact fails it for the reason given."""


@dataclass
class Context:
    """What the checks share; ``model`` is dropped before the trial to free its memory."""

    path: Path
    limits: VerificationLimits
    model: onnx.ModelProto
    inferred: onnx.GraphProto | None = None
    opset: int = 0
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


class Reporter:
    """Writes the protocol's JSON lines to a stream nothing else writes to."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def send(self, message: dict[str, Any]) -> None:
        self._stream.write(json.dumps(message) + "\n")
        self._stream.flush()

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.send({"type": "check", "name": name, "passed": passed, "detail": _clip(detail)})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limits", required=True, help="VerificationLimits as a JSON object")
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    limits = VerificationLimits(**json.loads(args.limits))
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="verify_worker: %(message)s")
    reporter = Reporter(_private_stdout())
    _limit_resources(limits)
    # The checker reads its own copy of the file; running it before the model is parsed
    # here keeps the two copies from being alive at once, so the peak stays near twice
    # the artifact's size. Its verdict waits until the bytes are known to be ONNX.
    checker = _attempt("checker", lambda: check_checker(args.path), limits)
    try:
        context = Context(args.path, limits, load(args.path, limits.trial_memory_bytes))
    except NotOnnx as error:
        reporter.send({"type": "not_onnx", "detail": _clip(str(error), 300)})
        return 0
    except MemoryError:
        reporter.check("checker", False, _memory_detail(limits, "while parsing the model"))
        for name in CHECK_NAMES[1:]:
            reporter.check(name, False, "skipped: checker failed")
        return 0
    reporter.check("checker", *checker)
    failed = ["checker"] if not checker[0] else []
    failed += run_static_checks(context, reporter)
    reporter.send(
        {
            "type": "model",
            "opset": context.opset,
            "inputs": [_spec_json(spec) for spec in context.inputs],
            "outputs": [_spec_json(spec) for spec in context.outputs],
        }
    )
    if failed:
        reporter.check("trial_inference", False, f"skipped: {failed[0]} failed")
        return 0
    # the parsed model and its inferred twin can be as large as the artifact; onnxruntime
    # reads its own copy
    del context.model
    context.inferred = None
    reporter.check("trial_inference", *_attempt("trial_inference", lambda: trial_inference(context), limits))
    return 0


def _private_stdout() -> TextIO:
    # Native code (protobuf, onnx, onnxruntime) may print to fd 1; keep the report on a
    # private duplicate and point fd 1 at stderr.
    protocol = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(protocol, "w", encoding="utf-8")


def _limit_resources(limits: VerificationLimits) -> None:
    # RLIMIT_DATA, not RLIMIT_AS: since Linux 4.7 it counts every private writable mapping
    # (heap, anonymous mmap, thread stacks), i.e. the memory a model can actually fill,
    # while ignoring the address space that shared libraries, PROT_NONE reservations
    # (glibc arenas, CUDA) and read-only file mappings take, which RLIMIT_AS counts and
    # which has nothing to do with the model.
    _set_limit(resource.RLIMIT_DATA, limits.trial_memory_bytes)
    # The parent's wall-clock deadline is the real time limit; this CPU-time backstop only
    # stops a spinning worker whose parent died before it could kill it.
    _set_limit(resource.RLIMIT_CPU, math.ceil(limits.check_timeout_s + limits.trial_timeout_s) + 30)
    # a crash must not leave a core dump the size of the limit behind
    _set_limit(resource.RLIMIT_CORE, 0)


def _set_limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def load(path: Path, memory_limit: int) -> onnx.ModelProto:
    """Parses the artifact (without external data), or raises NotOnnx."""
    data = path.read_bytes()
    if not data:
        raise NotOnnx("the file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except MemoryError:
        raise
    except Exception as error:
        # upb reports running out of memory as a parse error; a parse needs about the
        # size of the input again, so without that much headroom, do not call it junk
        if _data_bytes() + len(data) > memory_limit:
            raise MemoryError from None
        raise NotOnnx(f"not a protobuf ModelProto ({_first_line(error)})") from None
    # protobuf is lenient: many byte strings parse as a message with only unknown fields
    if model.ir_version <= 0:
        raise NotOnnx("no ONNX IR version")
    if not model.HasField("graph"):
        raise NotOnnx("no graph")
    return model


def _data_bytes() -> int:
    """The process's private writable memory, what RLIMIT_DATA limits (0 if unknown)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_static_checks(context: Context, reporter: Reporter) -> list[str]:
    """Runs the checks after ``checker`` but for the trial, reporting each as it ends;
    returns the names of those that failed. Each runs whatever the others found."""
    checks: dict[str, Callable[[Context], str]] = {
        "shape_inference": check_shape_inference,
        "opset": check_opset,
        "external_data": check_external_data,
        "tensor_sizes": check_tensor_sizes,
        "operators": check_operators,
        "signature": check_signature,
    }
    assert ("checker", *checks) == STATIC_CHECK_NAMES
    failed: list[str] = []
    for name, check in checks.items():
        passed, detail = _attempt(name, functools.partial(check, context), context.limits)
        if not passed:
            failed.append(name)
        reporter.check(name, passed, detail)
    return failed


def _attempt(name: str, check: Callable[[], str], limits: VerificationLimits) -> tuple[bool, str]:
    """Runs one check: (True, detail) when it passes, (False, reason) otherwise."""
    try:
        return True, check()
    except CheckFailed as verdict:
        return False, str(verdict)
    except MemoryError:
        return False, _memory_detail(limits, "")
    except Exception as error:
        # a bug of ours or of onnx on this input: fail safe and keep the traceback
        log.exception("check %s raised", name)
        return False, f"internal error: {type(error).__name__}: {_first_line(error)}"


# the static checks: each returns a detail for a pass or raises CheckFailed


def check_checker(path: Path) -> str:
    try:
        # the path, not the proto: onnx refuses to serialize protos over 2 GB
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise CheckFailed(_redact(_message(error), path)) from None
    return ""


def check_shape_inference(context: Context) -> str:
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _skeleton(context.model), check_type=True, strict_mode=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise CheckFailed(_message(error)) from None
    context.inferred = inferred.graph
    return ""


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers replaced by graph inputs of the same type."""
    graph = model.graph
    declared = {value.name for value in graph.input}
    small: list[TensorProto] = []
    stand_ins: list[onnx.ValueInfoProto] = []
    for tensor in graph.initializer:
        # by dims, not ByteSize(): upb's ByteSize serializes the tensor to measure it
        if _stored_bytes(tensor) <= _SHAPE_INFERENCE_VALUE_BYTES:
            small.append(tensor)
        elif tensor.name not in declared:
            stand_ins.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    skeleton_graph = onnx.GraphProto(
        name=graph.name,
        node=graph.node,
        input=[*graph.input, *stand_ins],
        output=graph.output,
        value_info=graph.value_info,
        initializer=small,
        sparse_initializer=graph.sparse_initializer,
    )
    return onnx.ModelProto(
        ir_version=model.ir_version,
        opset_import=model.opset_import,
        functions=model.functions,
        graph=skeleton_graph,
    )


def check_opset(context: Context) -> str:
    limits = context.limits
    versions = [entry.version for entry in context.model.opset_import if entry.domain in DEFAULT_DOMAINS]
    if not versions:
        raise CheckFailed("the model imports no ai.onnx opset")
    context.opset = max(versions)
    accepted = f"accepted: {limits.min_opset} to {limits.max_opset}"
    if not limits.min_opset <= context.opset <= limits.max_opset:
        raise CheckFailed(f"ai.onnx opset {context.opset} is not supported ({accepted})")
    return f"ai.onnx opset {context.opset} ({accepted})"


def check_external_data(context: Context) -> str:
    offenders: list[str] = []
    for where, name, tensor in _tensors(context.model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        escape = _escape(location)
        offenders.append(
            f"{where} {_name(name)} in {_name(location)}"
            + (f" (escapes the model's directory: {escape})" if escape else "")
        )
    if offenders:
        raise CheckFailed(
            f"the artifact must be a single file, but {len(offenders)} tensor(s) keep their data in "
            f"external files: {_listing(offenders)}; save the model with all data embedded"
        )
    return "all data embedded"


def _escape(location: str) -> str:
    if location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        return "absolute path"
    if ".." in re.split(r"[\\/]", location):
        return "'..' component"
    return ""


def check_tensor_sizes(context: Context) -> str:
    limit = context.limits.max_tensor_bytes
    sizes: dict[str, tuple[int, str]] = {}

    def note(name: str, size: int, kind: str) -> None:
        if size > sizes.get(name, (-1, ""))[0]:
            sizes[name] = (size, kind)

    for where, name, tensor in _tensors(context.model):
        note(name, _stored_bytes(tensor), where)
    for where, value in _declared_values(context.model.graph, context.inferred):
        size = _declared_bytes(value)
        if size is not None:
            note(value.name, size, where)
    too_big = sorted(
        ((size, name, kind) for name, (size, kind) in sizes.items() if size > limit), reverse=True
    )
    if too_big:
        raise CheckFailed(
            f"{len(too_big)} tensor(s) exceed the limit of {limit} bytes: "
            + _listing([f"{kind} {_name(name)} ({size} bytes)" for size, name, kind in too_big])
        )
    if not sizes:
        return "no tensor of static size"
    size, name, kind = max((size, name, kind) for name, (size, kind) in sizes.items())
    return f"largest: {kind} {_name(name)} ({size} bytes; limit {limit})"


def _stored_bytes(tensor: TensorProto) -> int:
    elements = _product(tensor.dims)
    if tensor.data_type == TensorProto.STRING:
        return elements * 32 + sum(len(s) for s in tensor.string_data)
    return _bytes_for(elements, tensor.data_type)


def _declared_bytes(value: onnx.ValueInfoProto) -> int | None:
    if value.type.WhichOneof("value") != "tensor_type":
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        dims.append(dim.dim_value)
    return _bytes_for(_product(dims), tensor_type.elem_type)


def _product(dims: Sequence[int]) -> int:
    elements = 1
    for dim in dims:
        elements *= max(dim, 0)
    return elements


def _bytes_for(elements: int, elem_type: int) -> int:
    return (elements * _ELEMENT_BITS.get(elem_type, _DEFAULT_ELEMENT_BITS) + 7) // 8


def check_operators(context: Context) -> str:
    model = context.model
    local = {(function.domain, function.name, function.overload) for function in model.functions}
    custom: Counter[tuple[str, str]] = Counter()
    nodes = 0
    for node in _nodes(model):
        nodes += 1
        if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type, node.overload) not in local:
            custom[(node.domain, node.op_type)] += 1
    if custom:
        found = [
            f"{_name(op)} from domain {_name(domain)} ({count} node(s))"
            for (domain, op), count in custom.most_common()
        ]
        raise CheckFailed(
            f"custom operators are not supported: {_listing(found)}; use only the ai.onnx and ai.onnx.ml "
            "domains and functions defined in the model"
        )
    return f"{nodes} node(s), {len(model.functions)} model-local function(s)"


def check_signature(context: Context) -> str:
    graph = context.model.graph
    initializers = {tensor.name for tensor in graph.initializer} | {
        sparse.values.name for sparse in graph.sparse_initializer
    }
    inferred_outputs = {value.name: value for value in context.inferred.output} if context.inferred else {}
    problems: list[str] = []
    for value in graph.input:
        if value.name not in initializers:
            _describe("input", value, context.inputs, problems)
    for value in graph.output:
        # shape inference fills in what the exporter left out, e.g. an output's rank
        _describe("output", inferred_outputs.get(value.name, value), context.outputs, problems)
    if not graph.output:
        problems.append("the graph has no outputs")
    if problems:
        raise CheckFailed(
            "; ".join(problems[:_LISTED])
            + (f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else "")
        )
    return f"{len(context.inputs)} input(s), {len(context.outputs)} output(s)"


def _describe(role: str, value: onnx.ValueInfoProto, specs: list[TensorSpec], problems: list[str]) -> None:
    what = f"{role} {_name(value.name)}"
    kind = value.type.WhichOneof("value")
    if kind is None:
        problems.append(f"{what} has no type")
        return
    if kind != "tensor_type":
        problems.append(f"{what} has type {_type_name(value.type)}, not a tensor" + _hint(value.type))
        return
    tensor_type = value.type.tensor_type
    datatype = OIP_DATATYPES.get(tensor_type.elem_type)
    if tensor_type.elem_type == TensorProto.UNDEFINED:
        problems.append(f"{what} has no element type")
    elif datatype is None:
        element = _element_name(tensor_type.elem_type)
        problems.append(f"{what} has element type {element}, which the Open Inference Protocol cannot carry")
    elif not tensor_type.HasField("shape"):
        problems.append(
            f"{what} has no shape, not even a rank; declare one, with named dims for variable sizes"
        )
    else:
        shape = tuple(dim.dim_value if dim.dim_value > 0 else -1 for dim in tensor_type.shape.dim)
        specs.append(TensorSpec(value.name, datatype, shape))


def _type_name(type_proto: onnx.TypeProto) -> str:
    """ONNX's own notation: ``seq(map(int64,tensor(float)))``."""
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({_element_name(type_proto.tensor_type.elem_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse_tensor({_element_name(type_proto.sparse_tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({_type_name(type_proto.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_name(type_proto.optional_type.elem_type)})"
    if kind == "map_type":
        key = _element_name(type_proto.map_type.key_type)
        return f"map({key},{_type_name(type_proto.map_type.value_type)})"
    return "undefined"


def _element_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"<unknown element type {elem_type}>"


def _hint(type_proto: onnx.TypeProto) -> str:
    is_zipmap = (
        type_proto.WhichOneof("value") == "sequence_type"
        and type_proto.sequence_type.elem_type.WhichOneof("value") == "map_type"
    )
    if is_zipmap:
        return (
            " (the ZipMap that skl2onnx appends to classifiers: export with zipmap=False, e.g. "
            "to_onnx(model, X, options={'zipmap': False}))"
        )
    return ""


# the trial


def trial_inference(context: Context) -> str:
    """Loads the model into onnxruntime and runs it once on generated inputs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # without the arena an allocation fails at the size the model asked for, not at the
    # next power of two the arena would have grown to
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    try:
        session = ort.InferenceSession(os.fspath(context.path), options, providers=["CPUExecutionProvider"])
        loaded = time.perf_counter()
        feeds = {spec.name: _generate(spec, rng) for spec in context.inputs}
        outputs = _run(session, feeds)
    except MemoryError:
        raise
    except Exception as error:
        message = _redact(_message(error), context.path)
        if any(hint in message for hint in _MEMORY_HINTS):
            raise CheckFailed(_memory_detail(context.limits, message)) from None
        raise CheckFailed(f"onnxruntime failed: {message}") from None
    ran = time.perf_counter()
    names = [output.name for output in session.get_outputs()]
    missing = [name for name, value in zip(names, outputs, strict=False) if value is None]
    if len(outputs) != len(names) or missing:
        raise CheckFailed(
            f"onnxruntime returned {len(outputs)} of {len(names)} outputs; missing {_listing(missing)}"
        )
    load_ms, run_ms = (loaded - started) * 1000, (ran - loaded) * 1000
    return f"loaded in {load_ms:.0f} ms, ran in {run_ms:.1f} ms on generated inputs"


def _generate(spec: TensorSpec, rng: np.random.Generator) -> Any:
    # every variable dim becomes 1: the smallest input that exercises the whole graph
    shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
    if spec.datatype in ("FP16", "FP32", "FP64"):
        # in [0, 1): finite and non-negative, so Log, Sqrt and friends stay quiet
        return rng.random(shape).astype(
            {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[spec.datatype]
        )
    if spec.datatype == "BF16":
        # numpy has no bfloat16: hand onnxruntime the upper halves of float32 values
        bits = (rng.random(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=TensorProto.BFLOAT16)
    if spec.datatype == "BOOL":
        return rng.random(shape) < 0.5
    if spec.datatype == "BYTES":
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = [
            "".join(rng.choice(letters, size=int(rng.integers(1, 9)))) for _ in range(int(np.prod(shape)))
        ]
        return np.array(words, dtype=object).reshape(shape)
    # Integer inputs are mostly indices (token ids, categories, positions); 0 is the only
    # index valid in every dimension once variable dims are 1, so random values would
    # fail sound models with out-of-range gathers.
    return np.zeros(shape, dtype=np.dtype(spec.datatype.lower()))


def _run(session: ort.InferenceSession, feeds: dict[str, Any]) -> list[Any]:
    if any(isinstance(value, np.ndarray) and value.dtype == object for value in feeds.values()):
        # onnxruntime builds string OrtValues only from numpy inside run()
        return list(session.run(None, feeds))
    # OrtValues all the way, so outputs numpy cannot hold (bfloat16) need no conversion
    values = {
        name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
        for name, value in feeds.items()
    }
    return list(session.run_with_ort_values(None, values))


# walking the model


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The main graph, every subgraph (If, Loop, Scan…) and every function's subgraphs."""
    pending: list[tuple[str, onnx.GraphProto]] = [("graph", model.graph)]
    for function in model.functions:
        pending.extend(_subgraphs(function.node))
    while pending:
        where, graph = pending.pop()
        yield where, graph
        pending.extend(_subgraphs(graph.node))


def _subgraphs(nodes: Sequence[onnx.NodeProto]) -> Iterator[tuple[str, onnx.GraphProto]]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield "subgraph", attribute.g
            for graph in attribute.graphs:
                yield "subgraph", graph


def _nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for function in model.functions:
        yield from function.node
    for _, graph in _graphs(model):
        yield from graph.node


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[str, str, TensorProto]]:
    """Every tensor stored in the model, as (kind, name, tensor): initializers, sparse ones
    and node attributes (named after the node's output: their own names are often empty)."""
    for where, graph in _graphs(model):
        prefix = "" if where == "graph" else "subgraph "
        for tensor in graph.initializer:
            yield prefix + "initializer", tensor.name, tensor
        for sparse in graph.sparse_initializer:
            yield prefix + "sparse initializer", sparse.values.name, _dense_view(sparse)
            yield prefix + "sparse initializer indices", sparse.values.name, sparse.indices
    for node in _nodes(model):
        owner = node.output[0] if node.output else node.name
        for attribute in node.attribute:
            tensors = [attribute.t] if attribute.HasField("t") else []
            tensors += list(attribute.tensors)
            tensors += [_dense_view(attribute.sparse_tensor)] if attribute.HasField("sparse_tensor") else []
            tensors += [_dense_view(sparse) for sparse in attribute.sparse_tensors]
            for tensor in tensors:
                yield f"{node.op_type} attribute of", tensor.name or owner, tensor


def _dense_view(sparse: onnx.SparseTensorProto) -> TensorProto:
    # onnxruntime densifies sparse initializers, so their dense shape is what they cost
    view = TensorProto(name=sparse.values.name, data_type=sparse.values.data_type, dims=sparse.dims)
    view.data_location = sparse.values.data_location
    view.external_data.extend(sparse.values.external_data)
    return view


def _declared_values(
    graph: onnx.GraphProto, inferred: onnx.GraphProto | None
) -> Iterator[tuple[str, onnx.ValueInfoProto]]:
    for where, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for value in values:
            yield where, value
    if inferred is not None:
        for value in inferred.value_info:
            yield "inferred value", value
        for value in inferred.output:
            yield "output", value


# formatting untrusted text


def _name(text: str) -> str:
    return repr(text if len(text) <= _NAME_CHARS else text[:_NAME_CHARS] + "...")


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _message(error: BaseException) -> str:
    text = " ".join(str(error).split())
    # onnxruntime prefixes "[ONNXRuntimeError] : 1 : FAIL : " and source locations
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return _clip(text or type(error).__name__)


def _redact(text: str, path: Path) -> str:
    # messages of onnx and onnxruntime name the registry's private upload directory
    return text.replace(os.fspath(path), "<model>").replace(os.fspath(path.parent), "<model directory>")


def _clip(text: str, limit: int = _DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _memory_detail(limits: VerificationLimits, context: str) -> str:
    detail = f"exceeded the memory limit of {limits.trial_memory_bytes} bytes"
    return f"{detail} ({_clip(context, 200)})" if context else detail


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


if __name__ == "__main__":
    sys.exit(main())
