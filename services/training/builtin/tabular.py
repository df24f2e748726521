"""``sklearn-tabular``: logistic regression (standardised features) or gradient boosting."""

from __future__ import annotations

from typing import Any

from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from services.training import datasets_io
from services.training.builtin import common
from services.training.plugins import PluginInfo, TrainingContext, TrainingResult

_FIT_SHARE = 0.8
"""Of the progress bar: fitting; the rest is loading, export and scoring."""


def train(context: TrainingContext, info: PluginInfo) -> TrainingResult:
    table = common.training_table(context, "dataset")
    y = datasets_io.class_labels(table)
    data = common.split(table.X, y, context.get_float("test_fraction"), context.seed)
    kind = context.get_str("model")
    context.progress(
        0.05,
        f"training {kind} on {len(data.y_train)} of {table.rows} rows x {table.features} features "
        f"({table.source})",
    )
    estimator: Any
    if kind == "logistic_regression":
        estimator = _logistic_regression(context, data)
        settings = f"C={context.get_float('C')}"
    else:
        estimator = _gradient_boosting(context, data)
        settings = (
            f"{context.get_int('n_estimators')} stages, learning_rate={context.get_float('learning_rate')}, "
            f"max_depth={context.get_int('max_depth')}"
        )
    context.progress(0.85, "exporting to ONNX")
    classes = [int(c) for c in estimator.classes_]
    description = f"{kind} ({settings}) on {table.source}: {table.features} features, classes {classes}"
    model = common.to_onnx(estimator, table.features, f"{info.name} {info.version} {kind}", description)
    metrics = {
        "accuracy": common.onnx_accuracy(model, data.X_test, data.y_test),
        "train_accuracy": common.onnx_accuracy(model, data.X_train, data.y_train),
    }
    context.progress(1.0, f"accuracy {metrics['accuracy']:.3f} on {len(data.y_test)} held-out rows")
    return TrainingResult(model, metrics, description)


def _logistic_regression(context: TrainingContext, data: common.Split) -> Pipeline:
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "classify",
                LogisticRegression(
                    C=context.get_float("C"), max_iter=context.get_int("max_iter"), random_state=context.seed
                ),
            ),
        ]
    )
    pipeline.fit(data.X_train, data.y_train)
    iterations = int(max(pipeline.named_steps["classify"].n_iter_))
    context.metric("iterations", iterations)
    context.progress(_FIT_SHARE, f"converged in {iterations} iterations")
    return pipeline


def _gradient_boosting(context: TrainingContext, data: common.Split) -> GradientBoostingClassifier:
    stages = context.get_int("n_estimators")
    every = max(1, stages // 20)

    def monitor(stage: int, estimator: GradientBoostingClassifier, _: object) -> bool:
        done = stage + 1
        if done % every == 0 or done == stages:
            context.metric("loss", float(estimator.train_score_[stage]), step=done)
            context.progress(0.05 + (_FIT_SHARE - 0.05) * done / stages, f"stage {done}/{stages}")
        return False

    estimator = GradientBoostingClassifier(
        n_estimators=stages,
        learning_rate=context.get_float("learning_rate"),
        max_depth=context.get_int("max_depth"),
        random_state=context.seed,
    )
    estimator.fit(data.X_train, data.y_train, monitor=monitor)
    return estimator
