"""Typed configuration read once from ``SCOREMESH_*`` environment variables.

Each service builds its frozen settings object in ``main`` from an environment mapping that
tests can substitute; the ``env_*`` helpers below fail fast with a :class:`SettingsError` that
names the variable and the bad value. An unset or empty variable means "use the default".

``ENVIRONMENT`` lists every variable the kernel reads, for the README and ``--help`` texts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "ENVIRONMENT",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "EnvVar",
    "MeshSettings",
    "SettingsError",
    "TlsSettings",
    "env_bool",
    "env_bytes",
    "env_float",
    "env_int",
    "env_path",
    "env_str",
    "parse_bytes",
]

# gRPC stores message limits in a C int: anything larger is rejected when a channel opens.
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024**2

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")


class SettingsError(ValueError):
    """A configuration variable holds a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One documented environment variable: its name, its default as written, what it means."""

    name: str
    default: str
    description: str


ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar("SCOREMESH_HOME", "~/.scoremesh", "artifacts, the private PostgreSQL cluster, run files"),
    EnvVar(
        "SCOREMESH_MAX_MESSAGE_BYTES",
        "64MiB",
        "gRPC message limit, equal for sending and receiving on both sides of every channel",
    ),
    EnvVar("SCOREMESH_SHUTDOWN_GRACE_S", "10", "how long in-flight calls may finish after SIGTERM"),
    EnvVar(
        "SCOREMESH_DEFAULT_DEADLINE_S",
        "30",
        "deadline of outbound calls that set none; cap for inbound calls that carry none",
    ),
    EnvVar("SCOREMESH_MAX_CONCURRENT_RPCS", "1000", "calls a server runs at once; more are refused"),
    EnvVar("SCOREMESH_LOG_LEVEL", "INFO", "log level: " + ", ".join(LOG_LEVELS)),
    EnvVar("SCOREMESH_LOG_FORMAT", "json", "json lines (with trace ids) or text"),
    EnvVar(
        "SCOREMESH_INTERNAL_TOKEN",
        "",
        "the mesh's shared secret; unset: $SCOREMESH_HOME/internal.token if present, else none",
    ),
    EnvVar(
        "SCOREMESH_METRICS_PORT",
        "0",
        "the Prometheus /metrics port (0: the OS picks; announced in run/<service>-metrics.addr)",
    ),
    EnvVar(
        "SCOREMESH_HEALTH_PORT",
        "",
        "a second port serving only grpc.health.v1, in plaintext, for probes that cannot speak TLS",
    ),
    EnvVar(
        "SCOREMESH_TLS_CERT_FILE",
        "",
        "PEM certificate this process presents as server and client; with key and CA: mutual TLS",
    ),
    EnvVar("SCOREMESH_TLS_KEY_FILE", "", "PEM private key of that certificate"),
    EnvVar(
        "SCOREMESH_TLS_CA_FILE",
        "",
        "PEM CA certificate(s) that peers' certificates must be signed by, both ways",
    ),
    EnvVar(
        "SCOREMESH_TLS_SERVER_NAME",
        "",
        "the name checked against servers' certificates instead of the host dialled (with TLS only)",
    ),
)

TLS_FILE_VARIABLES = ("SCOREMESH_TLS_CERT_FILE", "SCOREMESH_TLS_KEY_FILE", "SCOREMESH_TLS_CA_FILE")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_BYTES_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _bad(name: str, value: str, expected: str) -> SettingsError:
    return SettingsError(f"{name}={value!r}: expected {expected}")


def _check_range(name: str, raw: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise _bad(name, raw, f"a value of at least {minimum}")
    if maximum is not None and value > maximum:
        raise _bad(name, raw, f"a value of at most {maximum}")


def env_str(
    env: Mapping[str, str], name: str, default: str, *, choices: Collection[str] | None = None
) -> str:
    """The variable's value (stripped), or ``default``; with ``choices``, one of them."""
    raw = _raw(env, name)
    if raw is None:
        return default
    if choices is not None and raw not in choices:
        raise _bad(name, raw, "one of " + ", ".join(sorted(choices)))
    return raw


def env_int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """A whole number (``_`` separators allowed), or ``default``."""
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(name, raw, "a whole number") from None
    _check_range(name, raw, value, minimum, maximum)
    return value


def env_float(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """A finite number, or ``default``."""
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, raw, "a number") from None
    if not math.isfinite(value):
        raise _bad(name, raw, "a finite number")
    _check_range(name, raw, value, minimum, maximum)
    return value


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` in any case, or ``default``."""
    raw = _raw(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _bad(name, raw, "true or false")


def parse_bytes(text: str) -> int:
    """``64MiB`` → 67108864. Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of
    1024), in any case; no unit means bytes. Raises ValueError on anything else."""
    match = _BYTES_PATTERN.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _BYTE_UNITS:
        raise ValueError(f"not a byte size: {text!r}")
    number, unit = match.groups()
    multiplier = _BYTE_UNITS[unit]
    if "." in number:
        whole, fraction = number.split(".")
        # integer arithmetic keeps 1.5GiB exact; a fraction of a byte is not a size
        scaled = int(whole + fraction) * multiplier
        divisor: int = 10 ** len(fraction)
        if scaled % divisor:
            raise ValueError(f"not a whole number of bytes: {text!r}")
        return scaled // divisor
    return int(number) * multiplier


def env_bytes(
    env: Mapping[str, str], name: str, default: int, *, minimum: int | None = 0, maximum: int | None = None
) -> int:
    """A byte size such as ``64MiB``, ``2GiB``, ``500MB`` or ``1048576``, or ``default``."""
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = parse_bytes(raw)
    except ValueError:
        raise _bad(name, raw, "a byte size such as 1048576, 64MiB or 2GiB") from None
    _check_range(name, raw, value, minimum, maximum)
    return value


def env_path(env: Mapping[str, str], name: str, default: Path) -> Path:
    """A filesystem path with ``~`` expanded, or ``default`` (also expanded)."""
    raw = _raw(env, name)
    if raw is None:
        return default.expanduser()
    if "\0" in raw:
        raise _bad(name, raw, "a path without NUL characters")
    return Path(raw).expanduser()


@dataclass(frozen=True)
class TlsSettings:
    """Mutual TLS inside the mesh, from ``SCOREMESH_TLS_*``: the files as read at start-up.

    Every mesh gRPC server then presents ``certificate_chain`` and accepts only clients whose
    certificate ``root_certificates`` signed; every mesh channel presents the same certificate
    and checks the server's against the same CA (and its name against the host dialled, or
    ``server_name``). ``services.mesh.tls`` turns this into gRPC credentials. The files are read
    once: a renewed certificate takes effect when the process restarts."""

    cert_file: Path
    """SCOREMESH_TLS_CERT_FILE: the PEM certificate, leaf first, then any intermediates."""
    key_file: Path
    """SCOREMESH_TLS_KEY_FILE: its PEM private key (unencrypted)."""
    ca_file: Path
    """SCOREMESH_TLS_CA_FILE: the PEM CA certificate(s) peers must chain to."""
    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    root_certificates: bytes = field(repr=False)
    server_name: str | None = None
    """SCOREMESH_TLS_SERVER_NAME: the name a server's certificate must carry, instead of the
    host of the address dialled (for a certificate that does not name that address)."""


@dataclass(frozen=True)
class MeshSettings:
    """What every service's kernel needs, read once by :meth:`from_env`."""

    home: Path
    """SCOREMESH_HOME: where a service keeps its files (artifacts, a private PostgreSQL cluster,
    the ``run/<service>.addr`` files announcing bound addresses). Default ``~/.scoremesh``."""
    max_message_bytes: int
    """SCOREMESH_MAX_MESSAGE_BYTES: the largest gRPC message sent or received, set on both
    sides of every channel so that a limit is never enforced on one side only. Default 64MiB,
    at most 2GiB - 1 (gRPC keeps it in a C int)."""
    shutdown_grace_s: float
    """SCOREMESH_SHUTDOWN_GRACE_S: after SIGTERM, how long in-flight calls may finish before
    they are cancelled. Default 10."""
    default_deadline_s: float
    """SCOREMESH_DEFAULT_DEADLINE_S: the deadline given to outbound calls that set none, and
    the cap on the time passed on from an inbound call that carried none. Default 30."""
    max_concurrent_rpcs: int
    """SCOREMESH_MAX_CONCURRENT_RPCS: calls one server runs at once; beyond it, calls fail
    with RESOURCE_EXHAUSTED instead of queueing without bound. Default 1000."""
    log_level: str
    """SCOREMESH_LOG_LEVEL: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case). Default INFO."""
    log_format: str
    """SCOREMESH_LOG_FORMAT: ``json`` (one object per line, with trace ids) or ``text``.
    Default json."""
    metrics_port: int = 0
    """SCOREMESH_METRICS_PORT: where the service serves Prometheus's ``/metrics`` (default 0:
    a port the OS picks, announced in ``$SCOREMESH_HOME/run/<service>-metrics.addr``)."""
    internal_token: str | None = None
    """SCOREMESH_INTERNAL_TOKEN, else the contents of ``$SCOREMESH_HOME/internal.token`` when
    that file exists: the shared secret every call inside the mesh carries
    (``x-scoremesh-internal``). When set, services refuse calls without it
    (UNAUTHENTICATED), health and reflection excepted; unset, nothing is checked.
    ``scoremesh up`` creates one."""
    tls: TlsSettings | None = None
    """SCOREMESH_TLS_CERT_FILE, SCOREMESH_TLS_KEY_FILE and SCOREMESH_TLS_CA_FILE, all three or
    none: mutual TLS on every gRPC server and channel of the mesh (see :class:`TlsSettings`);
    None (the default): plaintext. A partial set is an error."""
    health_port: int | None = None
    """SCOREMESH_HEALTH_PORT: when set, the server also answers ``grpc.health.v1`` (and nothing
    else) in plaintext on this port of the same host, for probes that cannot present a client
    certificate, such as kubelet's gRPC probes (0: the OS picks). Unset (the default): none."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MeshSettings:
        """Reads every ``SCOREMESH_*`` variable of the kernel from ``env`` (default
        ``os.environ``); raises SettingsError naming the first bad one."""
        env = os.environ if env is None else env
        home = env_path(env, "SCOREMESH_HOME", Path("~/.scoremesh"))
        return cls(
            home=home,
            max_message_bytes=env_bytes(
                env,
                "SCOREMESH_MAX_MESSAGE_BYTES",
                DEFAULT_MAX_MESSAGE_BYTES,
                minimum=1024,
                maximum=MAX_GRPC_MESSAGE_BYTES,
            ),
            shutdown_grace_s=env_float(env, "SCOREMESH_SHUTDOWN_GRACE_S", 10.0, minimum=0.0),
            default_deadline_s=env_float(env, "SCOREMESH_DEFAULT_DEADLINE_S", 30.0, minimum=0.001),
            max_concurrent_rpcs=env_int(env, "SCOREMESH_MAX_CONCURRENT_RPCS", 1000, minimum=1),
            log_level=_log_level(env),
            log_format=env_str(env, "SCOREMESH_LOG_FORMAT", "json", choices=LOG_FORMATS),
            metrics_port=env_int(env, "SCOREMESH_METRICS_PORT", 0, minimum=0, maximum=65535),
            internal_token=_internal_token(env, home),
            tls=_tls(env),
            health_port=_health_port(env),
        )


INTERNAL_TOKEN_FILE = "internal.token"


def _internal_token(env: Mapping[str, str], home: Path) -> str | None:
    token = env_str(env, "SCOREMESH_INTERNAL_TOKEN", "")
    if token:
        return token
    try:
        return (home / INTERNAL_TOKEN_FILE).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise SettingsError(f"cannot read {home / INTERNAL_TOKEN_FILE}: {error.strerror}") from None


def _health_port(env: Mapping[str, str]) -> int | None:
    if _raw(env, "SCOREMESH_HEALTH_PORT") is None:
        return None
    return env_int(env, "SCOREMESH_HEALTH_PORT", 0, minimum=0, maximum=65535)


def _tls(env: Mapping[str, str]) -> TlsSettings | None:
    paths = {name: _raw(env, name) for name in TLS_FILE_VARIABLES}
    server_name = env_str(env, "SCOREMESH_TLS_SERVER_NAME", "") or None
    missing = [name for name, path in paths.items() if path is None]
    if len(missing) == len(paths):
        if server_name:
            raise SettingsError("SCOREMESH_TLS_SERVER_NAME is set but TLS is not: set " + _all_three())
        return None
    if missing:
        raise SettingsError(f"{' and '.join(missing)} not set: mutual TLS needs {_all_three()}")
    cert_file, key_file, ca_file = (env_path(env, name, Path()) for name in TLS_FILE_VARIABLES)
    cert_pem, key_pem, ca_pem = (
        _read_file(name, path)
        for name, path in zip(TLS_FILE_VARIABLES, (cert_file, key_file, ca_file), strict=True)
    )
    leaf = _certificates("SCOREMESH_TLS_CERT_FILE", cert_file, cert_pem)[0]
    _check_key_of(leaf, cert_file, key_file, key_pem)
    _certificates("SCOREMESH_TLS_CA_FILE", ca_file, ca_pem)
    return TlsSettings(cert_file, key_file, ca_file, cert_pem, key_pem, ca_pem, server_name)


def _all_three() -> str:
    return ", ".join(TLS_FILE_VARIABLES[:-1]) + " and " + TLS_FILE_VARIABLES[-1]


def _read_file(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise SettingsError(f"{name}={str(path)!r}: cannot read it: {error.strerror}") from None


# gRPC says no more than "handshake failed" about an unusable file, and only at the first call:
# the files are checked here, so that a bad one stops the service at start-up, named


def _certificates(name: str, path: Path, pem: bytes) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise SettingsError(f"{name}={str(path)!r}: not a PEM certificate") from None


def _check_key_of(leaf: x509.Certificate, cert_file: Path, key_file: Path, key_pem: bytes) -> None:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise SettingsError(
            f"SCOREMESH_TLS_KEY_FILE={str(key_file)!r}: not an unencrypted PEM private key"
        ) from None

    def der(public_key: Any) -> bytes:
        encoded: bytes = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return encoded

    if der(key.public_key()) != der(leaf.public_key()):
        raise SettingsError(
            f"SCOREMESH_TLS_KEY_FILE={str(key_file)!r} is not the key of the certificate in"
            f" SCOREMESH_TLS_CERT_FILE={str(cert_file)!r}"
        )


def _log_level(env: Mapping[str, str]) -> str:
    raw = env_str(env, "SCOREMESH_LOG_LEVEL", "INFO")
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise _bad("SCOREMESH_LOG_LEVEL", raw, "one of " + ", ".join(LOG_LEVELS))
    return level
