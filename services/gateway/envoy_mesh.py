"""The mesh as Envoy sees it: a small, typed description, read from YAML, that
:mod:`services.gateway.envoy_config` renders into an Envoy configuration.

A description names Envoy's gRPC listener and admin address, each upstream service (where its
replicas are, which gRPC services and packages it serves, which ``grpc.health.v1`` name to
check) and the mesh-wide options: message limit, unary timeout, health-check pacing, mutual
TLS, tracing and gRPC-JSON transcoding. :data:`DEFAULT_MESH` is the Kubernetes deployment of
``k8s/`` (namespace ``scoremesh``, headless Services, OTLP to ``otel-collector``); a file
overrides any top-level field of it, and its ``services`` replace the default ones::

    listener: {address: 0.0.0.0, port: 10000}
    admin: {address: 127.0.0.1, port: 9901}       # loopback only
    max_message_bytes: 64MiB                       # as SCOREMESH_MAX_MESSAGE_BYTES
    unary_timeout_s: 60                            # streaming RPCs get none
    health_check: {interval_s: 5, timeout_s: 1, unhealthy_threshold: 2, healthy_threshold: 1}
    tls: {enabled: true}                           # file paths default to /etc/scoremesh/tls/
    tracing: {enabled: true, collector: otel-collector.scoremesh.svc.cluster.local:4317}
    transcoding: {enabled: false, descriptor_set: /etc/envoy/descriptor_set.binpb}
    services:
      scoring:
        address: scoring-headless.scoremesh.svc.cluster.local:50052   # DNS: every replica
        # or endpoints: [127.0.0.1:50061, 127.0.0.1:50062]           # fixed IP addresses
        serves: [inference.GRPCInferenceService, scoremesh.scoring.v1]
        health_service: inference.GRPCInferenceService  # default: the first service served
        server_name: scoring.example                    # TLS: the name its certificate carries

Every field is checked as it is read; a bad one raises InvalidArgument naming it
(``services.scoring.address``) with what was expected.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, TypeVar

import yaml

from services.mesh.errors import InvalidArgument
from services.mesh.settings import DEFAULT_MAX_MESSAGE_BYTES, MAX_GRPC_MESSAGE_BYTES, parse_bytes

__all__ = [
    "DEFAULT_MESH",
    "HealthCheck",
    "HostPort",
    "MeshDescription",
    "TlsFiles",
    "Tracing",
    "Transcoding",
    "UpstreamService",
    "in_file",
    "load_mesh",
    "parse_mesh",
]

_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
_SERVICE_NAME: Final = re.compile(r"[a-z]([a-z0-9_-]{0,58}[a-z0-9])?")
_GRPC_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_T = TypeVar("_T")


def _invalid(field_path: str, description: str) -> InvalidArgument:
    return InvalidArgument.for_field(field_path, description, reason="BAD_MESH_DESCRIPTION")


@dataclass(frozen=True)
class HostPort:
    """``host:port``; ``host`` is an IP address or a DNS name (``[v6]:port`` for IPv6)."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        return _ip(self.host) is not None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, field_path: str, *, minimum_port: int = 1) -> HostPort:
        host, sep, port_text = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port_text.isdigit():
            raise _invalid(field_path, f"{text!r} is not host:port")
        port = int(port_text)
        if not minimum_port <= port <= 65535:
            raise _invalid(field_path, f"port {port} is not in {minimum_port}..65535")
        if _ip(host) is None and not _HOSTNAME.fullmatch(host.lower()):
            raise _invalid(field_path, f"{host!r} is neither an IP address nor a DNS name")
        return cls(host.lower() if _ip(host) is None else host, port)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class UpstreamService:
    """One mesh service behind Envoy: its replicas and the gRPC names routed to it."""

    name: str
    """The Envoy cluster's name (``scoring``)."""
    serves: tuple[str, ...]
    """Full gRPC service names (``inference.GRPCInferenceService``) or proto packages
    (``scoremesh.scoring.v1``: every service in it) whose calls go to this service."""
    address: HostPort | None = None
    """A DNS name whose every address is a replica (a headless Service): STRICT_DNS."""
    endpoints: tuple[HostPort, ...] = ()
    """Or fixed replicas by IP address: STATIC."""
    health_service: str | None = None
    """The ``grpc.health.v1`` service name checked; None: the first gRPC service served."""
    server_name: str | None = None
    """With TLS: the name the replicas' certificates must carry (and Envoy sends as SNI);
    None: the host of ``address``."""


@dataclass(frozen=True)
class HealthCheck:
    """Active ``grpc.health.v1`` checks of every replica."""

    interval_s: float = 5.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


TLS_DIRECTORY: Final = "/etc/scoremesh/tls"


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS both ways, with the files of the ``scoremesh-mesh-tls`` Secret: callers must
    present a certificate signed by the CA, and Envoy presents its own to the services."""

    cert_file: str = f"{TLS_DIRECTORY}/tls.crt"
    key_file: str = f"{TLS_DIRECTORY}/tls.key"
    ca_file: str = f"{TLS_DIRECTORY}/ca.crt"


@dataclass(frozen=True)
class Tracing:
    """OpenTelemetry spans from Envoy, over OTLP/gRPC to a collector."""

    collector: HostPort = HostPort("otel-collector.scoremesh.svc.cluster.local", 4317)
    service_name: str = "scoremesh-envoy"
    sampling_percent: float = 100.0
    """Of requests that arrive without a sampling decision; a ``traceparent``'s flag wins."""


@dataclass(frozen=True)
class Transcoding:
    """gRPC-JSON transcoding of every RPC's ``google.api.http`` route, from the descriptor set
    (``scoremesh envoy descriptors``) at ``descriptor_set`` where Envoy runs."""

    descriptor_set: str = "/etc/envoy/descriptor_set.binpb"


NAMESPACE: Final = "scoremesh"


def _headless(name: str, port: int) -> HostPort:
    return HostPort(f"{name}-headless.{NAMESPACE}.svc.cluster.local", port)


DEFAULT_SERVICES: Final = (
    UpstreamService(
        "registry",
        ("scoremesh.registry.v1",),
        _headless("registry", 50051),
        health_service="scoremesh.registry.v1.ModelRegistry",
    ),
    UpstreamService(
        "scoring",
        ("inference.GRPCInferenceService", "scoremesh.scoring.v1"),
        _headless("scoring", 50052),
        health_service="inference.GRPCInferenceService",
    ),
    UpstreamService(
        "training",
        ("scoremesh.training.v1",),
        _headless("training", 50053),
        health_service="scoremesh.training.v1.Training",
    ),
    # the gateway's gRPC side: the Admin service (keys, usage)
    UpstreamService(
        "gateway",
        ("scoremesh.gateway.v1",),
        _headless("gateway", 50054),
        health_service="scoremesh.gateway.v1.Admin",
    ),
)


@dataclass(frozen=True)
class MeshDescription:
    """What :func:`~services.gateway.envoy_config.render` turns into an Envoy configuration."""

    listener: HostPort = HostPort("0.0.0.0", 10000)
    """Where Envoy takes the mesh's gRPC calls (an IP address; port 0: the OS picks)."""
    admin: HostPort = HostPort("127.0.0.1", 9901)
    """Envoy's admin interface, on a loopback address only: it can stop Envoy and dump its
    configuration, TLS secrets' paths included."""
    services: tuple[UpstreamService, ...] = DEFAULT_SERVICES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """The largest gRPC message, as SCOREMESH_MAX_MESSAGE_BYTES: Envoy refuses a larger unary
    request before it reaches a service."""
    unary_timeout_s: float = 60.0
    """The longest a unary call may take through Envoy (its deadline, if shorter, still rules
    at the service); streaming calls have no timeout."""
    health_check: HealthCheck = field(default_factory=HealthCheck)
    tls: TlsFiles | None = None
    tracing: Tracing | None = field(default_factory=Tracing)
    transcoding: Transcoding | None = None


DEFAULT_MESH: Final = MeshDescription()


# reading


def _mapping(value: object, field_path: str) -> Mapping[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise _invalid(field_path or "(top level)", "expected a mapping of names to values")
    return value


def _known(mapping: Mapping[str, object], field_path: str, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise _invalid(_join(field_path, key), f"unknown field (expected one of {', '.join(allowed)})")


def _join(field_path: str, key: str) -> str:
    return f"{field_path}.{key}" if field_path else key


def _string(value: object, field_path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid(field_path, "expected a non-empty string")
    return value.strip()


def _integer(value: object, field_path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(field_path, "expected a whole number")
    if value < minimum:
        raise _invalid(field_path, f"expected at least {minimum}")
    return value


def _seconds(value: object, field_path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 86400 * 365:
        raise _invalid(field_path, "expected a positive number of seconds")
    return float(value)


def _boolean(value: object, field_path: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(field_path, "expected true or false")
    return value


def _list(value: object, field_path: str) -> list[object]:
    if not isinstance(value, list) or not value:
        raise _invalid(field_path, "expected a non-empty list")
    return value


def _field(
    mapping: Mapping[str, object], field_path: str, key: str, read: Callable[[object, str], _T], default: _T
) -> _T:
    if key not in mapping or mapping[key] is None:
        return default
    return read(mapping[key], _join(field_path, key))


def _host_port(value: object, field_path: str) -> HostPort:
    return HostPort.parse(_string(value, field_path), field_path)


def _socket(value: object, field_path: str) -> HostPort:
    """``{address: IP, port: N}`` (port 0: the OS picks)."""
    mapping = _mapping(value, field_path)
    _known(mapping, field_path, ("address", "port"))
    address = _string(mapping.get("address"), _join(field_path, "address"))
    port = _integer(mapping.get("port"), _join(field_path, "port"), 0)
    if port > 65535:
        raise _invalid(_join(field_path, "port"), "expected at most 65535")
    if _ip(address) is None:
        raise _invalid(_join(field_path, "address"), f"{address!r} is not an IP address")
    return HostPort(address, port)


def _admin(value: object, field_path: str) -> HostPort:
    admin = _socket(value, field_path)
    ip = _ip(admin.host)
    if ip is None or not ip.is_loopback:
        raise _invalid(
            _join(field_path, "address"), f"{admin.host} is not a loopback address (127.0.0.1, ::1)"
        )
    return admin


def _message_bytes(value: object, field_path: str) -> int:
    if isinstance(value, str):
        try:
            size = parse_bytes(value)
        except ValueError:
            raise _invalid(field_path, f"{value!r} is not a byte size such as 64MiB") from None
    else:
        size = _integer(value, field_path, 1024)
    if not 1024 <= size <= MAX_GRPC_MESSAGE_BYTES:
        raise _invalid(field_path, f"expected 1KiB to {MAX_GRPC_MESSAGE_BYTES} bytes (gRPC's limit)")
    return size


def _health_check(value: object, field_path: str) -> HealthCheck:
    mapping = _mapping(value, field_path)
    _known(mapping, field_path, ("interval_s", "timeout_s", "unhealthy_threshold", "healthy_threshold"))
    default = HealthCheck()
    return HealthCheck(
        interval_s=_field(mapping, field_path, "interval_s", _seconds, default.interval_s),
        timeout_s=_field(mapping, field_path, "timeout_s", _seconds, default.timeout_s),
        unhealthy_threshold=_field(
            mapping, field_path, "unhealthy_threshold", _at_least_one, default.unhealthy_threshold
        ),
        healthy_threshold=_field(
            mapping, field_path, "healthy_threshold", _at_least_one, default.healthy_threshold
        ),
    )


def _at_least_one(value: object, field_path: str) -> int:
    return _integer(value, field_path, 1)


def _enabled(mapping: Mapping[str, object], field_path: str) -> bool:
    if "enabled" not in mapping:
        raise _invalid(_join(field_path, "enabled"), "required: true or false")
    return _boolean(mapping["enabled"], _join(field_path, "enabled"))


def _tls(value: object, field_path: str) -> TlsFiles | None:
    mapping = _mapping(value, field_path)
    _known(mapping, field_path, ("enabled", "cert_file", "key_file", "ca_file"))
    if not _enabled(mapping, field_path):
        return None
    default = TlsFiles()
    return TlsFiles(
        cert_file=_field(mapping, field_path, "cert_file", _absolute_path, default.cert_file),
        key_file=_field(mapping, field_path, "key_file", _absolute_path, default.key_file),
        ca_file=_field(mapping, field_path, "ca_file", _absolute_path, default.ca_file),
    )


def _absolute_path(value: object, field_path: str) -> str:
    path = _string(value, field_path)
    if not path.startswith("/"):
        raise _invalid(field_path, f"{path!r} is not an absolute path (Envoy's working directory is unknown)")
    return path


def _percent(value: object, field_path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise _invalid(field_path, "expected a percentage from 0 to 100")
    return float(value)


def _tracing(value: object, field_path: str) -> Tracing | None:
    mapping = _mapping(value, field_path)
    _known(mapping, field_path, ("enabled", "collector", "service_name", "sampling_percent"))
    if not _enabled(mapping, field_path):
        return None
    default = Tracing()
    return Tracing(
        collector=_field(mapping, field_path, "collector", _host_port, default.collector),
        service_name=_field(mapping, field_path, "service_name", _string, default.service_name),
        sampling_percent=_field(mapping, field_path, "sampling_percent", _percent, default.sampling_percent),
    )


def _transcoding(value: object, field_path: str) -> Transcoding | None:
    mapping = _mapping(value, field_path)
    _known(mapping, field_path, ("enabled", "descriptor_set"))
    if not _enabled(mapping, field_path):
        return None
    return Transcoding(
        descriptor_set=_field(
            mapping, field_path, "descriptor_set", _absolute_path, Transcoding().descriptor_set
        )
    )


def _grpc_name(value: object, field_path: str) -> str:
    name = _string(value, field_path)
    if not _GRPC_NAME.fullmatch(name):
        raise _invalid(field_path, f"{name!r} is not a gRPC service or package name")
    return name


def _grpc_names(value: object, field_path: str) -> tuple[str, ...]:
    return tuple(
        _grpc_name(item, f"{field_path}[{index}]") for index, item in enumerate(_list(value, field_path))
    )


def _endpoints(value: object, field_path: str) -> tuple[HostPort, ...]:
    endpoints = []
    for index, item in enumerate(_list(value, field_path)):
        endpoint = _host_port(item, f"{field_path}[{index}]")
        # STATIC endpoints are addresses: a name needs `address` (STRICT_DNS) instead
        if not endpoint.is_ip:
            raise _invalid(f"{field_path}[{index}]", f"{endpoint.host!r} is not an IP address")
        endpoints.append(endpoint)
    return tuple(endpoints)


def _server_name(value: object, field_path: str) -> str:
    name = _string(value, field_path).lower()
    if not _HOSTNAME.fullmatch(name):
        raise _invalid(field_path, f"{name!r} is not a DNS name")
    return name


def _service(name: str, value: object, field_path: str) -> UpstreamService:
    if not _SERVICE_NAME.fullmatch(name):
        raise _invalid(field_path, "a service's name takes lower-case letters, digits, '-' and '_'")
    mapping = _mapping(value, field_path)
    _known(mapping, field_path, ("address", "endpoints", "serves", "health_service", "server_name"))
    if "serves" not in mapping:
        raise _invalid(_join(field_path, "serves"), "required: the gRPC services or packages routed here")
    service = UpstreamService(
        name=name,
        serves=_grpc_names(mapping["serves"], _join(field_path, "serves")),
        address=_field(mapping, field_path, "address", _host_port, None),
        endpoints=_field(mapping, field_path, "endpoints", _endpoints, ()),
        health_service=_field(mapping, field_path, "health_service", _grpc_name, None),
        server_name=_field(mapping, field_path, "server_name", _server_name, None),
    )
    if (service.address is None) == (not service.endpoints):
        raise _invalid(_join(field_path, "address"), "give either address (DNS) or endpoints (IP addresses)")
    return service


def _services(value: object, field_path: str) -> tuple[UpstreamService, ...]:
    mapping = _mapping(value, field_path)
    if not mapping:
        raise _invalid(field_path, "expected at least one service")
    return tuple(_service(name, item, _join(field_path, name)) for name, item in mapping.items())


_TOP_LEVEL: Final = (
    "listener",
    "admin",
    "services",
    "max_message_bytes",
    "unary_timeout_s",
    "health_check",
    "tls",
    "tracing",
    "transcoding",
)


def parse_mesh(data: object) -> MeshDescription:
    """A description from YAML's data (what ``yaml.safe_load`` returns): :data:`DEFAULT_MESH`
    with the fields ``data`` sets. Raises InvalidArgument naming the first bad field."""
    mapping = _mapping(data, "")
    _known(mapping, "", _TOP_LEVEL)
    default = DEFAULT_MESH
    mesh = replace(
        default,
        listener=_field(mapping, "", "listener", _socket, default.listener),
        admin=_field(mapping, "", "admin", _admin, default.admin),
        services=_field(mapping, "", "services", _services, default.services),
        max_message_bytes=_field(mapping, "", "max_message_bytes", _message_bytes, default.max_message_bytes),
        unary_timeout_s=_field(mapping, "", "unary_timeout_s", _seconds, default.unary_timeout_s),
        health_check=_field(mapping, "", "health_check", _health_check, default.health_check),
        tls=_field(mapping, "", "tls", _tls, default.tls),
        tracing=_field(mapping, "", "tracing", _tracing, default.tracing),
        transcoding=_field(mapping, "", "transcoding", _transcoding, default.transcoding),
    )
    if mesh.tls is not None:
        for service in mesh.services:
            if service.server_name is None and service.address is None:
                raise _invalid(
                    f"services.{service.name}.server_name",
                    "required with TLS and endpoints: the name the replicas' certificates carry",
                )
    return mesh


def load_mesh(path: Path) -> MeshDescription:
    """Reads and checks the description in ``path``; InvalidArgument names the file, and the
    field or the YAML line at fault."""
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidArgument.for_field("--mesh", f"cannot read {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise InvalidArgument.for_field("--mesh", f"{path} is not valid YAML{where}") from None
    try:
        return parse_mesh(data)
    except InvalidArgument as error:
        raise in_file(path, error) from None


def in_file(path: Path, error: InvalidArgument) -> InvalidArgument:
    """``error`` about a field of the description in ``path``, with the file named first."""
    return InvalidArgument(f"{path}: {error.message}", violations=error.violations, reason=error.reason)
