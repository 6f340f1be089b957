"""Model versions in one server: pinning, publishing, promoting, refusing, unloading, comparing,
shadowing, and the v2 repository extension driven by the real tritonclient.

The server runs on a real socket in a thread of the test process (served_in_thread) over a model
repository in a temporary folder, polled every 0.2 s; the test changes the repository the way
model_train.py and the repository CLI do (through mnist_service.registry.repository).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from mnist_service.registry.repository import MODEL_FILE, ModelConfig, Repository
from mnist_service.settings import Settings
from mnist_service.tools.images import png_bytes

from .conftest import add_version, metric_samples, same_answer, served_in_thread

ADMIN = "admin-s3cret"


def _tamper(pt: Path) -> None:
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))


class _Served:
    def __init__(self, app: Any, url: str, repo: Repository) -> None:
        self.app, self.url, self.repo = app, url, repo
        self.http = httpx.Client(base_url=url, timeout=10)

    @property
    def registry(self) -> Any:
        return self.app.state.registry

    def predict(self, png: bytes, version: str | None = None) -> httpx.Response:
        params = {"version": version} if version is not None else {}
        return self.http.post("/predict", params=params, files={"file": ("d.png", png, "image/png")})

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"never happened: {what}; versions {self.registry.index()}"
            time.sleep(0.05)

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return metric_samples(self.app, name)


@pytest.fixture
def repo(tmp_path: Path, model_dir: Path, other_model_dir: Path) -> Repository:
    """Versions 1 (stable) and 2 (another model), latest-2 policy."""
    repository = Repository(tmp_path / "models", "mnist")
    add_version(repository, 1, model_dir)
    add_version(repository, 2, other_model_dir)
    repository.write_config(ModelConfig(labels={"stable": 1}))
    return repository


@contextlib.contextmanager
def _served(repo: Repository, **settings: Any) -> Iterator[_Served]:
    base = Settings(
        model_repository=repo.root, repository_poll_s=0.2, max_batch_delay_ms=0, request_timeout_s=10,
        admin_api_key=ADMIN,
    )
    with served_in_thread(base.model_copy(update=settings)) as (app, url):
        served = _Served(app, url, repo)
        yield served
        served.http.close()


@pytest.fixture
def served(repo: Repository) -> Iterator[_Served]:
    with _served(repo) as served:
        yield served


@pytest.fixture(scope="module")
def digit_pngs(test_digits: tuple[np.ndarray, np.ndarray]) -> list[bytes]:
    images, _ = test_digits
    return [png_bytes(Image.fromarray(255 - images[i])) for i in range(40)]


def test_the_default_is_stable_and_each_request_can_pin_a_version(served: _Served, digit_pngs: list[bytes]) -> None:
    info = served.http.get("/model").json()
    assert [(v["version"], v["state"], v["labels"]) for v in info["versions"]] == [
        ("1", "READY", ["stable"]), ("2", "READY", []),
    ]
    assert info["model_version"] == "1" and info["labels"] == {"stable": 1}
    for version, expected in ((None, "1"), ("1", "1"), ("2", "2"), ("stable", "1")):
        response = served.predict(digit_pngs[0], version)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == expected and response.headers["x-model-version"] == expected
    for version, status, message in (
        ("canary", 404, "no version is labelled 'canary'; loaded: 1 (stable), 2"),
        ("7", 404, "model version 7 is not loaded; loaded: 1 (stable), 2"),
        ("latest", 404, "unknown model version 'latest'"),
    ):
        response = served.predict(digit_pngs[0], version)
        assert response.status_code == status and message in response.json()["detail"], response.text
    # Pinning works the same on the pixels route and the v2 paths.
    pixels = served.http.post("/predict/pixels", params={"version": "2"}, json={"pixels": [0] * 784})
    assert pixels.json()["model_version"] == "2"
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]}
    v2 = served.http.post("/v2/models/mnist/versions/2/infer", json=body)
    assert v2.status_code == 200 and v2.json()["model_version"] == "2"
    assert served.http.get("/v2/models/mnist").json()["versions"] == ["1", "2"]
    # The metrics say which version answered.
    requests = served.samples("mnist_requests_total")
    assert requests[(("endpoint", "/predict"), ("method", "POST"), ("status", "200"), ("version", "2"))] == 1


def test_a_new_version_loads_without_moving_the_default_until_promoted(
    served: _Served, digit_pngs: list[bytes], model_dir: Path
) -> None:
    add_version(served.repo, 3, model_dir)
    served.wait_for(lambda: "3" in [v.name for v in served.registry.ready()], "version 3 loaded")
    assert served.predict(digit_pngs[0]).json()["model_version"] == "1"  # adding never moves the default
    time.sleep(0.6)  # three polls
    # Stable is always held: version 1 stays, although the policy (latest 2) now picks 2 and 3.
    assert 1 in served.registry.versions and served.predict(digit_pngs[0]).json()["model_version"] == "1"
    served.repo.set_label("stable", 3)
    served.wait_for(lambda: served.predict(digit_pngs[0]).json()["model_version"] == "3", "stable moved to 3")
    served.wait_for(lambda: 1 not in served.registry.versions, "version 1, no longer stable nor latest, unloaded")
    response = served.predict(digit_pngs[0], "1")
    assert response.status_code == 404 and "loaded: 2, 3 (stable)" in response.json()["detail"], response.text
    assert served.repo.rollback() == (3, 1)
    served.wait_for(lambda: served.predict(digit_pngs[0]).json()["model_version"] == "1", "rolled back to 1")


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(
    served: _Served, digit_pngs: list[bytes], model_dir: Path
) -> None:
    add_version(served.repo, 3, model_dir, damage=_tamper)
    # Promote it by writing config.json directly (the CLI would refuse).
    served.repo.write_config(ModelConfig(labels={"stable": 3}, stable_history=[1]))
    served.wait_for(lambda: served.registry.versions.get(3) is not None and served.registry.versions[3].reason,
                    "version 3 refused")
    refused = served.registry.versions[3]
    assert refused.state == "UNAVAILABLE" and "sha256" in refused.reason
    index = served.http.post("/v2/repository/index", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    entry = next(e for e in index if e["version"] == "3")
    assert entry["state"] == "UNAVAILABLE" and "truncated, tampered with" in entry["reason"], index
    assert served.registry.failures() == f"version 3: {entry['reason']}"
    for _ in range(5):
        answer = served.predict(digit_pngs[0])
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    time.sleep(1)  # several polls: a refused version is not retried while its files stay the same
    assert served.samples("mnist_model_version_loads_total")[(("outcome", "failed"), ("version", "3"))] == 1
    response = served.predict(digit_pngs[0], "3")
    assert response.status_code == 404 and "could not be loaded" in response.json()["detail"]
    # Fixed files are tried again, and then the label moves.
    shutil.copy(model_dir / "mnist_cnn.pt", served.repo.folder / "3" / MODEL_FILE)
    served.wait_for(lambda: served.predict(digit_pngs[0]).json()["model_version"] == "3", "the repaired 3 serving")


@pytest.mark.parametrize("runtime", ["torchscript", "onnxruntime"])
def test_a_version_published_before_onnx_export_serves_under_torchscript_only(
    tmp_path: Path, model_dir: Path, old_model_dir: Path, digit_pngs: list[bytes], runtime: str
) -> None:
    repository = Repository(tmp_path / "models", "mnist")
    add_version(repository, 1, old_model_dir)  # no model.onnx, no onnx_sha256
    add_version(repository, 2, model_dir)
    repository.write_config(ModelConfig(labels={"stable": 2}))
    with _served(repository, runtime=runtime) as served:
        info = served.http.get("/model").json()
        assert info["runtime"] == runtime
        runtimes = {v["version"]: v["runtimes"] for v in info["versions"]}
        assert runtimes == {"1": ["torchscript"], "2": ["torchscript", "onnxruntime"]}
        assert served.predict(digit_pngs[0]).json()["model_version"] == "2"
        pinned = served.predict(digit_pngs[0], "1")
        index = served.http.post("/v2/repository/index", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        if runtime == "torchscript":
            assert pinned.status_code == 200 and pinned.json()["model_version"] == "1"
            assert [e["state"] for e in index] == ["READY", "READY"]
            return
        # ONNX Runtime: version 1 can't be served, says why everywhere a user looks, and 2 serves on.
        why = "published before ONNX export"
        assert pinned.status_code == 404 and why in pinned.json()["detail"], pinned.text
        assert index[0]["state"] == "UNAVAILABLE" and why in index[0]["reason"], index
        assert "RUNTIME=torchscript" in index[0]["reason"]
        assert index[1]["state"] == "READY"
        old = next(v for v in info["versions"] if v["version"] == "1")
        assert old["state"] == "UNAVAILABLE" and why in old["reason"]
        assert served.samples("mnist_model_version_loads_total")[(("outcome", "failed"), ("version", "1"))] == 1


def test_compare_answers_with_every_loaded_version(served: _Served, digit_pngs: list[bytes]) -> None:
    disagreed = 0
    for png in digit_pngs:
        response = served.http.post("/predict/compare", files={"file": ("d.png", png, "image/png")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert [p["model_version"] for p in body["predictions"]] == ["1", "2"] and body["default_version"] == "1"
        singles = [served.predict(png, v).json()["prediction"] for v in ("1", "2")]
        assert [p["prediction"] for p in body["predictions"]] == singles
        assert body["agree"] == (singles[0] == singles[1])
        disagreed += not body["agree"]
    print(f"versions 1 and 2 disagreed on {disagreed} of {len(digit_pngs)} digits")


def test_shadow_counts_agreement_without_changing_the_answers(served: _Served, digit_pngs: list[bytes]) -> None:
    before = [served.predict(png).json() for png in digit_pngs]
    expected_agree = sum(
        served.predict(png, "1").json()["prediction"] == served.predict(png, "2").json()["prediction"]
        for png in digit_pngs
    )
    served.repo.set_label("canary", 2)
    served.wait_for(lambda: served.registry.canary is not None, "canary set")
    # At a client's pace, not flat out: shadow work is skipped whenever a comparison is still waiting
    # for the canary (the next test), and a lone request is answered quicker than that.
    after = []
    for png in digit_pngs:
        after.append(served.predict(png).json())
        time.sleep(0.01)
    assert same_answer([a["probabilities"] for a in after], [b["probabilities"] for b in before])
    assert {a["model_version"] for a in after} == {"1"}
    key = (("canary", "2"), ("outcome", "{}"), ("stable", "1"))
    served.wait_for(
        lambda: sum(v for k, v in served.samples("mnist_shadow_comparisons_total").items()) == len(digit_pngs),
        "every stable answer shadowed",
    )
    counts = served.samples("mnist_shadow_comparisons_total")
    assert counts.get(tuple((n, v.format("agree")) for n, v in key), 0) == expected_agree
    assert counts.get(tuple((n, v.format("disagree")) for n, v in key), 0) == len(digit_pngs) - expected_agree
    assert served.samples("mnist_shadow_confidence_count") == {(("canary", "2"),): len(digit_pngs)}
    # Pinned requests are the client's own comparison: not shadowed.
    served.predict(digit_pngs[0], "1")
    time.sleep(0.3)
    assert sum(served.samples("mnist_shadow_comparisons_total").values()) == len(digit_pngs)


def test_shadow_work_is_skipped_not_queued_when_the_canary_is_busy(repo: Repository, digit_pngs: list[bytes]) -> None:
    repo.set_label("canary", 2)
    with _served(repo) as served:
        canary = served.registry.canary.predictor.runtime
        computed: list[int] = []
        original = canary.forward

        def slow(x: Any) -> Any:
            computed.append(int(x.shape[0]))
            time.sleep(0.3)
            return original(x)

        canary.forward = slow
        started = time.monotonic()
        answers = [served.predict(digit_pngs[i % len(digit_pngs)]) for i in range(30)]
        elapsed = time.monotonic() - started
        assert {a.status_code for a in answers} == {200} and {a.json()["model_version"] for a in answers} == {"1"}
        counts = served.samples("mnist_shadow_comparisons_total")
        skipped = counts.get((("canary", "2"), ("outcome", "skipped"), ("stable", "1")), 0)
        # The canary takes 0.3 s a pass: it could have shadowed at most ~elapsed/0.3 + 2 of the 30.
        assert skipped >= 30 - (elapsed / 0.3 + 2), (skipped, elapsed, computed)
        assert len(computed) <= elapsed / 0.3 + 2


def test_sample_zero_shadows_nothing(repo: Repository, digit_pngs: list[bytes]) -> None:
    repo.set_label("canary", 2)
    with _served(repo, shadow_sample=0.0) as served:
        for png in digit_pngs[:10]:
            assert served.predict(png).status_code == 200
        counts = served.samples("mnist_shadow_comparisons_total")
        key = (("canary", "2"), ("outcome", "{}"), ("stable", "1"))
        assert counts == {tuple((n, v.format(o)) for n, v in key): 10.0 if o == "skipped" else 0.0
                          for o in ("agree", "disagree", "skipped", "failed")}


# ---- the v2 repository extension, through the real tritonclient --------------------------------


def _triton(served: _Served) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(served.url.removeprefix("http://"))


def test_repository_index_load_and_unload_with_tritonclient(served: _Served, digit_pngs: list[bytes]) -> None:
    triton, auth = _triton(served), {"Authorization": f"Bearer {ADMIN}"}
    index = triton.get_model_repository_index(headers=auth)
    assert [(e["name"], e["version"], e["state"]) for e in index] == [("mnist", "1", "READY"), ("mnist", "2", "READY")]
    triton.unload_model("mnist", headers=auth)
    assert not triton.is_model_ready("mnist")
    response = served.predict(digit_pngs[0])
    assert response.status_code == 503 and "unloaded through the repository API" in response.json()["detail"]
    assert {e["state"] for e in triton.get_model_repository_index(headers=auth)} == {"UNAVAILABLE"}
    assert served.http.get("/readyz").status_code == 503
    triton.load_model("mnist", headers={"X-API-Key": ADMIN})
    assert triton.is_model_ready("mnist") and served.predict(digit_pngs[0]).json()["model_version"] == "1"
    ready_only = served.http.post("/v2/repository/index", json={"ready": True}, headers=auth).json()
    assert [e["version"] for e in ready_only] == ["1", "2"]
    triton.close()


def test_repository_api_errors(served: _Served) -> None:
    triton, auth = _triton(served), {"Authorization": f"Bearer {ADMIN}"}
    calls = (lambda h: triton.get_model_repository_index(headers=h), lambda h: triton.unload_model("mnist", headers=h))
    for call in calls:
        with pytest.raises(InferenceServerException, match="missing or wrong admin key") as caught:
            call({"Authorization": "Bearer wrong"})
        assert caught.value.status() == "401"
        with pytest.raises(InferenceServerException, match="missing or wrong admin key"):
            call({})
    with pytest.raises(InferenceServerException, match="unknown model 'resnet'") as caught:
        triton.load_model("resnet", headers=auth)
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException, match="can't carry a config, files or paths") as caught:
        triton.load_model("mnist", headers=auth, config=json.dumps({"backend": "python"}))
    assert caught.value.status() == "400"
    with pytest.raises(InferenceServerException, match="can't carry a config, files or paths"):
        triton.load_model("mnist", headers=auth, config="{}", files={"file:1/model.pt": b"evil"})
    assert triton.is_model_ready("mnist")  # nothing above changed what is served
    # The API key for predictions is not the admin key.
    assert served.http.post("/v2/repository/index", headers={"X-API-Key": "s3cret"}).status_code == 401
    triton.close()


def test_the_repository_api_is_off_without_an_admin_key(repo: Repository) -> None:
    with _served(repo, admin_api_key=None) as served:
        with pytest.raises(InferenceServerException, match="start the server with ADMIN_API_KEY") as caught:
            _triton(served).get_model_repository_index(headers={"Authorization": f"Bearer {ADMIN}"})
        assert caught.value.status() == "403"
