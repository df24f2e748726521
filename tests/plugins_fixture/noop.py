"""A training plugin that trains nothing, fast: for tests and benchmarks of the training path.

Its model is a fixed 4-class "classifier" built with onnx.helper: ``probabilities`` is the
softmax of the 4 input features and ``label`` their argmax. It reports accuracy 1.0 (the
argmax of a one-hot row is its class). ``sleep_s`` keeps a job running that long (reporting
progress every 0.1 s); ``fail`` makes it raise.
"""

from __future__ import annotations

import time
from typing import Final

from services.training.plugins import ArgumentSpec, Plugin, PluginInfo, TrainingContext, TrainingResult

FEATURES: Final = 4
_TICK_S: Final = 0.1


class Noop(Plugin):
    info = PluginInfo(
        name="noop",
        version="1.0.0",
        description="Trains nothing: a fixed softmax/argmax model over 4 features, for tests",
        arguments=(
            ArgumentSpec(
                "sleep_s",
                "float",
                "seconds to spend before finishing",
                default=0.0,
                minimum=0.0,
                maximum=3600.0,
            ),
            ArgumentSpec("fail", "bool", "raise instead of producing a model", default=False),
        ),
        output="onnx-classifier",
    )

    def run(self, context: TrainingContext) -> TrainingResult:
        sleep_s = context.get_float("sleep_s")
        context.progress(0.0, f"sleeping {sleep_s} s")
        deadline = time.monotonic() + sleep_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(_TICK_S, left))
            context.progress(1.0 - max(0.0, deadline - time.monotonic()) / sleep_s)
        if context.get_bool("fail"):
            raise RuntimeError("noop was asked to fail")
        context.progress(1.0, "done")
        return TrainingResult(model(), {"accuracy": 1.0}, "noop: softmax and argmax of 4 features")


def model() -> bytes:
    from onnx import TensorProto, helper  # only a running job needs onnx

    graph = helper.make_graph(
        [
            helper.make_node("Softmax", ["input"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "noop",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", FEATURES]),
        ],
    )
    made = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="scoremesh-noop"
    )
    made.ir_version = 8
    return bytes(made.SerializeToString())
