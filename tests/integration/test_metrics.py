"""Prometheus metrics: what the mesh's calls, batches, cache and HTTP requests leave in the
registry, read back through the gateway's /metrics (one process holds the whole test mesh)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import onnx_factory
from tests.integration.gateway_harness import RunningGateway, running_mesh

pytestmark = pytest.mark.integration


@pytest.fixture
async def mesh(database_url: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_mesh(database_url, tmp_path) as gateway:
        yield gateway


async def _samples(mesh: RunningGateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with mesh.http.get(f"{mesh.url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_calls_batches_cache_and_http_requests_are_counted(mesh: RunningGateway) -> None:
    before = await _samples(mesh)
    headers = await mesh.key("acme", "models:read", "models:write", "score")
    async with mesh.http.post(
        f"{mesh.url}/v1/models/clf/versions:upload",
        params={"alias": "production"},
        data=onnx_factory.tiny_classifier(seed=9),
        headers={**headers, "Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 200, await response.text()
    rows = np.ones((2, 4), np.float32).ravel().tolist()
    body = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": rows}]}
    for _ in range(3):
        async with mesh.http.post(f"{mesh.url}/v2/models/clf/infer", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
    async with mesh.http.post(
        f"{mesh.url}/v2/models/clf/infer", json={"inputs": []}, headers=headers
    ) as response:
        assert response.status == 400
    after = await _samples(mesh)

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("scoremesh_rpc_requests_total", method="ModelInfer", code="OK") == 3
    assert grew("scoremesh_rpc_requests_total", method="UploadVersion", code="OK") == 1
    assert grew("scoremesh_rpc_duration_seconds_count", method="ModelInfer", code="OK") == 3
    # three batches of 2 rows each (the test mesh runs without the response cache)
    assert grew("scoremesh_batch_rows_count") == 3
    assert grew("scoremesh_batch_rows_sum") == 6
    assert grew("scoremesh_batch_queue_seconds_count") == 3
    assert grew("scoremesh_batches_total") == 3
    assert grew("scoremesh_cache_lookups_total") == 0
    assert ("scoremesh_cache_bytes", frozenset()) in after
    assert grew("scoremesh_http_requests_total", route="/v2/models/{model}/infer", status="200") == 3
    assert grew("scoremesh_http_requests_total", route="/v2/models/{model}/infer", status="400") == 1
    assert grew("scoremesh_http_requests_total", route="/v1/models/{metadata.model}/versions:upload") == 1
    assert _value(after, "scoremesh_backend_healthy") == 1
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers.get("X-Trace-Id", "0" * 32))
