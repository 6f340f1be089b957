"""The monitoring: the Prometheus rules (checked and unit-tested with promtool), the Grafana dashboard,
what ships them (k8s/monitoring, compose.yaml), and a real Prometheus scraping a real server.

Tools live in .venv-tools (scripts/install_tools.sh): promtool and prometheus (Debian's package),
kubectl, and the Compose file schema. A missing one fails the test with the command that installs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mnist_service.inference.preprocess import image_to_digit
from mnist_service.monitoring import drift
from mnist_service.process.server import worker_pids
from mnist_service.registry.repository import ModelConfig, Repository
from mnist_service.tools.images import png_bytes
from mnist_service.training.train import reference_sample

from .conftest import ROOT, STARTUP_TIMEOUT_S, Server, add_version, free_port, start_process, wait_ready
from .test_k8s import K8S_VERSIONS, TOOLS_BIN, _render, _tool

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "rules.yml"
RULES_TEST = MONITORING / "prometheus" / "rules_test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboard.json"
K8S_MONITORING = ROOT / "k8s" / "monitoring"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_SCHEMA = TOOLS_BIN.parent / "share" / "compose" / "compose_spec.json"
JOB = "mnist-service"  # the scrape job the alerts expect
# Not the service's metrics: kube-state-metrics' (the HPA) and Prometheus's own `up`.
NOT_OURS = re.compile(r"kube_.*|up")
# Sample names of every metric family of the contract (docs/metrics.md): a live scrape has each.
FAMILIES = {
    "mnist_requests_total", "mnist_request_latency_seconds_bucket", "mnist_inference_seconds_bucket",
    "mnist_batch_size_bucket", "mnist_queue_depth", "mnist_queue_wait_seconds_bucket", "mnist_rejected_total",
    "mnist_connections_refused_total", "mnist_header_timeouts_total", "mnist_worker_deaths_total",
    "mnist_predictions_total", "mnist_prediction_confidence_bucket", "mnist_input_ink_fraction_bucket",
    "mnist_input_mean_intensity_bucket", "mnist_input_bbox_aspect_bucket", "mnist_model_info",
    "mnist_shadow_comparisons_total", "mnist_shadow_confidence_bucket", "mnist_drift_reference_share",
    "mnist_drift_reference_cdf", "mnist_drift_threshold", "mnist_captures_total", "mnist_capture_dropped_total",
    "mnist_feedback_total", "mnist_feedback_wrong_total", "mnist_labelled_captures", "mnist_model_test_accuracy",
    "mnist_grpc_requests_total", "mnist_grpc_request_latency_seconds_bucket", "mnist_capture_writer_cpu_seconds_total",
}
# What the dashboard must show: one query at least reads each.
DASHBOARD_MUST_READ = {
    "mnist_requests_total", "mnist_request_latency_seconds_bucket", "mnist_queue_depth",
    "mnist_queue_wait_seconds_bucket", "mnist_batch_size_count", "mnist_rejected_total",
    "kube_horizontalpodautoscaler_status_current_replicas", "kube_horizontalpodautoscaler_spec_min_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas", "mnist_predictions_total", "mnist_prediction_confidence_bucket",
    "version_score:mnist_drift_score:1h", "mnist_drift_threshold", "mnist_model_info",
    "mnist_shadow_comparisons_total", "mnist_worker_deaths_total", "mnist_captures_total",
    "mnist_capture_dropped_total", "mnist_feedback_total", "mnist_feedback_wrong_total", "mnist_labelled_captures",
    "mnist_grpc_requests_total", "mnist_grpc_request_latency_seconds_bucket", "mnist_capture_writer_cpu_seconds_total",
}
# Quoted in the alerts' descriptions besides the dashboard's panels: what the service logs.
LOG_MESSAGES = {"unhandled error", "inference failed"}


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("promtool"), *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


def _groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def _rules(kind: str) -> list[dict[str, Any]]:
    """Every rule of rules.yml of one kind: "record" or "alert"."""
    return [rule for group in _groups() for rule in group["rules"] if kind in rule]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    return [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]


def _fill(expr: str, version: str = ".+", interval: str = "5m") -> str:
    """A dashboard query as Grafana sends it: its variables replaced."""
    return expr.replace("$__rate_interval", interval).replace("${version}", version).replace("$version", version)


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers outside strings, label matchers,
    ranges and grouping clauses that are neither functions nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    return {
        m.group(1)
        for m in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", text)
        if m.group(2) is None and m.group(1) not in _KEYWORDS
    }


# --- the rules ---------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"
    assert f"SUCCESS: {len(_rules('record')) + len(_rules('alert'))} rules found" in result.stdout


def test_rules_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in _rules("alert"):
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']}: no test where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']}: no test where it stays silent"


def test_alerts_say_who_acts_and_how() -> None:
    titles = {p["title"] for p in _panels(_dashboard())} | {_dashboard()["title"]}
    for rule in _rules("alert"):
        name, annotations = rule["alert"], rule["annotations"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert set(annotations) == {"summary", "description", "runbook_url"}, name  # tests/test_docs.py: the url
        assert ":" in annotations["summary"] and "\n" not in annotations["summary"], name
        description = annotations["description"]
        assert "\n1. " in description and "\n2. " in description, f"{name}: the description has no numbered steps"
        # Every quoted name (not a label value) is a panel of the dashboard, or a message in the service's log.
        quoted = set(re.findall(r'(?<![=~])"([^"]+)"', description))
        unknown = quoted - titles - LOG_MESSAGES
        assert not unknown, f"{name} points at what does not exist: {unknown}"


def test_recording_rules_are_named_level_metric_operations() -> None:
    # level: the labels the result keeps, joined by _ (checked on live data below); metric: ours.
    for rule in _rules("record"):
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*:mnist_[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_prometheus_config_loads_the_rules_and_names_the_job() -> None:
    result = _promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, f"promtool check config:\n{result.stdout}{result.stderr}"
    assert "SUCCESS: 1 rule files found" in result.stdout
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]  # beside it, as compose.yaml mounts them
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]
    assert f'up{{job="{JOB}"}}' in RULES.read_text()


# --- the dashboard -------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    version = variables["version"]
    assert version["type"] == "query" and version["multi"] and version["includeAll"]
    assert version["definition"] == "label_values(mnist_model_info, version)"
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert version["datasource"] == source
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == source and t["expr"].strip() for t in panel["targets"]), panel["title"]
    # The version selector is used: every query of a version-labelled model metric filters on it.
    for title, expr in _queries(dashboard):
        if re.search(r"mnist_(predictions|prediction_confidence|input_\w+|request_latency_seconds)_", expr):
            assert 'version=~"$version"' in expr, title


def test_dashboard_reads_what_the_service_exports() -> None:
    read = {name for _, expr in _queries(_dashboard()) for name in _metric_names(expr)}
    assert not DASHBOARD_MUST_READ - read, f"no panel shows {sorted(DASHBOARD_MUST_READ - read)}"
    # Names that are not the service's, nor recorded by rules.yml, nor exempt, are typos.
    recorded = {rule["record"] for rule in _rules("record")}
    unknown = {n for n in read - recorded if not n.startswith("mnist_") and not NOT_OURS.fullmatch(n)}
    assert not unknown, unknown


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    queries = _queries(_dashboard())
    rules = [{"record": f"dashboard:query:{i}", "expr": _fill(expr)} for i, (_, expr) in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, f"a dashboard query does not parse:\n{result.stdout}{result.stderr}"
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monitoring_objects() -> list[dict[str, Any]]:
    return _render(K8S_MONITORING)


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def test_prometheus_rule_carries_the_rules_file(monitoring_objects: list[dict[str, Any]]) -> None:
    rule = _one(monitoring_objects, "PrometheusRule")
    assert rule["spec"]["groups"] == _groups(), (
        "k8s/monitoring/prometheusrule.yaml differs from monitoring/prometheus/rules.yml: regenerate it with "
        "the command at the top of prometheusrule.yaml"
    )


def test_prometheus_rule_is_what_the_operator_accepts(monitoring_objects: list[dict[str, Any]]) -> None:
    # No schema ships for the Operator's CRD: its structure (monitoring.coreos.com/v1 PrometheusRule) by hand.
    rule = _one(monitoring_objects, "PrometheusRule")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    # Its metadata is a plain ObjectMeta: validated strictly on a ConfigMap that carries it.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": rule["metadata"]}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(carrier, version, strict=True)
    names = [group["name"] for group in rule["spec"]["groups"]]
    assert len(names) == len(set(names))
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "partial_response_strategy", "limit"}, group["name"]
        for item in group["rules"]:
            assert set(item) <= {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, item
            assert ("record" in item) != ("alert" in item) and isinstance(item["expr"], str), item
            for mapping in (item.get("labels", {}), item.get("annotations", {})):
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()), item


def test_dashboard_config_map_for_the_grafana_sidecar(monitoring_objects: list[dict[str, Any]]) -> None:
    assert sorted(o["kind"] for o in monitoring_objects) == ["ConfigMap", "PrometheusRule"]
    config_map = _one(monitoring_objects, "ConfigMap")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = config_map["data"].values()
    assert json.loads(content) == _dashboard()
    assert len(content.encode()) < 256 * 1024, "over kubectl apply's annotation limit: use server-side apply"
    # In the service's namespace, like the base.
    namespace = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())["namespace"]
    assert {o["metadata"]["namespace"] for o in monitoring_objects} == {namespace}


def test_monitoring_is_not_in_the_base() -> None:
    assert "PrometheusRule" not in {o["kind"] for o in _render(ROOT / "k8s")}


# --- docker compose ------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts: container path -> file or folder in the repository."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if not source.startswith((".", "/")):  # a named volume (the capture database's data)
            continue
        assert source.startswith("./"), f"{volume}: not a file of the repository"
        out[target] = ROOT / source
    return out


def test_compose_file_follows_the_compose_schema() -> None:
    if not COMPOSE_SCHEMA.exists():
        pytest.fail(f"{COMPOSE_SCHEMA} not found: run scripts/install_tools.sh")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors


def test_compose_mounts_exist_and_agree() -> None:
    services = _compose()["services"]
    assert set(services) == {"mnist-service", "prometheus", "grafana", "postgres"}
    # The capture database the service is pointed at is the compose stack's own.
    database = services["mnist-service"]["environment"]["CAPTURE_DATABASE"]
    assert database.startswith("postgresql://") and "@postgres:5432/" in database
    assert "postgres" in services["mnist-service"]["depends_on"]
    for name, service in services.items():
        for source in _mounts(service).values():
            assert source.exists(), f"{name} mounts {source}, which does not exist"

    # The service: this repository's image, listening where Prometheus scrapes it.
    app = services["mnist-service"]
    assert app["build"]["context"] == "." and f"AS {app['build']['target']}" in (ROOT / "Dockerfile").read_text()
    assert app["image"] == re.search(r"^IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    port = int(app["environment"]["PORT"])
    assert [p.split(":")[-1] for p in app["ports"]] == [str(port), app["environment"]["GRPC_PORT"]]
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert job["job_name"] == JOB and job["static_configs"] == [{"targets": [f"mnist-service:{port}"]}]

    # Prometheus: its config and the rules side by side, as the config's relative rule_files expects.
    prometheus = _mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    assert prometheus["/etc/prometheus/rules.yml"] == RULES

    # Grafana: the datasource is that Prometheus, the provisioned dashboard is dashboard.json.
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    provisioning = {target: source for target, source in mounts.items() if target.startswith("/etc/grafana/")}
    (datasource,) = yaml.safe_load(
        (provisioning["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    (provider,) = yaml.safe_load(
        (provisioning["/etc/grafana/provisioning/dashboards"] / "mnist-service.yml").read_text()
    )["providers"]
    (dashboard_target,) = [target for target, source in mounts.items() if source == DASHBOARD]
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_target
    assert "3000:3000" in grafana["ports"]


# --- a real server and a real Prometheus ---------------------------------------------------------
# One server (two workers, a stable and a canary version, shadowing every request, a queue of one
# so that a burst is shed, gRPC on) and one Prometheus scraping it every second, for the tests below.
GRPC_CALLS = 20  # ModelInfer calls the fixture makes, answered by the stable version


@dataclass
class Stack:
    server: Server
    prometheus: str
    reference: dict[str, Any] = field(repr=False)  # the stable version's drift reference
    # What the stable version (1) answered, in the order answered: the 28x28 inputs and probabilities.
    digits: list[np.ndarray] = field(default_factory=list, repr=False)
    probs: list[list[float]] = field(default_factory=list, repr=False)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def classify(self, images: np.ndarray, concurrency: int = 4, retry: bool = True) -> int:
        """POST each image as a 28x28 PNG upload (how the drift reference saw the test set) to /predict;
        returns how many were refused with 503 (retried if `retry`)."""

        def one(image: np.ndarray) -> tuple[np.ndarray, httpx.Response]:
            deadline = time.monotonic() + 120
            png = png_bytes(Image.fromarray(image))
            while True:
                response = client.post("/predict", files={"file": ("digit.png", png, "image/png")})
                if response.status_code != 503 or not retry:
                    return image, response
                assert time.monotonic() < deadline, "503 for two minutes"
                time.sleep(0.01)

        refused = 0
        with httpx.Client(base_url=self.server.url, timeout=60) as client, ThreadPoolExecutor(concurrency) as pool:
            for image, response in pool.map(one, images):
                if response.status_code == 503:
                    refused += 1
                    continue
                assert response.status_code == 200, response.text
                answer = response.json()
                if answer["model_version"] == "1":
                    self.digits.append(image_to_digit(png_bytes(Image.fromarray(image))))  # what the model saw
                    self.probs.append(answer["probabilities"])
        return refused


def _eventually(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """check()'s first truthy value; fails after `timeout` seconds (generous: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.25)
    return value


def _start_prometheus(folder: Path, target: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Prometheus on loopback with compose's config, scraping `target` and evaluating the rules every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    proc = subprocess.Popen(
        [
            _tool("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    return proc, f"http://127.0.0.1:{port}", log


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def stack(
    model_dir: Path, other_model_dir: Path, test_digits: tuple[np.ndarray, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("monitoring")
    repo = Repository(folder / "models", "mnist")
    add_version(repo, 1, model_dir)
    add_version(repo, 2, other_model_dir)
    repo.write_config(ModelConfig(labels={"stable": 1, "canary": 2}))
    grpc_port = free_port()
    server = start_process(
        model_dir / "mnist_cnn.pt", folder, MODEL_REPOSITORY=str(repo.root), WORKERS="2", SHADOW_SAMPLE="1",
        MAX_QUEUE="1", ACCESS_LOG="errors", CAPTURE_SAMPLE="1", CAPTURE_DATABASE=str(folder / "captures.sqlite3"),
        GRPC_PORT=str(grpc_port),
    )
    prometheus = None
    try:
        wait_ready(server.url, server.proc, server.log, STARTUP_TIMEOUT_S)
        _eventually(lambda: server.stderr().count("Application startup complete.") >= 2, "both workers started")
        # Prometheus takes its first samples before any prediction, so increase() over the hour counts them all.
        prometheus, url, prometheus_log = _start_prometheus(folder, f"127.0.0.1:{server.port}")
        reference = json.loads((model_dir / "mnist_cnn.json").read_text())["drift_reference"]
        built = Stack(server, url, reference)

        def prometheus_ready() -> bool:
            assert prometheus.poll() is None, f"prometheus exited:\n{prometheus_log.read_text()}"
            return _ready(f"{url}/-/ready")

        _eventually(prometheus_ready, "prometheus ready")
        _eventually(lambda: built.query(f'up{{job="{JOB}"}} == 1'), "the server scraped")
        images = test_digits[0]
        # Requests one at a time: the canary shadows them (agree or disagree) when neither version is busy.
        _eventually(
            lambda: built.classify(images[3200:3210], concurrency=1) == 0
            and "mnist_shadow_confidence_bucket" in _scrape(built),
            "a shadow comparison",
        )
        # Bursts into a queue of one: some are shed (mnist_rejected_total).
        _eventually(lambda: built.classify(images[3220:3284], concurrency=64, retry=False), "a burst shed")
        # Feedback on a few answers, one of them labelled wrong on purpose: live accuracy and its panels.
        _send_feedback(built, test_digits[0][3300:3306], [*test_digits[1][3300:3305].tolist(), -1])
        # ModelInfer calls over gRPC, one at a time (the queue holds one).
        _eventually(lambda: server.stderr().count("over gRPC on") >= 2, "both workers serving gRPC")
        _infer_over_grpc(built, f"127.0.0.1:{grpc_port}", images[3400 : 3400 + GRPC_CALLS], folder)
        # A worker killed: counted in mnist_worker_deaths_total, and replaced.
        os.kill(worker_pids(server.proc.pid)[0], signal.SIGKILL)
        _eventually(lambda: server.stderr().count("Application startup complete.") >= 3, "the worker replaced")
        for family in ("mnist_worker_deaths_total", "mnist_rejected_total", "mnist_shadow_confidence_bucket",
                       "mnist_feedback_wrong_total"):
            _eventually(lambda family=family: built.query(family), f"{family} in Prometheus")
        yield built
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        server.proc.kill()
        server.proc.wait()


# tritonclient.grpc in a process of its own: this one may hold our generated modules' twin (test_grpc's).
_GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(sys.argv[1])
answers = []
for image in np.load(sys.argv[2]):
    tensor = grpcclient.InferInput("input", [1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(image[None])
    result = client.infer("mnist", [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    answers.append([result.get_response().model_version, result.as_numpy("probabilities")[0].tolist()])
print(json.dumps(answers))
"""


def _infer_over_grpc(stack: Stack, target: str, images: np.ndarray, folder: Path) -> None:
    """ModelInfer each 28x28 image as a UINT8 tensor; the stable version's answers are recorded like
    Stack.classify's (the tensor is what the model saw: no preprocessing on this path)."""
    np.save(folder / "grpc-images.npy", images)
    result = subprocess.run([sys.executable, "-c", _GRPC_CLIENT, target, str(folder / "grpc-images.npy")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for image, (version, probs) in zip(images, json.loads(result.stdout), strict=True):
        assert version in ("1", "2"), version
        if version == "1":
            stack.digits.append(image)
            stack.probs.append(probs)


def _send_feedback(stack: Stack, images: np.ndarray, labels: list[int]) -> None:
    """Predict each image (recorded like Stack.classify's), then label its answer (-1: a label the answer
    did not give, so it counts wrong)."""
    with httpx.Client(base_url=stack.server.url, timeout=60) as client:
        for image, label in zip(images, labels, strict=True):
            answer = client.post("/predict", files={"file": ("d.png", png_bytes(Image.fromarray(image)), "image/png")})
            assert answer.status_code == 200, answer.text
            if answer.json()["model_version"] == "1":
                stack.digits.append(image_to_digit(png_bytes(Image.fromarray(image))))
                stack.probs.append(answer.json()["probabilities"])
            given = (answer.json()["prediction"] + 1) % 10 if label < 0 else label
            response = client.post("/feedback", json={"request_id": answer.headers["x-request-id"], "label": given})
            assert response.status_code == 200, response.text


def _scrape(stack: Stack) -> str:
    return httpx.get(f"{stack.server.url}/metrics", timeout=30).text


def _sample_names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.mark.e2e
@pytest.mark.slow
def test_live_scrape_has_every_metric_family(stack: Stack) -> None:
    missing = FAMILIES - _sample_names(_scrape(stack))
    assert not missing, f"no samples of {sorted(missing)}"


@pytest.mark.e2e
@pytest.mark.slow
def test_grpc_calls_reach_prometheus(stack: Stack) -> None:
    """The fixture's ModelInfer calls are series in Prometheus, under the labels the rules and panels select
    (promtool's tests in rules_test.yml check what the rules make of them; the gRPC panels' data is
    checked with every other panel's below)."""
    selector = 'method="ModelInfer",code="OK",version="1"'  # the default version, stable, answers them
    _eventually(lambda: stack.query(f"sum(mnist_grpc_requests_total{{{selector}}}) == {GRPC_CALLS}"),
                f"{GRPC_CALLS} gRPC calls counted in Prometheus")
    _eventually(lambda: stack.query(
        f'sum(mnist_grpc_request_latency_seconds_count{{method="ModelInfer",version="1"}}) == {GRPC_CALLS}'
    ), "their latencies")


@pytest.mark.e2e
@pytest.mark.slow
def test_the_killed_worker_fires_mnist_worker_died(stack: Stack) -> None:
    def firing() -> list[dict[str, Any]]:
        alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "MnistWorkerDied" and a["state"] == "firing"]

    (alert,) = _eventually(firing, "MnistWorkerDied firing")
    assert alert["labels"]["cause"] == "SIGKILL" and alert["labels"]["job"] == JOB


@pytest.mark.e2e
@pytest.mark.slow
def test_live_scrape_passes_promtool_check_metrics(stack: Stack) -> None:
    result = _promtool("check", "metrics", stdin=_scrape(stack))
    findings = sorted(set((result.stdout + result.stderr).splitlines()))
    assert result.returncode == 0 and not findings, "promtool check metrics:\n" + "\n".join(findings)


@pytest.mark.e2e
@pytest.mark.slow
def test_dashboard_and_rules_read_only_what_the_server_exports(stack: Stack) -> None:
    scraped = _sample_names(_scrape(stack))
    recorded = {rule["record"] for rule in _rules("record")}  # checked in Prometheus below
    rules = [(rule.get("record") or rule["alert"], rule["expr"]) for rule in _rules("record") + _rules("alert")]
    readers = _queries(_dashboard()) + rules
    missing = {
        (reader, name)
        for reader, expr in readers
        for name in _metric_names(expr) - recorded
        if not NOT_OURS.fullmatch(name) and name not in scraped
    }
    assert not missing, f"read but not exported by the server: {sorted(missing)}"


@pytest.mark.e2e
@pytest.mark.slow
def test_rules_evaluate_without_errors_on_live_data(stack: Stack) -> None:
    # Joins that match many-to-many on real series (the reference from two workers, say) fail here.
    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if all(rule["health"] != "unknown" for rule in rules) else []

    rules = _eventually(evaluated, "every rule evaluated")
    assert len(rules) == len(_rules("record")) + len(_rules("alert"))
    failing = [f"{rule['name']}: {rule.get('lastError')}" for rule in rules if rule["health"] != "ok"]
    assert not failing, failing
    # Every recording rule has data, labelled by exactly the labels its name's level lists.
    for rule in _rules("record"):
        name = rule["record"]
        series = _eventually(lambda name=name: stack.query(name), f"{name} recorded")
        level = set(name.split(":")[0].split("_"))
        assert all(set(s["metric"]) - {"__name__"} == level for s in series), (name, series[0]["metric"])


@pytest.mark.e2e
@pytest.mark.slow
def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    # kube-state-metrics is not here: the HPA's queries are exempt.
    queries = [(t, e) for t, e in _queries(_dashboard()) if not any(n.startswith("kube_") for n in _metric_names(e))]
    assert len(queries) > 20

    def empty() -> list[str]:
        return [title for title, expr in queries if not stack.query(_fill(expr, version="1", interval="1m"))]

    # The recording rules answer from their first evaluation after the fixture's traffic.
    deadline = time.monotonic() + 60
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, f"panels without data: {missing}"
    # The version selector's values.
    assert {r["metric"]["version"] for r in stack.query("group by (version) (mnist_model_info)")} == {"1", "2"}


def _scores(stack: Stack) -> dict[str, float]:
    """Version 1's drift scores as the recording rules computed them from a scrape with every answer so far."""
    answered = len(stack.probs)
    _eventually(lambda: stack.query(f'sum(mnist_predictions_total{{version="1"}}) == {answered}'),
                f"Prometheus counting {answered} predictions")
    (scraped,) = stack.query('max(timestamp(mnist_predictions_total{version="1"}))')
    after = float(scraped["value"][1]) + 2  # an evaluation surely after that scrape was stored

    def evaluated() -> list[dict[str, Any]]:
        result = stack.query('version_score:mnist_drift_score:1h{version="1"}')
        stamps = stack.query('timestamp(version_score:mnist_drift_score:1h{version="1"})')
        return result if stamps and all(float(r["value"][1]) > after for r in stamps) else []

    return {r["metric"]["score"]: float(r["value"][1]) for r in _eventually(evaluated, "the drift rules evaluated")}


def _drift_py_scores(stack: Stack) -> dict[str, float]:
    """drift.py's scores of everything version 1 answered, from the inputs sent and the probabilities returned."""
    return drift.scores(stack.reference, np.asarray(stack.probs), np.stack(stack.digits))


def _drift_alerts(stack: Stack) -> set[str]:
    alerts = httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
    return {
        alert["labels"]["score"]
        for alert in alerts
        if alert["labels"]["alertname"] == "MnistInputDrift" and alert["labels"]["version"] == "1"
    }


@pytest.mark.e2e
@pytest.mark.slow
def test_drift_rules_compute_drift_py_scores_and_flag_only_a_shifted_stream(
    stack: Stack, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_digits
    thresholds = stack.reference["thresholds"]
    exported = {r["metric"]["score"]: float(r["value"][1]) for r in stack.query('mnist_drift_threshold{version="1"}')}
    assert exported == pytest.approx(thresholds)

    # Ordinary test digits (1,200 drawn at random, none of those the reference was built on): every
    # score stays below its threshold, with more than drift.WINDOW predictions in the window, and
    # nothing alerts. The draw is fixed and training deterministic, so this is not a coin toss per run.
    unseen = np.setdiff1d(np.arange(len(images)), reference_sample(len(images), 2000))
    stack.classify(images[np.random.default_rng(1).choice(unseen, 1200, replace=False)])
    scores = _scores(stack)
    assert scores == pytest.approx(_drift_py_scores(stack), abs=1e-9)
    (counted,) = stack.query('version:mnist_predictions:increase1h{version="1"}')
    assert float(counted["value"][1]) >= drift.WINDOW
    above = {s: (scores[s], thresholds[s]) for s in drift.SCORES if scores[s] > thresholds[s]}
    assert not above, f"unchanged digits scored above the thresholds: {above}"
    assert not _drift_alerts(stack)

    # Then only ones and sevens: every score rises past its threshold and MnistInputDrift is pending
    # (it fires after 30 minutes of this).
    stack.classify(images[np.isin(labels, (1, 7))][:2000])
    scores = _scores(stack)
    assert scores == pytest.approx(_drift_py_scores(stack), abs=1e-9)
    below = {s: (scores[s], thresholds[s]) for s in drift.SCORES if scores[s] <= thresholds[s]}
    assert not below, f"a shifted stream stayed under the thresholds: {below}"
    _eventually(lambda: _drift_alerts(stack) == set(drift.SCORES), "MnistInputDrift pending for every score")
