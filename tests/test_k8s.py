"""The Kubernetes manifests: render, validate against the official schemas, check structure, scan.

Tools live in .venv-tools (scripts/install_tools.sh): kubectl, checkov, actionlint. A missing tool
fails the test with the command that installs it, so CI can't pass by skipping the checks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mnist_service.process.handoff import LATE_AFTER_S
from mnist_service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
TOOLS_BIN = ROOT / ".venv-tools" / "bin"
# The oldest release we support (preStop's native sleep action needs >= 1.30) and the newest the
# pinned kubernetes-validate ships: a field removed or renamed in between fails one of them.
K8S_VERSIONS = ("1.31.0", "1.37.0")
APP = "mnist-service"
# Each overlay in k8s/overlays has a fixture of the same name; test_every_overlay_is_tested keeps them in step.
OVERLAYS = ("local", "ingress", "repository", "grpc", "capture", "slim")
# The ingress overlay's placeholders, which the user replaces (k8s/overlays/ingress/ingress.yaml).
INGRESS_HOST = "mnist.example.com"
INGRESS_TLS_SECRET = "mnist-service-tls"
NGINX = "nginx.ingress.kubernetes.io/"
# The repository overlay's shared volume (k8s/overlays/repository).
REPOSITORY = K8S / "overlays" / "repository"

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    path = TOOLS_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run scripts/install_tools.sh (installs it into .venv-tools)")
    return found


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def _render(path: Path) -> list[dict[str, Any]]:
    result = _run(_tool("kubectl"), "kustomize", str(path))
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _render(K8S)


@pytest.fixture(scope="module")
def local() -> list[dict[str, Any]]:
    return _render(K8S / "overlays" / "local")


@pytest.fixture(scope="module")
def ingress() -> list[dict[str, Any]]:
    return _render(K8S / "overlays" / "ingress")


@pytest.fixture(scope="module")
def repository() -> list[dict[str, Any]]:
    return _render(REPOSITORY)


@pytest.fixture(scope="module")
def grpc() -> list[dict[str, Any]]:
    return _render(K8S / "overlays" / "grpc")


@pytest.fixture(scope="module")
def capture() -> list[dict[str, Any]]:
    return _render(K8S / "overlays" / "capture")


@pytest.fixture(scope="module")
def slim() -> list[dict[str, Any]]:
    return _render(K8S / "overlays" / "slim")


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _makefile_image() -> str:
    match = re.search(r"^IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile has no `IMAGE ?= name:tag` line"
    return match.group(1)


def _makefile_trainer_image() -> str:
    """TRAINER_IMAGE as make expands it: its own name, IMAGE's tag."""
    match = re.search(
        r"^TRAINER_IMAGE \?= ([^:\s]+):\$\(lastword \$\(subst :, ,\$\(IMAGE\)\)\)$",
        (ROOT / "Makefile").read_text(),
        re.MULTILINE,
    )
    assert match, "Makefile has no `TRAINER_IMAGE ?= name:$(lastword $(subst :, ,$(IMAGE)))` line"
    return f"{match.group(1)}:{_makefile_image().rsplit(':', 1)[1]}"


def _makefile_slim_image() -> str:
    """SLIM_IMAGE as make expands it: IMAGE with -slim after its tag."""
    assert re.search(r"^SLIM_IMAGE \?= \$\(IMAGE\)-slim$", (ROOT / "Makefile").read_text(), re.MULTILINE), (
        "Makefile has no `SLIM_IMAGE ?= $(IMAGE)-slim` line"
    )
    return f"{_makefile_image()}-slim"


def _mebibytes(quantity: str) -> int:
    return int(quantity[:-2]) * {"Mi": 1, "Gi": 1024}[quantity[-2:]]


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    return _one(objects, "ConfigMap")["data"]


def _settings(objects: list[dict[str, Any]]) -> Settings:
    """The server's settings as the ConfigMap makes them: config.env over the Settings defaults."""
    return Settings(**{key.lower(): value for key, value in _config(objects).items()})


# --- rendering and schema validation ---------------------------------------------------------


def test_base_has_the_expected_objects(base: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in base)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
        ]
    )
    namespaced = [o for o in base if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {_one(base, "Namespace")["metadata"]["name"]}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("which", ["base", *OVERLAYS])
def test_rendered_objects_validate_strictly(which: str, version: str, request: pytest.FixtureRequest) -> None:
    for obj in request.getfixturevalue(which):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{which} {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {e.message}")


def test_every_overlay_is_tested() -> None:
    # A new overlay must join OVERLAYS (and get a fixture) so that it is validated and scanned too.
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(OVERLAYS)


def test_strict_validation_rejects_unknown_fields(base: list[dict[str, Any]]) -> None:
    # Guards the guard: a typo in a field name must not pass as "valid".
    deployment = json.loads(json.dumps(_one(base, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- structure of the base ---------------------------------------------------------------------


def test_selectors_match_pod_labels(base: list[dict[str, Any]]) -> None:
    deployment = _one(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/name"] == APP
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _selects(_one(base, "Service")["spec"]["selector"], pod_labels)
    assert _selects(_one(base, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert _selects(_one(base, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    for obj in base:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == APP, obj["kind"]


def test_rollout_never_drops_below_capacity(base: list[dict[str, Any]]) -> None:
    spec = _one(base, "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_probes_use_named_container_port(base: list[dict[str, Any]]) -> None:
    container = _container(_one(base, "Deployment"))
    port_names = {p["name"] for p in container["ports"]}
    expected_paths = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected_paths.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert isinstance(http_get["port"], str) and http_get["port"] in port_names, probe


def test_a_hung_worker_is_replaced_before_the_probes_would_act(base: list[dict[str, Any]]) -> None:
    """The supervisor skips a worker LATE_AFTER_S without a heartbeat and kills it after WORKER_TIMEOUT_S
    (the comments at the probes in deployment.yaml say why these numbers must agree)."""
    container = _container(_one(base, "Deployment"))
    settings = _settings(base)
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    # A forward pass over the request deadline has failed its requests: only then may it count as hung.
    assert settings.worker_timeout_s > settings.request_timeout_s
    # Every worker hung at once: replaced (killed, then a start-up of about 10 s) before the pod is restarted.
    assert settings.worker_timeout_s <= liveness["periodSeconds"] * liveness["failureThreshold"] / 2
    # A probe can reach a hung worker only before it is skipped, so never two probes in a row.
    for probe in (liveness, readiness):
        assert probe["periodSeconds"] > LATE_AFTER_S and probe["failureThreshold"] >= 2


def test_container_port_matches_configured_port(base: list[dict[str, Any]]) -> None:
    deployment = _one(base, "Deployment")
    port, grpc_port = _container(deployment)["ports"]
    assert (grpc_port["name"], grpc_port["containerPort"]) == ("grpc", int(_config(base)["GRPC_PORT"]))
    assert port["name"] == "http"
    assert port["containerPort"] == int(_config(base)["PORT"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_targets_the_named_port(base: list[dict[str, Any]]) -> None:
    service = _one(base, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    port, grpc_port = service["spec"]["ports"]
    assert port["name"] == "http"
    assert port["targetPort"] == "http"
    assert port["targetPort"] in {p["name"] for p in _container(_one(base, "Deployment"))["ports"]}
    # gRPC under its own name and appProtocol, so that meshes and gateways speak HTTP/2 to it.
    assert (grpc_port["name"], grpc_port["targetPort"], grpc_port["appProtocol"]) == ("grpc", "grpc", "grpc")


def test_hpa_scales_the_deployment_on_cpu(base: list[dict[str, Any]]) -> None:
    hpa = _one(base, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    deployment = _one(base, "Deployment")
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] == 2 <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    # CPU utilisation is relative to the request: without one the HPA never acts.
    assert "cpu" in _container(deployment)["resources"]["requests"]


def test_pdb_keeps_one_pod(base: list[dict[str, Any]]) -> None:
    pdb = _one(base, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1


def test_resources_requests_and_memory_limit(base: list[dict[str, Any]]) -> None:
    resources = _container(_one(base, "Deployment"))["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    mebibytes = {"Mi": 1, "Gi": 1024}
    req, lim = (
        int(v[:-2]) * mebibytes[v[-2:]] for v in (resources["requests"]["memory"], resources["limits"]["memory"])
    )
    assert 300 <= req <= lim  # the server's measured RSS is about 300 MiB


def test_security_context(base: list[dict[str, Any]]) -> None:
    pod = _one(base, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = _container(_one(base, "Deployment"))["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sa = _one(base, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["automountServiceAccountToken"] is False


def test_tmp_is_a_writable_emptydir(base: list[dict[str, Any]]) -> None:
    pod = _one(base, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in _container(_one(base, "Deployment"))["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_image_is_pinned_to_the_makefile_tag(base: list[dict[str, Any]]) -> None:
    image = _makefile_image()
    tag = image.rsplit(":", 1)[1]
    assert tag != "latest"
    deployment = _one(base, "Deployment")
    assert _container(deployment)["image"] == image
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == tag
    assert _container(deployment)["imagePullPolicy"] == "Always"


def test_grace_period_covers_prestop_drain_and_timeout(base: list[dict[str, Any]]) -> None:
    deployment = _one(base, "Deployment")
    pre_stop = _container(deployment)["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}, "preStop must be the native sleep action: the image has no shell"
    config = _config(base)
    needed = (
        pre_stop["sleep"]["seconds"]
        + float(config["SHUTDOWN_DRAIN_SECONDS"])
        + float(config["SHUTDOWN_TIMEOUT_SECONDS"])
    )
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= needed + 5, f"grace {grace}s leaves under 5 s of margin over {needed}s"


def test_configmap_keys_are_settings_fields_with_valid_values(base: list[dict[str, Any]]) -> None:
    config = _config(base)
    fields = {name.upper() for name in Settings.model_fields}
    assert set(config) <= fields, f"not Settings fields: {sorted(set(config) - fields)}"
    settings = _settings(base)
    # Where the image bakes the repository (tests/test_container_files.py checks the Dockerfile's side).
    assert settings.model_repository == Path("/app/models")
    assert settings.model_path is None, "MODEL_PATH would serve one file instead of the repository"
    assert "API_KEY" not in config, "the API key belongs in a Secret"


def test_settings_reach_the_container(base: list[dict[str, Any]]) -> None:
    container = _container(_one(base, "Deployment"))
    (env_from,) = container["envFrom"]
    assert env_from["configMapRef"]["name"] == _one(base, "ConfigMap")["metadata"]["name"]
    (api_key,) = [e for e in container["env"] if e["name"] == "API_KEY"]
    ref = api_key["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]


def test_network_policy_opens_only_the_http_and_grpc_ports(base: list[dict[str, Any]]) -> None:
    spec = _one(base, "NetworkPolicy")["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert spec["egress"] == []
    ports = [p["port"] for rule in spec["ingress"] for p in rule["ports"]]
    assert ports == ["http", "grpc"]


# --- the grpc overlay --------------------------------------------------------------------------


def test_grpc_overlay_probes_readiness_over_grpc_on_the_grpc_port(
    base: list[dict[str, Any]], grpc: list[dict[str, Any]]
) -> None:
    container, base_container = _container(_one(grpc, "Deployment")), _container(_one(base, "Deployment"))
    probe = container["readinessProbe"]
    # By number (Kubernetes resolves no port name for a gRPC probe): the container's grpc port and GRPC_PORT.
    (grpc_port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    assert probe["grpc"]["port"] == grpc_port == _settings(grpc).grpc_port != 0
    assert "httpGet" not in probe and probe.get("grpc", {}).get("service", "") == ""  # the server as a whole
    # Timing as the HTTP probe's; liveness and start-up untouched.
    assert {k: v for k, v in probe.items() if k != "grpc"} == {
        k: v for k, v in base_container["readinessProbe"].items() if k != "httpGet"
    }
    for other in ("livenessProbe", "startupProbe"):
        assert container[other] == base_container[other]
    assert [o["kind"] for o in grpc] == [o["kind"] for o in base]


# --- the capture overlay -----------------------------------------------------------------------


def test_capture_overlay_takes_the_database_from_a_secret_and_the_base_captures_nothing(
    base: list[dict[str, Any]], capture: list[dict[str, Any]]
) -> None:
    base_container, container = _container(_one(base, "Deployment")), _container(_one(capture, "Deployment"))
    assert not any(e["name"].startswith("CAPTURE_") for e in base_container["env"])
    assert _settings(base).capture_sample == 0  # off unless an overlay asks
    env = {e["name"]: e for e in container["env"]}
    assert env["CAPTURE_DATABASE"]["valueFrom"]["secretKeyRef"] == {"name": "mnist-capture", "key": "dsn"}
    sample = float(env["CAPTURE_SAMPLE"]["value"])
    assert Settings(capture_sample=sample).capture_sample == sample > 0
    # Everything else as in the base; the pods may reach PostgreSQL (and DNS), nothing more.
    assert [e for e in container["env"] if not e["name"].startswith("CAPTURE_")] == base_container["env"]
    egress = _one(capture, "NetworkPolicy")["spec"]["egress"]
    ports = {(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]}
    assert ports == {(5432, "TCP"), (53, "UDP"), (53, "TCP")}
    assert all("to" not in rule or rule["to"] for rule in egress)
    assert [o["kind"] for o in capture] == [o["kind"] for o in base]


# --- the slim overlay --------------------------------------------------------------------------

# Measured with benchmarks/images.py (docs/deploy.md#the-slim-image): VmRSS of a slim worker after 200
# predictions, and of the supervisor (with spawn's resource tracker), in MiB, rounded up.
SLIM_WORKER_RSS_MIB = 130
SLIM_SUPERVISOR_RSS_MIB = 65


def test_slim_overlay_runs_the_slim_image_with_onnx_runtime(
    base: list[dict[str, Any]], slim: list[dict[str, Any]]
) -> None:
    container = _container(_one(slim, "Deployment"))
    assert container["image"] == _makefile_slim_image()
    assert container["imagePullPolicy"] == "Always"
    assert _settings(slim).runtime == "onnxruntime"
    # The ConfigMap keeps its generated name with a new hash suffix and differs from the base's only in RUNTIME.
    overlay_map, base_map = _one(slim, "ConfigMap"), _one(base, "ConfigMap")
    assert overlay_map["metadata"]["name"] != base_map["metadata"]["name"]
    assert {k: v for k, v in overlay_map["data"].items() if base_map["data"].get(k) != v} == {"RUNTIME": "onnxruntime"}
    assert set(overlay_map["data"]) - set(base_map["data"]) == {"RUNTIME"}


def test_slim_overlay_requests_less_memory_but_what_it_measured(
    base: list[dict[str, Any]], slim: list[dict[str, Any]]
) -> None:
    resources = _container(_one(slim, "Deployment"))["resources"]
    base_resources = _container(_one(base, "Deployment"))["resources"]
    request, limit = _mebibytes(resources["requests"]["memory"]), _mebibytes(resources["limits"]["memory"])
    steady = _settings(slim).workers * SLIM_WORKER_RSS_MIB + SLIM_SUPERVISOR_RSS_MIB
    assert steady < request < _mebibytes(base_resources["requests"]["memory"])
    # The same room over the steady state as the base leaves for queued requests, uploads and version swaps.
    base_room = _mebibytes(base_resources["limits"]["memory"]) - _mebibytes(base_resources["requests"]["memory"])
    assert limit - request >= base_room
    # CPU is the base's: the HPA's target is relative to it.
    assert resources["requests"]["cpu"] == base_resources["requests"]["cpu"]
    assert resources["limits"]["cpu"] == base_resources["limits"]["cpu"]


def test_slim_overlay_changes_nothing_else(base: list[dict[str, Any]], slim: list[dict[str, Any]]) -> None:
    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    changed = {"ConfigMap", "Deployment"}
    assert sorted((o for o in slim if o["kind"] not in changed), key=key) == sorted(
        (o for o in base if o["kind"] not in changed), key=key
    )
    # The Deployment with the base's image, memory and ConfigMap name is the base's: probes, drain and security.
    deployment = json.loads(json.dumps(_one(slim, "Deployment")))
    container, base_container = _container(deployment), _container(_one(base, "Deployment"))
    container["image"] = base_container["image"]
    container["resources"] = base_container["resources"]
    container["envFrom"] = base_container["envFrom"]
    assert deployment == _one(base, "Deployment")


# --- the local overlay -------------------------------------------------------------------------


def test_local_overlay(base: list[dict[str, Any]], local: list[dict[str, Any]]) -> None:
    deployment = _one(local, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert _container(deployment)["imagePullPolicy"] == "IfNotPresent"
    assert _container(deployment)["image"] == _makefile_image()
    service = _one(local, "Service")
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = _one(local, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert not [o for o in local if o["kind"] == "PodDisruptionBudget"]
    # Everything else is the base: the security settings and probes are not overlaid away.
    assert _container(deployment)["securityContext"] == _container(_one(base, "Deployment"))["securityContext"]
    assert _container(deployment)["readinessProbe"] == _container(_one(base, "Deployment"))["readinessProbe"]


# --- the ingress overlay ------------------------------------------------------------------------


def _nginx(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The Ingress's ingress-nginx annotations, without the prefix."""
    annotations = _one(objects, "Ingress")["metadata"].get("annotations", {})
    return {key.removeprefix(NGINX): value for key, value in annotations.items() if key.startswith(NGINX)}


def _nginx_bytes(size: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
    assert match, f"not an nginx size: {size!r}"
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")


def _nginx_seconds(value: str) -> int:
    # ingress-nginx takes these timeout annotations as whole seconds without a unit.
    assert re.fullmatch(r"[1-9]\d*", value), f"not a whole number of seconds: {value!r}"
    return int(value)


def _routed(paths: list[dict[str, Any]], url_path: str) -> bool:
    """Whether an Ingress path list sends url_path on (Kubernetes' Exact/Prefix rules, element-wise)."""
    for path in paths:
        if path["pathType"] == "Exact" and url_path == path["path"]:
            return True
        prefix = path["path"].rstrip("/")
        if path["pathType"] == "Prefix" and (url_path == prefix or url_path.startswith(prefix + "/")):
            return True
    return False


def _app_paths() -> set[str]:
    """Every path the server answers, path parameters filled in."""
    from mnist_service.serving.api import create_app  # imports torch: only for the test that needs it
    from mnist_service.serving.routes import web

    app = create_app(Settings())
    paths = set(app.openapi()["paths"])  # every route in the schema, from every router
    paths |= {route.path for route in app.routes if hasattr(route, "path")}  # FastAPI's /docs, /openapi.json, ...
    paths |= {route.path for route in web.router.routes}  # the page and /static, left out of the schema
    return {re.sub(r"\{[^}]+\}", "x", path) for path in paths}


def test_ingress_overlay_only_adds_the_ingress(base: list[dict[str, Any]], ingress: list[dict[str, Any]]) -> None:
    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted((o for o in ingress if o["kind"] != "Ingress"), key=key) == sorted(base, key=key)
    obj = _one(ingress, "Ingress")
    service = _one(ingress, "Service")
    # ingress.yaml repeats the base's namespace and labels: they must not drift (a version bump, a rename).
    assert obj["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert obj["metadata"]["labels"] == service["metadata"]["labels"]


def test_ingress_routes_to_the_services_named_port(ingress: list[dict[str, Any]]) -> None:
    obj = _one(ingress, "Ingress")
    assert obj["apiVersion"] == "networking.k8s.io/v1"
    assert obj["spec"]["ingressClassName"] == "nginx"
    assert "defaultBackend" not in obj["spec"]
    service = _one(ingress, "Service")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"] for p in _container(_one(ingress, "Deployment"))["ports"]}
    (rule,) = obj["spec"]["rules"]
    assert rule["host"] == INGRESS_HOST
    assert rule["http"]["paths"]
    for path in rule["http"]["paths"]:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"], path["path"]
        # By name, like the Service's targetPort: the port numbers can move without touching the Ingress.
        assert set(backend["port"]) == {"name"}, path["path"]
        assert service_ports[backend["port"]["name"]]["targetPort"] in container_ports, path["path"]


def test_ingress_terminates_tls_with_the_placeholder_secret(ingress: list[dict[str, Any]]) -> None:
    spec = _one(ingress, "Ingress")["spec"]
    (tls,) = spec["tls"]
    assert tls["secretName"] == INGRESS_TLS_SECRET
    assert tls["hosts"] == [INGRESS_HOST]
    assert {rule["host"] for rule in spec["rules"]} <= set(tls["hosts"]), "a host without its certificate"
    assert _nginx(ingress)["ssl-redirect"] == "true"
    # The certificate is the user's to create: a Secret here would put a private key in git.
    assert not [o for o in ingress if o["kind"] == "Secret"]


def test_ingress_exposes_every_route_but_metrics(ingress: list[dict[str, Any]]) -> None:
    (rule,) = _one(ingress, "Ingress")["spec"]["rules"]
    paths = rule["http"]["paths"]
    served = _app_paths()
    internal = {"/metrics"}  # Prometheus scrapes the pods directly; not for the internet
    assert internal <= served
    missing = sorted(p for p in served - internal if not _routed(paths, p))
    assert not missing, f"not passed on by the Ingress (add to k8s/overlays/ingress/ingress.yaml): {missing}"
    assert not [p for p in internal if _routed(paths, p)], "the Ingress exposes /metrics"
    for path in paths:
        assert any(_routed([path], p) for p in served), f"{path['path']} leads to no route of the server"


def test_ingress_limits_agree_with_the_server(ingress: list[dict[str, Any]]) -> None:
    nginx = _nginx(ingress)
    settings = _settings(ingress)
    # Only annotations ingress-nginx reads per Ingress: a ConfigMap-only key (client-body-timeout, ...) or a
    # misspelt one as an annotation is silently ignored by the controller.
    per_ingress = {
        "proxy-body-size",
        "proxy-buffering",
        "proxy-request-buffering",
        "proxy-connect-timeout",
        "proxy-read-timeout",
        "proxy-send-timeout",
        "proxy-next-upstream",
        "proxy-next-upstream-tries",
        "ssl-redirect",
    }
    assert set(nginx) == per_ingress
    # Exactly the server's limit: lower refuses uploads the server takes, higher buffers ones it will refuse.
    assert _nginx_bytes(nginx["proxy-body-size"]) == settings.max_upload_bytes
    # nginx must outwait the server's own deadlines so that the server's answer (503, 408) reaches the client.
    assert _nginx_seconds(nginx["proxy-read-timeout"]) > settings.request_timeout_s
    assert _nginx_seconds(nginx["proxy-send-timeout"]) > settings.body_timeout_s
    # Moving a refused connection to another pod costs less than the request's deadline.
    assert _nginx_seconds(nginx["proxy-connect-timeout"]) < settings.request_timeout_s
    # nginx absorbs slow clients (and can re-send a body) only with request buffering.
    assert nginx["proxy-request-buffering"] == "on"
    assert nginx["proxy-buffering"] == "on"
    # Retry on connection errors and timeouts only; never on the server's 5xx, never a POST already sent.
    assert nginx["proxy-next-upstream"].split() == ["error", "timeout"]
    assert 2 <= int(nginx["proxy-next-upstream-tries"]) <= 3


def test_recommended_controller_settings_agree_with_the_server(ingress: list[dict[str, Any]]) -> None:
    # The controller-wide keys can't be annotations; the overlay's comment gives them. Keep its numbers true.
    text = (K8S / "overlays" / "ingress" / "kustomization.yaml").read_text()
    recommended = {key: int(value) for key, value in re.findall(r'^#\s+([a-z-]+): "(\d+)"', text, re.MULTILINE)}
    assert set(recommended) == {"client-header-timeout", "client-body-timeout", "upstream-keepalive-timeout"}
    settings = _settings(ingress)
    assert 0 < recommended["client-header-timeout"] <= settings.header_timeout_s
    assert 0 < recommended["client-body-timeout"] <= settings.body_timeout_s
    # nginx must close an idle connection to a pod before the server does.
    assert 0 < recommended["upstream-keepalive-timeout"] < settings.keepalive_timeout_s


def test_network_policy_admits_the_ingress_controller(ingress: list[dict[str, Any]]) -> None:
    # ingress-nginx sends to the pod IPs on the Service's target port, from its own namespace.
    controller_namespace = {"kubernetes.io/metadata.name": "ingress-nginx"}
    (rule,) = _one(ingress, "Ingress")["spec"]["rules"]
    (backend_port,) = {path["backend"]["service"]["port"]["name"] for path in rule["http"]["paths"]}
    (target,) = [p["targetPort"] for p in _one(ingress, "Service")["spec"]["ports"] if p["name"] == backend_port]
    pod = _one(ingress, "Deployment")["spec"]["template"]
    (container_port,) = [p for p in _container(_one(ingress, "Deployment"))["ports"] if p["name"] == target]
    pod_port = {container_port["name"], container_port["containerPort"]}

    def admits_port(rule: dict[str, Any]) -> bool:
        ports = rule.get("ports")
        return not ports or any(p.get("port") in pod_port for p in ports)

    def admits_controller(rule: dict[str, Any]) -> bool:
        peers = rule.get("from")
        return not peers or any(
            set(peer) == {"namespaceSelector"}
            and "matchExpressions" not in peer["namespaceSelector"]
            and peer["namespaceSelector"].get("matchLabels", {}).items() <= controller_namespace.items()
            for peer in peers
        )

    policy = _one(ingress, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    assert any(admits_port(rule) and admits_controller(rule) for rule in policy["spec"]["ingress"])


# --- the repository overlay ----------------------------------------------------------------------


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _claim_mounts(pod_spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[dict, dict]]:
    """claimName -> (the pod's volume source, the container's mount of it), for every claim the pod uses."""
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    return {
        v["persistentVolumeClaim"]["claimName"]: (v["persistentVolumeClaim"], mounts[v["name"]])
        for v in pod_spec.get("volumes", [])
        if "persistentVolumeClaim" in v and v["name"] in mounts
    }


def _job(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The training Job, its pod spec and its one container."""
    job = _one(objects, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return job, pod, container


def _env_value(container: dict[str, Any], name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def _promote_pod() -> dict[str, Any]:
    """The `kubectl run ... --overrides=` pod that train-job.yaml's comments give for promoting a version."""
    text = (REPOSITORY / "train-job.yaml").read_text()
    command = "\n".join(line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#"))
    match = re.search(r"kubectl -n (\S+) run (\S+) .*?--image=(\S+) \\\s*--overrides='(.*?)'", command, re.DOTALL)
    assert match, "train-job.yaml's comments lost the `kubectl run ... --overrides='...'` promote command"
    namespace, name, image, overrides = match.groups()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}}
    pod["spec"] = {"restartPolicy": "Never", **json.loads(overrides)["spec"]}
    # kubectl merges the overrides into the container it names after the pod, with the --image given.
    (container,) = pod["spec"]["containers"]
    assert container["name"] == name and container.get("image", image) == image
    return pod


def test_repository_overlay_adds_the_claim_the_job_and_the_mount(
    base: list[dict[str, Any]], repository: list[dict[str, Any]]
) -> None:
    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    # The ConfigMap keeps its generated name but gets a new hash suffix (so the pods roll onto it).
    overlay_map, base_map = _one(repository, "ConfigMap"), _one(base, "ConfigMap")
    assert overlay_map["metadata"]["name"] != base_map["metadata"]["name"]
    assert overlay_map["metadata"]["name"].rsplit("-", 1)[0] == base_map["metadata"]["name"].rsplit("-", 1)[0]
    overlay_config, base_config = overlay_map["data"], base_map["data"]
    assert {k: v for k, v in overlay_config.items() if base_config.get(k) != v} == {"MODEL_REPOSITORY": "/models"}
    assert set(overlay_config) == set(base_config)

    base_keys = {key(o) for o in base if o["kind"] != "ConfigMap"}
    added = sorted(key(o) for o in repository if o["kind"] != "ConfigMap" and key(o) not in base_keys)
    assert added == [
        ("Job", "mnist-train"),
        ("NetworkPolicy", "mnist-train"),
        ("PersistentVolumeClaim", "mnist-model-repository"),
    ]
    unchanged = {"ConfigMap", "Deployment"}
    same = sorted((o for o in repository if o["kind"] not in unchanged and key(o) in base_keys), key=key)
    assert same == sorted((o for o in base if o["kind"] not in unchanged), key=key)
    # The Deployment only gains the volume and its mount: probes, resources and security stay the base's.
    deployment = json.loads(json.dumps(_one(repository, "Deployment")))
    pod, container = deployment["spec"]["template"]["spec"], _container(deployment)
    (env_from,) = container["envFrom"]
    assert env_from["configMapRef"]["name"] == overlay_map["metadata"]["name"]
    env_from["configMapRef"]["name"] = base_map["metadata"]["name"]
    pod["volumes"] = [v for v in pod["volumes"] if "persistentVolumeClaim" not in v]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/models"]
    assert deployment == _one(base, "Deployment")
    # pvc.yaml and train-job.yaml repeat the base's namespace and shared labels: they must not drift.
    labels = _one(base, "Deployment")["metadata"]["labels"]
    shared = {
        k: labels[k] for k in ("app.kubernetes.io/part-of", "app.kubernetes.io/version", "app.kubernetes.io/managed-by")
    }
    for kind, name in added:
        obj = _named(repository, kind, name)
        assert obj["metadata"]["namespace"] == _one(base, "Namespace")["metadata"]["name"], kind
        assert obj["metadata"]["labels"].items() >= shared.items(), kind


def test_repository_claim_is_shared_by_many_nodes(repository: list[dict[str, Any]]) -> None:
    claim = _one(repository, "PersistentVolumeClaim")
    # Serving pods on several nodes and the Job mount it at once.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    # The class is the user's to name (an RWX one): a placeholder comment, not a guess that silently binds.
    assert "storageClassName" not in claim["spec"]
    assert re.search(r"^\s*# storageClassName: \S+", (REPOSITORY / "pvc.yaml").read_text(), re.MULTILINE)


def test_serving_pods_mount_the_repository_read_only(repository: list[dict[str, Any]]) -> None:
    deployment = _one(repository, "Deployment")
    claim = _one(repository, "PersistentVolumeClaim")["metadata"]["name"]
    mounts = _claim_mounts(deployment["spec"]["template"]["spec"], _container(deployment))
    assert set(mounts) == {claim}
    source, mount = mounts[claim]
    assert source.get("readOnly") is True and mount.get("readOnly") is True, "only the Job may write the repository"
    # The server reads the repository where the claim is mounted, not the one baked into the image.
    settings = _settings(repository)
    assert settings.model_repository == Path(mount["mountPath"])
    assert settings.model_path is None


def test_training_job_publishes_into_the_same_claim_read_write(repository: list[dict[str, Any]]) -> None:
    _, pod, container = _job(repository)
    claim = _one(repository, "PersistentVolumeClaim")["metadata"]["name"]
    deployment = _one(repository, "Deployment")
    assert set(_claim_mounts(deployment["spec"]["template"]["spec"], _container(deployment))) == {claim}
    mounts = _claim_mounts(pod, container)
    assert set(mounts) == {claim}, "the Job must write into the claim the servers read"
    source, mount = mounts[claim]
    assert not source.get("readOnly") and not mount.get("readOnly")
    path = mount["mountPath"]
    assert _env_value(container, "MODEL_REPOSITORY") == path
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["python", "model_train.py"]
    assert "--repository" in argv and argv[argv.index("--repository") + 1] == path
    # It publishes a new version; moving stable is a person's decision (model_repository.py promote).
    assert "--promote" not in argv and "--output" not in argv


def test_training_job_is_bounded_and_locked_down(repository: list[dict[str, Any]]) -> None:
    job, pod, container = _job(repository)
    spec = job["spec"]
    assert 0 < spec["backoffLimit"] <= 3
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert pod["restartPolicy"] == "Never"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    # The serving container's settings: non-root 10001, read-only root, no capabilities, RuntimeDefault.
    serving = _one(repository, "Deployment")["spec"]["template"]["spec"]
    assert container["securityContext"] == _container(_one(repository, "Deployment"))["securityContext"]
    assert pod["securityContext"].items() >= serving["securityContext"].items()
    # fsGroup gives uid 10001 write access to the volume's files.
    assert pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == _one(repository, "ServiceAccount")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


def test_training_job_runs_the_trainer_image_of_this_release(repository: list[dict[str, Any]]) -> None:
    job, _, container = _job(repository)
    image = _makefile_trainer_image()
    assert container["image"] == image
    assert container["imagePullPolicy"] == "Always"
    assert job["metadata"]["labels"]["app.kubernetes.io/version"] == image.rsplit(":", 1)[1]


def test_training_pod_is_no_serving_endpoint_and_has_no_network(repository: list[dict[str, Any]]) -> None:
    job, _, _ = _job(repository)
    labels = job["spec"]["template"]["metadata"]["labels"]
    # A running training pod is "ready": selected by the Service it would be sent requests it can't answer.
    assert not _selects(_one(repository, "Service")["spec"]["selector"], labels)
    assert not _selects(_one(repository, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert not _selects(
        _named(repository, "NetworkPolicy", "mnist-service")["spec"]["podSelector"]["matchLabels"], labels
    )
    policy = _named(repository, "NetworkPolicy", "mnist-train")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["ingress"] == [] and policy["spec"]["egress"] == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_documented_promote_command_is_a_valid_pod_on_the_claim(version: str, repository: list[dict[str, Any]]) -> None:
    pod = _promote_pod()
    kubernetes_validate.validate(pod, version, strict=True)
    job, job_pod, job_container = _job(repository)
    assert pod["metadata"]["namespace"] == job["metadata"]["namespace"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == job_container["image"]
    claim = _one(repository, "PersistentVolumeClaim")["metadata"]["name"]
    mounts = _claim_mounts(pod["spec"], container)
    assert set(mounts) == {claim}
    source, mount = mounts[claim]
    assert not source.get("readOnly") and not mount.get("readOnly"), "promote rewrites config.json"
    argv = container["command"]
    assert argv[:2] == ["python", "model_repository.py"]
    assert argv[argv.index("--repository") + 1] == mount["mountPath"]
    assert argv[-2] == "promote" and argv[-1].isdigit()
    # It passes the same checks as the Job: the namespace may enforce the restricted Pod Security level.
    assert pod["spec"]["securityContext"].items() <= job_pod["securityContext"].items()
    assert container["securityContext"].items() <= job_container["securityContext"].items()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False


# --- extras (CRDs not in the official schemas) ---------------------------------------------------


def _extra(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((K8S / "extras" / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def test_kserve_inference_service(base: list[dict[str, Any]]) -> None:
    isvc = _extra("inferenceservice.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == _makefile_image()
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROTOCOL"] == "v2"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Extras run in the base's namespace and reuse its service account.
    assert predictor["serviceAccountName"] == _one(base, "ServiceAccount")["metadata"]["name"]
    # The container fields that exist in core/v1 must still be valid there.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "isvc"},
        "spec": {
            k: v for k, v in predictor.items() if k not in {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
        },
    }
    kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


def test_service_monitor_scrapes_the_service(base: list[dict[str, Any]]) -> None:
    monitor = _extra("servicemonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    service = _one(base, "Service")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_extras_are_not_in_the_base() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "extras" not in kustomization.read_text().split("resources:", 1)[-1], kustomization


# --- static scans --------------------------------------------------------------------------------


def _checkov(*args: str) -> dict[str, Any]:
    result = _run(_tool("checkov"), *args, "--skip-download", "--output", "json")
    assert result.returncode in (0, 1), f"checkov crashed:\n{result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for report in reports
        for c in report.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov findings (fix, or skip in place with a reason):\n" + "\n".join(failed)
    assert result.returncode == 0
    return reports[0]["summary"]


def test_checkov_kubernetes(base: list[dict[str, Any]], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Scans what gets applied: the rendered base and overlays (namespace, generated names,
    # patches included), plus the extras as written.
    (tmp_path / "base.yaml").write_text(yaml.safe_dump_all(base))
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(request.getfixturevalue(overlay)))
    for extra in (K8S / "extras").glob("*.yaml"):
        shutil.copy(extra, tmp_path / f"extras-{extra.name}")
    summary = _checkov("--directory", str(tmp_path), "--framework", "kubernetes")
    assert summary["passed"] > 50 and summary["parsing_errors"] == 0


def test_checkov_dockerfile() -> None:
    dockerfile = ROOT / "Dockerfile"
    assert dockerfile.exists(), "Dockerfile missing"
    summary = _checkov("--file", str(dockerfile), "--framework", "dockerfile")
    assert summary["passed"] > 0 and summary["parsing_errors"] == 0


def test_actionlint_workflows() -> None:
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows, "no GitHub workflow"
    result = _run(_tool("actionlint"), "-no-color", *map(str, workflows))
    assert result.returncode == 0, f"actionlint findings:\n{result.stdout}{result.stderr}"
