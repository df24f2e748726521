"""``digits-mlp``: standardised features into a one-hidden-layer MLPClassifier, trained one
epoch per ``partial_fit``, with the loss and the held-out accuracy reported after each epoch."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from services.training import datasets_io
from services.training.builtin import common
from services.training.plugins import PluginInfo, TrainingContext, TrainingResult


def train(context: TrainingContext, info: PluginInfo) -> TrainingResult:
    table = common.training_table(context, "dataset")
    y = datasets_io.class_labels(table)
    data = common.split(table.X, y, context.get_float("test_fraction"), context.seed)
    epochs = context.get_int("epochs")
    hidden = context.get_int("hidden")
    classifier = MLPClassifier(
        hidden_layer_sizes=(hidden,),
        learning_rate_init=context.get_float("learning_rate"),
        batch_size=min(context.get_int("batch_size"), len(data.y_train)),
        alpha=context.get_float("alpha"),
        random_state=context.seed,
        # each epoch's order comes from `order` below: MLPClassifier reseeds its own
        # shuffle on every partial_fit, which would repeat one order every epoch
        shuffle=False,
    )
    context.progress(0.0, f"training on {len(data.y_train)} rows of {table.source}")
    scaler = StandardScaler().fit(data.X_train)
    scaled = common.Split(
        scaler.transform(data.X_train).astype(np.float32),
        data.y_train,
        scaler.transform(data.X_test).astype(np.float32),
        data.y_test,
    )
    fit_epochs(context, classifier, scaled, np.unique(y), epochs)
    context.progress(0.95, "exporting to ONNX")
    description = (
        f"MLP {table.features}-{hidden}-{len(classifier.classes_)} after {epochs} epochs on {table.source}"
    )
    pipeline = Pipeline([("scale", scaler), ("classify", classifier)])
    model = common.to_onnx(pipeline, table.features, f"{info.name} {info.version}", description)
    metrics = {
        "accuracy": common.onnx_accuracy(model, data.X_test, data.y_test),
        "loss": float(classifier.loss_),
    }
    context.progress(1.0, f"accuracy {metrics['accuracy']:.3f} on {len(data.y_test)} held-out rows")
    return TrainingResult(model, metrics, description)


def fit_epochs(
    context: TrainingContext,
    classifier: MLPClassifier,
    data: common.Split,
    classes: NDArray[np.int64],
    epochs: int,
) -> None:
    """``epochs`` passes of ``partial_fit`` over the training rows, each in a fresh order
    drawn from the job's seed; reports "loss" and "accuracy" (held out) per epoch."""
    order = np.random.default_rng(context.seed)
    for epoch in range(1, epochs + 1):
        rows = order.permutation(len(data.y_train))
        classifier.partial_fit(data.X_train[rows], data.y_train[rows], classes=classes)
        accuracy = float(classifier.score(data.X_test, data.y_test))
        context.metric("loss", float(classifier.loss_), step=epoch)
        context.metric("accuracy", accuracy, step=epoch)
        context.progress(
            0.9 * epoch / epochs,
            f"epoch {epoch}/{epochs}: loss {classifier.loss_:.4f}, accuracy {accuracy:.3f}",
        )
