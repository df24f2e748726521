"""What every benchmark needs: a started server's announced address, and percentiles."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Final

START_TIMEOUT_S: Final = 120.0


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def wait_for_file(
    path: Path, process: asyncio.subprocess.Process, timeout: float = START_TIMEOUT_S
) -> str:
    """The address a server started as ``process`` announced in ``path`` (see
    ``services.mesh.server.address_file``), polled until it appears."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.returncode is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        await asyncio.sleep(0.02)
    return path.read_text().strip()
