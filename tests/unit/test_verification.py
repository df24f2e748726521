"""ONNX artifact verification, end to end through the real worker process.

Every test writes a model built by ``tests.onnx_factory`` and runs ``verify_onnx`` on it:
the child process, its limits and its JSON report are the thing under test. Only the last
tests replace the worker, with real processes scripted to die in the ways a model can make
it die. Each call costs a Python start-up (a few hundred ms).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.defs
import onnxruntime as ort
import pytest
from onnx import TensorProto

from services.mesh.errors import InvalidArgument
from services.registry import verification
from services.registry.domain import TensorSpec, VerificationCheck
from services.registry.verification import (
    CHECK_NAMES,
    ONNXRUNTIME_MAX_OPSET,
    VerificationLimits,
    VerificationResult,
    verify_onnx,
)
from tests import onnx_factory

LIMITS = VerificationLimits()
PROTOCOL_DATATYPES = (
    *("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"),
    *("FP16", "BF16", "FP32", "FP64", "BYTES"),
)
_names = itertools.count()

Verify = Callable[..., VerificationResult]


@pytest.fixture
def verify(tmp_path: Path) -> Verify:
    """Writes the bytes to a file and verifies it; keyword arguments override LIMITS."""

    def run(data: bytes, **limits: Any) -> VerificationResult:
        path = tmp_path / f"model-{next(_names)}.onnx"
        path.write_bytes(data)
        return verify_onnx(path, dataclasses.replace(LIMITS, **limits))

    return run


def checks(result: VerificationResult) -> dict[str, VerificationCheck]:
    assert tuple(check.name for check in result.report.checks) == CHECK_NAMES
    return {check.name: check for check in result.report.checks}


def failed(result: VerificationResult) -> dict[str, str]:
    return {check.name: check.detail for check in result.report.failures}


def assert_only_failure(result: VerificationResult, name: str) -> str:
    """Asserts that ``name`` is the one static check that failed, and the trial was skipped."""
    failures = failed(result)
    assert set(failures) == {name, "trial_inference"}, failures
    assert failures["trial_inference"] == f"skipped: {name} failed"
    return failures[name]


# passing


def test_a_small_classifier_passes_every_check(verify: Verify) -> None:
    result = verify(onnx_factory.tiny_classifier(n_features=4, n_classes=3))

    assert result.report.passed, result.report.failures
    assert result.report.opset == onnx_factory.OPSET
    assert result.signature.inputs == (TensorSpec("input", "FP32", (-1, 4)),)
    assert result.signature.outputs == (TensorSpec("probabilities", "FP32", (-1, 3)),)
    by_name = checks(result)
    assert (
        by_name["opset"].detail == f"ai.onnx opset {onnx_factory.OPSET} (accepted: 7 to {LIMITS.max_opset})"
    )
    assert by_name["tensor_sizes"].detail.startswith("largest: initializer 'W' (48 bytes")
    assert by_name["trial_inference"].detail.endswith("on generated inputs")


@pytest.mark.parametrize("datatype", PROTOCOL_DATATYPES)
def test_every_protocol_datatype_is_described_and_runs(verify: Verify, datatype: str) -> None:
    result = verify(onnx_factory.identity_model(datatype, shape=("batch", 2)))

    assert result.report.passed, result.report.failures
    assert result.signature.inputs == (TensorSpec("input", datatype, (-1, 2)),)
    assert result.signature.outputs == (TensorSpec("output", datatype, (-1, 2)),)


def test_strings_are_reported_as_bytes(verify: Verify) -> None:
    result = verify(onnx_factory.identity_model("STRING"))

    assert result.report.passed, result.report.failures
    assert result.signature.inputs[0].datatype == "BYTES"


def test_static_named_and_anonymous_dims(verify: Verify) -> None:
    result = verify(onnx_factory.identity_model("INT64", shape=(3, "n", None, 1)))

    assert result.report.passed, result.report.failures
    assert result.signature.inputs == (TensorSpec("input", "INT64", (3, -1, -1, 1)),)


def test_a_model_local_function_is_allowed(verify: Verify) -> None:
    result = verify(onnx_factory.local_function_model())

    assert result.report.passed, result.report.failures
    assert checks(result)["operators"].detail == "3 node(s), 1 model-local function(s)"


def test_a_large_initializer_passes_and_is_measured(verify: Verify) -> None:
    # big enough that shape inference runs on a skeleton without the table's bytes
    result = verify(onnx_factory.large_model(4 * 1024 * 1024))

    assert result.report.passed, result.report.failures
    assert checks(result)["tensor_sizes"].detail.startswith("largest: initializer 'table' (4194304 bytes")
    assert result.signature.inputs == (TensorSpec("ids", "INT64", (-1,)),)
    assert result.signature.outputs == (TensorSpec("embeddings", "FP32", (-1, 64)),)


# not ONNX at all


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not a model",
        bytes(range(256)) * 16,
        np.random.default_rng(0).bytes(4096),
        onnx_factory.graphless_model(),
    ],
    ids=["empty", "text", "byte-ramp", "random", "graphless"],
)
def test_bytes_that_are_no_model_raise_not_onnx(verify: Verify, data: bytes) -> None:
    with pytest.raises(InvalidArgument) as caught:
        verify(data)

    assert caught.value.reason == "NOT_ONNX"
    assert caught.value.message.startswith("the artifact is not an ONNX model: ")
    assert "\n" not in caught.value.message


def test_a_missing_file_is_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        verify_onnx(tmp_path / "absent.onnx", LIMITS)


# one failing check each


def test_checker(verify: Verify) -> None:
    detail = failed(verify(onnx_factory.checker_failing_model()))["checker"]

    assert "'nowhere'" in detail
    assert "topologically sorted" in detail


def test_shape_inference(verify: Verify) -> None:
    result = verify(onnx_factory.shape_mismatch_model())

    # the full checker runs strict shape inference too, so both report the conflict
    assert set(failed(result)) == {"checker", "shape_inference", "trial_inference"}
    assert (
        "Inferred shape and existing shape differ in dimension 0: (2) vs (3)"
        in failed(result)["shape_inference"]
    )
    assert failed(result)["trial_inference"] == "skipped: checker failed"


@pytest.mark.parametrize(
    ("data", "opset"),
    [
        (onnx_factory.opset_model(6, ir_version=3), 6),
        (onnx_factory.opset_model(LIMITS.max_opset + 1), LIMITS.max_opset + 1),
    ],
    ids=["too-old", "too-new"],
)
def test_opset_outside_the_accepted_range(verify: Verify, data: bytes, opset: int) -> None:
    result = verify(data)

    detail = assert_only_failure(result, "opset")
    assert detail == f"ai.onnx opset {opset} is not supported (accepted: 7 to {LIMITS.max_opset})"
    assert result.report.opset == opset


def test_the_highest_accepted_opset_really_runs(verify: Verify) -> None:
    # guards ONNXRUNTIME_MAX_OPSET against an onnxruntime downgrade
    result = verify(onnx_factory.opset_model(LIMITS.max_opset))

    assert result.report.passed, result.report.failures
    assert result.report.opset == LIMITS.max_opset


def test_onnxruntime_still_refuses_the_next_opset() -> None:
    # when an onnxruntime upgrade starts to accept it, raise ONNXRUNTIME_MAX_OPSET
    next_opset = ONNXRUNTIME_MAX_OPSET + 1
    if next_opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"onnx {onnx.__version__} does not know opset {next_opset} yet")
    with pytest.raises(
        Exception, match=f"official support for domain ai.onnx is till opset {ONNXRUNTIME_MAX_OPSET}"
    ):
        ort.InferenceSession(onnx_factory.opset_model(next_opset), providers=["CPUExecutionProvider"])
    assert min(onnx.defs.onnx_opset_version(), ONNXRUNTIME_MAX_OPSET) == LIMITS.max_opset


@pytest.mark.parametrize(
    ("location", "escape"),
    [
        ("weights.bin", None),
        ("../../etc/passwd", "(escapes the model's directory: '..' component)"),
        ("/etc/passwd", "(escapes the model's directory: absolute path)"),
    ],
)
def test_external_data(verify: Verify, tmp_path: Path, location: str, escape: str | None) -> None:
    result = verify(onnx_factory.external_data_model(location))

    failures = failed(result)
    # the checker objects to the reference as well; either way the trial never runs
    assert set(failures) <= {"checker", "external_data", "trial_inference"}
    assert failures["trial_inference"].startswith("skipped: ")
    detail = failures["external_data"]
    assert f"initializer 'W' in {location!r}" in detail
    assert "must be a single file" in detail
    if escape is None:
        assert "escapes" not in detail
    else:
        assert escape in detail
    # the registry's private upload directory stays private
    assert not [detail for detail in failures.values() if str(tmp_path) in detail]


def test_tensor_sizes_huge_declared_shape(verify: Verify) -> None:
    result = verify(onnx_factory.huge_declared_tensor_model())

    detail = assert_only_failure(result, "tensor_sizes")
    assert detail.startswith(f"2 tensor(s) exceed the limit of {LIMITS.max_tensor_bytes} bytes: ")
    assert "input 'huge' (4398046511104 bytes)" in detail
    assert "output 'output' (4398046511104 bytes)" in detail


def test_tensor_sizes_initializer_over_the_limit(verify: Verify) -> None:
    result = verify(onnx_factory.tiny_classifier(n_features=4, n_classes=3), max_tensor_bytes=40)

    detail = assert_only_failure(result, "tensor_sizes")
    assert detail == "1 tensor(s) exceed the limit of 40 bytes: initializer 'W' (48 bytes)"


@pytest.mark.parametrize("in_subgraph", [False, True], ids=["graph", "if-branch"])
def test_operators_custom_domain(verify: Verify, in_subgraph: bool) -> None:
    result = verify(onnx_factory.custom_op_model(in_subgraph=in_subgraph))

    detail = assert_only_failure(result, "operators")
    assert detail.startswith(
        "custom operators are not supported: 'FancyOp' from domain 'com.example.custom' (1 node(s))"
    )


def test_operators_custom_domain_inside_a_local_function(verify: Verify) -> None:
    result = verify(onnx_factory.local_function_model(body_domain="com.example.custom"))

    detail = assert_only_failure(result, "operators")
    assert "'Add' from domain 'com.example.custom'" in detail


def test_signature_zipmap_output(verify: Verify) -> None:
    result = verify(onnx_factory.zipmap_model())

    detail = assert_only_failure(result, "signature")
    assert "output 'output_probability' has type seq(map(int64,tensor(float))), not a tensor" in detail
    assert "zipmap=False" in detail
    # what could be described still is
    assert result.signature.inputs == (TensorSpec("input", "FP32", (-1, 3)),)
    assert result.signature.outputs == ()


def test_signature_element_type_without_a_protocol_name(verify: Verify) -> None:
    result = verify(onnx_factory.identity_model(TensorProto.COMPLEX64))

    detail = assert_only_failure(result, "signature")
    assert (
        "input 'input' has element type complex64, which the Open Inference Protocol cannot carry" in detail
    )


# the trial's limits


def test_memory_bomb_fails_the_trial(verify: Verify) -> None:
    result = verify(onnx_factory.memory_bomb_model(), trial_memory_bytes=1024**3)

    failures = failed(result)
    assert set(failures) == {"trial_inference"}, failures
    assert failures["trial_inference"].startswith("exceeded the memory limit of 1073741824 bytes")


def test_slow_model_fails_the_trial_at_the_time_limit(verify: Verify) -> None:
    started = time.monotonic()
    result = verify(onnx_factory.slow_model(), trial_timeout_s=1.0)

    assert failed(result) == {"trial_inference": "exceeded the time limit of 1 s"}
    assert time.monotonic() - started < LIMITS.check_timeout_s


def test_a_worker_that_cannot_get_memory_yields_a_report(verify: Verify) -> None:
    # far below what the interpreter itself needs: the worker fails or crashes outright
    result = verify(onnx_factory.tiny_classifier(), trial_memory_bytes=16 * 1024**2)

    assert not result.report.passed
    assert "exceeded the memory limit of 16777216 bytes" in result.report.failures[0].detail
    assert not checks(result)["trial_inference"].passed


def test_the_static_checks_have_their_own_time_limit(verify: Verify) -> None:
    # too short for the worker to even start
    result = verify(onnx_factory.tiny_classifier(), check_timeout_s=0.01)

    failures = failed(result)
    assert failures["checker"] == "exceeded the time limit of 0.01 s"
    assert all(failures[name] == "skipped: checker failed" for name in CHECK_NAMES[1:])


# how the parent reads a worker that misbehaves: real child processes, scripted to fail

_CHECKER_PASSED = '{"type": "check", "name": "checker", "passed": true, "detail": ""}'


@pytest.mark.parametrize(
    ("script", "stopped_at", "reason"),
    [
        (
            "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
            "checker",
            "the verification process crashed with SIGSEGV: the model crashes the runtime, "
            "or it exceeded the memory limit of 4294967296 bytes",
        ),
        (
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
            "checker",
            "exceeded the memory limit of 4294967296 bytes (the verification process was killed)",
        ),
        (
            "import os, sys; sys.stderr.write('std::bad_alloc'); sys.stderr.flush(); os.abort()",
            "checker",
            "exceeded the memory limit of 4294967296 bytes",
        ),
        (
            f"import sys; print({_CHECKER_PASSED!r}, flush=True); sys.exit(3)",
            "shape_inference",
            "the verification process exited with status 3 before finishing this check",
        ),
        (
            "print('not json', flush=True)",
            "checker",
            "the verification process sent a malformed report "
            "(JSONDecodeError: Expecting value: line 1 column 1 (char 0))",
        ),
    ],
    ids=["segfault", "sigkill", "bad-alloc-abort", "early-exit", "garbage"],
)
def test_a_worker_that_dies_yields_a_failed_report(
    verify: Verify, monkeypatch: pytest.MonkeyPatch, script: str, stopped_at: str, reason: str
) -> None:
    monkeypatch.setattr(verification, "_worker_command", lambda path, limits: [sys.executable, "-c", script])

    by_name = checks(verify(onnx_factory.tiny_classifier()))

    assert by_name[stopped_at] == VerificationCheck(stopped_at, False, reason)
    later = CHECK_NAMES[CHECK_NAMES.index(stopped_at) + 1 :]
    assert all(by_name[name].detail == f"skipped: {stopped_at} failed" for name in later)
