"""``python -m services.training.runner`` as the worker runs it: a real child process per job,
its JSON lines on stdout, the model it writes, and that model checked the way the registry
checks uploads (``verify_onnx``) and run in onnxruntime.

Models are kept small so the whole file takes well under a minute on two cores; the bases
that finetune starts from are trained once per module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from services.mesh.children import CODE_ROOT, child_env
from services.registry.verification import VerificationLimits, verify_onnx
from services.training import datasets_io
from services.training.builtin.finetune import SUPPORTED
from services.training.runner import MODEL_FILE
from tests.plugins_fixture import noop

PLUGINS_FIXTURE = Path(__file__).resolve().parent.parent / "plugins_fixture"
RUN_TIMEOUT_S = 120
_runs = itertools.count()


@dataclass
class Run:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    stdout: str
    workdir: Path

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]

    @property
    def result(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stdout + self.stderr
        assert self.events[-1]["type"] == "result"
        assert len(self.of("result")) == 1
        return self.events[-1]

    @property
    def error(self) -> dict[str, Any]:
        assert self.returncode == 1, self.stdout + self.stderr
        assert [e["type"] for e in self.events].count("error") == 1
        assert self.events[-1]["type"] == "error"
        assert "Traceback" not in self.stdout
        assert not (self.workdir / MODEL_FILE).exists()
        return self.events[-1]

    @property
    def model(self) -> bytes:
        data = (self.workdir / MODEL_FILE).read_bytes()
        assert hashlib.sha256(data).hexdigest() == self.result["sha256"]
        return data

    def metric_steps(self, name: str) -> list[int]:
        return [event["step"] for event in self.of("metric") if event["name"] == name]


def run_runner(
    root: Path,
    plugin: str,
    arguments: Mapping[str, object] | None = None,
    *,
    dataset: Path | None = None,
    base_model: bytes | None = None,
    seed: int = 7,
    plugins_dir: Path | None = None,
    spec: Any = None,
) -> Run:
    """Runs the runner on a spec as the worker writes it; every stdout line must be JSON."""
    workdir = root / f"job-{next(_runs)}"
    workdir.mkdir()
    base_path = None
    if base_model is not None:
        base_path = workdir / "base.onnx"
        base_path.write_bytes(base_model)
    if spec is None:
        spec = {
            "plugin": plugin,
            "arguments": dict(arguments or {}),
            "dataset": {"path": str(dataset), "format": dataset.suffix.lstrip(".")} if dataset else None,
            "base_model": str(base_path) if base_path else None,
            "workdir": str(workdir),
            "seed": seed,
            "plugins_dir": str(plugins_dir) if plugins_dir else None,
        }
    spec_path = workdir / "spec.json"
    spec_path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "services.training.runner", str(spec_path)],
        capture_output=True,
        text=True,
        cwd=CODE_ROOT,
        env=child_env(),
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return Run(done.returncode, events, done.stderr, done.stdout, workdir)


def assert_verified(model: bytes, root: Path) -> None:
    """The check the registry runs on an upload, with the registry's default limits."""
    path = root / f"verify-{next(_runs)}.onnx"
    path.write_bytes(model)
    report = verify_onnx(path, VerificationLimits()).report
    assert report.passed, [(c.name, c.detail) for c in report.failures]


def session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def signature(model: bytes) -> list[tuple[str, str, list[Any]]]:
    opened = session(model)
    return [(v.name, v.type, list(v.shape)) for v in [*opened.get_inputs(), *opened.get_outputs()]]


def predict(model: bytes, X: NDArray[np.float32]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    label, probabilities = session(model).run(["label", "probabilities"], {"input": X.astype(np.float32)})
    return np.asarray(label), np.asarray(probabilities)


def write_npz(path: Path, X: NDArray[Any], y: NDArray[Any]) -> Path:
    np.savez(path, X=X.astype(np.float32), y=y)
    return path


def check_events(run: Run) -> None:
    fractions = [event["fraction"] for event in run.of("progress")]
    assert fractions
    assert fractions == sorted(fractions)
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert {e["type"] for e in run.events} <= {"progress", "metric", "log", "result"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runner")


@pytest.fixture(scope="module")
def iris_logistic(root: Path) -> Run:
    return run_runner(root, "sklearn-tabular", {"model": "logistic_regression", "dataset": "iris"})


@pytest.fixture(scope="module")
def digits_mlp(root: Path) -> Run:
    return run_runner(root, "digits-mlp", {"epochs": "4", "hidden": 32, "learning_rate": 0.003})


# the built-ins


def test_noop_runs_fast_and_writes_its_model(root: Path) -> None:
    run = run_runner(root, "noop", {"sleep_s": 0.2}, plugins_dir=PLUGINS_FIXTURE)
    check_events(run)
    assert run.result["metrics"] == {"accuracy": 1.0}
    assert run.model == noop.model()
    assert sorted(p.name for p in run.workdir.iterdir()) == [MODEL_FILE, "spec.json"]
    label, probabilities = predict(run.model, np.eye(4, dtype=np.float32))
    assert label.tolist() == [0, 1, 2, 3]
    assert probabilities.shape == (4, 4)


def test_logistic_regression_on_iris(iris_logistic: Run, root: Path) -> None:
    run = iris_logistic
    check_events(run)
    metrics = run.result["metrics"]
    assert metrics["accuracy"] >= 0.85
    assert "iris" in run.result["description"]
    assert signature(run.model) == [
        ("input", "tensor(float)", [None, 4]),
        ("label", "tensor(int64)", [None]),
        ("probabilities", "tensor(float)", [None, 3]),
    ]
    iris = datasets_io.bundled("iris")
    label, probabilities = predict(run.model, iris.X)
    assert label.dtype == np.int64
    assert np.mean(label == iris.y) >= 0.9
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert_verified(run.model, root)


def test_the_same_seed_gives_the_same_bytes(iris_logistic: Run, root: Path) -> None:
    again = run_runner(root, "sklearn-tabular", {"model": "logistic_regression", "dataset": "iris"})
    assert again.result["sha256"] == iris_logistic.result["sha256"]


def test_gradient_boosting_on_an_uploaded_csv(root: Path) -> None:
    wine = datasets_io.bundled("wine")
    table = root / "wine.csv"
    rows = [",".join([*wine.columns, "kind"])]
    rows += [",".join([*(f"{v:g}" for v in x), str(int(c))]) for x, c in zip(wine.X, wine.y, strict=True)]
    table.write_text("\n".join(rows) + "\n")
    run = run_runner(
        root,
        "sklearn-tabular",
        {"model": "gradient_boosting", "n_estimators": "15", "target": "kind", "test_fraction": 0.3},
        dataset=table,
    )
    check_events(run)
    assert run.result["metrics"]["accuracy"] >= 0.8
    steps = run.metric_steps("loss")
    assert steps == sorted(steps)
    assert steps[-1] == 15
    assert signature(run.model)[0] == ("input", "tensor(float)", [None, 13])
    assert_verified(run.model, root)
    # finetune cannot read trees, and says which models it can
    refused = run_runner(
        root, "finetune", dataset=write_npz(root / "w.npz", wine.X, wine.y), base_model=run.model
    )
    assert refused.error["reason"] == "INVALID_ARGUMENT"
    assert SUPPORTED in refused.error["message"]


def test_digits_mlp_reports_every_epoch(digits_mlp: Run, root: Path) -> None:
    run = digits_mlp
    check_events(run)
    assert run.metric_steps("loss") == [1, 2, 3, 4]
    assert run.metric_steps("accuracy") == [1, 2, 3, 4]
    assert run.result["metrics"]["accuracy"] >= 0.85
    assert signature(run.model) == [
        ("input", "tensor(float)", [None, 64]),
        ("label", "tensor(int64)", [None]),
        ("probabilities", "tensor(float)", [None, 10]),
    ]
    assert_verified(run.model, root)


# finetune


def test_finetune_learns_a_tenant_whose_labels_are_permuted(iris_logistic: Run, root: Path) -> None:
    iris = datasets_io.bundled("iris")
    tenant = write_npz(root / "iris-permuted.npz", iris.X, (iris.y + 1) % 3)
    run = run_runner(root, "finetune", dataset=tenant, base_model=iris_logistic.model)
    check_events(run)
    metrics = run.result["metrics"]
    assert metrics["base_accuracy"] <= 0.2
    assert metrics["accuracy"] >= 0.8
    assert metrics["accuracy_gain"] == pytest.approx(metrics["accuracy"] - metrics["base_accuracy"])
    assert run.metric_steps("accuracy")[0] == 0  # the base's, before the first epoch
    assert signature(run.model) == signature(iris_logistic.model)
    label, _ = predict(run.model, iris.X)
    assert np.mean(label == (iris.y + 1) % 3) >= 0.8
    assert_verified(run.model, root)
    # a fine-tuned model can be fine-tuned again; replay mixes in the bundled rows
    replayed = run_runner(
        root, "finetune", {"replay": "iris", "epochs": 5}, dataset=tenant, base_model=run.model
    )
    assert any("replaying" in event["message"] for event in replayed.of("log"))
    assert signature(replayed.model) == signature(iris_logistic.model)


def test_finetune_moves_a_binary_decision_boundary(root: Path) -> None:
    base = run_runner(root, "sklearn-tabular", {"dataset": "breast_cancer", "max_iter": 500})
    cancer = datasets_io.bundled("breast_cancer")
    # this tenant calls benign only the smaller half of what the base calls benign
    shifted = ((cancer.y == 1) & (cancer.X[:, 0] < np.median(cancer.X[:, 0]))).astype(np.int64)
    run = run_runner(
        root, "finetune", dataset=write_npz(root / "shifted.npz", cancer.X, shifted), base_model=base.model
    )
    metrics = run.result["metrics"]
    assert metrics["accuracy"] >= metrics["base_accuracy"] + 0.08
    assert metrics["accuracy"] >= 0.9
    assert signature(run.model) == signature(base.model)
    assert_verified(run.model, root)


def test_finetune_continues_an_mlp(digits_mlp: Run, root: Path) -> None:
    digits = datasets_io.bundled("digits")
    rows = np.random.default_rng(0).choice(len(digits.y), 400, replace=False)
    tenant = write_npz(root / "digits-permuted.npz", digits.X[rows], (digits.y[rows] + 1) % 10)
    run = run_runner(root, "finetune", dataset=tenant, base_model=digits_mlp.model)
    metrics = run.result["metrics"]
    assert metrics["base_accuracy"] <= 0.2
    assert metrics["accuracy"] >= metrics["base_accuracy"] + 0.5
    assert signature(run.model) == signature(digits_mlp.model)
    assert_verified(run.model, root)


# failures: exit status 1 and one error line


_PRINTS_AND_FORGETS = """
import math

from services.training.plugins import Plugin, PluginInfo, TrainingContext, TrainingResult
from tests.plugins_fixture.noop import model


class Chatty(Plugin):
    info = PluginInfo(name="chatty", version="1", description="prints, and reports no accuracy")

    def run(self, context: TrainingContext) -> TrainingResult:
        print("hello from the plugin", flush=True)
        return TrainingResult(model(), {"loss": 0.5})


class Diverged(Plugin):
    info = PluginInfo(name="diverged", version="1", description="a NaN metric")

    def run(self, context: TrainingContext) -> TrainingResult:
        return TrainingResult(model(), {"accuracy": math.nan})
"""


def test_a_plugin_printing_to_stdout_does_not_break_the_protocol(root: Path) -> None:
    folder = root / "chatty"
    folder.mkdir()
    (folder / "chatty.py").write_text(_PRINTS_AND_FORGETS)
    run = run_runner(root, "chatty", plugins_dir=folder)
    assert "hello from the plugin" in run.stderr
    assert run.error["reason"] == "PLUGIN_FAILED"
    assert "no accuracy" in run.error["message"]
    diverged = run_runner(root, "diverged", plugins_dir=folder)
    assert diverged.error["reason"] == "PLUGIN_FAILED"
    assert "not a finite number" in diverged.error["message"]


def test_a_failing_plugin_fails_with_its_message(root: Path) -> None:
    run = run_runner(root, "noop", {"fail": "true"}, plugins_dir=PLUGINS_FIXTURE)
    assert run.error == {
        "type": "error",
        "message": "plugin noop failed: RuntimeError: noop was asked to fail",
        "reason": "PLUGIN_FAILED",
    }
    assert "Traceback" in run.stderr


@pytest.mark.parametrize(
    ("plugin", "arguments", "extra", "reason", "expected"),
    [
        ("no-such-plugin", {}, {}, "NOT_FOUND", "no training plugin 'no-such-plugin'"),
        ("noop", {"sleep_s": "soon", "colour": "red"}, {}, "INVALID_ARGUMENT", "arguments.colour"),
        ("finetune", {}, {}, "INVALID_ARGUMENT", "needs a dataset"),
        ("finetune", {}, {"dataset": "iris.csv"}, "INVALID_ARGUMENT", "starts from a base model"),
        ("finetune", {}, {"dataset": "iris.csv", "base": "junk"}, "INVALID_ARGUMENT", "not an ONNX model"),
        ("sklearn-tabular", {}, {"dataset": "bad.csv"}, "INVALID_ARGUMENT", "line 3, column 'b'"),
        (
            "sklearn-tabular",
            {"target": "kind"},
            {"dataset": "iris.csv"},
            "INVALID_ARGUMENT",
            "no column 'kind'",
        ),
        ("sklearn-tabular", {}, {"dataset": "tiny.csv"}, "INVALID_ARGUMENT", "too few"),
    ],
)
def test_bad_jobs_end_with_one_error_line(
    root: Path, plugin: str, arguments: dict[str, object], extra: dict[str, str], reason: str, expected: str
) -> None:
    files = root / "inputs"
    files.mkdir(exist_ok=True)
    (files / "bad.csv").write_text("a,b,label\n1,2,0\n3,four,1\n")
    (files / "tiny.csv").write_text("a,label\n1,0\n2,1\n")
    iris = datasets_io.bundled("iris")
    (files / "iris.csv").write_text(
        "a,b,c,d,label\n"
        + "".join(f"{','.join(map(str, x))},{c}\n" for x, c in zip(iris.X, iris.y, strict=True))
    )
    bases = {"junk": b"not a model"}
    run = run_runner(
        root,
        plugin,
        arguments,
        dataset=files / extra["dataset"] if "dataset" in extra else None,
        base_model=bases[extra["base"]] if "base" in extra else None,
        plugins_dir=PLUGINS_FIXTURE,
    )
    assert run.error["reason"] == reason
    assert expected in run.error["message"]
    assert "\n" not in run.error["message"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{not json", "cannot read the job spec"),
        ("[]", "malformed job spec"),
        (json.dumps({"arguments": {}}), "malformed job spec"),
        (json.dumps({"plugin": "noop", "workdir": "/tmp", "seed": -1}), "seed"),
    ],
)
def test_a_malformed_spec_is_an_invalid_argument(root: Path, spec: str, expected: str) -> None:
    run = run_runner(root, "", spec=spec)
    assert run.error["reason"] == "INVALID_ARGUMENT"
    assert expected in run.error["message"]
