"""Verification of uploaded ONNX artifacts, run in a disposable child process.

The registry never parses an uploaded artifact itself: protobuf, the ONNX checker and
onnxruntime are large C++ code bases fed untrusted bytes, and a trial inference can ask
for any amount of memory or time. So :func:`verify_onnx` starts one child
(``python -m services.registry.verify_worker``) that does all of it under a memory limit,
watches it with a wall-clock deadline, and turns whatever happens to it (a JSON report, a
kill, a crash) into a :class:`VerificationReport`.

The worker reports one JSON line per finished check, in :data:`CHECK_NAMES` order, so when
it dies or runs out of time the parent knows which check was running.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx.defs

from services.mesh.children import CODE_ROOT, child_env
from services.mesh.errors import InvalidArgument
from services.registry.domain import Signature, TensorSpec, VerificationCheck, VerificationReport

log = logging.getLogger(__name__)

CHECK_NAMES: tuple[str, ...] = (
    "checker",
    "shape_inference",
    "opset",
    "external_data",
    "tensor_sizes",
    "operators",
    "signature",
    "trial_inference",
)
"""Every check, in the order the worker runs them and the report lists them."""

STATIC_CHECK_NAMES = CHECK_NAMES[:-1]

# The highest ai.onnx opset onnxruntime 1.31 officially supports: for newer opsets it refuses
# to load the model ("Opset 27 is under development ... official support for domain ai.onnx
# is till opset 26"). onnx itself may know newer ones (1.23 knows 28), so the default is the
# lower of the two; tests/unit/test_verification.py notices when an upgrade moves it.
ONNXRUNTIME_MAX_OPSET = 26
DEFAULT_MAX_OPSET = min(onnx.defs.onnx_opset_version(), ONNXRUNTIME_MAX_OPSET)

# What the worker may write on stdout: a report line per check plus the signature. A model
# with an absurd number of inputs must not make the registry buffer without bound.
_MAX_REPORT_BYTES = 32 * 1024 * 1024  # per line
_STDERR_TAIL_BYTES = 16 * 1024
_MEMORY_HINTS = (
    "MemoryError",
    "bad_alloc",
    "Failed to allocate memory",
    "Cannot allocate memory",
    "out of memory",
)
_KILL_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class VerificationLimits:
    """Bounds on what an artifact may declare and what its verification may consume."""

    min_opset: int = 7
    """Lowest accepted ai.onnx opset; onnxruntime dropped support for older ones."""
    max_opset: int = DEFAULT_MAX_OPSET
    """Highest accepted ai.onnx opset: what both onnx and onnxruntime officially support."""
    max_tensor_bytes: int = 4 * 1024**3
    """Any initializer, constant or statically shaped declared tensor larger than this fails."""
    trial_timeout_s: float = 60.0
    """Wall-clock limit on the trial inference (session creation and one run)."""
    trial_memory_bytes: int = 4 * 1024**3
    """Memory limit (RLIMIT_DATA) on the whole verification process, parsing included."""
    check_timeout_s: float = 300.0
    """Wall-clock limit on starting the worker, parsing and the static checks, which grow
    with the artifact's size (about 0.8 s for 200 MB, most of it the checker and parsing)."""


@dataclass(frozen=True, slots=True)
class VerificationResult:
    """A report and the signature found. When the ``signature`` check fails, the signature
    holds only the inputs and outputs that could be described."""

    report: VerificationReport
    signature: Signature


class _Outcome:
    """What the parent learned from one worker run."""

    def __init__(self) -> None:
        self.checks: dict[str, VerificationCheck] = {}
        self.opset = 0
        self.signature = Signature((), ())
        self.not_onnx: str | None = None
        self.timed_out_after: float | None = None
        self.malformed: str | None = None
        self.stderr_tail = b""
        self.returncode: int | None = None

    def running_check(self) -> str | None:
        return next((name for name in CHECK_NAMES if name not in self.checks), None)


def verify_onnx(path: Path, limits: VerificationLimits) -> VerificationResult:
    """Verifies the ONNX artifact at ``path`` in a child process and reports every check.

    Blocks for up to ``check_timeout_s + trial_timeout_s`` seconds: run it in an executor.
    A model that fails any check still gets a report (the registry keeps it as FAILED);
    only bytes that are no ONNX model at all raise :class:`InvalidArgument` with reason
    ``NOT_ONNX``. A missing ``path`` raises :class:`FileNotFoundError`."""
    size = path.stat().st_size
    started = time.monotonic()
    outcome = _run_worker(path, limits)
    if outcome.not_onnx is not None:
        raise InvalidArgument(
            f"the artifact is not an ONNX model: {outcome.not_onnx}",
            reason="NOT_ONNX",
            metadata={"detail": outcome.not_onnx},
        )
    report = VerificationReport(checks=_complete(outcome, limits), opset=outcome.opset)
    log.info(
        "verified %s (%d bytes) in %.2f s: %s",
        path.name,
        size,
        time.monotonic() - started,
        "passed" if report.passed else "failed " + ", ".join(c.name for c in report.failures),
    )
    return VerificationResult(report=report, signature=outcome.signature)


def _worker_command(path: Path, limits: VerificationLimits) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.registry.verify_worker",
        "--limits",
        json.dumps(dataclasses.asdict(limits)),
        os.fspath(path.resolve()),
    ]


def _worker_env() -> dict[str, str]:
    # One thread everywhere: the trial is a smoke test, and verifications run side by side.
    return child_env(threads=1)


def _run_worker(path: Path, limits: VerificationLimits) -> _Outcome:
    outcome = _Outcome()
    stdout = bytearray()
    stderr = bytearray()
    with subprocess.Popen(
        _worker_command(path, limits),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_worker_env(),
        cwd=CODE_ROOT,
        # out of the terminal's process group: a Ctrl-C stops the registry, which then
        # decides what happens to its workers
        start_new_session=True,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        deadline = time.monotonic() + limits.check_timeout_s
        phase_limit = limits.check_timeout_s
        in_trial = False
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, stdout)
            selector.register(process.stderr, selectors.EVENT_READ, stderr)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome.timed_out_after = phase_limit
                    break
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffer: bytearray = key.data
                    buffer += chunk
                    if buffer is stderr:
                        del stderr[: max(0, len(stderr) - _STDERR_TAIL_BYTES)]
                        continue
                    _consume_lines(stdout, outcome)
                    if len(stdout) > _MAX_REPORT_BYTES:
                        outcome.malformed = f"a line longer than {_MAX_REPORT_BYTES} bytes"
                if outcome.malformed is not None:
                    break
                if not in_trial and all(name in outcome.checks for name in STATIC_CHECK_NAMES):
                    # the trial's clock starts when the static checks are done, so a big
                    # model's slow checker does not eat into the trial's time
                    in_trial = True
                    phase_limit = limits.trial_timeout_s
                    deadline = time.monotonic() + phase_limit
        if outcome.timed_out_after is not None or outcome.malformed is not None:
            process.kill()
        try:
            # both pipes at EOF means it is exiting: the kernel closes them in exit()
            returncode = process.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            # it closed its pipes but lingers; nothing more will come from it
            process.kill()
            returncode = process.wait()
    outcome.stderr_tail = bytes(stderr)
    _note_exit(outcome, returncode)
    return outcome


def _consume_lines(buffer: bytearray, outcome: _Outcome) -> None:
    while outcome.malformed is None and (end := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        try:
            _apply(json.loads(line), outcome)
        except (ValueError, KeyError, TypeError) as error:
            outcome.malformed = f"{type(error).__name__}: {error}"[:200]


def _apply(message: dict[str, Any], outcome: _Outcome) -> None:
    kind = message["type"]
    if kind == "check":
        name = str(message["name"])
        if name not in CHECK_NAMES:
            raise ValueError(f"verification worker reported an unknown check {name!r}")
        outcome.checks[name] = VerificationCheck(name, bool(message["passed"]), str(message["detail"]))
    elif kind == "model":
        outcome.opset = int(message["opset"])
        outcome.signature = Signature(
            inputs=tuple(_tensor_spec(spec) for spec in message["inputs"]),
            outputs=tuple(_tensor_spec(spec) for spec in message["outputs"]),
        )
    elif kind == "not_onnx":
        outcome.not_onnx = str(message["detail"])
    else:
        raise ValueError(f"verification worker sent an unknown message type {kind!r}")


def _tensor_spec(spec: dict[str, Any]) -> TensorSpec:
    return TensorSpec(str(spec["name"]), str(spec["datatype"]), tuple(int(d) for d in spec["shape"]))


def _note_exit(outcome: _Outcome, returncode: int) -> None:
    outcome.returncode = returncode
    finished = outcome.not_onnx is not None or outcome.running_check() is None
    if finished and returncode == 0:
        return
    # a timeout is the model's doing; anything else may be ours, so keep the evidence
    level = logging.INFO if outcome.timed_out_after is not None else logging.WARNING
    log.log(
        level,
        "verification worker ended with status %s while running %s; stderr tail:\n%s",
        returncode,
        outcome.running_check(),
        outcome.stderr_tail.decode("utf-8", "replace"),
    )


def _complete(outcome: _Outcome, limits: VerificationLimits) -> tuple[VerificationCheck, ...]:
    """The report in CHECK_NAMES order: what the worker said, the reason it stopped for the
    check it was running, and a skip for every check after that one."""
    stopped_at = outcome.running_check()
    checks: list[VerificationCheck] = []
    for name in CHECK_NAMES:
        if name in outcome.checks:
            checks.append(outcome.checks[name])
        elif name == stopped_at:
            checks.append(VerificationCheck(name, False, _stop_reason(outcome, limits)))
        else:
            checks.append(VerificationCheck(name, False, f"skipped: {stopped_at} failed"))
    return tuple(checks)


def _stop_reason(outcome: _Outcome, limits: VerificationLimits) -> str:
    if outcome.timed_out_after is not None:
        return f"exceeded the time limit of {outcome.timed_out_after:g} s"
    if outcome.malformed is not None:
        return f"the verification process sent a malformed report ({outcome.malformed})"
    memory = f"exceeded the memory limit of {limits.trial_memory_bytes} bytes"
    stderr = outcome.stderr_tail.decode("utf-8", "replace")
    if any(hint in stderr for hint in _MEMORY_HINTS):
        return memory
    returncode = outcome.returncode
    if returncode == -signal.SIGKILL:
        # nobody but the kernel's OOM killer sends SIGKILL to a worker we did not kill
        return f"{memory} (the verification process was killed)"
    if returncode is not None and returncode < 0:
        return (
            f"the verification process crashed with {_signal_name(returncode)}: the model crashes the "
            f"runtime, or it {memory}"
        )
    return f"the verification process exited with status {returncode} before finishing this check"


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"
