"""``finetune``: a base model trained further on a tenant's data, starting from its own weights.

The base must be a stack of dense layers, which is what both trainable built-ins produce:

- sklearn-tabular's logistic regression: ``Scaler`` → ``LinearClassifier`` (ai.onnx.ml), whose
  ``coefficients``/``intercepts`` attributes are the weights (a binary model keeps the
  positive class's row and its negation);
- digits-mlp: ``MatMul``/``Add`` pairs over initializers with an activation between them,
  then ``Softmax`` (or ``Sigmoid`` for two classes).

Either becomes a scikit-learn MLPClassifier holding the base's weights (a logistic regression
is an MLP with no hidden layer: softmax over one dense layer, or a sigmoid for two classes)
that ``partial_fit`` trains epoch by epoch. The new weights are then written into a copy of
the base graph, so the new version has exactly the base's inputs, outputs, classes and
preprocessing. Accuracy and base_accuracy are measured with onnxruntime on the same held-out
rows of the tenant's dataset.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper
from sklearn.neural_network import MLPClassifier

from services.mesh.errors import InvalidArgument
from services.training import datasets_io
from services.training.builtin import common
from services.training.builtin.mlp import fit_epochs
from services.training.plugins import PluginInfo, TrainingContext, TrainingResult

SUPPORTED: Final = "finetune supports models made by sklearn-tabular (logistic_regression) and digits-mlp"
_ACTIVATIONS: Final = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "logistic", "Identity": "identity"}
_LINEAR_OPS: Final = frozenset({"Scaler", "LinearClassifier", "Normalizer", "Cast", "Identity"})
_MLP_OPS: Final = frozenset(
    {"Scaler", "Cast", "MatMul", "Add", "Relu", "Tanh", "Sigmoid", "Softmax", "Identity", "Sub", "Concat"}
    | {"ArgMax", "ArrayFeatureExtractor", "Reshape"}
)

Array = NDArray[np.float64]
Layer = tuple[Array, Array]
"""Weights [inputs, outputs] and biases [outputs], as MLPClassifier keeps them."""


def unsupported(why: str) -> InvalidArgument:
    return InvalidArgument.for_field("base_model", f"{SUPPORTED}; {why}", reason="UNSUPPORTED_BASE_MODEL")


@dataclass(eq=False)
class Base:
    """A base model read as dense layers, and where in its graph each parameter lives."""

    model: onnx.ModelProto
    kind: Literal["linear", "mlp"]
    classes: NDArray[np.int64]
    layers: list[Layer]
    activation: str
    """The hidden layers' activation, as MLPClassifier names it."""
    offset: Array | None = None
    scale: Array | None = None
    linear: onnx.NodeProto | None = None
    initializers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_features(self) -> int:
        return int(self.layers[0][0].shape[0])

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(int(weights.shape[1]) for weights, _ in self.layers[:-1])

    def features(self, X: NDArray[np.float32]) -> Array:
        """``X`` as the first dense layer sees it: through the graph's Scaler, if any."""
        values = X.astype(np.float64)
        if self.offset is not None and self.scale is not None:
            values = (values - self.offset) * self.scale
        return values

    def with_layers(self, layers: list[Layer]) -> onnx.ModelProto:
        """A copy of the base graph holding ``layers`` instead of its own parameters."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        if self.kind == "linear":
            (weights, bias) = layers[0]
            if len(self.classes) == 2:  # the negative class's row is the negation
                coefficients = np.concatenate([-weights[:, 0], weights[:, 0]])
                intercepts = np.array([-bias[0], bias[0]])
            else:
                coefficients, intercepts = weights.T.reshape(-1), bias
            assert self.linear is not None
            node = next(n for n in model.graph.node if n.output == self.linear.output)
            _set_attribute(node, "coefficients", coefficients)
            _set_attribute(node, "intercepts", intercepts)
        else:
            stored = {tensor.name: tensor for tensor in model.graph.initializer}
            for (w_name, b_name), (weights, bias) in zip(self.initializers, layers, strict=True):
                for name, value in ((w_name, weights), (b_name, bias)):
                    old = stored[name]
                    dtype = numpy_helper.to_array(old).dtype
                    old.CopyFrom(numpy_helper.from_array(value.astype(dtype).reshape(tuple(old.dims)), name))
        return model


def _set_attribute(node: onnx.NodeProto, name: str, values: Array) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.CopyFrom(helper.make_attribute(name, [float(v) for v in values]))


# reading the base


def read_base(data: bytes) -> Base:
    try:
        model = onnx.load_from_string(data)
    except Exception as error:
        raise unsupported(f"it is not an ONNX model ({type(error).__name__})") from None
    ops = {node.op_type for node in model.graph.node}
    if "LinearClassifier" in ops:
        return _read_linear(model, ops)
    if "MatMul" in ops:
        return _read_mlp(model, ops)
    shown = ", ".join(sorted(ops)) or "no nodes"
    raise unsupported(f"the base model has neither a LinearClassifier nor MatMul layers ({shown})")


def _graph_input(model: onnx.ModelProto) -> str:
    stored = {tensor.name for tensor in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in stored]
    if len(inputs) != 1:
        raise unsupported(f"the base model has {len(inputs)} inputs, not one table")
    return inputs[0]


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def _entry(model: onnx.ModelProto) -> tuple[str, Array | None, Array | None]:
    """The tensor the first trainable node reads, and the Scaler's offset and scale when the
    graph input passes through one (and any Cast) on the way."""
    consumers = _consumers(model)
    current = _graph_input(model)
    offset = scale = None
    while len(consumers[current]) == 1 and consumers[current][0].op_type in ("Cast", "Scaler"):
        node = consumers[current][0]
        if node.op_type == "Scaler":
            attributes = _attributes(node)
            offset = np.asarray(attributes.get("offset", [0.0]), dtype=np.float64)
            scale = np.asarray(attributes.get("scale", [1.0]), dtype=np.float64)
        current = node.output[0]
    return current, offset, scale


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _check_ops(ops: set[str], allowed: frozenset[str], what: str) -> None:
    extra = sorted(ops - allowed)
    if extra:
        raise unsupported(f"the base model's {what} has other nodes too: {', '.join(extra)}")


def _classes(values: Any) -> NDArray[np.int64]:
    classes = np.asarray(values)
    if classes.dtype.kind not in "iu":
        raise unsupported("the base model's classes are not class numbers")
    if len(classes) < 2 or np.any(np.diff(classes) <= 0):
        raise unsupported("the base model's classes are not two or more sorted class numbers")
    return classes.astype(np.int64)


def _read_linear(model: onnx.ModelProto, ops: set[str]) -> Base:
    _check_ops(ops, _LINEAR_OPS, "LinearClassifier")
    nodes = [node for node in model.graph.node if node.op_type == "LinearClassifier"]
    entry, offset, scale = _entry(model)
    if len(nodes) != 1 or nodes[0].input[0] != entry:
        raise unsupported("its LinearClassifier does not read the model's input")
    node = nodes[0]
    attributes = _attributes(node)
    if "classlabels_ints" not in attributes:
        raise unsupported("its classes are strings, not class numbers")
    classes = _classes(attributes["classlabels_ints"])
    intercepts = np.asarray(attributes.get("intercepts", []), dtype=np.float64)
    coefficients = np.asarray(attributes["coefficients"], dtype=np.float64)
    rows = len(intercepts)
    if rows == 0 or coefficients.size % rows:
        raise unsupported("its LinearClassifier's coefficients do not match its intercepts")
    coefficients = coefficients.reshape(rows, -1)
    post = attributes.get("post_transform", b"NONE")
    post = post.decode() if isinstance(post, bytes) else str(post)
    if len(classes) == 2 and rows == 2 and post == "LOGISTIC":
        if not (np.allclose(coefficients[0], -coefficients[1]) and np.isclose(intercepts[0], -intercepts[1])):
            raise unsupported("its two-class LinearClassifier is not one logistic regression")
        layer: Layer = (coefficients[1][:, None], intercepts[1:])
    elif len(classes) > 2 and rows == len(classes) and post == "SOFTMAX":
        layer = (coefficients.T.copy(), intercepts)
    else:
        raise unsupported(
            f"its LinearClassifier ({rows} rows, {len(classes)} classes, post_transform {post}) is not "
            "a multinomial or binary logistic regression"
        )
    offset, scale = _broadcast(offset, scale, layer[0].shape[0])
    return Base(model, "linear", classes, [layer], "identity", offset, scale, linear=node)


def _read_mlp(model: onnx.ModelProto, ops: set[str]) -> Base:
    _check_ops(ops, _MLP_OPS, "network")
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    consumers = _consumers(model)
    current, offset, scale = _entry(model)
    layers: list[Layer] = []
    names: list[tuple[str, str]] = []
    activations: list[str] = []
    while True:
        matmul = _only(consumers[current], "MatMul")
        if matmul is None or matmul.input[0] != current or matmul.input[1] not in stored:
            break
        add = _only(consumers[matmul.output[0]], "Add")
        bias_name = next((name for name in add.input if name in stored), None) if add else None
        if add is None or bias_name is None:
            raise unsupported("a MatMul of its network is not followed by the Add of a bias")
        weights = numpy_helper.to_array(stored[matmul.input[1]]).astype(np.float64)
        bias = numpy_helper.to_array(stored[bias_name]).astype(np.float64).reshape(-1)
        width = layers[-1][0].shape[1] if layers else weights.shape[0]
        if weights.ndim != 2 or weights.shape[0] != width or bias.shape != (weights.shape[1],):
            raise unsupported(
                f"its layer {len(layers) + 1} has weights {weights.shape} and biases {bias.shape}"
            )
        layers.append((weights, bias))
        names.append((matmul.input[1], bias_name))
        current = add.output[0]
        following = consumers[current]
        if len(following) == 1 and following[0].op_type in (*_ACTIVATIONS, "Softmax"):
            activations.append(following[0].op_type)
            current = following[0].output[0]
        else:
            activations.append("Identity")
    if not layers:
        raise unsupported("its network does not start with a MatMul of the model's input")
    hidden = set(activations[:-1]) or {"Identity"}
    if len(hidden) != 1 or "Softmax" in hidden:
        raise unsupported(f"its hidden layers mix activations ({', '.join(sorted(hidden))})")
    extractors = [node for node in model.graph.node if node.op_type == "ArrayFeatureExtractor"]
    if len(extractors) != 1 or extractors[0].input[0] not in stored:
        raise unsupported("its class numbers are not where skl2onnx puts them")
    classes = _classes(numpy_helper.to_array(stored[extractors[0].input[0]]))
    outputs, last = layers[-1][0].shape[1], activations[-1]
    if not ((last == "Softmax" and outputs == len(classes) > 2) or (last == "Sigmoid" and outputs == 1)):
        raise unsupported(f"its output layer ({outputs} units, {last}) does not fit {len(classes)} classes")
    offset, scale = _broadcast(offset, scale, layers[0][0].shape[0])
    (activation,) = hidden
    return Base(model, "mlp", classes, layers, _ACTIVATIONS[activation], offset, scale, initializers=names)


def _only(nodes: list[onnx.NodeProto], op_type: str) -> onnx.NodeProto | None:
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def _broadcast(offset: Array | None, scale: Array | None, width: int) -> tuple[Array | None, Array | None]:
    if offset is None or scale is None:
        return None, None
    if offset.size not in (1, width) or scale.size not in (1, width):
        raise unsupported(
            f"its Scaler has {offset.size} offsets and {scale.size} scales for {width} features"
        )
    return np.broadcast_to(offset, (width,)).copy(), np.broadcast_to(scale, (width,)).copy()


# training


def train(context: TrainingContext, info: PluginInfo) -> TrainingResult:
    if context.base_model is None or context.dataset is None:
        raise InvalidArgument("finetune needs a base model and a dataset")
    base = read_base(context.base_model)
    table = context.dataset
    y = datasets_io.class_labels(table)
    _check_fits(base, table, y, "dataset")
    data = common.split(table.X, y, context.get_float("test_fraction"), context.seed)
    base_accuracy = common.onnx_accuracy(context.base_model, data.X_test, data.y_test)
    context.metric("accuracy", base_accuracy, step=0)
    X_train, y_train = data.X_train, data.y_train
    replay = context.get_str("replay")
    if replay != "none":
        X_train, y_train = _with_replay(context, base, X_train, y_train, replay)
    prepared = common.Split(
        base.features(X_train).astype(np.float32),
        y_train,
        base.features(data.X_test).astype(np.float32),
        data.y_test,
    )
    epochs = context.get_int("epochs")
    context.progress(
        0.0,
        f"fine-tuning a {base.kind} model ({base.n_features} features, {len(base.classes)} classes) on "
        f"{len(y_train)} rows; base accuracy {base_accuracy:.3f} on {len(data.y_test)} held-out rows",
    )
    classifier = MLPClassifier(
        hidden_layer_sizes=base.hidden,
        activation=base.activation,
        learning_rate_init=context.get_float("learning_rate"),
        batch_size=min(context.get_int("batch_size"), len(y_train)),
        alpha=context.get_float("alpha"),
        random_state=context.seed,
        shuffle=False,  # fit_epochs draws each epoch's order
    )
    _start_from(classifier, base, prepared)
    fit_epochs(context, classifier, prepared, base.classes, epochs)
    context.progress(0.95, "writing the new weights into the base graph")
    layers = [
        (np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64))
        for w, b in zip(classifier.coefs_, classifier.intercepts_, strict=True)
    ]
    model = base.with_layers(layers)
    base_sha256 = hashlib.sha256(context.base_model).hexdigest()
    description = f"{base.kind} model {base_sha256[:12]} fine-tuned for {epochs} epochs on {table.source}" + (
        f" with {replay} replayed" if replay != "none" else ""
    )
    common.tidy(model, f"{info.name} {info.version} from {base_sha256}", description)
    data_bytes = bytes(model.SerializeToString())
    accuracy = common.onnx_accuracy(data_bytes, data.X_test, data.y_test)
    metrics = {
        "accuracy": accuracy,
        "base_accuracy": base_accuracy,
        "accuracy_gain": accuracy - base_accuracy,
    }
    context.progress(
        1.0, f"accuracy {accuracy:.3f} (base {base_accuracy:.3f}) on {len(data.y_test)} held-out rows"
    )
    return TrainingResult(data_bytes, metrics, description)


def _check_fits(base: Base, table: datasets_io.Table, y: NDArray[np.int64], field: str) -> None:
    if table.features != base.n_features:
        raise InvalidArgument.for_field(
            field, f"{table.source} has {table.features} features; the base model takes {base.n_features}"
        )
    unknown = sorted(set(np.unique(y).tolist()) - set(base.classes.tolist()))
    if unknown:
        raise InvalidArgument.for_field(
            field,
            f"{table.source} has labels {unknown[:10]} that are not among the base model's classes "
            f"{base.classes.tolist()[:20]}",
        )


def _with_replay(
    context: TrainingContext, base: Base, X: NDArray[np.float32], y: NDArray[np.int64], name: str
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The tenant's rows and as many rows of the bundled dataset ``name`` (at most all of it)."""
    replayed = datasets_io.bundled(name)
    labels = datasets_io.class_labels(replayed)
    _check_fits(base, replayed, labels, "arguments.replay")
    rows = np.random.default_rng(context.seed).choice(
        len(labels), size=min(len(labels), len(y)), replace=False
    )
    context.log(f"replaying {len(rows)} rows of {replayed.source}")
    return np.concatenate([X, replayed.X[rows]]), np.concatenate([y, labels[rows]])


def _start_from(classifier: MLPClassifier, base: Base, data: common.Split) -> None:
    """Gives ``classifier`` the base's weights. One partial_fit on one row first sets up what
    MLPClassifier keeps beside them (classes, layer count, output activation); its weights
    are then overwritten in place, and its optimizer dropped so that the first epoch starts
    one afresh over the base's weights (Adam's moments from that row would otherwise linger)."""
    classifier.partial_fit(data.X_train[:1], data.y_train[:1], classes=base.classes)
    parameters = [*classifier.coefs_, *classifier.intercepts_]
    values = [*(w for w, _ in base.layers), *(b for _, b in base.layers)]
    for parameter, value in zip(parameters, values, strict=True):
        if parameter.shape != value.shape:
            raise unsupported(
                f"a layer of shape {value.shape} does not fit MLPClassifier's {parameter.shape}"
            )
        parameter[...] = value
    if hasattr(classifier, "_optimizer"):
        del classifier._optimizer
