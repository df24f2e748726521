"""What tests pass to the mesh and to Envoy for a certificate folder written by
``IssuedCertificate.write`` (``tls.crt``, ``tls.key``, ``ca.crt``)."""

from __future__ import annotations

from pathlib import Path

from services.certs import CA_FILE, CERT_FILE, KEY_FILE
from services.gateway.envoy_mesh import TlsFiles


def tls_env(folder: Path, *, ca_file: Path | None = None) -> dict[str, str]:
    """SCOREMESH_TLS_* for the folder's certificate, trusting ``ca_file`` (default: the
    folder's CA, the one that signed it)."""
    return {
        "SCOREMESH_TLS_CERT_FILE": str(folder / CERT_FILE),
        "SCOREMESH_TLS_KEY_FILE": str(folder / KEY_FILE),
        "SCOREMESH_TLS_CA_FILE": str(ca_file or folder / CA_FILE),
    }


def envoy_tls(folder: Path) -> TlsFiles:
    """The mesh description's ``tls`` for the folder's certificate."""
    return TlsFiles(str(folder / CERT_FILE), str(folder / KEY_FILE), str(folder / CA_FILE))
