"""The Envoy configuration generator: every configuration it can produce passes the real
``envoy --mode validate`` (with real certificate files and the real descriptor set where the
configuration names them), bad mesh descriptions are refused naming the field, and the
committed k8s/base/envoy/envoy.yaml is exactly what its mesh.yaml renders to."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import cli
from services.certs import CertificateAuthority
from services.gateway.envoy_command import rendered
from services.gateway.envoy_config import (
    GRPC_FRAME_HEADER_BYTES,
    ProtoCatalog,
    descriptor_set_bytes,
    render,
    render_yaml,
)
from services.gateway.envoy_mesh import (
    DEFAULT_MESH,
    TLS_DIRECTORY,
    HostPort,
    MeshDescription,
    TlsFiles,
    Tracing,
    Transcoding,
    UpstreamService,
    load_mesh,
    parse_mesh,
)
from services.mesh.errors import InvalidArgument
from services.mesh.protogen import GENERATED
from tests.envoy_process import validate
from tests.tls_files import envoy_tls

K8S_ENVOY = GENERATED.parent / "k8s" / "base" / "envoy"

CUSTOM_MESH = """
listener: {address: 127.0.0.1, port: 0}
admin: {address: 127.0.0.1, port: 0}
max_message_bytes: 4MiB
unary_timeout_s: 2.5
health_check: {interval_s: 0.5, timeout_s: 0.25, unhealthy_threshold: 1, healthy_threshold: 1}
tracing: {enabled: true, collector: 127.0.0.1:4317, service_name: edge, sampling_percent: 10}
services:
  models:
    endpoints: [127.0.0.1:50061, "[::1]:50062"]
    serves: [scoremesh.registry.v1]
    server_name: models.internal
  inference:
    address: inference.example.org:9000
    serves: [inference.GRPCInferenceService, scoremesh.scoring.v1.Scoring]
    health_service: scoremesh.scoring.v1.Scoring
"""


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Real PEM files where a configuration with TLS names them."""
    issued = CertificateAuthority.create().issue("envoy", ["*.scoremesh.svc.cluster.local", "localhost"])
    return envoy_tls(issued.write(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("descriptors") / "descriptor_set.binpb"
    path.write_bytes(descriptor_set_bytes())
    return path


def _assert_valid(config_text: str, path: Path) -> None:
    path.write_text(config_text)
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("tls", "transcoding", "tracing"),
    list(itertools.product([False, True], repeat=3)),
    ids=lambda on: "on" if on else "off",
)
def test_every_option_combination_passes_envoy_validate(
    tls: bool, transcoding: bool, tracing: bool, tls_files: TlsFiles, descriptor_set: Path, tmp_path: Path
) -> None:
    mesh = dataclasses.replace(
        DEFAULT_MESH,
        tls=tls_files if tls else None,
        transcoding=Transcoding(str(descriptor_set)) if transcoding else None,
        tracing=Tracing() if tracing else None,
    )
    _assert_valid(render_yaml(mesh), tmp_path / "envoy.yaml")


def test_the_built_in_default_passes_envoy_validate(tmp_path: Path) -> None:
    _assert_valid(rendered(None), tmp_path / "envoy.yaml")


def test_a_custom_mesh_file_with_tls_and_fixed_endpoints_passes_envoy_validate(
    tls_files: TlsFiles, tmp_path: Path
) -> None:
    description = yaml.safe_load(CUSTOM_MESH)
    description["tls"] = {"enabled": True, **dataclasses.asdict(tls_files)}
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump(description))
    _assert_valid(rendered(mesh_file), tmp_path / "envoy.yaml")


def test_the_committed_k8s_config_is_what_its_mesh_renders(tls_files: TlsFiles, tmp_path: Path) -> None:
    committed = (K8S_ENVOY / "envoy.yaml").read_text()
    fresh = rendered(K8S_ENVOY / "mesh.yaml")
    assert committed == fresh, (
        "k8s/base/envoy/envoy.yaml is out of date: run "
        "`scoremesh envoy render --mesh k8s/base/envoy/mesh.yaml --output k8s/base/envoy/envoy.yaml`"
    )
    # Envoy reads the Secret's files where the pod mounts them; here they live elsewhere
    directory = str(Path(tls_files.cert_file).parent)
    assert committed.count(TLS_DIRECTORY + "/") >= 3
    _assert_valid(committed.replace(TLS_DIRECTORY + "/", directory + "/"), tmp_path / "envoy.yaml")


def test_the_k8s_mesh_is_the_contract() -> None:
    mesh = load_mesh(K8S_ENVOY / "mesh.yaml")
    assert mesh.tls == TlsFiles()  # /etc/scoremesh/tls/{tls.crt,tls.key,ca.crt}
    assert mesh.tracing == Tracing(HostPort("otel-collector.scoremesh.svc.cluster.local", 4317))
    assert (mesh.listener, mesh.admin) == (HostPort("0.0.0.0", 10000), HostPort("127.0.0.1", 9901))
    assert {s.name: str(s.address) for s in mesh.services} == {
        "registry": "registry-headless.scoremesh.svc.cluster.local:50051",
        "scoring": "scoring-headless.scoremesh.svc.cluster.local:50052",
        "training": "training-headless.scoremesh.svc.cluster.local:50053",
        "gateway": "gateway-headless.scoremesh.svc.cluster.local:50054",
    }
    # the built-in default is the same mesh, with TLS left to the description
    assert dataclasses.replace(mesh, tls=None) == DEFAULT_MESH


# what the configuration holds


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    [listener] = config["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    manager: dict[str, Any] = chain["filters"][0]["typed_config"]
    return manager


def _routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [host] = _hcm(config)["route_config"]["virtual_hosts"]
    return {route["match"].get("path") or route["match"]["prefix"]: route for route in host["routes"]}


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}


def test_routes_send_each_grpc_service_to_its_cluster() -> None:
    routes = _routes(render(DEFAULT_MESH))
    prefixes = {
        prefix: route["route"]["cluster"] for prefix, route in routes.items() if "prefix" in route["match"]
    }
    assert prefixes == {
        "/scoremesh.registry.v1.": "registry",
        "/inference.GRPCInferenceService/": "scoring",
        "/scoremesh.scoring.v1.": "scoring",
        "/scoremesh.training.v1.": "training",
        "/scoremesh.gateway.v1.": "gateway",
    }
    assert all(route["match"]["grpc"] == {} for route in routes.values())


def test_streaming_rpcs_have_no_timeout_and_unary_ones_a_bounded_one() -> None:
    routes = _routes(render(DEFAULT_MESH))
    for path in (
        "/scoremesh.registry.v1.ModelRegistry/WatchModels",
        "/scoremesh.training.v1.Training/WatchJob",
        "/scoremesh.registry.v1.ModelRegistry/UploadVersion",
        "/scoremesh.registry.v1.ModelRegistry/DownloadVersion",
        "/scoremesh.training.v1.Training/UploadDataset",
    ):
        assert routes[path]["route"]["timeout"] == "0s", path
        assert routes[path]["route"]["idle_timeout"] == "0s", path
    assert routes["/inference.GRPCInferenceService/"]["route"]["timeout"] == "60s"
    assert routes["/scoremesh.registry.v1."]["route"]["timeout"] == "60s"
    # exact streaming paths come before the prefixes that would otherwise take them
    order = list(routes)
    assert order.index("/scoremesh.registry.v1.ModelRegistry/WatchModels") < order.index(
        "/scoremesh.registry.v1."
    )
    # an upload streams through; the unary size limit does not apply to it
    upload = routes["/scoremesh.registry.v1.ModelRegistry/UploadVersion"]
    assert upload["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True
    assert "typed_per_filter_config" not in routes["/scoremesh.registry.v1.ModelRegistry/WatchModels"]


def test_upstreams_are_http2_least_request_dns_with_health_checks_outliers_and_breakers() -> None:
    clusters = _clusters(render(DEFAULT_MESH))
    assert set(clusters) == {"registry", "scoring", "training", "gateway", "otel_collector"}
    health = {
        name: c["health_checks"][0]["grpc_health_check"]["service_name"]
        for name, c in clusters.items()
        if name != "otel_collector"
    }
    assert health == {
        "registry": "scoremesh.registry.v1.ModelRegistry",
        "scoring": "inference.GRPCInferenceService",
        "training": "scoremesh.training.v1.Training",
        "gateway": "scoremesh.gateway.v1.Admin",
    }
    scoring = clusters["scoring"]
    assert (scoring["type"], scoring["lb_policy"]) == ("STRICT_DNS", "LEAST_REQUEST")
    [endpoint] = scoring["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "scoring-headless.scoremesh.svc.cluster.local",
        "port_value": 50052,
    }
    options = scoring["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert scoring["outlier_detection"]["consecutive_gateway_failure"] > 0
    [thresholds] = scoring["circuit_breakers"]["thresholds"]
    assert thresholds["retry_budget"]["budget_percent"]["value"] > 0
    assert "transport_socket" not in scoring


def test_retries_on_unavailable_and_resets_go_to_another_replica() -> None:
    [host] = _hcm(render(DEFAULT_MESH))["route_config"]["virtual_hosts"]
    policy = host["retry_policy"]
    assert {"unavailable", "reset", "connect-failure"} <= set(policy["retry_on"].split(","))
    assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"


def test_limits_tracing_access_log_and_admin() -> None:
    config = render(DEFAULT_MESH)
    manager = _hcm(config)
    buffer = next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.buffer")
    assert buffer["typed_config"]["max_request_bytes"] == 64 * 1024**2 + GRPC_FRAME_HEADER_BYTES
    assert manager["http_filters"][-1]["name"] == "envoy.filters.http.router"
    assert manager["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    grpc_service = manager["tracing"]["provider"]["typed_config"]["grpc_service"]
    assert grpc_service["envoy_grpc"]["cluster_name"] == "otel_collector"
    collector = _clusters(config)["otel_collector"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert collector["endpoint"]["address"]["socket_address"]["port_value"] == 4317
    [log] = manager["access_log"]
    assert log["name"] == "envoy.access_loggers.stdout"
    assert "json_format" in log["typed_config"]["log_format"]
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_tls_both_ways_and_transcoding_when_the_description_says_so(tls_files: TlsFiles) -> None:
    mesh = dataclasses.replace(DEFAULT_MESH, tls=tls_files, transcoding=Transcoding("/d.binpb"), tracing=None)
    config = render(mesh)
    [chain] = config["static_resources"]["listeners"][0]["filter_chains"]
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["require_client_certificate"] is True
    assert (
        downstream["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == tls_files.ca_file
    )
    upstream = _clusters(config)["scoring"]["transport_socket"]["typed_config"]
    assert upstream["sni"] == "scoring-headless.scoremesh.svc.cluster.local"
    context = upstream["common_tls_context"]
    assert context["tls_certificates"][0]["certificate_chain"]["filename"] == tls_files.cert_file
    assert context["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "scoring-headless.scoremesh.svc.cluster.local"}}
    ]
    transcoder = _hcm(config)["http_filters"][0]
    assert transcoder["name"] == "envoy.filters.http.grpc_json_transcoder"
    assert transcoder["typed_config"]["proto_descriptor"] == "/d.binpb"
    assert "scoremesh.registry.v1.ModelRegistry" in transcoder["typed_config"]["services"]
    assert "tracing" not in _hcm(config)
    assert "otel_collector" not in _clusters(config)


@pytest.mark.parametrize("seconds", [0.001, 2.5, 60, 1_000_000])
def test_durations_are_written_as_envoy_reads_them(seconds: float, tmp_path: Path) -> None:
    mesh = dataclasses.replace(DEFAULT_MESH, unary_timeout_s=seconds)
    timeouts = {route["route"]["timeout"] for route in _routes(render(mesh)).values()}
    assert timeouts == {"0s", f"{seconds:f}".rstrip("0").rstrip(".") + "s"}
    _assert_valid(render_yaml(mesh), tmp_path / "envoy.yaml")


def test_the_yaml_is_the_config() -> None:
    text = render_yaml(DEFAULT_MESH)
    assert text.startswith("# Generated by `scoremesh envoy render`")
    assert yaml.safe_load(text) == render(DEFAULT_MESH)


def test_the_catalog_reads_services_packages_and_streaming_methods() -> None:
    catalog = ProtoCatalog.packaged()
    assert catalog.resolve("scoremesh.registry.v1") == ("scoremesh.registry.v1.ModelRegistry",)
    assert catalog.resolve("inference.GRPCInferenceService") == ("inference.GRPCInferenceService",)
    assert catalog.resolve("scoremesh") == ()
    watch = next(m for m in catalog.methods["scoremesh.training.v1.Training"] if m.name == "WatchJob")
    assert (watch.path, watch.server_streaming, watch.client_streaming) == (
        "/scoremesh.training.v1.Training/WatchJob",
        True,
        False,
    )


# bad descriptions


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("listner: {}", "listner"),
        ("listener: {address: envoy.local, port: 10000}", "listener.address"),
        ("listener: {address: 0.0.0.0, port: 70000}", "listener.port"),
        ("listener: {address: 0.0.0.0, port: ten}", "listener.port"),
        ("admin: {address: 0.0.0.0, port: 9901}", "admin.address"),
        ("max_message_bytes: lots", "max_message_bytes"),
        ("max_message_bytes: 4GiB", "max_message_bytes"),
        ("unary_timeout_s: -1", "unary_timeout_s"),
        ("health_check: {interval_s: 0}", "health_check.interval_s"),
        ("health_check: {unhealthy_threshold: 0}", "health_check.unhealthy_threshold"),
        ("tls: {cert_file: /a}", "tls.enabled"),
        ("tls: {enabled: yes-please}", "tls.enabled"),
        ("tls: {enabled: true, key_file: relative/tls.key}", "tls.key_file"),
        ("tracing: {enabled: true, collector: otel-collector}", "tracing.collector"),
        ("tracing: {enabled: true, sampling_percent: 150}", "tracing.sampling_percent"),
        ("transcoding: {enabled: true, descriptors: /x}", "transcoding.descriptors"),
        ("services: {}", "services"),
        ("services: [scoring]", "services"),
        ("services: {scoring: {serves: [inference.GRPCInferenceService]}}", "services.scoring.address"),
        ("services: {scoring: {address: 'scoring:50052'}}", "services.scoring.serves"),
        (
            "services: {scoring: {address: 'scoring', serves: [scoremesh.scoring.v1]}}",
            "services.scoring.address",
        ),
        (
            "services: {scoring: {address: 'scoring:1', endpoints: ['127.0.0.1:2'],"
            " serves: [scoremesh.scoring.v1]}}",
            "services.scoring.address",
        ),
        (
            "services: {scoring: {endpoints: ['scoring:2'], serves: [scoremesh.scoring.v1]}}",
            "services.scoring.endpoints[0]",
        ),
        ("services: {scoring: {address: 'scoring:1', serves: ['not a name']}}", "services.scoring.serves[0]"),
        ("services: {Scoring: {address: 'scoring:1', serves: [scoremesh.scoring.v1]}}", "services.Scoring"),
        (
            "tls: {enabled: true}\n"
            "services: {scoring: {endpoints: ['127.0.0.1:2'], serves: [scoremesh.scoring.v1]}}",
            "services.scoring.server_name",
        ),
        ("- a list", "(top level)"),
    ],
)
def test_a_bad_description_names_its_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_mesh(yaml.safe_load(text))
    assert [v.field for v in caught.value.violations] == [field]
    assert caught.value.message.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("services", "field", "fragment"),
    [
        (
            {"scoring": {"address": "s:1", "serves": ["scoremesh.scorin.v1"]}},
            "services.scoring.serves[0]",
            "neither",
        ),
        (
            {
                "a": {"address": "a:1", "serves": ["scoremesh.scoring.v1"]},
                "b": {"address": "b:1", "serves": ["scoremesh.scoring.v1.Scoring"]},
            },
            "services.b.serves[0]",
            "served by a",
        ),
        (
            {
                "s": {
                    "address": "s:1",
                    "serves": ["scoremesh.scoring.v1"],
                    "health_service": "grpc.health.v1.Health",
                }
            },
            "services.s.health_service",
            "not one of",
        ),
    ],
)
def test_serves_must_name_what_the_protos_have(services: dict[str, Any], field: str, fragment: str) -> None:
    mesh = parse_mesh({"services": services})
    with pytest.raises(InvalidArgument) as caught:
        render(mesh)
    assert [v.field for v in caught.value.violations] == [field]
    assert fragment in caught.value.message


def test_the_cli_renders_a_file_and_refuses_a_bad_one_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(CUSTOM_MESH)
    output = tmp_path / "envoy.yaml"
    assert cli.main(["envoy", "render", "--mesh", str(mesh_file), "--output", str(output)]) == 0
    assert output.read_text() == render_yaml(load_mesh(mesh_file))
    assert cli.main(["envoy", "render"]) == 0
    assert capsys.readouterr().out == render_yaml(DEFAULT_MESH)

    cases = [
        ("services: {x: {address: 'x:1', serves: [nope.v1]}}", "services.x.serves[0]"),
        ("admin: {address: 10.0.0.1, port: 9901}", "admin.address"),
        ("listener: [unclosed", "not valid YAML (line 1)"),
    ]
    for text, fragment in cases:
        mesh_file.write_text(text)
        assert cli.main(["envoy", "render", "--mesh", str(mesh_file)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        [line] = captured.err.splitlines()
        assert line.startswith(f"scoremesh: {mesh_file}") or line.startswith("scoremesh: --mesh:"), line
        assert fragment in line, line
    assert cli.main(["envoy", "render", "--mesh", str(tmp_path / "missing.yaml")]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "missing.yaml" in line
    assert "No such file" in line


def test_the_cli_writes_the_descriptor_set(tmp_path: Path) -> None:
    output = tmp_path / "descriptor_set.binpb"
    assert cli.main(["envoy", "descriptors", "--output", str(output)]) == 0
    assert ProtoCatalog(output.read_bytes()).methods == ProtoCatalog.packaged().methods


def test_a_custom_mesh_reads_as_written() -> None:
    mesh = parse_mesh(yaml.safe_load(CUSTOM_MESH))
    assert mesh == MeshDescription(
        listener=HostPort("127.0.0.1", 0),
        admin=HostPort("127.0.0.1", 0),
        services=(
            UpstreamService(
                "models",
                ("scoremesh.registry.v1",),
                endpoints=(HostPort("127.0.0.1", 50061), HostPort("::1", 50062)),
                server_name="models.internal",
            ),
            UpstreamService(
                "inference",
                ("inference.GRPCInferenceService", "scoremesh.scoring.v1.Scoring"),
                HostPort("inference.example.org", 9000),
                health_service="scoremesh.scoring.v1.Scoring",
            ),
        ),
        max_message_bytes=4 * 1024**2,
        unary_timeout_s=2.5,
        health_check=dataclasses.replace(
            DEFAULT_MESH.health_check, interval_s=0.5, timeout_s=0.25, unhealthy_threshold=1
        ),
        tracing=Tracing(HostPort("127.0.0.1", 4317), "edge", 10.0),
    )
    clusters = _clusters(render(mesh))
    assert clusters["models"]["type"] == "STATIC"
    assert len(clusters["models"]["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
