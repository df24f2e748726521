"""The gateway's Admin service: API keys and usage counters over gRPC, over REST and from the
CLI, on a real PostgreSQL behind a real gateway."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import timestamp_pb2
from scoremesh.gateway.v1 import admin_pb2 as pb
from scoremesh.gateway.v1 import admin_pb2_grpc

from services.gateway.admin_command import AdminClient
from services.gateway.keys import ApiKey
from services.mesh.errors import Unauthenticated
from services.mesh.identity import Caller
from services.mesh.status import from_rpc_error
from tests import onnx_factory
from tests.integration.cli_harness import run_cli
from tests.integration.gateway_harness import ADMIN_SETTINGS, RunningGateway, running_mesh, serving_gateway
from tests.integration.registry_harness import error_details

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[RunningGateway]:
    """The gateway with only its own Admin service behind it."""
    async with serving_gateway(database_url, {}) as running:
        yield running


def _client(gateway: RunningGateway) -> AdminClient:
    return AdminClient(gateway.admin, "ops")


async def _status(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def _fields(error: grpc.aio.AioRpcError) -> set[str]:
    return set(error_details(error)[1])


# over gRPC


async def test_a_key_is_created_listed_and_revoked(gateway: RunningGateway) -> None:
    client = _client(gateway)
    created = await client.create_key(
        "acme",
        ["score", "models:read"],
        description="the web shop",
        rate=pb.RateLimit(requests_per_second=5, burst=10),
    )
    key = created.key
    assert created.token.startswith(f"smk_{key.id}_")
    assert (key.tenant, list(key.scopes), key.created_by) == ("acme", ["models:read", "score"], "ops")
    assert (key.rate.requests_per_second, key.rate.burst) == (5, 10)
    assert not key.HasField("revoke_time")
    # the token is a working key
    assert (await gateway.keys.authenticate(created.token)).tenant == "acme"

    other = (await client.create_key("globex", ["score"])).key
    assert [k.id for k in await client.list_keys("acme")] == [key.id]
    assert {k.id for k in await client.list_keys()} == {key.id, other.id}

    revoked = await client.revoke_key(key.id)
    assert revoked.HasField("revoke_time")
    assert [k.id for k in await client.list_keys("acme")] == []
    assert [k.id for k in await client.list_keys("acme", include_revoked=True)] == [key.id]
    with pytest.raises(Unauthenticated) as caught:
        await gateway.keys.authenticate(created.token)
    assert caught.value.reason == "API_KEY_REVOKED"


async def test_listing_pages_through_every_key(gateway: RunningGateway) -> None:
    stub = admin_pb2_grpc.AdminStub(gateway.admin)
    metadata = Caller("default", "ops", frozenset({"admin"})).metadata()
    ids = {(await _client(gateway).create_key("acme", ["score"])).key.id for _ in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListKeys(pb.ListKeysRequest(page_size=2, page_token=token), metadata=metadata)
        assert len(page.keys) <= 2
        seen += [k.id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(ids)


async def test_every_admin_call_needs_the_admin_scope(gateway: RunningGateway) -> None:
    stub = admin_pb2_grpc.AdminStub(gateway.admin)
    for scopes in (frozenset(), frozenset({"models:read", "models:write", "score", "train"})):
        metadata = Caller("acme", "mallory", scopes).metadata()
        for call in (
            stub.CreateKey(pb.CreateKeyRequest(tenant="acme", scopes=["admin"]), metadata=metadata),
            stub.ListKeys(pb.ListKeysRequest(), metadata=metadata),
            stub.RevokeKey(pb.RevokeKeyRequest(id="0123456789ab"), metadata=metadata),
            stub.GetUsage(pb.GetUsageRequest(), metadata=metadata),
        ):
            error = await _status(call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert from_rpc_error(error).reason == "MISSING_SCOPE"
    # without the mesh's internal token nobody gets that far
    async with grpc.aio.insecure_channel(gateway.admin_address) as bare:
        admin = Caller("default", "ops", frozenset({"admin"})).metadata()
        error = await _status(admin_pb2_grpc.AdminStub(bare).ListKeys(pb.ListKeysRequest(), metadata=admin))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_requests_name_every_bad_field_and_change_nothing(gateway: RunningGateway) -> None:
    stub = admin_pb2_grpc.AdminStub(gateway.admin)
    metadata = Caller("default", "ops", frozenset({"admin"})).metadata()
    bad_key = pb.CreateKeyRequest(
        tenant="no spaces!", scopes=["score", "root"], rate=pb.RateLimit(requests_per_second=-1, burst=0)
    )
    error = await _status(stub.CreateKey(bad_key, metadata=metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _fields(error) == {"tenant", "scopes", "rate.requests_per_second", "rate.burst"}
    error = await _status(stub.CreateKey(pb.CreateKeyRequest(tenant="acme"), metadata=metadata))
    assert _fields(error) == {"scopes"}
    assert await _client(gateway).list_keys(include_revoked=True) == []

    for call in (
        stub.RevokeKey(pb.RevokeKeyRequest(id="0123456789ab"), metadata=metadata),
        stub.GetKey(pb.GetKeyRequest(id="../etc"), metadata=metadata),
    ):
        assert (await _status(call)).code() == grpc.StatusCode.NOT_FOUND
    cases = [
        (pb.ListKeysRequest(page_size=-1), "page_size"),
        (pb.ListKeysRequest(page_token="not a token"), "page_token"),
    ]
    for request, field in cases:
        error = await _status(stub.ListKeys(request, metadata=metadata))
        assert (error.code(), _fields(error)) == (grpc.StatusCode.INVALID_ARGUMENT, {field})
    far = timestamp_pb2.Timestamp(seconds=2**62)
    error = await _status(stub.GetUsage(pb.GetUsageRequest(start_time=far), metadata=metadata))
    assert (error.code(), _fields(error)) == (grpc.StatusCode.INVALID_ARGUMENT, {"start_time"})
    # and the service goes on
    assert (await _client(gateway).create_key("acme", ["score"])).key.tenant == "acme"


async def test_usage_is_summed_per_key_and_model_or_given_per_hour(gateway: RunningGateway) -> None:
    client = _client(gateway)
    acme = await gateway.keys.get((await client.create_key("acme", ["score"])).key.id)
    globex = await gateway.keys.get((await client.create_key("globex", ["score"])).key.id)
    _record(gateway, acme, "iris", rows=3, times=2)
    _record(gateway, acme, "wine", rows=1, times=1)
    _record(gateway, globex, "iris", rows=10, times=4)
    # GetUsage writes what this gateway has not written yet, so it reads its own counts
    totals = {(u.key_id, u.model): (u.requests, u.rows) for u in await client.usage()}
    assert totals == {
        (acme.id, "iris"): (2, 6),
        (acme.id, "wine"): (1, 1),
        (globex.id, "iris"): (4, 40),
    }
    iris = await client.usage(model="iris", tenant="acme")
    assert [(u.key_id, u.requests, u.rows) for u in iris] == [(acme.id, 2, 6)]
    hourly = await client.usage(key_id=acme.id, hourly=True)
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    assert {u.hour.ToDatetime(tzinfo=UTC) for u in hourly} <= {this_hour, this_hour - timedelta(hours=1)}
    assert sum(u.requests for u in hourly) == 3
    assert await client.usage(since=datetime.now(UTC) + timedelta(hours=2)) == []
    assert await client.usage(until=this_hour - timedelta(hours=1)) == []


def _record(gateway: RunningGateway, key: ApiKey, model: str, *, rows: int, times: int) -> None:
    for _ in range(times):
        gateway.usage.record(key, model, rows=rows)


# over REST, through the gateway


async def test_rest_manages_keys_with_an_admin_key_only(gateway: RunningGateway) -> None:
    admin = await gateway.key("default", "admin")
    url = f"{gateway.url}/v1/admin/keys"
    new_key = {"tenant": "acme", "scopes": ["score"]}
    async with gateway.http.post(url, json=new_key, headers=admin) as response:
        assert response.status == 200, await response.text()
        created = await response.json()
    key_id, token = created["key"]["id"], created["token"]
    async with gateway.http.get(url, params={"tenant": "acme"}, headers=admin) as response:
        assert [k["id"] for k in (await response.json())["keys"]] == [key_id]
    # the new key is not an admin: 403; bad bodies: 400 naming the field
    async with gateway.http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 403
    async with gateway.http.post(url, json={"tenant": "acme", "scopes": ["root"]}, headers=admin) as response:
        assert response.status == 400
        assert "scopes" in await response.text()
    async with gateway.http.post(f"{url}/{key_id}:revoke", headers=admin) as response:
        assert response.status == 200, await response.text()
        assert "revokeTime" in await response.json()
    async with gateway.http.get(f"{url}/{key_id}", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 401
    async with gateway.http.post(f"{url}/ffffffffffff:revoke", headers=admin) as response:
        assert response.status == 404


async def test_usage_counts_rest_requests_and_scored_rows(database_url: str, tmp_path: Path) -> None:
    async with running_mesh(database_url, tmp_path) as mesh:
        writer = await mesh.key("acme", "models:read", "models:write", "score")
        async with mesh.http.post(
            f"{mesh.url}/v1/models/clf/versions:upload",
            params={"alias": "production"},
            data=onnx_factory.tiny_classifier(seed=5),
            headers={**writer, "Content-Type": "application/octet-stream"},
        ) as response:
            assert response.status == 200, await response.text()
        rows = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
        tensor = {"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows.ravel().tolist()}
        infer = f"{mesh.url}/v2/models/clf/infer"
        for _ in range(2):
            async with mesh.http.post(infer, json={"inputs": [tensor]}, headers=writer) as response:
                assert response.status == 200, await response.text()
        bad = {"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": [1.0]}]}
        async with mesh.http.post(infer, json=bad, headers=writer) as response:
            assert response.status == 400

        admin = await mesh.key("default", "admin")
        writer_id = writer["Authorization"].split("_")[1]
        async with mesh.http.get(
            f"{mesh.url}/v1/admin/usage", params={"keyId": writer_id, "model": "clf"}, headers=admin
        ) as response:
            assert response.status == 200, await response.text()
            usage = (await response.json())["usage"]
        # the upload and two scorings; the refused scoring never reached the model
        assert [(u["requests"], u["rows"]) for u in usage] == [("3", "6")]


# the CLI


async def test_the_cli_creates_lists_revokes_and_reads_usage(gateway: RunningGateway) -> None:
    env = {
        "SCOREMESH_GATEWAY_ADMIN_ADDR": gateway.admin_address,
        "SCOREMESH_INTERNAL_TOKEN": ADMIN_SETTINGS.internal_token or "",
        "SCOREMESH_PRINCIPAL": "carol",
    }
    code, out, err = await run_cli(
        env, "keys", "create", "--tenant", "acme", "--scopes", "score,models:read", "--json"
    )
    assert code == 0, err
    created = json.loads(out)
    key = await gateway.keys.authenticate(created["token"])
    assert (key.id, key.created_by) == (created["key"]["id"], "carol")

    code, out, err = await run_cli(env, "keys", "list", "--tenant", "acme")
    assert code == 0, err
    assert key.id in out
    assert "active" in out

    gateway.usage.record(key, "iris", rows=4)
    code, out, err = await run_cli(env, "usage", "--tenant", "acme", "--json")
    assert code == 0, err
    assert [(u["model"], u["requests"], u["rows"]) for u in json.loads(out)] == [("iris", "1", "4")]

    code, out, err = await run_cli(env, "keys", "revoke", key.id)
    assert (code, out.strip()) == (0, f"revoked key {key.id} of tenant acme"), err

    # failures: one line on stderr, non-zero exit
    code, out, err = await run_cli(env, "keys", "create", "--tenant", "acme", "--scopes", "root")
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "scopes" in err
    code, _, err = await run_cli({**env, "SCOREMESH_INTERNAL_TOKEN": "wrong"}, "keys", "list")
    assert code == 1
    assert "UNAUTHENTICATED" in err.upper()
