"""The ``scoremesh`` command as a real process."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping

CLI_TIMEOUT_S = 120.0


async def run_cli(env: Mapping[str, str], *args: str) -> tuple[int, str, str]:
    """Runs ``scoremesh ARGS`` with ``env`` over this environment; returns the exit status,
    stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
