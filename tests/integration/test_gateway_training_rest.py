"""The training service through the gateway's REST routes: plugins, jobs, watching a job as
NDJSON, datasets uploaded as a raw body; scopes and tenants."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.gateway_harness import RunningGateway, running_mesh

pytestmark = pytest.mark.integration


@pytest.fixture
async def mesh(database_url: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_mesh(database_url, tmp_path) as gateway:
        yield gateway


async def test_jobs_and_datasets_over_rest(mesh: RunningGateway) -> None:
    trainer = await mesh.key("acme", "train")
    async with mesh.http.get(f"{mesh.url}/v1/training/plugins", headers=trainer) as response:
        assert response.status == 200, await response.text()
        names = {p["name"] for p in (await response.json())["plugins"]}
    assert {"sklearn-tabular", "digits-mlp", "finetune", "noop"} <= names

    async with mesh.http.post(
        f"{mesh.url}/v1/datasets/rows:upload",
        params={"format": "csv"},
        data=b"a,b,label\n1,2,0\n3,4,1\n",
        headers={**trainer, "Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["rows"] == "2"

    submit = {
        "plugin": "sklearn-tabular",
        "arguments": {"dataset": "iris", "test_fraction": 0.25},
        "registration": {"model": "rest-trained", "alias": "production", "promoteIf": "accuracy >= 0.9"},
        "idempotencyKey": "rest-1",
    }
    async with mesh.http.post(f"{mesh.url}/v1/jobs", json=submit, headers=trainer) as response:
        assert response.status == 200, await response.text()
        job = await response.json()
    assert (job["state"], job["arguments"]["dataset"]) == ("QUEUED", "iris")
    async with mesh.http.post(f"{mesh.url}/v1/jobs", json=submit, headers=trainer) as response:
        assert (await response.json())["id"] == job["id"]  # the same idempotency key
    async with mesh.http.post(f"{mesh.url}/v1/jobs/{job['id']}:cancel", headers=trainer) as response:
        assert (await response.json())["state"] == "CANCELLED"
    async with mesh.http.get(f"{mesh.url}/v1/jobs/{job['id']}:watch", headers=trainer) as response:
        assert response.content_type == "application/x-ndjson"
        events = [json.loads(line) for line in (await response.read()).splitlines()]
    assert [e["state"]["state"] for e in events] == ["QUEUED", "CANCELLED"]


async def test_training_routes_need_the_train_scope_and_keep_tenants_apart(mesh: RunningGateway) -> None:
    trainer = await mesh.key("acme", "train")
    body = {"plugin": "noop", "registration": {"model": "mine"}}
    async with mesh.http.post(f"{mesh.url}/v1/jobs", json=body, headers=trainer) as response:
        job = await response.json()
    reader = await mesh.key("acme", "models:read", "score")
    async with mesh.http.get(f"{mesh.url}/v1/jobs/{job['id']}", headers=reader) as response:
        assert response.status == 403
    stranger = await mesh.key("globex", "train")
    async with mesh.http.get(f"{mesh.url}/v1/jobs/{job['id']}", headers=stranger) as response:
        assert response.status == 404
    async with mesh.http.get(f"{mesh.url}/v1/jobs", headers=stranger) as response:
        assert (await response.json()).get("jobs", []) == []


async def test_bad_submissions_are_400_naming_every_field(mesh: RunningGateway) -> None:
    trainer = await mesh.key("acme", "train")
    body = {
        "plugin": "sklearn-tabular",
        "arguments": {"model": "forest", "nope": 1, "test_fraction": "lots"},
        "registration": {"model": "a/b"},
    }
    async with mesh.http.post(f"{mesh.url}/v1/jobs", json=body, headers=trainer) as response:
        assert response.status == 400
        error = await response.json()
    fields = {
        violation["field"] for detail in error["details"] for violation in detail.get("fieldViolations", [])
    }
    assert fields >= {"arguments.model", "arguments.nope", "arguments.test_fraction", "registration.model"}
    async with mesh.http.post(
        f"{mesh.url}/v1/jobs", json={"plugin": "nope", "registration": {"model": "m"}}, headers=trainer
    ) as response:
        assert response.status == 404
