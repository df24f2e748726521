"""SCOREMESH_TLS_* and SCOREMESH_HEALTH_PORT: all three TLS files or none, each one checked at
start-up, and every problem named by its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.certs import CertificateAuthority
from services.mesh.server import local_host
from services.mesh.settings import TLS_FILE_VARIABLES, MeshSettings, SettingsError
from tests import tls_files


@pytest.fixture(scope="module")
def tls_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    issued = CertificateAuthority.create().issue("registry", ["localhost", "127.0.0.1"])
    return tls_files.tls_env(issued.write(tmp_path_factory.mktemp("tls")))


def test_no_tls_variables_means_plaintext() -> None:
    settings = MeshSettings.from_env({})
    assert settings.tls is None
    assert settings.health_port is None


def test_all_three_files_are_read_once(tls_env: dict[str, str]) -> None:
    tls = MeshSettings.from_env(tls_env).tls
    assert tls is not None
    assert tls.cert_file == Path(tls_env["SCOREMESH_TLS_CERT_FILE"])
    assert tls.certificate_chain == Path(tls_env["SCOREMESH_TLS_CERT_FILE"]).read_bytes()
    assert tls.private_key == Path(tls_env["SCOREMESH_TLS_KEY_FILE"]).read_bytes()
    assert tls.root_certificates == Path(tls_env["SCOREMESH_TLS_CA_FILE"]).read_bytes()
    assert tls.server_name is None
    # the key never shows in a log line that prints the settings
    assert b"PRIVATE KEY" in tls.private_key
    assert "PRIVATE" not in repr(tls)
    named = MeshSettings.from_env({**tls_env, "SCOREMESH_TLS_SERVER_NAME": "registry.mesh"}).tls
    assert named is not None
    assert named.server_name == "registry.mesh"


@pytest.mark.parametrize("present", [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)])
def test_a_partial_set_names_what_is_missing(tls_env: dict[str, str], present: tuple[int, ...]) -> None:
    env = {TLS_FILE_VARIABLES[i]: tls_env[TLS_FILE_VARIABLES[i]] for i in present}
    with pytest.raises(SettingsError) as raised:
        MeshSettings.from_env(env)
    missing = [name for i, name in enumerate(TLS_FILE_VARIABLES) if i not in present]
    message = str(raised.value)
    assert message.startswith(" and ".join(missing) + " not set"), message


def test_a_server_name_without_tls_is_an_error() -> None:
    with pytest.raises(SettingsError, match="SCOREMESH_TLS_SERVER_NAME is set but TLS is not"):
        MeshSettings.from_env({"SCOREMESH_TLS_SERVER_NAME": "x"})


def test_unusable_files_are_named(tls_env: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.crt")
    with pytest.raises(SettingsError, match=r"SCOREMESH_TLS_CA_FILE='.*missing.crt': cannot read it"):
        MeshSettings.from_env({**tls_env, "SCOREMESH_TLS_CA_FILE": missing})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(SettingsError, match=r"SCOREMESH_TLS_CERT_FILE='.*junk.pem': not a PEM certificate"):
        MeshSettings.from_env({**tls_env, "SCOREMESH_TLS_CERT_FILE": str(junk)})
    with pytest.raises(SettingsError, match=r"SCOREMESH_TLS_CA_FILE='.*junk.pem': not a PEM certificate"):
        MeshSettings.from_env({**tls_env, "SCOREMESH_TLS_CA_FILE": str(junk)})
    with pytest.raises(SettingsError, match=r"SCOREMESH_TLS_KEY_FILE='.*junk.pem': not an unencrypted PEM"):
        MeshSettings.from_env({**tls_env, "SCOREMESH_TLS_KEY_FILE": str(junk)})
    other = tmp_path / "other.key"
    other.write_bytes(CertificateAuthority.create().issue("x", ["x"]).private_key_pem)
    with pytest.raises(SettingsError, match=r"SCOREMESH_TLS_KEY_FILE='.*other.key' is not the key of"):
        MeshSettings.from_env({**tls_env, "SCOREMESH_TLS_KEY_FILE": str(other)})


def test_health_port() -> None:
    assert MeshSettings.from_env({"SCOREMESH_HEALTH_PORT": "50050"}).health_port == 50050
    assert MeshSettings.from_env({"SCOREMESH_HEALTH_PORT": "0"}).health_port == 0
    with pytest.raises(SettingsError, match="SCOREMESH_HEALTH_PORT='x'"):
        MeshSettings.from_env({"SCOREMESH_HEALTH_PORT": "x"})


@pytest.mark.parametrize(
    ("bound", "dialed"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("::", "::1"),
        ("", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("10.0.0.7", "10.0.0.7"),
    ],
)
def test_a_wildcard_bind_is_dialed_by_loopback(bound: str, dialed: str) -> None:
    # a certificate names 127.0.0.1, never 0.0.0.0: the gateway dials its own Admin server so
    assert local_host(bound) == dialed
