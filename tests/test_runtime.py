"""The two runtimes: the same answers, verified files, the ONNX export and its agreement check, RUNTIME,
and a real server that starts and predicts with torch unimportable."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from mnist_service.inference import onnx_runtime, runtime
from mnist_service.inference.integrity import ModelLoadError, sha256_file
from mnist_service.inference.runtime import RUNTIMES, normalize
from mnist_service.registry.repository import MODEL_FILE, ModelConfig, Repository
from mnist_service.settings import Settings
from mnist_service.tools.images import png_bytes
from mnist_service.training import export
from mnist_service.training.train import add_onnx

from .conftest import DATA_DIR, ROOT, STARTUP_TIMEOUT_S, add_version, exit_code_within, start_process, wait_ready

# Probabilities of the same image from the two runtimes: measured within 1e-6 (float32 kernels that fuse and
# sum differently); 1e-5 as for two batches of one runtime (conftest.PROBABILITY_TOLERANCE).
TOLERANCE = 1e-5

# Put on PYTHONPATH, this makes torch (and ONNX export's packages) unimportable in the server and every worker
# it spawns, as in the slim image: `import torch` raises ModuleNotFoundError, find_spec("torch") is None.
NO_TORCH = "import sys\nfor name in ('torch', 'onnx', 'onnxscript'):\n    sys.modules[name] = None\n"


def _files(folder: Path) -> tuple[Path, Path]:
    return folder / "mnist_cnn.pt", folder / "mnist_cnn.json"


def test_both_runtimes_give_the_same_digits_and_probabilities(
    model_dir: Path, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_digits[0][:2000], test_digits[1][:2000]
    answers = {}
    for name in RUNTIMES:
        loaded, metadata = runtime.load(name, *_files(model_dir))
        norm = metadata["input"]["normalization"]
        batches = [normalize(images[i : i + 500], norm["mean"], norm["std"]) for i in range(0, len(images), 500)]
        answers[name] = np.concatenate([loaded.forward(x) for x in batches])
    ts, ort = answers["torchscript"], answers["onnxruntime"]
    assert ts.shape == ort.shape == (2000, 10) and ort.dtype == np.float32
    assert (ts.argmax(1) == ort.argmax(1)).all()
    np.testing.assert_allclose(ort, ts, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ort.sum(1), 1, rtol=0, atol=TOLERANCE)
    assert (ort.argmax(1) == labels).mean() > 0.85  # and they are right, not merely equal


def test_the_metadata_records_the_export_and_its_agreement_on_the_test_set(model_dir: Path) -> None:
    meta = json.loads(_files(model_dir)[1].read_text())
    assert meta["onnx_sha256"] == sha256_file(model_dir / "mnist_cnn.onnx")
    agreement = meta["onnx"]["agreement"]
    assert agreement["images"] == agreement["same_digit"] == 10_000
    assert 0 <= agreement["max_abs_prob_diff"] <= agreement["tolerance"] == export.TOLERANCE
    assert meta["onnx"]["opset"] == export.OPSET


def test_the_onnx_graph_has_batch_norm_folded_and_a_dynamic_batch(model_dir: Path) -> None:
    graph = onnx.load(str(model_dir / "mnist_cnn.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"Conv", "Gemm"} <= ops and not ops & {"BatchNormalization", "Dropout", "Softmax"}, ops
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named axis, not a fixed size
    loaded, _ = runtime.load("onnxruntime", *_files(model_dir))
    for n in (1, 7, 64):
        assert loaded.forward(np.zeros((n, 1, 28, 28), np.float32)).shape == (n, 10)


def test_the_agreement_check_refuses_an_export_that_answers_differently(
    model_dir: Path, other_model_dir: Path, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    torchscript, meta = runtime.load("torchscript", *_files(model_dir))
    other = onnx_runtime.OnnxRuntime(onnx_runtime.session(other_model_dir / "mnist_cnn.onnx"))
    with pytest.raises(export.ExportMismatch, match=r"on the 1000 test images: \d+ give another digit.*nothing was"):
        export.check_agreement(torchscript, other, test_digits[0][:1000], meta["input"]["normalization"])


def test_publishing_with_a_mismatched_onnx_export_publishes_nothing(
    model_dir: Path, other_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    test_digits: tuple[np.ndarray, np.ndarray],
) -> None:
    # The exporter writes another model's graph: what a broken exporter or a tampered file would give.
    monkeypatch.setattr(export, "export_onnx", lambda _net, path: shutil.copy(other_model_dir / "mnist_cnn.onnx", path))
    metadata = json.loads(_files(model_dir)[1].read_text())
    del metadata["version"]
    net = torch.jit.load(str(_files(model_dir)[0]))
    repo = Repository(tmp_path / "models", "mnist")
    with pytest.raises(export.ExportMismatch, match="disagrees with the TorchScript model"):
        repo.publish(lambda folder: export.export_version(net, metadata, folder / MODEL_FILE, test_digits[0][:500]))
    assert repo.versions() == [] and [p.name for p in repo.folder.iterdir()] == []
    flat = tmp_path / "flat" / "mnist_cnn.pt"
    with pytest.raises(export.ExportMismatch):
        export.export_version(net, metadata, flat, test_digits[0][:500])
    assert list(flat.parent.iterdir()) == []  # no .onnx (nor its partial file) without its .pt


@pytest.fixture
def version_copy(model_dir: Path, tmp_path: Path) -> Path:
    """model_dir's three files in a folder of their own; returns the .pt."""
    for suffix in (".pt", ".json", ".onnx"):
        shutil.copy(model_dir / f"mnist_cnn{suffix}", tmp_path / f"mnist_cnn{suffix}")
    return tmp_path / "mnist_cnn.pt"


def test_onnx_runtime_refuses_a_tampered_or_missing_onnx_file(version_copy: Path) -> None:
    onnx_file, js = version_copy.with_suffix(".onnx"), version_copy.with_suffix(".json")
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"has sha256 .* tampered with"):
        runtime.load("onnxruntime", version_copy, js)
    runtime.load("torchscript", version_copy, js)  # TorchScript never reads it
    onnx_file.unlink()
    with pytest.raises(ModelLoadError, match=r"mnist_cnn\.onnx not found"):
        runtime.load("onnxruntime", version_copy, js)


def test_a_swapped_onnx_file_with_its_hash_in_the_json_is_refused(version_copy: Path, other_model_dir: Path) -> None:
    # model.json is not the authority: the hash embedded in model.pt (the version id) is.
    shutil.copy(other_model_dir / "mnist_cnn.onnx", version_copy.with_suffix(".onnx"))
    js = version_copy.with_suffix(".json")
    meta = json.loads(js.read_text())
    meta["onnx_sha256"] = sha256_file(version_copy.with_suffix(".onnx"))
    js.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="does not match the metadata embedded"):
        runtime.load("onnxruntime", version_copy, js)


def test_a_model_without_an_onnx_export_loads_under_torchscript_only(old_model_dir: Path) -> None:
    runtime.load("torchscript", *_files(old_model_dir))
    with pytest.raises(ModelLoadError, match=r"published before ONNX export .* RUNTIME=torchscript.* --add-onnx"):
        runtime.load("onnxruntime", *_files(old_model_dir))
    assert runtime.servable_by(json.loads(_files(old_model_dir)[1].read_text())) == ["torchscript"]


def test_add_onnx_gives_an_old_flat_model_its_export(old_model_dir: Path, tmp_path: Path) -> None:
    for path in _files(old_model_dir):
        shutil.copy(path, tmp_path / path.name)
    old = json.loads(_files(old_model_dir)[1].read_text())
    pt, meta = add_onnx(tmp_path / "mnist_cnn.pt", DATA_DIR)
    assert meta["version"] == sha256_file(pt) != old["version"] and meta["derived_from"] == old["version"]
    assert meta["onnx"]["agreement"]["same_digit"] == 10_000
    assert meta["test_accuracy"] == old["test_accuracy"]
    runtime.load("onnxruntime", pt, pt.with_suffix(".json"))
    with pytest.raises(ValueError, match="already has an ONNX export"):
        add_onnx(pt, DATA_DIR)


def test_add_onnx_publishes_a_repository_version_again_and_leaves_the_old_one(
    old_model_dir: Path, tmp_path: Path
) -> None:
    repo = Repository(tmp_path / "models", "mnist")
    add_version(repo, 1, old_model_dir)
    repo.write_config(ModelConfig(labels={"stable": 1}))
    before = sha256_file(repo.folder / "1" / MODEL_FILE)
    pt, meta = add_onnx(repo.folder / "1" / MODEL_FILE, DATA_DIR)
    assert pt == repo.folder / "2" / MODEL_FILE and (repo.folder / "2" / "model.onnx").is_file()
    assert meta["derived_from"] == before == sha256_file(repo.folder / "1" / MODEL_FILE)
    assert not (repo.folder / "1" / "model.onnx").exists() and repo.read_config().labels == {"stable": 1}
    assert repo.check_servable(2)["onnx_sha256"] == sha256_file(repo.folder / "2" / "model.onnx")


def test_runtime_setting_is_validated() -> None:
    assert Settings().runtime == "torchscript"  # torch is installed here
    assert Settings(runtime="onnxruntime").runtime == "onnxruntime"
    with pytest.raises(ValidationError, match="'torchscript' or 'onnxruntime'"):
        Settings(runtime="tensorflow")


def test_without_torch_the_default_is_onnxruntime_and_torchscript_is_refused(tmp_path: Path) -> None:
    probe = (
        NO_TORCH + "from mnist_service.settings import Settings\nprint(Settings().runtime)\n"
        "try:\n    Settings(runtime='torchscript')\nexcept ValueError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    default, error = result.stdout.split("\n", 1)
    assert default == "onnxruntime"
    assert "RUNTIME=torchscript needs torch, which is not installed here" in error and "RUNTIME=onnxruntime" in error


def test_requirements_slim_has_the_pins_of_requirements_without_torch() -> None:
    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith("#"))

    slim, full = pins("requirements-slim.txt"), pins("requirements.txt")
    assert {name: full[name] for name in slim} == slim
    assert not {"torch", "onnx", "onnxscript"} & set(slim) and "onnxruntime" in slim


def _processes(pid: int) -> list[int]:
    """A process and its descendants, from /proc."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            queue += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.e2e
def test_a_server_without_torch_starts_on_onnxruntime_and_predicts(
    model_path: Path, tmp_path: Path, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    hook = tmp_path / "no-torch"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_TORCH)
    server = start_process(model_path, tmp_path, PYTHONPATH=str(hook), WORKERS="2")
    try:
        wait_ready(server.url, server.proc, server.log, STARTUP_TIMEOUT_S)
        images, labels = test_digits
        with httpx.Client(base_url=server.url, timeout=30) as http:
            info = http.get("/model").json()
            assert (info["runtime"], info["runtime_version"]) == ("onnxruntime", onnx_runtime.ort.__version__)
            answers = [
                http.post("/predict", files={"file": ("d.png", png_bytes(Image.fromarray(images[i])), "image/png")})
                for i in range(20)
            ]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert sum(a.json()["prediction"] == labels[i] for i, a in enumerate(answers)) >= 17
        maps = [Path(f"/proc/{pid}/maps").read_text() for pid in _processes(server.proc.pid)]
        assert not any("libtorch" in m for m in maps)
        assert sum("onnxruntime" in m for m in maps) == 2  # the two workers; the supervisor loads no runtime
    finally:
        server.proc.kill()
        server.proc.wait()
    assert "Traceback" not in server.stderr()


@pytest.mark.e2e
def test_runtime_torchscript_without_torch_exits_with_one_line(model_path: Path, tmp_path: Path) -> None:
    hook = tmp_path / "no-torch"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_TORCH)
    server = start_process(model_path, tmp_path, PYTHONPATH=str(hook), RUNTIME="torchscript")
    code, _ = exit_code_within(server.proc, 60)
    assert code == 1, server.stderr()
    assert re.fullmatch(r"error: invalid settings: RUNTIME: Value error, RUNTIME=torchscript needs torch.*\n",
                        server.stderr()), server.stderr()
