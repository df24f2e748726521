"""``scoremesh certs create``: a private CA for the mesh and a certificate per service, for the
mutual TLS that ``SCOREMESH_TLS_*`` turns on (``services.mesh.tls``).

``DIR/ca.crt`` and ``DIR/ca.key`` are the CA (made on the first run, reused afterwards, so that
services added later chain to the same CA); ``DIR/NAME/`` gets ``tls.crt``, ``tls.key`` and a
copy of ``ca.crt`` for each service NAME: the three files k8s/ builds its
``scoremesh-mesh-tls`` Secret from (``k8s/base/secrets/tls/``). Each certificate
serves both ways (server and client authentication) and names the service as Kubernetes
resolves it, plus any ``--hosts``. Keys are ECDSA P-256, written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.mesh.errors import InvalidArgument

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "add_command",
    "create_certificates",
    "default_hosts",
]

CA_DAYS: Final = 3650
DEFAULT_DAYS: Final = 365
DEFAULT_NAMESPACE: Final = "scoremesh"
CERT_FILE: Final = "tls.crt"
KEY_FILE: Final = "tls.key"
CA_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"
# a certificate valid from "now" is refused by a peer whose clock is a little behind
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
_DNS_LABEL: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_SERVICE_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its key, PEM-encoded, with the certificate of the CA that signed it."""

    certificate_pem: bytes
    private_key_pem: bytes
    ca_certificate_pem: bytes

    def write(self, folder: Path) -> Path:
        """Writes ``folder/{tls.crt,tls.key,ca.crt}`` (the key with mode 0600); returns ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / KEY_FILE, self.private_key_pem, 0o600)
        _write(folder / CERT_FILE, self.certificate_pem, 0o644)
        _write(folder / CA_FILE, self.ca_certificate_pem, 0o644)
        return folder


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scoremesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    # ECDSA keys sign (TLS handshakes, and certificates for a CA); they never encrypt
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))


class CertificateAuthority:
    """A CA certificate and its key, which signs the services' certificates."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate = certificate
        self._key = key

    @classmethod
    def create(cls, common_name: str = "scoremesh mesh CA", *, days: int = CA_DAYS) -> CertificateAuthority:
        key = _new_key()
        name = _name(common_name)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        return cls(_validity(builder, days).sign(key, hashes.SHA256()), key)

    @classmethod
    def load(cls, certificate_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an ECDSA key")
        return cls(x509.load_pem_x509_certificate(certificate_pem), key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        return _key_pem(self._key)

    def issue(self, common_name: str, hosts: Sequence[str], *, days: int = DEFAULT_DAYS) -> IssuedCertificate:
        """A certificate for ``common_name`` whose subject alternative names are ``hosts`` (DNS
        names, ``*.``-wildcards or IP addresses; see :func:`parse_host`), good for TLS servers
        and clients alike."""
        key = _new_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([parse_host(host) for host in hosts]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        certificate = _validity(builder, days).sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key), self.certificate_pem
        )


def parse_host(text: str) -> x509.GeneralName:
    """An IP address, a DNS name, or a DNS name whose first label is ``*``; raises ValueError."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{text!r} is not a DNS name, a *.wildcard name or an IP address")
    return x509.DNSName(name)


def default_hosts(service: str, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """The names a Kubernetes Service ``service`` (and its ``-headless`` twin) answers to in
    ``namespace``, and loopback, so that the certificate also works on one machine."""
    cluster = f"{namespace}.svc.cluster.local"
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{cluster}",
        f"{service}-headless.{cluster}",
        "localhost",
        "127.0.0.1",
    ]


def _write(path: Path, data: bytes, mode: int) -> None:
    # written beside and renamed, with its mode set before any byte of a key is in it
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _authority(directory: Path) -> CertificateAuthority:
    """The CA in ``directory``, made if there is none."""
    cert_path, key_path = directory / CA_FILE, directory / CA_KEY_FILE
    if cert_path.exists() != key_path.exists():
        present, absent = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise InvalidArgument.for_field(
            "--dir", f"{present} exists without {absent}; restore it or remove both"
        )
    if cert_path.exists():
        try:
            return CertificateAuthority.load(cert_path.read_bytes(), key_path.read_bytes())
        except ValueError as error:
            raise InvalidArgument.for_field(
                "--dir", f"the CA in {directory} cannot be used: {error}"
            ) from None
    authority = CertificateAuthority.create()
    _write(key_path, authority.private_key_pem, 0o600)
    _write(cert_path, authority.certificate_pem, 0o644)
    return authority


def create_certificates(
    directory: Path,
    services: Iterable[str],
    *,
    hosts: Sequence[str] = (),
    namespace: str = DEFAULT_NAMESPACE,
    days: int = DEFAULT_DAYS,
) -> list[Path]:
    """Writes the CA (unless ``directory`` has one) and ``directory/NAME/{tls.crt,tls.key,ca.crt}``
    for each service (replacing an older certificate there); returns the folders written.
    Raises InvalidArgument naming the option at fault."""
    names = list(services)
    for name in names:
        if not _SERVICE_NAME.fullmatch(name):
            raise InvalidArgument.for_field(
                "--service", f"{name!r} is not a service name (lower-case letters, digits and '-')"
            )
    for host in hosts:
        try:
            parse_host(host)
        except ValueError as error:
            raise InvalidArgument.for_field("--hosts", str(error)) from None
    if not _DNS_LABEL.fullmatch(namespace):
        raise InvalidArgument.for_field("--namespace", f"{namespace!r} is not a Kubernetes namespace name")
    if days < 1:
        raise InvalidArgument.for_field("--days", "must be at least 1")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidArgument.for_field("--dir", f"cannot create {directory}: {error.strerror}") from None
    authority = _authority(directory)
    return [
        authority.issue(name, [*default_hosts(name, namespace), *hosts], days=days).write(directory / name)
        for name in names
    ]


def add_command(commands: Any) -> None:
    """Adds ``certs create`` to the CLI's subcommands (``argparse`` subparsers)."""
    certs = commands.add_parser("certs", help="make the mesh's CA and certificates for mutual TLS")
    verbs = certs.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser(
        "create",
        help="write a CA (unless DIR has one) and a certificate and key per service",
        description=(
            "Writes DIR/ca.crt and DIR/ca.key (first run only) and DIR/NAME/{tls.crt,tls.key,ca.crt} for"
            " each service: the files SCOREMESH_TLS_CERT_FILE, SCOREMESH_TLS_KEY_FILE and"
            " SCOREMESH_TLS_CA_FILE name. Each certificate names NAME, NAME.NAMESPACE,"
            " NAME.NAMESPACE.svc, NAME.NAMESPACE.svc.cluster.local,"
            " NAME-headless.NAMESPACE.svc.cluster.local, localhost and 127.0.0.1, plus --hosts."
            " One certificate for every pod: --service mesh --hosts '*.NAMESPACE.svc.cluster.local'."
        ),
    )
    create.add_argument("--dir", required=True, type=Path, help="where the files go")
    create.add_argument(
        "--service", required=True, nargs="+", action="extend", metavar="NAME", help="one or more services"
    )
    create.add_argument(
        "--hosts",
        default="",
        metavar="HOST[,HOST…]",
        help="more names for every certificate: DNS names, *.wildcards, IP addresses",
    )
    create.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"default {DEFAULT_NAMESPACE}")
    create.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    create.set_defaults(run=run_create)


def run_create(args: argparse.Namespace) -> int:
    hosts = [host.strip() for host in args.hosts.split(",") if host.strip()]
    had_ca = (args.dir / CA_FILE).exists()
    folders = create_certificates(
        args.dir, args.service, hosts=hosts, namespace=args.namespace, days=args.days
    )
    print(
        f"{'reused' if had_ca else 'created'} the CA {args.dir / CA_FILE} (its key: {args.dir / CA_KEY_FILE})"
    )
    for folder in folders:
        print(f"wrote {folder / CERT_FILE}, {folder / KEY_FILE}, {folder / CA_FILE}")
    if folders:
        # k8s/ builds its Secret from these files (README.md, "Deploying on Kubernetes")
        print(f"for k8s/: cp {folders[0]}/* k8s/base/secrets/tls/", file=sys.stderr)
    return 0
