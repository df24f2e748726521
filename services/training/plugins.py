"""The training plugin interface: what a plugin declares, how it is found, and what it gets
and gives back when it runs.

A plugin is a :class:`Plugin` subclass with a class attribute ``info`` (a :class:`PluginInfo`:
its name, version, arguments, the dataset it expects, what it produces) and a ``run`` method
that turns a :class:`TrainingContext` into a :class:`TrainingResult` (ONNX bytes and metrics).
The service lists the declarations and checks submissions against them
(:func:`validate_arguments`); the worker runs a job's plugin in a child process
(``python -m services.training.runner``), which calls ``run``.

Plugins are found in two places (:func:`discover_plugins`): the entry-point group
``scoremesh.training_plugins`` of installed distributions (the built-ins are registered there)
and the ``*.py`` files of a plugins folder. A plugin module should import heavy libraries
inside ``run``, not at the top: every plugin module is imported when the service starts, to
list it.

This module stays light (no numpy, no onnx): the runner imports it before it knows which
plugin a job needs.
"""

from __future__ import annotations

import abc
import importlib.metadata
import importlib.util
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, ClassVar, Final, Literal, TypeAlias, TypeGuard

from services.mesh.errors import FieldViolation, raise_for_violations

if TYPE_CHECKING:
    from services.training.datasets_io import Table

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "scoremesh.training_plugins"
"""The entry-point group whose entries name :class:`Plugin` subclasses."""

ArgumentType: TypeAlias = Literal["str", "int", "float", "bool", "choice"]
ARGUMENT_TYPES: Final[tuple[ArgumentType, ...]] = ("str", "int", "float", "bool", "choice")
ArgumentValue: TypeAlias = str | int | float | bool

DatasetUsage: TypeAlias = Literal["required", "optional", "unused"]
DatasetKind: TypeAlias = Literal["tabular", "feedback"]

PLUGIN_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ARGUMENT_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_STRING_CHARS: Final = 1024
"""The longest value a ``str`` argument takes."""
MAX_SAFE_INT: Final = 2**53
"""Arguments travel as JSON numbers (doubles): larger whole numbers would not survive."""
_SHOWN_NAME_CHARS: Final = 64


# declarations


@dataclass(frozen=True, slots=True)
class ArgumentSpec:
    """One argument a plugin takes.

    ``default`` is None exactly when the argument is ``required``. ``choices`` lists the
    values of a ``choice``; ``minimum``/``maximum`` bound an ``int`` or ``float`` (inclusive).
    A spec that contradicts itself raises ValueError when it is made.
    """

    name: str
    type: ArgumentType
    description: str
    default: ArgumentValue | None = None
    required: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not ARGUMENT_NAME.fullmatch(self.name):
            problems.append("a name of letters, digits and '_' (at most 64)")
        if self.type not in ARGUMENT_TYPES:
            problems.append(f"a type among {', '.join(ARGUMENT_TYPES)}")
        if (self.type == "choice") != bool(self.choices):
            problems.append("choices exactly when its type is choice")
        if (self.minimum is not None or self.maximum is not None) and self.type not in ("int", "float"):
            problems.append("bounds only on an int or a float")
        if self.required != (self.default is None):
            problems.append("a default exactly when it is optional")
        if not problems and self.default is not None:
            value, problem = _coerce(self, self.default)
            if problem or value != self.default or type(value) is not type(self.default):
                problems.append(f"a default that is a valid {self.type} ({problem or 'not as declared'})")
        if problems:
            raise ValueError(f"argument {self.name!r} needs " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """What a plugin does with a job's dataset, and what the dataset must hold.

    Every dataset is a table of numeric features X and one label y per row: a CSV file with a
    header row (the label in the column named by the argument ``target_argument``, "label"
    when the plugin has no such argument) or an NPZ file with arrays ``X`` and ``y``, which is
    also what datasets built from feedback are. ``kinds`` says which of those the plugin was
    made for: "tabular" (uploaded tables) and "feedback" (labelled predictions of a model).
    """

    usage: DatasetUsage
    kinds: tuple[DatasetKind, ...] = ()
    description: str = ""
    target_argument: str | None = None

    def __post_init__(self) -> None:
        if self.usage not in ("required", "optional", "unused"):
            raise ValueError(f"dataset usage must be required, optional or unused, not {self.usage!r}")
        if (self.usage == "unused") != (not self.kinds):
            raise ValueError("a dataset that is used names its kinds; an unused one names none")

    def __str__(self) -> str:
        if self.usage == "unused":
            return "none: the plugin takes no dataset"
        target = (
            f"the column named by argument {self.target_argument!r}" if self.target_argument else "'label'"
        )
        words = (
            f"{self.usage}: {' or '.join(self.kinds)} data, as CSV with a header row (numeric columns; "
            f"the label in {target}) or NPZ with arrays X and y"
        )
        return f"{words}. {self.description}" if self.description else words


NO_DATASET: Final = DatasetSpec("unused")


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """A plugin's declaration: what the service lists and checks submissions against.

    ``output`` names what the plugin produces: "onnx-classifier" (input ``input`` FP32
    [batch, features]; outputs ``label`` INT64 [batch] and ``probabilities`` FP32
    [batch, classes]; the result's metrics include "accuracy") or "onnx-regressor".
    ``needs_base_model``: a job must name a model version to start from.
    """

    name: str
    version: str
    description: str
    arguments: tuple[ArgumentSpec, ...] = ()
    datasets: DatasetSpec = NO_DATASET
    output: str = "onnx-classifier"
    needs_base_model: bool = False

    def __post_init__(self) -> None:
        if not PLUGIN_NAME.fullmatch(self.name):
            raise ValueError(f"plugin name {self.name!r} must match {PLUGIN_NAME.pattern}")
        names = [spec.name for spec in self.arguments]
        if len(set(names)) != len(names):
            raise ValueError(f"plugin {self.name} declares an argument twice")
        target = self.datasets.target_argument
        if target is not None and target not in names:
            raise ValueError(f"plugin {self.name}: target_argument {target!r} is not one of its arguments")

    @property
    def dataset_required(self) -> bool:
        return self.datasets.usage == "required"

    def argument(self, name: str) -> ArgumentSpec | None:
        return next((spec for spec in self.arguments if spec.name == name), None)


def describe(info: PluginInfo) -> dict[str, object]:
    """The declaration as JSON values, for listings."""
    arguments: list[dict[str, object]] = []
    for spec in info.arguments:
        entry: dict[str, object] = {
            "name": spec.name,
            "type": spec.type,
            "required": spec.required,
            "default": spec.default,
            "description": spec.description,
        }
        if spec.choices:
            entry["choices"] = list(spec.choices)
        if spec.minimum is not None:
            entry["minimum"] = spec.minimum
        if spec.maximum is not None:
            entry["maximum"] = spec.maximum
        arguments.append(entry)
    return {
        "name": info.name,
        "version": info.version,
        "description": info.description,
        "arguments": arguments,
        "datasets": {
            "usage": info.datasets.usage,
            "kinds": list(info.datasets.kinds),
            "description": str(info.datasets),
            "target_argument": info.datasets.target_argument,
        },
        "dataset_required": info.dataset_required,
        "needs_base_model": info.needs_base_model,
        "output": info.output,
    }


# arguments


def validate_arguments(info: PluginInfo, raw: Mapping[str, object]) -> dict[str, ArgumentValue]:
    """The arguments of a job for ``info``: each value as its declared type, defaults filled in.

    Values may be JSON values or strings (``--arg k=v`` on the command line): "0.5" reads as
    a float, "3" as an int, "true"/"false" as a bool. A null counts as not given. Raises one
    InvalidArgument naming every violation (``arguments.NAME``): unknown or missing
    arguments, wrong types, values out of range or not among the choices.
    """
    violations: list[FieldViolation] = []
    values: dict[str, ArgumentValue] = {}
    for spec in info.arguments:
        given = raw.get(spec.name)
        if given is None:
            if spec.required:
                violations.append(
                    FieldViolation(f"arguments.{spec.name}", f"is required ({spec.description})")
                )
            else:
                assert spec.default is not None
                values[spec.name] = spec.default
            continue
        value, problem = _coerce(spec, given)
        if problem:
            violations.append(FieldViolation(f"arguments.{spec.name}", problem))
        else:
            values[spec.name] = value
    known = ", ".join(spec.name for spec in info.arguments) or "none"
    for name in sorted(set(raw) - {spec.name for spec in info.arguments}):
        shown = name[:_SHOWN_NAME_CHARS]
        violations.append(
            FieldViolation(
                f"arguments.{shown}", f"plugin {info.name} takes no such argument (known: {known})"
            )
        )
    raise_for_violations(violations)
    return values


def _coerce(spec: ArgumentSpec, given: object) -> tuple[ArgumentValue, str]:
    """(value, "") or (a placeholder, what is wrong with ``given``)."""
    if spec.type == "bool":
        return _as_bool(given)
    if spec.type in ("str", "choice"):
        if not isinstance(given, str):
            return "", f"must be a string, not {_shown(given)}"
        if spec.type == "choice" and given not in spec.choices:
            return "", f"must be one of {', '.join(spec.choices)}, not {_shown(given)}"
        if len(given) > MAX_STRING_CHARS:
            return "", f"must be at most {MAX_STRING_CHARS} characters"
        return given, ""
    number, problem = _as_int(given) if spec.type == "int" else _as_float(given)
    if problem:
        return 0, problem
    if spec.minimum is not None and number < spec.minimum:
        return 0, f"must be at least {_bound(spec.minimum)}, not {number}"
    if spec.maximum is not None and number > spec.maximum:
        return 0, f"must be at most {_bound(spec.maximum)}, not {number}"
    return number, ""


def _as_bool(given: object) -> tuple[bool, str]:
    if isinstance(given, bool):
        return given, ""
    if isinstance(given, str) and given.strip().lower() in ("true", "false"):
        return given.strip().lower() == "true", ""
    return False, f"must be true or false, not {_shown(given)}"


def _as_int(given: object) -> tuple[int, str]:
    problem = f"must be a whole number, not {_shown(given)}"
    value: int
    if isinstance(given, bool):
        return 0, problem
    if isinstance(given, int):
        value = given
    elif isinstance(given, float):
        # JSON has one number type: a whole 3.0 is the 3 a client sent
        if not given.is_integer():
            return 0, problem
        value = int(given)
    elif isinstance(given, str):
        try:
            value = int(given.strip())
        except ValueError:
            return 0, problem
    else:
        return 0, problem
    if abs(value) > MAX_SAFE_INT:
        return 0, f"must be at most {MAX_SAFE_INT} in size"
    return value, ""


def _as_float(given: object) -> tuple[float, str]:
    problem = f"must be a number, not {_shown(given)}"
    value: float
    if isinstance(given, bool):
        return 0.0, problem
    if isinstance(given, int | float):
        value = float(given)
    elif isinstance(given, str):
        try:
            value = float(given.strip())
        except ValueError:
            return 0.0, problem
    else:
        return 0.0, problem
    if not math.isfinite(value):
        return 0.0, f"must be a finite number, not {_shown(given)}"
    return value, ""


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_NAME_CHARS else text[: _SHOWN_NAME_CHARS - 3] + "..."


# running


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the plugin has got, from 0 to 1."""

    fraction: float
    message: str = ""


@dataclass(frozen=True, slots=True)
class Metric:
    """A measurement, at a step (an epoch, an iteration) or for the whole run."""

    name: str
    value: float
    step: int | None = None


@dataclass(frozen=True, slots=True)
class Log:
    message: str


Event: TypeAlias = Progress | Metric | Log
EventSink: TypeAlias = Callable[[Event], None]
MAX_MESSAGE_CHARS: Final = 2000


class TrainingContext:
    """What a plugin's ``run`` gets: its checked arguments, the job's dataset and base model,
    a seed, a private work directory, and the means to report progress, metrics and logs."""

    def __init__(
        self,
        *,
        arguments: Mapping[str, ArgumentValue],
        dataset: Table | None = None,
        base_model: bytes | None = None,
        seed: int = 0,
        workdir: Path,
        sink: EventSink | None = None,
    ) -> None:
        self.arguments: Mapping[str, ArgumentValue] = MappingProxyType(dict(arguments))
        self.dataset = dataset
        """The job's dataset, loaded (None when it names none)."""
        self.base_model = base_model
        """The ONNX bytes of the model version to start from (None when the job names none)."""
        self.seed = seed
        """Seed every random number generator with it: the same seed should give the same model."""
        self.workdir = workdir
        """A directory of this run's own, deleted after it."""
        self._sink = sink or (lambda event: None)

    def progress(self, fraction: float, message: str = "") -> None:
        """Reports how far the run has got (clamped to 0..1; a NaN is ignored)."""
        if math.isnan(fraction):
            return
        self._sink(Progress(min(1.0, max(0.0, float(fraction))), message[:MAX_MESSAGE_CHARS]))

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        """Reports a measurement; one that is not finite becomes a log line instead, as JSON
        has no NaN."""
        if not math.isfinite(value):
            self.log(f"metric {name} is {value} at step {step}")
            return
        self._sink(Metric(name[:_SHOWN_NAME_CHARS], float(value), step))

    def log(self, message: str) -> None:
        self._sink(Log(message[:MAX_MESSAGE_CHARS]))

    # typed access to the arguments, which validate_arguments has made the declared types

    def get_str(self, name: str) -> str:
        value = self.arguments[name]
        assert isinstance(value, str), f"argument {name} is {value!r}, not a str"
        return value

    def get_int(self, name: str) -> int:
        value = self.arguments[name]
        assert isinstance(value, int), f"argument {name} is {value!r}, not an int"
        assert not isinstance(value, bool), f"argument {name} is {value!r}, not an int"
        return value

    def get_float(self, name: str) -> float:
        value = self.arguments[name]
        assert isinstance(value, float), f"argument {name} is {value!r}, not a float"
        return value

    def get_bool(self, name: str) -> bool:
        value = self.arguments[name]
        assert isinstance(value, bool), f"argument {name} is {value!r}, not a bool"
        return value


@dataclass(frozen=True, slots=True)
class TrainingResult:
    """What a run produced: an ONNX model (bytes), its metrics (a classifier's include
    "accuracy", measured on data it was not trained on), and a sentence describing it."""

    model: bytes
    metrics: Mapping[str, float] = field(default_factory=dict)
    description: str = ""


class Plugin(abc.ABC):
    """A trainer. Subclasses set ``info`` and implement ``run``; they are made with no
    arguments, once per job, in the job's own process.

    ``run`` raises InvalidArgument for a problem with the job's input (a dataset without
    enough rows, a base model it cannot read): the job fails with that message. Anything else
    it raises is a failure of the plugin."""

    info: ClassVar[PluginInfo]

    @abc.abstractmethod
    def run(self, context: TrainingContext) -> TrainingResult:
        """Trains a model as ``context`` asks and returns it."""


# discovery


def discover_plugins(folder: Path | None = None) -> dict[str, type[Plugin]]:
    """Every plugin installed through the entry-point group, then every plugin in the ``*.py``
    files of ``folder`` (in name order; files starting with "_" are skipped), by name.

    A module that fails to import, or an entry that names no valid plugin, is logged and
    skipped. When two plugins share a name, the first found wins and a warning names both.
    """
    found: dict[str, type[Plugin]] = {}
    origins: dict[str, str] = {}
    for origin, plugin in [*_entry_point_plugins(None), *_folder_plugins(folder)]:
        _add(found, origins, origin, plugin)
    return found


def find_plugin(name: str, folder: Path | None = None) -> type[Plugin] | None:
    """The plugin that :func:`discover_plugins` would list as ``name``, importing as little
    as it can: an entry point of that name first (entry points come first in discovery),
    the whole search otherwise."""
    for _, plugin in _entry_point_plugins(name):
        if plugin.info.name == name:
            return plugin
    return discover_plugins(folder).get(name)


def _add(found: dict[str, type[Plugin]], origins: dict[str, str], origin: str, plugin: type[Plugin]) -> None:
    name = plugin.info.name
    if name in found:
        log.warning(
            "two training plugins are named %r: keeping the one from %s, ignoring the one from %s",
            name,
            origins[name],
            origin,
        )
        return
    found[name] = plugin
    origins[name] = origin


def _entry_point_plugins(only: str | None) -> list[tuple[str, type[Plugin]]]:
    entries = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)
    )
    plugins: list[tuple[str, type[Plugin]]] = []
    for entry in entries:
        if only is not None and entry.name != only:
            continue
        origin = f"entry point {entry.name} = {entry.value}"
        try:
            loaded = entry.load()
        except (Exception, SystemExit):
            log.exception("skipping training plugin %s: it failed to load", origin)
            continue
        if _is_plugin(loaded):
            if loaded.info.name != entry.name:
                log.warning(
                    "%s names plugin %r: entry points should carry the plugin's name",
                    origin,
                    loaded.info.name,
                )
            plugins.append((origin, loaded))
        else:
            log.error("skipping %s: it is not a Plugin subclass with a PluginInfo", origin)
    return plugins


def _folder_plugins(folder: Path | None) -> list[tuple[str, type[Plugin]]]:
    if folder is None:
        return []
    if not folder.is_dir():
        log.error("the training plugins folder %s is not a directory; no plugins loaded from it", folder)
        return []
    plugins: list[tuple[str, type[Plugin]]] = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            module = _import_file(path)
        except (Exception, SystemExit):
            log.exception("skipping training plugin file %s: it failed to import", path)
            continue
        classes = [
            value
            for value in vars(module).values()
            if _is_plugin(value) and value.__module__ == module.__name__
        ]
        if not classes:
            log.warning("training plugin file %s defines no Plugin subclass", path)
        plugins += [(f"file {path}", plugin) for plugin in classes]
    return plugins


def _import_file(path: Path) -> ModuleType:
    # a name of its own per file, so that two folders' "plugin.py" do not meet in sys.modules
    name = f"scoremesh_training_plugins.{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # registered while it runs, so dataclasses and pickling inside it can find it
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _is_plugin(value: object) -> TypeGuard[type[Plugin]]:
    return (
        isinstance(value, type)
        and issubclass(value, Plugin)
        and not getattr(value, "__abstractmethods__", None)
        and isinstance(getattr(value, "info", None), PluginInfo)
    )
