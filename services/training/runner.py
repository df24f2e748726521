"""The process that runs one training job's plugin; the worker starts one per attempt.

    python -m services.training.runner SPEC_JSON_PATH

The spec is a JSON object::

    {"plugin": "sklearn-tabular", "arguments": {"max_iter": "50"},
     "dataset": {"path": "/…/rows.csv", "format": "csv"} | null,
     "base_model": "/…/base.onnx" | null, "workdir": "/…", "seed": 7, "plugins_dir": "/…" | null}

It finds the plugin, checks the arguments again, loads the dataset and runs the plugin in a
work directory of the job's own. Its stdout carries nothing but JSON lines, each flushed as
it is written: ``progress`` (fraction, message), ``metric`` (name, value, step) and ``log``
(message) while it runs, then one ``result`` line (metrics, description, sha256 of the model
it wrote to WORKDIR/model.onnx) with exit status 0, or one ``error`` line (message, reason:
INVALID_ARGUMENT, NOT_FOUND or PLUGIN_FAILED) with exit status 1. Whatever else the plugin or
native code prints goes to stderr, with tracebacks and Python warnings.

Start-up stays light: numpy and what the chosen plugin's module imports, nothing more, until
the plugin runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from services.mesh.children import apply_own_limits
from services.mesh.errors import InvalidArgument
from services.training.plugins import (
    ArgumentValue,
    Event,
    Log,
    Metric,
    Plugin,
    PluginInfo,
    Progress,
    TrainingContext,
    TrainingResult,
    find_plugin,
    validate_arguments,
)

if TYPE_CHECKING:
    from services.training.datasets_io import Table

MODEL_FILE: Final = "model.onnx"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
INVALID_ARGUMENT: Final = "INVALID_ARGUMENT"
NOT_FOUND: Final = "NOT_FOUND"
PLUGIN_FAILED: Final = "PLUGIN_FAILED"
_MESSAGE_CHARS: Final = 2000


class RunFailed(Exception):
    """Ends the run with one error line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Spec:
    plugin: str
    arguments: Mapping[str, object]
    dataset_path: Path | None
    dataset_format: str
    base_model: Path | None
    workdir: Path
    seed: int
    plugins_dir: Path | None

    @classmethod
    def read(cls, path: Path) -> Spec:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RunFailed(f"cannot read the job spec {path}: {error}", INVALID_ARGUMENT) from None
        try:
            return cls._parse(data)
        except (KeyError, TypeError, ValueError) as error:
            raise RunFailed(
                f"malformed job spec {path}: {type(error).__name__}: {error}", INVALID_ARGUMENT
            ) from None

    @classmethod
    def _parse(cls, data: Any) -> Spec:
        if not isinstance(data, dict):
            raise TypeError("the spec is not a JSON object")
        plugin, arguments, seed = data["plugin"], data.get("arguments") or {}, data.get("seed", 0)
        if not isinstance(plugin, str) or not isinstance(arguments, dict):
            raise TypeError("plugin must be a string and arguments an object")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be a whole number from 0 to 2**32 - 1, not {seed!r}")
        dataset = data.get("dataset")
        if dataset is not None and not isinstance(dataset, dict):
            raise TypeError("dataset must be an object or null")
        base_model, plugins_dir = data.get("base_model"), data.get("plugins_dir")
        workdir = Path(data["workdir"])
        if not workdir.is_dir():
            raise ValueError(f"workdir {workdir} is not a directory")
        return cls(
            plugin=plugin,
            arguments=arguments,
            dataset_path=Path(dataset["path"]) if dataset else None,
            dataset_format=str(dataset.get("format", "")) if dataset else "",
            base_model=Path(base_model) if base_model else None,
            workdir=workdir,
            seed=seed,
            plugins_dir=Path(plugins_dir) if plugins_dir else None,
        )


class Events:
    """Writes the protocol's JSON lines to a stream nothing else writes to."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def send(self, message: Mapping[str, object]) -> None:
        # allow_nan=False: the worker parses strict JSON; metrics were checked to be finite
        self._stream.write(json.dumps(message, allow_nan=False) + "\n")
        self._stream.flush()

    def event(self, event: Event) -> None:
        if isinstance(event, Progress):
            self.send({"type": "progress", "fraction": event.fraction, "message": event.message})
        elif isinstance(event, Metric):
            self.send({"type": "metric", "name": event.name, "value": event.value, "step": event.step})
        elif isinstance(event, Log):
            self.send({"type": "log", "message": event.message})

    def error(self, message: str, reason: str) -> None:
        line = " ".join(message.split())  # one line, whatever the exception's text held
        self.send({"type": "error", "message": line[:_MESSAGE_CHARS], "reason": reason})


def main(argv: list[str] | None = None) -> int:
    apply_own_limits()
    args = sys.argv[1:] if argv is None else argv
    events = Events(_private_stdout())
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="runner: %(levelname)s %(name)s: %(message)s"
    )
    if len(args) != 1:
        events.error("usage: python -m services.training.runner SPEC_JSON_PATH", INVALID_ARGUMENT)
        return EXIT_FAILED
    try:
        result = run(Spec.read(Path(args[0])), events)
    except RunFailed as failed:
        events.error(failed.message, failed.reason)
        return EXIT_FAILED
    except Exception as error:  # a bug of the runner's own: the traceback is for stderr only
        traceback.print_exc()
        events.error(f"the training runner failed: {type(error).__name__}: {error}", PLUGIN_FAILED)
        return EXIT_FAILED
    events.send({"type": "result", **result})
    return EXIT_OK


def run(spec: Spec, events: Events) -> dict[str, object]:
    """Runs the spec's plugin; returns the result line's fields or raises RunFailed."""
    plugin = find_plugin(spec.plugin, spec.plugins_dir)
    if plugin is None:
        raise RunFailed(f"no training plugin {spec.plugin!r} is installed", NOT_FOUND)
    info = plugin.info
    try:
        arguments = validate_arguments(info, spec.arguments)
        dataset = _dataset(spec, info, arguments, events)
        base_model = _base_model(spec, info)
    except InvalidArgument as error:
        raise RunFailed(error.message, INVALID_ARGUMENT) from None
    context = TrainingContext(
        arguments=arguments,
        dataset=dataset,
        base_model=base_model,
        seed=spec.seed,
        workdir=spec.workdir,
        sink=events.event,
    )
    _seed(spec.seed)
    with warnings.catch_warnings():
        # a library's warnings (a solver that did not converge) are worth a job event
        warnings.simplefilter("default")
        warnings.showwarning = _warnings_to(context)
        result = _run_plugin(plugin, context)
    return _finish(info, result, spec.workdir)


def _warnings_to(context: TrainingContext) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        context.log(f"{category.__name__}: {message}")

    return show


def _dataset(
    spec: Spec, info: PluginInfo, arguments: Mapping[str, ArgumentValue], events: Events
) -> Table | None:
    if spec.dataset_path is None:
        if info.dataset_required:
            raise InvalidArgument(f"plugin {info.name} needs a dataset: {info.datasets}")
        return None
    if info.datasets.usage == "unused":
        events.event(Log(f"plugin {info.name} takes no dataset; ignoring {spec.dataset_path.name}"))
        return None
    from services.training import datasets_io  # numpy: not before a plugin needs it

    target_argument = info.datasets.target_argument
    target = arguments[target_argument] if target_argument else datasets_io.DEFAULT_TARGET
    return datasets_io.load(spec.dataset_path, spec.dataset_format, str(target))


def _base_model(spec: Spec, info: PluginInfo) -> bytes | None:
    if spec.base_model is None:
        if info.needs_base_model:
            raise InvalidArgument(f"plugin {info.name} starts from a base model, and the job names none")
        return None
    try:
        return spec.base_model.read_bytes()
    except OSError as error:
        raise InvalidArgument(f"cannot read the base model: {error.strerror}") from None


def _seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # a plugin that needs no numpy
        return
    numpy.random.seed(seed)


def _run_plugin(plugin: type[Plugin], context: TrainingContext) -> TrainingResult:
    name = plugin.info.name
    try:
        result = plugin().run(context)
    except InvalidArgument as error:
        raise RunFailed(error.message, INVALID_ARGUMENT) from None
    except MemoryError:
        traceback.print_exc()
        raise RunFailed(f"plugin {name} ran out of memory (MemoryError)", PLUGIN_FAILED) from None
    except Exception as error:
        traceback.print_exc()
        raise RunFailed(f"plugin {name} failed: {type(error).__name__}: {error}", PLUGIN_FAILED) from None
    if not isinstance(result, TrainingResult):
        raise RunFailed(
            f"plugin {name} returned {type(result).__name__}, not a TrainingResult", PLUGIN_FAILED
        )
    return result


def _finish(info: PluginInfo, result: TrainingResult, workdir: Path) -> dict[str, object]:
    """Checks the result, writes the model (whole or not at all) and says what it is."""
    if not isinstance(result.model, bytes) or not result.model:
        raise RunFailed(f"plugin {info.name} produced no model bytes", PLUGIN_FAILED)
    metrics: dict[str, float] = {}
    for name, value in result.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise RunFailed(
                f"plugin {info.name} reported metric {name!r} as {value!r}, not a finite number",
                PLUGIN_FAILED,
            )
        metrics[str(name)] = float(value)
    if info.output == "onnx-classifier" and "accuracy" not in metrics:
        raise RunFailed(f"plugin {info.name} makes a classifier but reported no accuracy", PLUGIN_FAILED)
    target = workdir / MODEL_FILE
    partial = workdir / f".{MODEL_FILE}.partial"
    try:
        with partial.open("wb") as sink:
            sink.write(result.model)
            sink.flush()
            os.fsync(sink.fileno())
        partial.replace(target)
    except OSError as error:
        raise RunFailed(f"cannot write the model to {target}: {error.strerror}", PLUGIN_FAILED) from None
    return {
        "metrics": metrics,
        "description": result.description,
        "sha256": hashlib.sha256(result.model).hexdigest(),
    }


def _private_stdout() -> TextIO:
    # The protocol gets a private duplicate of fd 1, and fd 1 becomes stderr: a plugin's
    # print() or a native library's chatter cannot break the JSON lines.
    protocol = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(protocol, "w", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
