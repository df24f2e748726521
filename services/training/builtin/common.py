"""What the built-in plugins share: held-out splits, ONNX export with skl2onnx, and accuracy
measured on the exported model itself (the bytes the registry will serve), not on the
estimator it came from.

Imports scikit-learn, skl2onnx and onnxruntime: only a running plugin imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from services.mesh.errors import InvalidArgument
from services.training import datasets_io
from services.training.plugins import TrainingContext

INPUT_NAME: Final = "input"
LABEL_OUTPUT: Final = "label"
TARGET_OPSET: Final = {"": 17, "ai.onnx.ml": 3}
"""Opsets old enough for the onnxruntime inside Triton 2.51 and new enough for every
converter used here; fixed, so that a newer skl2onnx does not change the bytes."""
MIN_ROWS: Final = 10
METADATA_TRAINED_BY: Final = "scoremesh.trained_by"


@dataclass(frozen=True, slots=True, eq=False)
class Split:
    """A dataset cut into the rows a model trains on and the held-out rows it is scored on."""

    X_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    X_test: NDArray[np.float32]
    y_test: NDArray[np.int64]


def training_table(context: TrainingContext, bundled_argument: str) -> datasets_io.Table:
    """The job's dataset, or the bundled one its argument ``bundled_argument`` names."""
    if context.dataset is not None:
        return context.dataset
    return datasets_io.bundled(context.get_str(bundled_argument))


def split(X: NDArray[np.float32], y: NDArray[np.int64], test_fraction: float, seed: int) -> Split:
    """A held-out split, stratified by class where every class has rows enough for it."""
    rows = len(y)
    if rows < MIN_ROWS:
        raise InvalidArgument.for_field(
            "dataset", f"{rows} rows are too few to train and test on (at least {MIN_ROWS})"
        )
    classes, counts = np.unique(y, return_counts=True)
    n_test = max(1, round(rows * test_fraction))
    stratify = y if counts.min() >= 2 and len(classes) <= min(n_test, rows - n_test) else None
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=n_test, random_state=seed, stratify=stratify
    )
    if len(np.unique(y_train)) < 2:
        raise InvalidArgument.for_field(
            "dataset", "the training part holds one class; a classifier needs two"
        )
    return Split(X_train, y_train, X_test, y_test)


def to_onnx(estimator: Any, n_features: int, trained_by: str, description: str) -> bytes:
    """A fitted scikit-learn classifier (or pipeline ending in one) as ONNX: input ``input``
    FP32 [batch, n_features]; outputs ``label`` INT64 [batch] and ``probabilities`` FP32
    [batch, classes] (zipmap off: a plain tensor, not a sequence of maps)."""
    # imported here: finetune, which writes into its base's graph instead, never needs
    # skl2onnx, the slowest import of all (about a second)
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    final = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    model = convert_sklearn(
        estimator,
        # skl2onnx names the graph with a random uuid otherwise: the same seed must give the
        # same bytes
        name=type(final).__name__,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={id(final): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    tidy(model, trained_by, description)
    return bytes(model.SerializeToString())


def tidy(model: onnx.ModelProto, trained_by: str, description: str) -> None:
    """One import per opset domain (skl2onnx lists the default domain twice for pipelines),
    and where the model came from."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    del model.opset_import[:]
    for domain, version in sorted(versions.items()):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    model.doc_string = description
    kept = [p for p in model.metadata_props if p.key != METADATA_TRAINED_BY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_TRAINED_BY, value=trained_by))


def predict_labels(model: bytes, X: NDArray[np.float32]) -> NDArray[Any]:
    """The labels the ONNX classifier ``model`` gives the rows of ``X``, by onnxruntime."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about unused initializers and the like
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    outputs = [output.name for output in session.get_outputs()]
    wanted = LABEL_OUTPUT if LABEL_OUTPUT in outputs else outputs[0]
    (labels,) = session.run([wanted], {inputs[0].name: X.astype(np.float32)})
    return np.asarray(labels).reshape(-1)


def onnx_accuracy(model: bytes, X: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    return float(np.mean(predict_labels(model, X) == y))
