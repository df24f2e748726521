"""Pure registry logic: names, references, artifacts on disk, proto conversion."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scoremesh.registry.v1 import registry_pb2 as pb

from services.mesh.artifacts import LocalArtifactStore
from services.mesh.errors import InvalidArgument
from services.registry import converters as conv
from services.registry.client import Reference
from services.registry.domain import (
    ModelCard,
    ModelVersion,
    Signature,
    TensorSpec,
    Threshold,
    VerificationCheck,
    VerificationReport,
    VersionStatus,
    check_alias_name,
    check_model_name,
)


@pytest.mark.parametrize("name", ["iris", "Iris-2", "a", "resnet50.v1_5", "x" * 128])
def test_valid_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "a b", "a/b", "a..b", "x" * 129, "ü", "a\n"])
def test_invalid_model_names_name_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_model_name(name, "metadata.model")
    assert caught.value.reason == "INVALID_MODEL_NAME"
    assert [v.field for v in caught.value.violations] == ["metadata.model"]


@pytest.mark.parametrize("alias", ["production", "staging", "champion", "a-b_c1"])
def test_valid_aliases(alias: str) -> None:
    assert check_alias_name(alias) == alias


@pytest.mark.parametrize("alias", ["", "Production", "1st", "a b", "x" * 64])
def test_invalid_aliases(alias: str) -> None:
    with pytest.raises(InvalidArgument):
        check_alias_name(alias)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iris", Reference("iris")),
        ("iris:3", Reference("iris", version=3)),
        ("iris@staging", Reference("iris", alias="staging")),
    ],
)
def test_references_parse(text: str, expected: Reference) -> None:
    assert Reference.parse(text) == expected


@pytest.mark.parametrize("text", ["", "iris:", "iris@", "iris:x", "a:1:2", "a@b@c", "a:1@b"])
def test_bad_references_are_invalid_arguments(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Reference.parse(text)


async def test_an_upload_becomes_visible_only_on_commit(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    data = os.urandom(300_000)
    async with store.upload() as upload:
        for offset in range(0, len(data), 65536):
            await upload.write(data[offset : offset + 65536])
        digest = hashlib.sha256(data).hexdigest()
        assert upload.sha256() == digest
        assert not store.path_of(digest).exists()
        await upload.commit()
    assert store.path_of(digest).read_bytes() == data
    assert list((tmp_path / "tmp").iterdir()) == []
    assert b"".join([chunk async for chunk in store.read(digest, chunk_bytes=100_000)]) == data
    assert store.uri(digest).startswith("file://")


async def test_an_abandoned_upload_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)

    async def fail_midway() -> None:
        async with store.upload() as upload:
            await upload.write(b"partial")
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await fail_midway()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "sha256").iterdir()) == []


def test_sweep_removes_uploads_of_dead_processes_only(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    dead = tmp_path / "tmp" / "upload-999999999-abc"
    mine = tmp_path / "tmp" / f"upload-{os.getpid()}-def"
    dead.write_bytes(b"x")
    mine.write_bytes(b"y")
    assert store.sweep_abandoned_uploads() == 1
    assert not dead.exists()
    assert mine.exists()


_NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_version_to_proto_keeps_every_field() -> None:
    version = ModelVersion(
        model="m",
        version=3,
        sha256="a" * 64,
        size_bytes=123,
        signature=Signature(
            inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "INT64", (-1,)),)
        ),
        status=VersionStatus.FAILED,
        report=VerificationReport(
            checks=(VerificationCheck("checker", True), VerificationCheck("operators", False, "custom op")),
            opset=17,
        ),
        create_time=_NOW,
        created_by="alice",
    )
    message = conv.version_to_pb(version)
    assert (message.model, message.version, message.status) == ("m", 3, pb.FAILED)
    assert list(message.signature.inputs[0].shape) == [-1, 4]
    assert message.signature.outputs[0].datatype == "INT64"
    assert not message.verification.passed
    assert message.verification.opset == 17
    assert [(c.name, c.passed, c.detail) for c in message.verification.checks] == [
        ("checker", True, ""),
        ("operators", False, "custom op"),
    ]
    assert message.create_time.ToDatetime(tzinfo=UTC) == _NOW


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@given(metrics=st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5))
def test_model_card_metrics_survive_the_proto_round_trip(metrics: dict[str, object]) -> None:
    card = ModelCard("m", 1, metrics, (Threshold("spam", 0.5, {"precision": 0.9}),), "d", None)
    back = conv.card_from_pb(conv.card_to_pb(card))
    assert back.thresholds == card.thresholds
    assert back.description == "d"
    assert _normalise(back.metrics) == _normalise(metrics)


def _normalise(value: object) -> object:
    # a Struct carries every number as a double
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    raise TypeError(type(value))
