"""Settings: typed values from an environment mapping, failing fast with the variable named."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from services.mesh.settings import (
    ENVIRONMENT,
    EnvVar,
    MeshSettings,
    SettingsError,
    env_bool,
    env_bytes,
    env_float,
    env_int,
    env_path,
    env_str,
    parse_bytes,
)


class RecordingEnv(Mapping[str, str]):
    """An environment that remembers which variables were looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.add(key)
        return self._values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def test_defaults() -> None:
    settings = MeshSettings.from_env({})
    assert settings == MeshSettings(
        home=Path("~/.scoremesh").expanduser(),
        max_message_bytes=64 * 1024 * 1024,
        shutdown_grace_s=10.0,
        default_deadline_s=30.0,
        max_concurrent_rpcs=1000,
        log_level="INFO",
        log_format="json",
    )


def test_every_variable_is_read(tmp_path: Path) -> None:
    settings = MeshSettings.from_env(
        {
            "SCOREMESH_HOME": str(tmp_path),
            "SCOREMESH_MAX_MESSAGE_BYTES": "2MiB",
            "SCOREMESH_SHUTDOWN_GRACE_S": "2.5",
            "SCOREMESH_DEFAULT_DEADLINE_S": "0.25",
            "SCOREMESH_MAX_CONCURRENT_RPCS": "16",
            "SCOREMESH_LOG_LEVEL": "debug",
            "SCOREMESH_LOG_FORMAT": "text",
        }
    )
    assert settings.home == tmp_path
    assert settings.max_message_bytes == 2 * 1024 * 1024
    assert settings.shutdown_grace_s == 2.5
    assert settings.default_deadline_s == 0.25
    assert settings.max_concurrent_rpcs == 16
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "text"


def test_settings_are_frozen() -> None:
    settings = MeshSettings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.log_level = "DEBUG"  # type: ignore[misc]


def test_environment_documents_exactly_what_is_read() -> None:
    env = RecordingEnv({})
    MeshSettings.from_env(env)
    assert env.read == {var.name for var in ENVIRONMENT}
    assert all(var.description for var in ENVIRONMENT)


@pytest.mark.parametrize("var", ENVIRONMENT, ids=lambda var: var.name)
def test_documented_defaults_are_the_defaults(var: EnvVar) -> None:
    assert MeshSettings.from_env({var.name: var.default}) == MeshSettings.from_env({})


def test_empty_or_blank_means_default() -> None:
    assert MeshSettings.from_env({"SCOREMESH_MAX_CONCURRENT_RPCS": "", "SCOREMESH_LOG_LEVEL": "  "}) == (
        MeshSettings.from_env({})
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SCOREMESH_MAX_MESSAGE_BYTES", "lots"),
        ("SCOREMESH_MAX_MESSAGE_BYTES", "2GiB"),  # gRPC keeps the limit in a C int
        ("SCOREMESH_MAX_MESSAGE_BYTES", "12"),
        ("SCOREMESH_SHUTDOWN_GRACE_S", "-1"),
        ("SCOREMESH_SHUTDOWN_GRACE_S", "nan"),
        ("SCOREMESH_DEFAULT_DEADLINE_S", "0"),
        ("SCOREMESH_DEFAULT_DEADLINE_S", "inf"),
        ("SCOREMESH_MAX_CONCURRENT_RPCS", "0"),
        ("SCOREMESH_MAX_CONCURRENT_RPCS", "1.5"),
        ("SCOREMESH_LOG_LEVEL", "verbose"),
        ("SCOREMESH_LOG_FORMAT", "yaml"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        MeshSettings.from_env({name: value})
    assert name in str(raised.value)
    assert repr(value) in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1048576", 1048576),
        ("64MiB", 64 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("2gib", 2 * 1024**3),
        ("512 KiB", 512 * 1024),
        ("1TiB", 1024**4),
        ("500MB", 500 * 1000**2),
        ("1kb", 1000),
        ("10B", 10),
        ("1.5KiB", 1536),
        (" 3GB ", 3 * 1000**3),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5", "0.5B", "64 MiBs", "64M", "1e6", "1,000", "0x10"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="byte"):
        parse_bytes(text)


def test_env_bytes() -> None:
    assert env_bytes({"X": "2GiB"}, "X", 0) == 2 * 1024**3
    assert env_bytes({}, "X", 7) == 7
    with pytest.raises(SettingsError, match=r"X='two gigs'"):
        env_bytes({"X": "two gigs"}, "X", 0)
    with pytest.raises(SettingsError, match="at most 1024"):
        env_bytes({"X": "2KiB"}, "X", 0, maximum=1024)


def test_env_int() -> None:
    assert env_int({"N": " 42 "}, "N", 1) == 42
    assert env_int({"N": "1_000"}, "N", 1) == 1000
    assert env_int({}, "N", 5) == 5
    with pytest.raises(SettingsError, match=r"N='x': expected a whole number"):
        env_int({"N": "x"}, "N", 1)
    with pytest.raises(SettingsError, match="at least 1"):
        env_int({"N": "0"}, "N", 1, minimum=1)
    with pytest.raises(SettingsError, match="at most 65535"):
        env_int({"N": "70000"}, "N", 1, maximum=65535)


def test_env_float() -> None:
    assert env_float({"F": "0.5"}, "F", 1.0) == 0.5
    assert env_float({"F": "3"}, "F", 1.0) == 3.0
    assert env_float({}, "F", 1.5) == 1.5
    with pytest.raises(SettingsError, match=r"F='soon'"):
        env_float({"F": "soon"}, "F", 1.0)
    with pytest.raises(SettingsError, match="finite"):
        env_float({"F": "-inf"}, "F", 1.0)
    with pytest.raises(SettingsError, match="at most 2"):
        env_float({"F": "2.5"}, "F", 1.0, maximum=2.0)


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("TRUE", True), ("yes", True), ("On", True)])
def test_env_bool_true(text: str, expected: bool) -> None:
    assert env_bool({"B": text}, "B", not expected) is expected


@pytest.mark.parametrize("text", ["0", "false", "No", "OFF"])
def test_env_bool_false(text: str) -> None:
    assert env_bool({"B": text}, "B", True) is False


def test_env_bool_default_and_bad() -> None:
    assert env_bool({}, "B", True) is True
    with pytest.raises(SettingsError, match=r"B='maybe': expected true or false"):
        env_bool({"B": "maybe"}, "B", False)


def test_env_str() -> None:
    assert env_str({"S": " a "}, "S", "d") == "a"
    assert env_str({}, "S", "d") == "d"
    assert env_str({"S": "b"}, "S", "d", choices=("a", "b")) == "b"
    with pytest.raises(SettingsError, match=r"S='c': expected one of a, b"):
        env_str({"S": "c"}, "S", "d", choices=("a", "b"))


def test_env_path(tmp_path: Path) -> None:
    assert env_path({"P": str(tmp_path)}, "P", Path("/nowhere")) == tmp_path
    assert env_path({"P": "~/x"}, "P", Path("/nowhere")) == Path.home() / "x"
    assert env_path({}, "P", Path("~/y")) == Path.home() / "y"
    with pytest.raises(SettingsError, match="NUL"):
        env_path({"P": "a\0b"}, "P", Path("/nowhere"))
