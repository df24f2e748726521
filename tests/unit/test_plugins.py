"""The training plugin layer's pure logic: argument declarations and their validation, plugin
discovery (entry points and a folder), the context plugins report through, and dataset files."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.mesh.children import CODE_ROOT, child_env
from services.mesh.errors import InvalidArgument
from services.training import datasets_io
from services.training.builtin import DigitsMlp, Finetune, SklearnTabular
from services.training.plugins import (
    ArgumentSpec,
    DatasetSpec,
    Event,
    Log,
    Metric,
    PluginInfo,
    Progress,
    TrainingContext,
    describe,
    discover_plugins,
    find_plugin,
    validate_arguments,
)

PLUGINS_FIXTURE = Path(__file__).resolve().parent.parent / "plugins_fixture"

INFO = PluginInfo(
    name="example",
    version="1",
    description="arguments of every type",
    arguments=(
        ArgumentSpec("learning_rate", "float", "step size", default=0.1, minimum=0.0, maximum=1.0),
        ArgumentSpec("epochs", "int", "passes", default=10, minimum=1, maximum=100),
        ArgumentSpec("shuffle", "bool", "reorder rows", default=True),
        ArgumentSpec("model", "choice", "kind", default="small", choices=("small", "large")),
        ArgumentSpec("name", "str", "a name", required=True),
    ),
    datasets=DatasetSpec("optional", ("tabular",), "rows", target_argument="name"),
)


def violations(raw: dict[str, object], info: PluginInfo = INFO) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_arguments(info, raw)
    return {v.field: v.description for v in caught.value.violations}


# validate_arguments


def test_defaults_fill_what_is_not_given() -> None:
    assert validate_arguments(INFO, {"name": "x"}) == {
        "learning_rate": 0.1,
        "epochs": 10,
        "shuffle": True,
        "model": "small",
        "name": "x",
    }


def test_every_violation_is_listed_at_once() -> None:
    found = violations(
        {"learning_rate": 2.0, "epochs": "many", "shuffle": "maybe", "model": "huge", "colour": "red"}
    )
    assert set(found) == {
        "arguments.learning_rate",
        "arguments.epochs",
        "arguments.shuffle",
        "arguments.model",
        "arguments.name",
        "arguments.colour",
    }
    assert "at most 1" in found["arguments.learning_rate"]
    assert "whole number" in found["arguments.epochs"]
    assert "true or false" in found["arguments.shuffle"]
    assert "small, large" in found["arguments.model"]
    assert "required" in found["arguments.name"]
    assert "no such argument" in found["arguments.colour"]
    assert "learning_rate" in found["arguments.colour"]  # the known ones are named


def test_strings_from_the_command_line_read_as_the_declared_type() -> None:
    values = validate_arguments(
        INFO, {"learning_rate": "0.5", "epochs": " 3 ", "shuffle": "FALSE", "model": "large", "name": "7"}
    )
    assert values == {"learning_rate": 0.5, "epochs": 3, "shuffle": False, "model": "large", "name": "7"}
    assert type(values["epochs"]) is int
    assert type(values["learning_rate"]) is float


def test_json_numbers_read_as_the_declared_type() -> None:
    # protobuf's Value has one number type: 3 arrives as 3.0
    values = validate_arguments(INFO, {"learning_rate": 1, "epochs": 3.0, "name": "x"})
    assert (values["learning_rate"], values["epochs"]) == (1.0, 3)
    assert type(values["learning_rate"]) is float
    assert type(values["epochs"]) is int


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("epochs", "3.5"),
        ("epochs", 3.5),
        ("epochs", True),
        ("epochs", "1e3"),
        ("epochs", 0),
        ("epochs", 2**60),
        ("learning_rate", False),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("learning_rate", "nan"),
        ("learning_rate", "-inf"),
        ("learning_rate", -0.1),
        ("learning_rate", [0.1]),
        ("shuffle", 1),
        ("shuffle", "yes"),
        ("model", 1),
        ("model", "Small"),
        ("name", 7),
        ("name", "x" * 2000),
    ],
)
def test_bad_values_are_refused(name: str, value: object) -> None:
    raw: dict[str, object] = {"name": "x", name: value}
    assert list(violations(raw)) == [f"arguments.{name}"]


def test_null_counts_as_not_given() -> None:
    assert validate_arguments(INFO, {"name": "x", "epochs": None})["epochs"] == 10
    assert list(violations({"name": None})) == ["arguments.name"]


def test_a_long_unknown_name_is_cut_in_the_field() -> None:
    (field,) = violations({"name": "x", "z" * 500: 1})
    assert len(field) < 100


@pytest.mark.parametrize(
    "make",
    [
        lambda: ArgumentSpec("n", "int", "", default=1.5),
        lambda: ArgumentSpec("n", "float", "", default=1),
        lambda: ArgumentSpec("n", "int", "", default=0, minimum=1),
        lambda: ArgumentSpec("n", "choice", "", default="a"),
        lambda: ArgumentSpec("n", "choice", "", default="c", choices=("a", "b")),
        lambda: ArgumentSpec("n", "str", "", default="a", choices=("a",)),
        lambda: ArgumentSpec("n", "str", "", default="a", minimum=1),
        lambda: ArgumentSpec("n", "str", ""),  # neither required nor defaulted
        lambda: ArgumentSpec("n", "str", "", default="a", required=True),
        lambda: ArgumentSpec("bad name", "str", "", default="a"),
        lambda: ArgumentSpec("n", "list", "", default="a"),  # type: ignore[arg-type]
        lambda: PluginInfo("Bad Name", "1", ""),
        lambda: PluginInfo("p", "1", "", arguments=(INFO.arguments[0], INFO.arguments[0])),
        lambda: PluginInfo("p", "1", "", datasets=DatasetSpec("optional", ("tabular",), target_argument="t")),
        lambda: DatasetSpec("required"),
        lambda: DatasetSpec("unused", ("tabular",)),
    ],
)
def test_declarations_that_contradict_themselves_are_refused(make: Any) -> None:
    with pytest.raises(ValueError, match=r"."):
        make()


def test_describe_is_json() -> None:
    described = describe(INFO)
    assert json.loads(json.dumps(described)) == described
    arguments: Any = described["arguments"]
    assert arguments[0] == {
        "name": "learning_rate",
        "type": "float",
        "required": False,
        "default": 0.1,
        "description": "step size",
        "minimum": 0.0,
        "maximum": 1.0,
    }
    assert arguments[3]["choices"] == ["small", "large"]
    assert arguments[4]["required"] is True
    assert arguments[4]["default"] is None
    assert described["dataset_required"] is False
    assert described["needs_base_model"] is False


def test_the_dataset_declaration_reads_as_words() -> None:
    assert "'name'" in str(INFO.datasets)
    assert str(INFO.datasets).startswith("optional: tabular data")
    assert str(DatasetSpec("unused")).startswith("none")
    assert Finetune.info.dataset_required
    assert Finetune.info.needs_base_model
    assert not SklearnTabular.info.dataset_required


def test_every_builtin_declaration_validates_its_own_defaults() -> None:
    for plugin in (SklearnTabular, DigitsMlp, Finetune):
        defaults = validate_arguments(plugin.info, {})
        assert set(defaults) == {spec.name for spec in plugin.info.arguments}
        json.dumps(describe(plugin.info))


# discovery


def test_the_builtins_are_found_through_their_entry_points() -> None:
    found = discover_plugins(None)
    assert found["sklearn-tabular"] is SklearnTabular
    assert found["digits-mlp"] is DigitsMlp
    assert found["finetune"] is Finetune
    assert find_plugin("finetune") is Finetune


def test_plugins_are_found_in_a_folder() -> None:
    found = discover_plugins(PLUGINS_FIXTURE)
    assert found["noop"].info.name == "noop"
    assert "sklearn-tabular" in found
    # each search imports the folder's files afresh
    again = find_plugin("noop", PLUGINS_FIXTURE)
    assert again is not None
    assert again.info == found["noop"].info
    assert find_plugin("noop") is None
    assert find_plugin("nothing", PLUGINS_FIXTURE) is None


_DUPLICATE = """
from services.training.plugins import Plugin, PluginInfo, TrainingContext, TrainingResult


class Impostor(Plugin):
    info = PluginInfo(name="sklearn-tabular", version="9", description="a second plugin of that name")

    def run(self, context: TrainingContext) -> TrainingResult:
        raise NotImplementedError
"""


def test_a_broken_file_is_skipped_and_a_second_name_loses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copy(PLUGINS_FIXTURE / "noop.py", tmp_path / "noop.py")
    (tmp_path / "broken.py").write_text("import no_such_module_anywhere\n")
    (tmp_path / "syntax.py").write_text("def (:\n")
    (tmp_path / "exits.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "impostor.py").write_text(_DUPLICATE)
    (tmp_path / "_private.py").write_text("raise RuntimeError('never imported')\n")
    (tmp_path / "nothing.py").write_text("X = 1\n")
    with caplog.at_level(logging.INFO, logger="services.training.plugins"):
        found = discover_plugins(tmp_path)
    assert found["sklearn-tabular"] is SklearnTabular
    assert "noop" in found
    messages = [record.getMessage() for record in caplog.records]
    for name in ("broken.py", "syntax.py", "exits.py"):
        assert any(name in m and "failed to import" in m for m in messages), name
    (duplicate,) = [m for m in messages if "two training plugins" in m]
    assert "entry point sklearn-tabular" in duplicate
    assert "impostor.py" in duplicate
    assert any("nothing.py" in m and "no Plugin" in m for m in messages)
    assert not any("_private" in m for m in messages)


def test_a_missing_folder_is_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="services.training.plugins"):
        found = discover_plugins(tmp_path / "absent")
    assert "finetune" in found
    assert any("not a directory" in record.getMessage() for record in caplog.records)


def test_listing_plugins_imports_no_training_library() -> None:
    # the service lists plugins at start-up; scikit-learn and friends wait for a job
    code = (
        "import sys; from pathlib import Path; from services.training.plugins import discover_plugins;"
        f"found = discover_plugins(Path({str(PLUGINS_FIXTURE)!r}));"
        "heavy = ('sklearn', 'skl2onnx', 'onnxruntime', 'onnx');"
        "print(sorted(found), sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=CODE_ROOT,
        env=child_env(),
        check=True,
    )
    assert done.stdout.strip() == "['digits-mlp', 'finetune', 'noop', 'sklearn-tabular'] []"


# the context


def test_the_context_reports_through_its_sink(tmp_path: Path) -> None:
    events: list[Event] = []
    context = TrainingContext(
        arguments={"epochs": 3, "rate": 0.5, "name": "x", "flag": True},
        workdir=tmp_path,
        sink=events.append,
    )
    context.progress(1.5, "over")
    context.progress(-1)
    context.progress(math.nan)
    context.metric("loss", 0.25, step=2)
    context.metric("loss", math.inf, step=3)
    context.log("hello")
    assert events == [
        Progress(1.0, "over"),
        Progress(0.0, ""),
        Metric("loss", 0.25, 2),
        Log("metric loss is inf at step 3"),
        Log("hello"),
    ]
    assert (context.get_int("epochs"), context.get_float("rate")) == (3, 0.5)
    assert (context.get_str("name"), context.get_bool("flag")) == ("x", True)
    with pytest.raises(AssertionError):
        context.get_int("flag")
    with pytest.raises(TypeError):
        context.arguments["epochs"] = 4  # type: ignore[index]


# dataset files


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def test_a_csv_reads_into_features_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a, b ,kind\n1,2,0\n3.5,-4,1\n\n5,6e1,1.0\n")
    table = datasets_io.load(path, "csv", "kind")
    assert table.X.dtype == np.float32
    assert table.X.tolist() == [[1, 2], [3.5, -4], [5, 60]]
    assert table.y.dtype == np.int64
    assert table.y.tolist() == [0, 1, 1]
    assert table.columns == ("a", "b")
    assert datasets_io.inspect(path, "csv") == (3, 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a,b,label\n1,x,0\n", "line 2, column 'b': 'x' is not a number"),
        ("a,b,label\n1,2,0\n1,nan,0\n", "line 3, column 'b'"),
        ("a,b,label\n1,2,0\n1,2\n", "line 3 of t.csv has 2 values; the header has 3"),
        ("a,b,label\n1,,0\n", "line 2, column 'b'"),
        ("a,b,target\n1,2,0\n", "no column 'label'"),
        ("a,a,label\n1,2,0\n", "'a' more than once"),
        ("label\n1\n", "one column"),
        ("a,label\n", "no rows"),
        ("", "empty"),
        ("a,b,label\n1,1e39,0\n", "float32"),
    ],
)
def test_a_bad_csv_is_refused_naming_the_place(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as caught:
        datasets_io.load(path, "csv")
    assert expected in caught.value.message
    assert caught.value.violations[0].field == "dataset"


def test_an_npz_reads_into_features_and_labels(tmp_path: Path) -> None:
    path = _npz(
        tmp_path / "d.npz", X=np.arange(6, dtype=np.float64).reshape(3, 2), y=np.array([[0.0], [1.0], [2.0]])
    )
    table = datasets_io.load(path, "npz")
    assert (table.rows, table.features, table.y.tolist()) == (3, 2, [0, 1, 2])
    assert table.X.dtype == np.float32
    assert datasets_io.inspect(path, "npz") == (3, 2)
    soft = datasets_io.load(_npz(tmp_path / "s.npz", X=np.ones((2, 1)), y=np.array([0.5, 1.0])), "npz")
    assert soft.y.dtype == np.float64
    with pytest.raises(InvalidArgument, match="whole-number labels"):
        datasets_io.class_labels(soft)


def _huge_npz(path: Path) -> Path:
    """An NPZ whose arrays declare 10**9 rows of 10**6 float64 features and hold none of them."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, shape in (("X", (10**9, 10**6)), ("y", (10**9,))):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(  # type: ignore[no-untyped-call]
                header, {"descr": "<f8", "fortran_order": False, "shape": shape}
            )
            archive.writestr(f"{name}.npy", header.getvalue())
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: _npz(p, X=np.ones((2, 2))), "no array 'y'"),
        (lambda p: _npz(p, X=np.ones((2, 2)), y=np.ones(3)), "2 rows in X but 3 labels"),
        (lambda p: _npz(p, X=np.ones((2, 2, 2)), y=np.ones(2)), "must be 2-D"),
        (lambda p: _npz(p, X=np.array([["a", "b"]]), y=np.ones(1)), "must hold numbers"),
        (lambda p: _npz(p, X=np.array([[1, None]], dtype=object), y=np.ones(1)), "must hold numbers"),
        (lambda p: _npz(p, X=np.ones((2, 1)), y=np.array([0, np.nan])), "not a finite number"),
        (lambda p: _npz(p, X=np.zeros((0, 3)), y=np.zeros(0)), "empty"),
        (lambda p: p.write_bytes(b"not a zip") and p, "not an NPZ file"),
        (_huge_npz, "the limits are"),
    ],
)
def test_a_bad_npz_is_refused(tmp_path: Path, make: Any, expected: str) -> None:
    path = tmp_path / "d.npz"
    make(path)
    with pytest.raises(InvalidArgument) as caught:
        datasets_io.load(path, "npz")
    assert expected in caught.value.message


def test_an_unknown_format_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="format must be one of csv, npz"):
        datasets_io.load(tmp_path / "x.parquet", "parquet")
    with pytest.raises(InvalidArgument, match="cannot read"):
        datasets_io.load(tmp_path / "absent.csv", "csv")


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("iris", (150, 4), 3),
        ("wine", (178, 13), 3),
        ("breast_cancer", (569, 30), 2),
        ("digits", (1797, 64), 10),
    ],
)
def test_the_bundled_datasets_ship_with_scikit_learn(name: str, shape: tuple[int, int], classes: int) -> None:
    table = datasets_io.bundled(name)
    assert table.X.shape == shape
    assert len(np.unique(datasets_io.class_labels(table))) == classes


def test_an_unknown_bundled_dataset_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="iris, wine, breast_cancer, digits"):
        datasets_io.bundled("mnist")
