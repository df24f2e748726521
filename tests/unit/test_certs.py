"""``scoremesh certs create``: a CA made once and reused, one certificate per service that
chains to it and names the service as Kubernetes resolves it, keys readable by the owner only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from services import cli
from services.certs import default_hosts
from services.mesh.settings import MeshSettings


def _names(path: Path) -> set[str]:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    }


def test_create_writes_a_ca_and_one_certificate_per_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "certs"
    code = cli.main(
        [
            "certs",
            "create",
            "--dir",
            str(directory),
            "--service",
            "registry",
            "scoring",
            "--hosts",
            "*.mesh.example,10.0.0.7",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "created the CA" in out
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    authority = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    for service in ("registry", "scoring"):
        folder = directory / service
        assert stat.S_IMODE((folder / "tls.key").stat().st_mode) == 0o600
        assert (folder / "ca.crt").read_bytes() == (directory / "ca.crt").read_bytes()
        assert _names(folder / "tls.crt") == {*default_hosts(service), "*.mesh.example", "10.0.0.7"}
        certificate = x509.load_pem_x509_certificate((folder / "tls.crt").read_bytes())
        certificate.verify_directly_issued_by(authority)
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        # the three files are what the settings take, and they agree
        tls = MeshSettings.from_env(
            {
                "SCOREMESH_TLS_CERT_FILE": str(folder / "tls.crt"),
                "SCOREMESH_TLS_KEY_FILE": str(folder / "tls.key"),
                "SCOREMESH_TLS_CA_FILE": str(folder / "ca.crt"),
            }
        ).tls
        assert tls is not None
    assert "scoring-headless.scoremesh.svc.cluster.local" in _names(directory / "scoring" / "tls.crt")

    # a later run reuses the CA, so that new certificates chain to the same one
    ca_before = (directory / "ca.crt").read_bytes()
    assert (
        cli.main(["certs", "create", "--dir", str(directory), "--service", "envoy", "--namespace", "prod"])
        == 0
    )
    assert "reused the CA" in capsys.readouterr().out
    assert (directory / "ca.crt").read_bytes() == ca_before
    assert "envoy.prod.svc.cluster.local" in _names(directory / "envoy" / "tls.crt")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--service", "Bad_Name"], "--service: 'Bad_Name' is not a service name"),
        (["--service", "ok", "--hosts", "bad host"], "--hosts: 'bad host' is not a DNS name"),
        (["--service", "ok", "--hosts", "a.*.b"], "--hosts: 'a.*.b'"),
        (["--service", "ok", "--days", "0"], "--days: must be at least 1"),
        (["--service", "ok", "--namespace", "No"], "--namespace"),
    ],
)
def test_bad_options_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert cli.main(["certs", "create", "--dir", str(tmp_path / "certs"), *args]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("scoremesh: ")
    assert fragment in line, line
    assert not (tmp_path / "certs" / "ok").exists()


def test_a_half_present_ca_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ca.crt").write_text("left over")
    assert cli.main(["certs", "create", "--dir", str(tmp_path), "--service", "registry"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "ca.crt exists without" in line
    assert not (tmp_path / "registry").exists()
