"""Small ONNX models built in memory for tests and benchmarks, each returned as serialized bytes.

Nothing is downloaded: every model is a few nodes made with ``onnx.helper``. The well-formed
ones run on onnxruntime's CPU provider; the others are broken in exactly one way each, so that
a test can say which verification check they must fail.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# IR 8 / opset 17 is what most exporters in the wild still stamp, and every onnxruntime we
# support loads it; tests that need another opset pass one explicitly.
IR_VERSION = 8
OPSET = 17
CUSTOM_DOMAIN = "com.example.custom"

# Open Inference Protocol datatype -> ONNX element type, for the dtypes the factory can build.
ELEMENT_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "BF16": TensorProto.BFLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
    "STRING": TensorProto.STRING,
}


def _model(
    graph: onnx.GraphProto,
    *,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    extra_opsets: tuple[tuple[str, int], ...] = (),
    functions: tuple[onnx.FunctionProto, ...] = (),
) -> onnx.ModelProto:
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return helper.make_model(
        graph,
        opset_imports=imports,
        ir_version=ir_version,
        producer_name="scoremesh-tests",
        functions=list(functions),
    )


def _bytes(model: onnx.ModelProto) -> bytes:
    data: bytes = model.SerializeToString()
    return data


def _value(name: str, elem_type: int, shape: list[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def tiny_classifier(n_features: int = 4, n_classes: int = 3, seed: int = 0) -> bytes:
    """A linear classifier: ``softmax(input @ W + b)``.

    Input ``input`` FP32 ``[-1, n_features]``, output ``probabilities`` FP32 ``[-1, n_classes]``.
    Different seeds give different weights, hence different bytes and digests."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n_features, n_classes)).astype(np.float32)
    bias = rng.standard_normal(n_classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny_classifier",
        [_value("input", TensorProto.FLOAT, ["batch", n_features])],
        [_value("probabilities", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    return _bytes(_model(graph))


def mlp_model(width: int = 512, layers: int = 8, seed: int = 0) -> bytes:
    """``layers`` dense layers with ReLU between them, ``width`` wide: a model whose execution
    costs real time (about ``layers * width**2`` multiply-adds a row).

    Input ``input`` FP32 ``[-1, width]``, output ``output`` FP32 ``[-1, width]``."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []
    current = "input"
    for layer in range(layers):
        weights = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weights, f"W{layer}"))
        product = f"h{layer}" if layer < layers - 1 else "output"
        nodes.append(
            helper.make_node(
                "MatMul", [current, f"W{layer}"], [f"m{layer}" if layer < layers - 1 else product]
            )
        )
        if layer < layers - 1:
            nodes.append(helper.make_node("Relu", [f"m{layer}"], [product]))
        current = product
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_value("input", TensorProto.FLOAT, ["batch", width])],
        [_value("output", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    return _bytes(_model(graph))


def identity_model(datatype: str | int = "FP32", shape: tuple[int | str | None, ...] = ("batch", 2)) -> bytes:
    """``output = Identity(input)`` for one Open Inference Protocol datatype (``FP32``, ``INT64``,
    ``BOOL``, ``FP16``, ``BYTES``/``STRING``…) or a raw ONNX element type (``TensorProto.INT4``);
    ``shape`` takes sizes, symbolic names and None (a dimension with neither)."""
    elem_type = ELEMENT_TYPES[datatype] if isinstance(datatype, str) else datatype
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        f"identity_{elem_type}",
        [_value("input", elem_type, list(shape))],
        [_value("output", elem_type, list(shape))],
    )
    return _bytes(_model(graph))


def opset_model(opset: int, ir_version: int = 10) -> bytes:
    """An FP32 identity stamped with the given default-domain opset."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "opset",
        [_value("input", TensorProto.FLOAT, ["batch"])],
        [_value("output", TensorProto.FLOAT, ["batch"])],
    )
    return _bytes(_model(graph, opset=opset, ir_version=ir_version))


def checker_failing_model() -> bytes:
    """A node reads a value that nothing produces, which the ONNX checker rejects."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "nowhere"], ["output"])],
        "dangling_input",
        [_value("input", TensorProto.FLOAT, ["batch", 2])],
        [_value("output", TensorProto.FLOAT, ["batch", 2])],
    )
    return _bytes(_model(graph))


def shape_mismatch_model() -> bytes:
    """The declared output shape contradicts what shape inference derives ([2] vs [3])."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "shape_mismatch",
        [_value("input", TensorProto.FLOAT, [2])],
        [_value("output", TensorProto.FLOAT, [3])],
    )
    return _bytes(_model(graph))


def custom_op_model(in_subgraph: bool = False) -> bytes:
    """Uses ``FancyOp`` from ``com.example.custom``, which onnxruntime does not know.

    With ``in_subgraph`` the custom node hides in both branches of an ``If``."""
    custom = helper.make_node("FancyOp", ["input"], ["output"], domain=CUSTOM_DOMAIN)
    inputs = [_value("input", TensorProto.FLOAT, ["batch", 2])]
    outputs = [_value("output", TensorProto.FLOAT, ["batch", 2])]
    if not in_subgraph:
        graph = helper.make_graph([custom], "custom_op", inputs, outputs)
    else:
        branch_out = [_value("branch_out", TensorProto.FLOAT, ["batch", 2])]
        then_branch = helper.make_graph(
            [helper.make_node("FancyOp", ["input"], ["branch_out"], domain=CUSTOM_DOMAIN)],
            "then",
            [],
            branch_out,
        )
        else_branch = helper.make_graph(
            [helper.make_node("Identity", ["input"], ["branch_out"])], "else", [], branch_out
        )
        graph = helper.make_graph(
            [
                helper.make_node(
                    "Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True), "flag")
                ),
                helper.make_node(
                    "If", ["flag"], ["output"], then_branch=then_branch, else_branch=else_branch
                ),
            ],
            "custom_op_in_if",
            inputs,
            outputs,
        )
    return _bytes(_model(graph, extra_opsets=((CUSTOM_DOMAIN, 1),)))


def local_function_model(body_domain: str = "") -> bytes:
    """Calls ``local.AddOne``, a function defined in the model itself; its body uses an
    ``Add`` from ``body_domain`` (a custom domain there makes the function body fail)."""
    body = [
        helper.make_node(
            "Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32), "one")
        ),
        helper.make_node("Add", ["x", "one"], ["y"], domain=body_domain),
    ]
    opsets = [helper.make_opsetid("", OPSET)]
    if body_domain:
        opsets.append(helper.make_opsetid(body_domain, 1))
    function = helper.make_function("local", "AddOne", ["x"], ["y"], body, opsets)
    graph = helper.make_graph(
        [helper.make_node("AddOne", ["input"], ["output"], domain="local")],
        "local_function",
        [_value("input", TensorProto.FLOAT, ["batch", 2])],
        [_value("output", TensorProto.FLOAT, ["batch", 2])],
    )
    extra = (("local", 1),) + (((body_domain, 1),) if body_domain else ())
    return _bytes(_model(graph, extra_opsets=extra, functions=(function,)))


def zipmap_model(n_classes: int = 3) -> bytes:
    """Shaped like an skl2onnx classifier exported with the default ``zipmap=True``: the
    ``output_probability`` output is a sequence of maps, not a tensor."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "ZipMap",
                ["input"],
                ["output_probability"],
                domain="ai.onnx.ml",
                classlabels_int64s=list(range(n_classes)),
            )
        ],
        "zipmap",
        [_value("input", TensorProto.FLOAT, ["batch", n_classes])],
        [
            helper.make_value_info(
                "output_probability",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            )
        ],
    )
    return _bytes(_model(graph, extra_opsets=(("ai.onnx.ml", 1),)))


def external_data_model(location: str) -> bytes:
    """The weight ``W`` claims its bytes live in the file ``location`` next to the model."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2, 2])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key = key
        entry.value = value
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "W"], ["output"])],
        "external_data",
        [_value("input", TensorProto.FLOAT, [2, 2])],
        [_value("output", TensorProto.FLOAT, [2, 2])],
        initializer=[weight],
    )
    return _bytes(_model(graph))


def huge_declared_tensor_model() -> bytes:
    """Declares an FP32 input of 2**20 x 2**20 elements (4 TiB) in a file of a few hundred bytes."""
    side = 2**20
    graph = helper.make_graph(
        [helper.make_node("Identity", ["huge"], ["output"])],
        "huge_declared",
        [_value("huge", TensorProto.FLOAT, [side, side])],
        [_value("output", TensorProto.FLOAT, [side, side])],
    )
    return _bytes(_model(graph))


def memory_bomb_model(elements: int = 2**34) -> bytes:
    """Passes every static check, then asks onnxruntime for ``elements`` FP32 values (64 GiB by
    default) at run time.

    The target shape is computed from the input's shape, so shape inference cannot see it:
    ``Expand(1.0, Shape(input) * elements)`` summed to a scalar."""
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["input"], ["input_shape"]),
            helper.make_node(
                "Constant",
                [],
                ["count"],
                value=numpy_helper.from_array(np.array([elements], np.int64), "count"),
            ),
            helper.make_node("Mul", ["input_shape", "count"], ["target_shape"]),
            helper.make_node(
                "Constant", [], ["one"], value=numpy_helper.from_array(np.array([1.0], np.float32), "one")
            ),
            helper.make_node("Expand", ["one", "target_shape"], ["expanded"]),
            helper.make_node("ReduceSum", ["expanded"], ["output"], keepdims=0),
        ],
        "memory_bomb",
        [_value("input", TensorProto.FLOAT, ["n"])],
        [_value("output", TensorProto.FLOAT, [])],
    )
    return _bytes(_model(graph))


def slow_model(iterations: int = 2**62) -> bytes:
    """A ``Loop`` that adds 1.0 ``iterations`` times: effectively forever at the default."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node(
                "Constant", [], ["one"], value=numpy_helper.from_array(np.array([1.0], np.float32), "one")
            ),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            _value("iteration", TensorProto.INT64, []),
            _value("cond_in", TensorProto.BOOL, []),
            _value("acc_in", TensorProto.FLOAT, [1]),
        ],
        [_value("cond_out", TensorProto.BOOL, []), _value("acc_out", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["trip_count"],
                value=numpy_helper.from_array(np.array(iterations, np.int64), "trip_count"),
            ),
            helper.make_node(
                "Constant", [], ["keep_going"], value=numpy_helper.from_array(np.array(True), "keep_going")
            ),
            helper.make_node("Loop", ["trip_count", "keep_going", "input"], ["output"], body=body),
        ],
        "slow",
        [_value("input", TensorProto.FLOAT, [1])],
        [_value("output", TensorProto.FLOAT, [1])],
    )
    return _bytes(_model(graph))


def large_model(size_bytes: int, width: int = 64) -> bytes:
    """A valid embedding lookup whose FP32 table makes the file about ``size_bytes`` long.

    Input ``ids`` INT64 ``[-1]``, output ``embeddings`` FP32 ``[-1, width]``; the table's
    contents are one row repeated, not random numbers, so building 200 MB takes a second."""
    rows = max(1, size_bytes // (4 * width))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embeddings"], axis=0)],
        "large",
        [_value("ids", TensorProto.INT64, ["batch"])],
        [_value("embeddings", TensorProto.FLOAT, ["batch", width])],
    )
    # filled in place: make_graph would copy the table once more
    table = graph.initializer.add()
    table.name = "table"
    table.data_type = TensorProto.FLOAT
    table.dims.extend([rows, width])
    table.raw_data = np.arange(width, dtype="<f4").tobytes() * rows
    return _bytes(_model(graph))


def graphless_model() -> bytes:
    """A ModelProto with an IR version and an opset but no graph: parses, is not a model."""
    model = onnx.ModelProto(ir_version=IR_VERSION)
    model.opset_import.append(helper.make_opsetid("", OPSET))
    return _bytes(model)
