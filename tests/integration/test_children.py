"""Children started through services.mesh.exec_child die with the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.mesh.children import child_env

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose (its own parent has not reaped it yet)
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


def test_a_child_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from services.mesh.children import dying_with_parent\n"
            "child = subprocess.Popen(dying_with_parent(['sleep', '60']))\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.stdout.close()
        deadline = time.monotonic() + DEADLINE_S
        # the child has become `sleep` (exec keeps the pid), then outlives nothing
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_child_whose_parent_is_already_gone_stops_at_once() -> None:
    # a parent pid that is not ours stands for a parent that died before the child was ready
    started = subprocess.run(
        [sys.executable, "-m", "services.mesh.exec_child", "1", "sleep", "60"],
        env=child_env(),
        timeout=DEADLINE_S,
        check=False,
    )
    assert started.returncode == -signal.SIGTERM
