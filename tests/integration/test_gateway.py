"""The gateway's REST routes end to end: a real aiohttp server on 127.0.0.1, real API keys in a
real PostgreSQL, and a real registry behind it over gRPC."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from services.gateway.keys import RateLimit
from services.gateway.main import REGISTRY
from tests import onnx_factory
from tests.integration.gateway_harness import MAX_BODY, RunningGateway, running_mesh, serving_gateway
from tests.integration.registry_harness import registry_env, running_registry

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(database_url: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with (
        running_registry(registry_env(tmp_path / "home", database_url)) as registry,
        serving_gateway(database_url, {REGISTRY.full_name: registry.channel}) as running,
    ):
        yield running


async def _json(response: aiohttp.ClientResponse) -> dict[str, object]:
    assert response.content_type == "application/json", await response.text()
    body: dict[str, object] = await response.json()
    return body


async def test_health_openapi_and_docs_need_no_key(gateway: RunningGateway) -> None:
    async with gateway.http.get(f"{gateway.url}/healthz") as response:
        assert response.status == 200
    async with gateway.http.get(f"{gateway.url}/openapi.json") as response:
        document = await _json(response)
        assert "/v1/models/{name}" in document["paths"]  # type: ignore[operator]
    async with gateway.http.get(f"{gateway.url}/docs") as response:
        assert response.status == 200
        assert "openapi.json" in await response.text()


async def test_models_are_created_read_and_listed_through_rest(gateway: RunningGateway) -> None:
    headers = await gateway.key("acme", "models:read", "models:write")
    async with gateway.http.post(
        f"{gateway.url}/v1/models", json={"name": "iris"}, headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        created = await _json(response)
        assert created["name"] == "iris"
        assert created["tenant"] == "acme"
    async with gateway.http.get(f"{gateway.url}/v1/models/iris", headers=headers) as response:
        assert (await _json(response))["visibility"] == "PRIVATE"
    async with gateway.http.get(
        f"{gateway.url}/v1/models", params={"pageSize": "10"}, headers=headers
    ) as response:
        assert [m["name"] for m in (await _json(response))["models"]] == ["iris"]  # type: ignore[attr-defined]


async def test_an_upload_and_a_streamed_download(gateway: RunningGateway) -> None:
    headers = await gateway.key("acme", "models:read", "models:write")
    data = onnx_factory.tiny_classifier()
    async with gateway.http.post(
        f"{gateway.url}/v1/models/clf/versions:upload",
        params={"alias": "production"},
        data=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 200, await response.text()
        uploaded = await _json(response)
        assert uploaded["version"]["version"] == "1"  # type: ignore[index]
    async with gateway.http.get(
        f"{gateway.url}/v1/models/clf/versions/1:download", headers=headers
    ) as response:
        assert response.status == 200
        assert response.content_type == "application/x-ndjson"
        lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert b"".join(base64.b64decode(line["chunk"]) for line in lines) == data


async def test_missing_wrong_and_revoked_keys_are_401(gateway: RunningGateway) -> None:
    url = f"{gateway.url}/v1/models"
    key, plaintext = await gateway.keys.create("acme", ["models:read"], created_by="test")
    await gateway.keys.revoke(key.id)
    for headers in ({}, {"Authorization": "Bearer smk_nope"}, {"Authorization": f"Bearer {plaintext}"}):
        async with gateway.http.get(url, headers=headers) as response:
            assert response.status == 401
            body = await _json(response)
            assert body["code"] == 16  # UNAUTHENTICATED


async def test_a_missing_scope_is_403_and_another_tenants_private_model_404(gateway: RunningGateway) -> None:
    reader = await gateway.key("acme", "models:read")
    async with gateway.http.post(f"{gateway.url}/v1/models", json={"name": "x"}, headers=reader) as response:
        assert response.status == 403
    writer = await gateway.key("acme", "models:read", "models:write")
    async with gateway.http.post(
        f"{gateway.url}/v1/models", json={"name": "secret"}, headers=writer
    ) as response:
        assert response.status == 200
    other = await gateway.key("globex", "models:read")
    async with gateway.http.get(f"{gateway.url}/v1/models/secret", headers=other) as response:
        assert response.status == 404


async def test_bad_bodies_are_4xx_naming_the_field(gateway: RunningGateway) -> None:
    headers = {
        **(await gateway.key("acme", "models:read", "models:write")),
        "Content-Type": "application/json",
    }
    url = f"{gateway.url}/v1/models"
    cases = [
        (b"{not json", 400, "body"),
        (b'{"name": "m", "colour": "red"}', 400, "colour"),
        (b'{"name": 7}', 400, "name"),
        (b"x" * (MAX_BODY + 1), 413, ""),
    ]
    for body, status, field in cases:
        async with gateway.http.post(url, data=body, headers=headers) as response:
            assert response.status == status, (body[:20], await response.text())
            error = await _json(response)
            assert set(error) == {"code", "message", "details"}
            if field:
                assert field in json.dumps(error["details"]), error

    async def chunked(body: bytes) -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    over = b'{"name": "' + b"x" * MAX_BODY + b'"}'
    async with gateway.http.post(url, data=chunked(over), headers=headers) as response:
        assert response.status == 413, await response.text()
    async with gateway.http.post(url, data=chunked(b'{"name": "chunky"}'), headers=headers) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["name"] == "chunky"
    async with gateway.http.get(f"{gateway.url}/healthz") as response:
        assert response.status == 200


async def test_a_key_over_its_rate_gets_429_with_retry_after(gateway: RunningGateway) -> None:
    headers = await gateway.key("acme", "models:read", rate=RateLimit(requests_per_second=0.5, burst=1))
    async with gateway.http.get(f"{gateway.url}/v1/models", headers=headers) as response:
        assert response.status == 200
    async with gateway.http.get(f"{gateway.url}/v1/models", headers=headers) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1


async def test_unknown_routes_and_methods(gateway: RunningGateway) -> None:
    headers = await gateway.key("acme", "models:read")
    async with gateway.http.get(f"{gateway.url}/v1/nowhere", headers=headers) as response:
        assert response.status == 404
    async with gateway.http.delete(f"{gateway.url}/v1/models", headers=headers) as response:
        assert response.status == 405
        assert "GET" in response.headers["Allow"]


# the Open Inference Protocol's REST binding, with stock tritonclient.http


@pytest.fixture
async def mesh(database_url: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_mesh(database_url, tmp_path) as running:
        yield running


async def test_stock_tritonclient_http_scores_through_the_gateway(mesh: RunningGateway) -> None:
    writer = await mesh.key("acme", "models:read", "models:write", "score")
    data = onnx_factory.tiny_classifier(seed=3)
    async with mesh.http.post(
        f"{mesh.url}/v1/models/clf/versions:upload",
        params={"alias": "production"},
        data=data,
        headers={**writer, "Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 200, await response.text()

    client = triton_http.InferenceServerClient(mesh.url.removeprefix("http://"))
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("clf", headers=writer)
        metadata = await client.get_model_metadata("clf", headers=writer)
        assert metadata["inputs"][0]["name"] == "input"
        rows = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
        for binary in (True, False):
            infer_input = triton_http.InferInput("input", [3, 4], "FP32")
            infer_input.set_data_from_numpy(rows, binary_data=binary)
            # a copy each time: tritonclient writes its own headers into the dict it is given
            result = await client.infer("clf", [infer_input], headers=dict(writer))
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            expected = session.run(None, {"input": rows})[0]
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
        # no key: refused; another tenant: the private model is not there
        with pytest.raises(InferenceServerException):
            await client.infer("clf", [infer_input])
        stranger = await mesh.key("globex", "score")
        assert not await client.is_model_ready("clf", headers=stranger)
    finally:
        await client.close()
