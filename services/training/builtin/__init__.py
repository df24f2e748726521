"""The built-in training plugins, registered in the ``scoremesh.training_plugins`` entry-point
group (pyproject.toml):

- ``sklearn-tabular``: logistic regression or gradient boosting on a table;
- ``digits-mlp``: a small neural network, trained epoch by epoch, on sklearn's digits;
- ``finetune``: more training for a model either of them made, on a tenant's own data.

This module only declares them, so that listing plugins stays cheap; each ``run`` imports the
module that trains (scikit-learn, skl2onnx, onnxruntime) when a job needs it.
"""

from __future__ import annotations

from typing import Final

from services.training import datasets_io
from services.training.plugins import (
    ArgumentSpec,
    DatasetSpec,
    Plugin,
    PluginInfo,
    TrainingContext,
    TrainingResult,
)

VERSION: Final = "1.0.0"

_TEST_FRACTION = ArgumentSpec(
    "test_fraction",
    "float",
    "the share of the dataset held out to measure accuracy on",
    default=0.2,
    minimum=0.05,
    maximum=0.5,
)
_TARGET = ArgumentSpec(
    "target", "str", "the label column of a CSV dataset", default=datasets_io.DEFAULT_TARGET
)
_TABLE = DatasetSpec(
    "optional",
    ("tabular", "feedback"),
    "Labels are class numbers. Without a dataset, the bundled one named by argument 'dataset' is used.",
    target_argument="target",
)


class SklearnTabular(Plugin):
    info = PluginInfo(
        name="sklearn-tabular",
        version=VERSION,
        description="A scikit-learn classifier (logistic regression or gradient boosting) for a table",
        arguments=(
            ArgumentSpec(
                "model",
                "choice",
                "the kind of classifier",
                default="logistic_regression",
                choices=("logistic_regression", "gradient_boosting"),
            ),
            ArgumentSpec(
                "dataset",
                "choice",
                "the bundled dataset to train on when the job names no dataset",
                default="iris",
                choices=("iris", "wine", "breast_cancer", "digits"),
            ),
            _TARGET,
            _TEST_FRACTION,
            ArgumentSpec(
                "max_iter",
                "int",
                "logistic_regression: the solver's most iterations",
                default=200,
                minimum=1,
                maximum=100_000,
            ),
            ArgumentSpec(
                "C",
                "float",
                "logistic_regression: inverse strength of the L2 penalty",
                default=1.0,
                minimum=1e-6,
                maximum=1e6,
            ),
            ArgumentSpec(
                "n_estimators",
                "int",
                "gradient_boosting: the number of boosting stages",
                default=100,
                minimum=1,
                maximum=5000,
            ),
            ArgumentSpec(
                "learning_rate",
                "float",
                "gradient_boosting: how much each stage contributes",
                default=0.1,
                minimum=1e-4,
                maximum=1.0,
            ),
            ArgumentSpec(
                "max_depth",
                "int",
                "gradient_boosting: the depth of each tree",
                default=3,
                minimum=1,
                maximum=16,
            ),
        ),
        datasets=_TABLE,
        output="onnx-classifier",
    )

    def run(self, context: TrainingContext) -> TrainingResult:
        from services.training.builtin import tabular

        return tabular.train(context, self.info)


class DigitsMlp(Plugin):
    info = PluginInfo(
        name="digits-mlp",
        version=VERSION,
        description=(
            "A one-hidden-layer neural network (scikit-learn MLPClassifier), trained epoch by epoch; "
            "on sklearn's 8x8 digits (64 features) unless the job names a dataset"
        ),
        arguments=(
            ArgumentSpec(
                "epochs", "int", "passes over the training rows", default=20, minimum=1, maximum=1000
            ),
            ArgumentSpec("hidden", "int", "units in the hidden layer", default=64, minimum=1, maximum=4096),
            ArgumentSpec(
                "learning_rate", "float", "Adam's step size", default=0.001, minimum=1e-6, maximum=1.0
            ),
            ArgumentSpec("batch_size", "int", "rows per step", default=64, minimum=1, maximum=65536),
            ArgumentSpec("alpha", "float", "L2 penalty", default=0.0001, minimum=0.0, maximum=10.0),
            ArgumentSpec(
                "dataset",
                "choice",
                "the bundled dataset to train on when the job names no dataset",
                default="digits",
                choices=("digits", "iris", "wine", "breast_cancer"),
            ),
            _TARGET,
            _TEST_FRACTION,
        ),
        datasets=_TABLE,
        output="onnx-classifier",
    )

    def run(self, context: TrainingContext) -> TrainingResult:
        from services.training.builtin import mlp

        return mlp.train(context, self.info)


class Finetune(Plugin):
    info = PluginInfo(
        name="finetune",
        version=VERSION,
        description=(
            "Trains a model further on a tenant's data, from the base model's own weights: the new "
            "version has the base's inputs, outputs and classes. Supports models made by "
            "sklearn-tabular (logistic_regression) and digits-mlp."
        ),
        arguments=(
            ArgumentSpec("epochs", "int", "passes over the dataset", default=40, minimum=1, maximum=1000),
            ArgumentSpec(
                "learning_rate", "float", "Adam's step size", default=0.05, minimum=1e-6, maximum=1.0
            ),
            ArgumentSpec("batch_size", "int", "rows per step", default=16, minimum=1, maximum=65536),
            ArgumentSpec("alpha", "float", "L2 penalty", default=0.0001, minimum=0.0, maximum=10.0),
            ArgumentSpec(
                "replay",
                "choice",
                "a bundled dataset to mix in (as many rows as the tenant's), so that the model "
                "keeps what it knew; none: only the tenant's rows",
                default="none",
                choices=("none", *datasets_io.BUNDLED),
            ),
            _TARGET,
            _TEST_FRACTION,
        ),
        datasets=DatasetSpec(
            "required",
            ("feedback", "tabular"),
            "Features as the base model takes them, labels among its classes. Accuracy and "
            "base_accuracy are measured on the same held-out part of it.",
            target_argument="target",
        ),
        output="onnx-classifier",
        needs_base_model=True,
    )

    def run(self, context: TrainingContext) -> TrainingResult:
        from services.training.builtin import finetune

        return finetune.train(context, self.info)
