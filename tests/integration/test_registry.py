"""The registry end to end: real PostgreSQL, real gRPC server and channel, real verification."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scoremesh.registry.v1 import registry_pb2 as pb

from tests import onnx_factory
from tests.integration.registry_harness import (
    ALICE,
    BOB,
    CAROL,
    RunningRegistry,
    error_details,
    push,
    registry_env,
    running_registry,
    upload_requests,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def reg(database_url: str, tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    async with running_registry(registry_env(tmp_path / "home", database_url)) as running:
        yield running


async def _expect_error(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def _assert_serving(reg: RunningRegistry) -> None:
    health = health_pb2_grpc.HealthStub(reg.channel)
    response = await health.Check(
        health_pb2.HealthCheckRequest(service="scoremesh.registry.v1.ModelRegistry")
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# happy paths


async def test_push_creates_a_verified_version_with_its_signature(reg: RunningRegistry) -> None:
    data = onnx_factory.tiny_classifier(n_features=4, n_classes=3)
    response = await push(reg.stub, ALICE, "iris", data, sha256=hashlib.sha256(data).hexdigest())

    version = response.version
    assert response.created
    assert (version.model, version.version, version.status) == ("iris", 1, pb.READY)
    assert version.sha256 == hashlib.sha256(data).hexdigest()
    assert version.size_bytes == len(data)
    assert version.created_by == "alice"
    assert version.verification.passed
    assert {c.name for c in version.verification.checks} >= {"checker", "trial_inference", "operators"}
    [spec] = version.signature.inputs
    assert (spec.name, spec.datatype, list(spec.shape)) == ("input", "FP32", [-1, 4])
    assert [o.name for o in version.signature.outputs] == ["probabilities"]

    model = await reg.stub.GetModel(pb.GetModelRequest(name="iris"), metadata=ALICE.metadata())
    assert (model.tenant, model.visibility, model.latest_version) == ("acme", pb.PRIVATE, 1)


async def test_versions_are_numbered_per_model_and_download_returns_the_bytes(reg: RunningRegistry) -> None:
    first = onnx_factory.tiny_classifier(seed=1)
    second = onnx_factory.tiny_classifier(seed=2)
    await push(reg.stub, ALICE, "m", first)
    response = await push(reg.stub, ALICE, "m", second)
    assert response.version.version == 2

    chunks = []
    versions = []
    async for message in reg.stub.DownloadVersion(
        pb.DownloadVersionRequest(model="m", version=1), metadata=ALICE.metadata()
    ):
        chunks.append(message.chunk)
        if message.HasField("version"):
            versions.append(message.version.version)
    assert b"".join(chunks) == first
    assert versions == [1]

    listed = await reg.stub.ListVersions(pb.ListVersionsRequest(model="m"), metadata=ALICE.metadata())
    assert [v.version for v in listed.versions] == [2, 1]


async def test_the_same_bytes_again_return_the_existing_version(reg: RunningRegistry) -> None:
    data = onnx_factory.tiny_classifier()
    first = await push(reg.stub, ALICE, "m", data)
    again = await push(reg.stub, ALICE, "m", data)
    assert not again.created
    assert again.version.version == first.version.version == 1


async def test_ten_concurrent_pushes_of_the_same_bytes_make_one_version(reg: RunningRegistry) -> None:
    data = onnx_factory.tiny_classifier(seed=7)
    responses = await asyncio.gather(*(push(reg.stub, ALICE, "same", data) for _ in range(10)))
    assert {r.version.version for r in responses} == {1}
    assert sum(r.created for r in responses) == 1
    listed = await reg.stub.ListVersions(pb.ListVersionsRequest(model="same"), metadata=ALICE.metadata())
    assert len(listed.versions) == 1


async def test_resolve_by_number_alias_and_default_production(reg: RunningRegistry) -> None:
    await push(reg.stub, ALICE, "m", onnx_factory.tiny_classifier(seed=1), alias="production")
    await push(reg.stub, ALICE, "m", onnx_factory.tiny_classifier(seed=2), alias="staging")

    by_default = await reg.stub.ResolveModel(pb.ResolveModelRequest(model="m"), metadata=ALICE.metadata())
    assert (by_default.version.version, by_default.alias) == (1, "production")
    assert by_default.artifact_uri.startswith("file://")
    assert Path(by_default.artifact_uri.removeprefix("file://")).is_file()
    by_alias = await reg.stub.ResolveModel(
        pb.ResolveModelRequest(model="m", alias="staging"), metadata=ALICE.metadata()
    )
    assert by_alias.version.version == 2
    by_number = await reg.stub.ResolveModel(
        pb.ResolveModelRequest(model="m", version=2), metadata=ALICE.metadata()
    )
    assert (by_number.version.version, by_number.alias) == (2, "")
    assert list(by_number.version.signature.inputs[0].shape) == [-1, 4]


async def test_alias_moves_are_audited(reg: RunningRegistry) -> None:
    await push(reg.stub, ALICE, "m", onnx_factory.tiny_classifier(seed=1))
    await push(reg.stub, ALICE, "m", onnx_factory.tiny_classifier(seed=2))
    await reg.stub.SetAlias(
        pb.SetAliasRequest(model="m", alias="champion", version=1), metadata=ALICE.metadata()
    )
    await reg.stub.SetAlias(
        pb.SetAliasRequest(model="m", alias="champion", version=2, expected_version=1),
        metadata=CAROL.metadata(),
    )
    await reg.stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="champion"), metadata=ALICE.metadata())

    changes = await reg.stub.ListAliasChanges(
        pb.ListAliasChangesRequest(model="m"), metadata=ALICE.metadata()
    )
    assert [(c.from_version, c.to_version, c.actor) for c in changes.changes] == [
        (2, 0, "alice"),
        (1, 2, "carol"),
        (0, 1, "alice"),
    ]
    assert all(c.alias == "champion" and c.HasField("create_time") for c in changes.changes)


async def test_two_concurrent_moves_expecting_the_same_version_one_wins(reg: RunningRegistry) -> None:
    for seed in (1, 2, 3):
        await push(reg.stub, ALICE, "m", onnx_factory.tiny_classifier(seed=seed))
    await reg.stub.SetAlias(
        pb.SetAliasRequest(model="m", alias="production", version=1), metadata=ALICE.metadata()
    )

    moves = [
        reg.stub.SetAlias(
            pb.SetAliasRequest(model="m", alias="production", version=to, expected_version=1),
            metadata=ALICE.metadata(),
        )
        for to in (2, 3)
    ]
    results = await asyncio.gather(*moves, return_exceptions=True)
    winners = [r.version for r in results if isinstance(r, pb.Alias)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert [e.code() for e in losers] == [grpc.StatusCode.FAILED_PRECONDITION]
    assert error_details(losers[0])[0] == "ALIAS_CHANGED"
    aliases = await reg.stub.ListAliases(pb.ListAliasesRequest(model="m"), metadata=ALICE.metadata())
    assert [(a.alias, a.version) for a in aliases.aliases] == [("production", winners[0])]


async def test_model_cards_hold_metrics_and_thresholds(reg: RunningRegistry) -> None:
    await push(reg.stub, ALICE, "m", onnx_factory.tiny_classifier())
    empty = await reg.stub.GetModelCard(
        pb.GetModelCardRequest(model="m", version=1), metadata=ALICE.metadata()
    )
    assert not empty.HasField("update_time")

    card = pb.ModelCard(
        model="m",
        version=1,
        description="toy classifier",
        thresholds=[pb.Threshold(output="spam", value=0.8, metrics={"precision": 0.95, "recall": 0.6})],
    )
    card.metrics.update({"accuracy": 0.93, "per_class": {"spam": 0.9}})
    await reg.stub.UpdateModelCard(pb.UpdateModelCardRequest(card=card), metadata=ALICE.metadata())

    stored = await reg.stub.GetModelCard(
        pb.GetModelCardRequest(model="m", version=1), metadata=CAROL.metadata()
    )
    assert stored.metrics["accuracy"] == pytest.approx(0.93)
    assert stored.metrics["per_class"]["spam"] == pytest.approx(0.9)
    assert stored.thresholds[0].metrics["precision"] == pytest.approx(0.95)
    assert stored.description == "toy classifier"
    assert stored.HasField("update_time")


async def test_list_models_paginates_and_shows_own_and_public_models(reg: RunningRegistry) -> None:
    for name in ("a1", "a2", "a3"):
        await reg.stub.CreateModel(
            pb.CreateModelRequest(model=pb.Model(name=name)), metadata=ALICE.metadata()
        )
    await reg.stub.CreateModel(
        pb.CreateModelRequest(model=pb.Model(name="b-public", visibility=pb.PUBLIC)), metadata=BOB.metadata()
    )
    await reg.stub.CreateModel(
        pb.CreateModelRequest(model=pb.Model(name="b-private")), metadata=BOB.metadata()
    )

    names: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await reg.stub.ListModels(
            pb.ListModelsRequest(page_size=2, page_token=token), metadata=ALICE.metadata()
        )
        names += [m.name for m in page.models]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert names == ["a1", "a2", "a3", "b-public"]
    assert pages == 2


# tenants


async def test_another_tenants_private_model_is_not_found(reg: RunningRegistry) -> None:
    await push(reg.stub, ALICE, "secret", onnx_factory.tiny_classifier())
    for call in (
        reg.stub.GetModel(pb.GetModelRequest(name="secret"), metadata=BOB.metadata()),
        reg.stub.ResolveModel(pb.ResolveModelRequest(model="secret", version=1), metadata=BOB.metadata()),
        reg.stub.UploadVersion(
            iter(upload_requests("secret", onnx_factory.tiny_classifier(seed=3))), metadata=BOB.metadata()
        ),
    ):
        await _expect_error(call, grpc.StatusCode.NOT_FOUND)


async def test_a_public_model_is_readable_but_not_writable_by_other_tenants(reg: RunningRegistry) -> None:
    await push(reg.stub, ALICE, "shared", onnx_factory.tiny_classifier())
    await reg.stub.UpdateModel(
        pb.UpdateModelRequest(model=pb.Model(name="shared", visibility=pb.PUBLIC)), metadata=ALICE.metadata()
    )
    resolved = await reg.stub.ResolveModel(
        pb.ResolveModelRequest(model="shared", version=1), metadata=BOB.metadata()
    )
    assert resolved.version.version == 1
    error = await _expect_error(
        reg.stub.SetAlias(
            pb.SetAliasRequest(model="shared", alias="production", version=1), metadata=BOB.metadata()
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_details(error)[0] == "NOT_MODEL_OWNER"


# bad input


@pytest.mark.parametrize("name", ["", " ", "../etc", "a" * 129, "has space", "-leading", "a..b"])
async def test_invalid_model_names_are_rejected(reg: RunningRegistry, name: str) -> None:
    error = await _expect_error(
        push(reg.stub, ALICE, name, onnx_factory.tiny_classifier()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_details(error) == ("INVALID_MODEL_NAME", ["metadata.model"])
    await _expect_error(
        reg.stub.GetModel(pb.GetModelRequest(name=name), metadata=ALICE.metadata()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await _assert_serving(reg)


async def test_an_upload_over_the_limit_is_refused_and_leaves_nothing(reg: RunningRegistry) -> None:
    big = onnx_factory.large_model(9 * 1024 * 1024)
    error = await _expect_error(push(reg.stub, ALICE, "big", big), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error_details(error)[0] == "UPLOAD_TOO_LARGE"
    declared = await _expect_error(
        push(reg.stub, ALICE, "big", b"x", size_bytes=3 * 1024**3), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert error_details(declared)[0] == "UPLOAD_TOO_LARGE"
    await _expect_error(
        reg.stub.GetModel(pb.GetModelRequest(name="big"), metadata=ALICE.metadata()),
        grpc.StatusCode.NOT_FOUND,
    )
    assert list((reg.home / "artifacts" / "tmp").iterdir()) == []


async def test_a_truncated_stream_leaves_nothing(reg: RunningRegistry) -> None:
    data = onnx_factory.tiny_classifier()
    requests = upload_requests(
        "trunc", data, chunk_bytes=64, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
    )
    # the client sends part of the bytes and then gives up
    call = reg.stub.UploadVersion(metadata=ALICE.metadata())
    for request in requests[: len(requests) // 2]:
        await call.write(request)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # and a stream that ends early is caught by the declared size
    short = await _expect_error(
        reg.stub.UploadVersion(iter(requests[: len(requests) // 2]), metadata=ALICE.metadata()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(short) == ("SIZE_MISMATCH", ["metadata.size_bytes"])
    await _expect_error(
        reg.stub.GetModel(pb.GetModelRequest(name="trunc"), metadata=ALICE.metadata()),
        grpc.StatusCode.NOT_FOUND,
    )
    await _wait_for_empty(reg.home / "artifacts" / "tmp")
    await _assert_serving(reg)


async def _wait_for_empty(directory: Path, timeout: float = 10.0) -> None:
    # the server notices a cancelled stream asynchronously; poll until it cleaned up
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while list(directory.iterdir()):
        assert loop.time() < deadline, f"{directory} still holds {list(directory.iterdir())}"
        await asyncio.sleep(0.02)


async def test_a_wrong_declared_sha256_is_refused(reg: RunningRegistry) -> None:
    data = onnx_factory.tiny_classifier()
    error = await _expect_error(
        push(reg.stub, ALICE, "m", data, sha256="0" * 64), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_details(error) == ("SHA256_MISMATCH", ["metadata.sha256"])
    malformed = await _expect_error(
        push(reg.stub, ALICE, "m", data, sha256="XYZ"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_details(malformed)[1] == ["metadata.sha256"]


async def test_bytes_that_are_not_onnx_are_refused(reg: RunningRegistry) -> None:
    for junk in (b"definitely not a model", bytes(range(256)) * 16):
        error = await _expect_error(push(reg.stub, ALICE, "junk", junk), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_details(error)[0] == "NOT_ONNX"
    await _expect_error(
        reg.stub.GetModel(pb.GetModelRequest(name="junk"), metadata=ALICE.metadata()),
        grpc.StatusCode.NOT_FOUND,
    )
    await _assert_serving(reg)


async def test_an_empty_or_metadata_less_upload_is_refused(reg: RunningRegistry) -> None:
    await _expect_error(
        reg.stub.UploadVersion(iter([]), metadata=ALICE.metadata()), grpc.StatusCode.INVALID_ARGUMENT
    )
    await _expect_error(
        reg.stub.UploadVersion(iter([pb.UploadVersionRequest(chunk=b"abc")]), metadata=ALICE.metadata()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    error = await _expect_error(push(reg.stub, ALICE, "m", b""), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_details(error)[0] == "EMPTY_UPLOAD"


async def test_a_graph_that_fails_the_checker_is_kept_as_failed_and_never_served(
    reg: RunningRegistry,
) -> None:
    response = await push(reg.stub, ALICE, "broken", onnx_factory.checker_failing_model())
    version = response.version
    assert version.status == pb.FAILED
    assert not version.verification.passed
    failed = {c.name: c.detail for c in version.verification.checks if not c.passed}
    assert failed.get("checker")
    assert "skipped" in failed["trial_inference"]

    error = await _expect_error(
        reg.stub.ResolveModel(pb.ResolveModelRequest(model="broken", version=1), metadata=ALICE.metadata()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_details(error)[0] == "VERSION_NOT_READY"
    await _expect_error(
        reg.stub.SetAlias(
            pb.SetAliasRequest(model="broken", alias="production", version=1), metadata=ALICE.metadata()
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_an_external_data_path_that_escapes_fails_verification(reg: RunningRegistry) -> None:
    response = await push(reg.stub, ALICE, "escape", onnx_factory.external_data_model("../../etc/passwd"))
    assert response.version.status == pb.FAILED
    failed = {c.name: c.detail for c in response.version.verification.checks if not c.passed}
    assert "external_data" in failed
    assert "../../etc/passwd" in failed["external_data"]


async def test_custom_operators_fail_verification(reg: RunningRegistry) -> None:
    response = await push(reg.stub, ALICE, "custom", onnx_factory.custom_op_model())
    failed = {c.name for c in response.version.verification.checks if not c.passed}
    assert response.version.status == pb.FAILED
    assert "operators" in failed


async def test_bad_references_and_tokens(reg: RunningRegistry) -> None:
    await push(reg.stub, ALICE, "m", onnx_factory.tiny_classifier())
    md = ALICE.metadata()
    stub = reg.stub
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    not_found = grpc.StatusCode.NOT_FOUND
    cases: list[tuple[str, Callable[[], Awaitable[object]], grpc.StatusCode]] = [
        (
            "version 0",
            lambda: stub.GetVersion(pb.GetVersionRequest(model="m", version=0), metadata=md),
            invalid,
        ),
        (
            "missing version",
            lambda: stub.GetVersion(pb.GetVersionRequest(model="m", version=9), metadata=md),
            not_found,
        ),
        ("missing model", lambda: stub.GetModel(pb.GetModelRequest(name="nope"), metadata=md), not_found),
        (
            "no production alias",
            lambda: stub.ResolveModel(pb.ResolveModelRequest(model="m"), metadata=md),
            not_found,
        ),
        (
            "bad alias",
            lambda: stub.ResolveModel(pb.ResolveModelRequest(model="m", alias="Bad Alias"), metadata=md),
            invalid,
        ),
        ("bad token", lambda: stub.ListModels(pb.ListModelsRequest(page_token="%%%"), metadata=md), invalid),
        (
            "forged token",
            lambda: stub.ListVersions(
                pb.ListVersionsRequest(model="m", page_token="bm90LWEtbnVtYmVy"), metadata=md
            ),
            invalid,
        ),
        (
            "negative page size",
            lambda: stub.ListModels(pb.ListModelsRequest(page_size=-1), metadata=md),
            invalid,
        ),
        (
            "alias to a missing version",
            lambda: stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=5), metadata=md),
            not_found,
        ),
        (
            "delete a missing alias",
            lambda: stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="nothing"), metadata=md),
            not_found,
        ),
        (
            "unknown visibility",
            lambda: stub.UpdateModel(
                pb.UpdateModelRequest(model=pb.Model(name="m", visibility=7)), metadata=md
            ),
            invalid,
        ),
        (
            "unknown update_mask path",
            lambda: stub.UpdateModel(
                pb.UpdateModelRequest(model=pb.Model(name="m"), update_mask={"paths": ["tenant"]}),
                metadata=md,
            ),
            invalid,
        ),
        (
            "duplicate model",
            lambda: stub.CreateModel(pb.CreateModelRequest(model=pb.Model(name="m")), metadata=md),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        (
            "card of a missing version",
            lambda: stub.UpdateModelCard(
                pb.UpdateModelCardRequest(card=pb.ModelCard(model="m", version=4)), metadata=md
            ),
            not_found,
        ),
        (
            "bad cursor",
            lambda: stub.WatchModels(pb.WatchModelsRequest(cursor="not-a-cursor"), metadata=md).read(),
            invalid,
        ),
    ]
    for label, call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == code, (label, caught.value.details())
    await _assert_serving(reg)


# WatchModels


async def test_watch_streams_changes_and_resumes_from_a_cursor(reg: RunningRegistry) -> None:
    stream = reg.stub.WatchModels(pb.WatchModelsRequest(), metadata=ALICE.metadata())
    await push(reg.stub, ALICE, "w", onnx_factory.tiny_classifier(seed=1), alias="production")
    created = await asyncio.wait_for(stream.read(), 10)
    moved = await asyncio.wait_for(stream.read(), 10)
    assert (created.type, created.model, created.version) == (pb.VERSION_CREATED, "w", 1)
    assert (moved.type, moved.alias, moved.version, moved.previous_version) == (
        pb.ALIAS_SET,
        "production",
        1,
        0,
    )
    # the stream drops; changes happen while nobody watches
    stream.cancel()
    await push(reg.stub, ALICE, "w", onnx_factory.tiny_classifier(seed=2))
    await reg.stub.SetAlias(
        pb.SetAliasRequest(model="w", alias="production", version=2), metadata=ALICE.metadata()
    )

    resumed = reg.stub.WatchModels(pb.WatchModelsRequest(cursor=moved.cursor), metadata=ALICE.metadata())
    missed = [await asyncio.wait_for(resumed.read(), 10) for _ in range(2)]
    assert [(e.type, e.version) for e in missed] == [(pb.VERSION_CREATED, 2), (pb.ALIAS_SET, 2)]
    assert int(missed[0].cursor) > int(moved.cursor)
    resumed.cancel()


async def test_watch_hides_other_tenants_private_models(reg: RunningRegistry) -> None:
    stream = reg.stub.WatchModels(pb.WatchModelsRequest(), metadata=BOB.metadata())
    await push(reg.stub, ALICE, "hidden", onnx_factory.tiny_classifier(seed=1))
    await push(reg.stub, BOB, "visible", onnx_factory.tiny_classifier(seed=2))
    event = await asyncio.wait_for(stream.read(), 10)
    assert event.model == "visible"
    stream.cancel()
