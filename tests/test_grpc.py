"""The Open Inference Protocol over gRPC, over real sockets: tritonclient.grpc (sync and asyncio) and its
generated stub, KServe's InferenceGRPCClient, grpc.health.v1, raw HTTP/2 frames; the limits, every error
status, deadlines, cancels and the SIGTERM drain.

Every server here is a process of its own (`python model_inference.py`): this process imports
tritonclient.grpc, whose generated modules define the package `inference` as ours do, and one process
cannot hold both ("duplicate symbol", MLServer #1730). The slow servers run the trained network behind
a forward pass that takes a set time on real digits (test_hung_worker's _Controlled), so that a call
can be made to wait in the queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from mnist_service.process.server import worker_pids
from mnist_service.registry.repository import ModelConfig, Repository

from .conftest import (
    ROOT,
    STARTUP_TIMEOUT_S,
    Server,
    add_version,
    exit_code_within,
    free_port,
    start_process,
    wait_ready,
)
from .test_hung_worker import _controlled_repository

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_KEY = "grpc-test-key"
ADMIN_KEY = "grpc-admin-key"
KEYED = [("x-api-key", API_KEY)]
ADMIN = [("authorization", f"Bearer {ADMIN_KEY}")]
MAX_UPLOAD = 300_000  # over the largest batch (64 FP32 images, 200,704 bytes), under 400 KB
SLOW_S = 0.4  # a forward pass on real digits, on the slow servers
SERVICE = "inference.GRPCInferenceService"
SERVING_LINE = "serving the Open Inference Protocol over gRPC"


@dataclass
class GrpcServer:
    process: Server
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the server's /metrics (summed over every worker), 0 if absent."""
        text = httpx.get(f"{self.process.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
                if all(found.get(k) == v for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total


def _start(model_path: Path, tmp_path: Path, workers: int = 2, **env: str) -> GrpcServer:
    port = free_port()
    server = start_process(model_path, tmp_path, GRPC_PORT=str(port), WORKERS=str(workers), **env)
    wait_ready(server.url, server.proc, server.log, STARTUP_TIMEOUT_S)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while server.stderr().count(SERVING_LINE) < workers:
        assert server.proc.poll() is None and time.monotonic() < deadline, server.stderr()[-3000:]
        time.sleep(0.05)
    return GrpcServer(server, port)


def _stop(server: GrpcServer) -> None:
    if server.process.proc.poll() is None:
        server.process.proc.kill()
        server.process.proc.wait()


@pytest.fixture(scope="module")
def server(model_dir: Path, other_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    """Two workers serving versions 1 (stable) and 2 (canary, a weaker model), with both keys set."""
    tmp = tmp_path_factory.mktemp("grpc")
    repo = Repository(tmp / "models", "mnist")
    add_version(repo, 1, model_dir)
    add_version(repo, 2, other_model_dir)
    repo.write_config(ModelConfig(version_policy={"all": {}}, labels={"stable": 1, "canary": 2}))
    running = _start(
        model_dir / "mnist_cnn.pt", tmp, MODEL_REPOSITORY=str(repo.root), API_KEY=API_KEY, ADMIN_API_KEY=ADMIN_KEY,
        MAX_UPLOAD_BYTES=str(MAX_UPLOAD), REPOSITORY_POLL_S="0.5",
    )
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def slow(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    """One worker whose forward passes on real digits take SLOW_S, one image each, two waiting at most;
    JSON logs with every call, idle connections closed after 1 s, 7 streams per connection."""
    tmp = tmp_path_factory.mktemp("grpc-slow")
    repo_root = _controlled_repository(model_dir, tmp, base_s=0.0, slow_s=SLOW_S)
    running = _start(
        model_dir / "mnist_cnn.pt", tmp, workers=1, MODEL_REPOSITORY=str(repo_root), MAX_BATCH_SIZE="1",
        MAX_QUEUE="2", LOG_FORMAT="json", ACCESS_LOG="all", GRPC_MAX_CONNECTION_IDLE_S="1",
        GRPC_MAX_CONCURRENT_STREAMS="7",
    )
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def digits(test_digits: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = test_digits
    return images[:64], labels[:64]


def _infer_input(array: np.ndarray, datatype: str, module: object = grpcclient) -> object:
    tensor = module.InferInput("input", list(array.shape), datatype)  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(array)
    return tensor


def _outputs(module: object = grpcclient) -> list[object]:
    return [module.InferRequestedOutput("probabilities"), module.InferRequestedOutput("prediction")]  # type: ignore[attr-defined]


def _rest_probabilities(server: GrpcServer, images: np.ndarray, version: str = "") -> np.ndarray:
    """The REST v2 door's answer for the same pixels."""
    path = f"/v2/models/mnist/versions/{version}/infer" if version else "/v2/models/mnist/infer"
    body = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.ravel().tolist()}], "outputs": [{"name": "probabilities"}]}
    response = httpx.post(f"{server.process.url}{path}", json=body, headers={"X-API-Key": API_KEY}, timeout=30)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _stub(server: GrpcServer) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.target)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _typed_request(images: np.ndarray, datatype: str = "FP32", **fields: object) -> service_pb2.ModelInferRequest:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=images.shape)
    if datatype == "FP32":
        tensor.contents.fp32_contents.extend((images.astype(np.float32) / 255).ravel().tolist())
    else:
        tensor.contents.uint_contents.extend(images.ravel().tolist())
    return service_pb2.ModelInferRequest(model_name="mnist", inputs=[tensor], **fields)  # type: ignore[arg-type]


def _raw_request(array: np.ndarray, datatype: str, shape: list[int] | None = None) -> service_pb2.ModelInferRequest:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype=datatype, shape=shape or list(array.shape)
    )
    return service_pb2.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[array.tobytes()])


# --- the modules and the messages --------------------------------------------------------------------


def test_the_app_factory_and_the_supervisor_never_import_the_generated_modules(model_path: Path) -> None:
    """A process that builds the app (as the tests and the supervisor do) must stay free of our copy of
    the package `inference`, or importing tritonclient.grpc beside it fails."""
    code = (
        "import sys\n"
        "from mnist_service.serving.api import create_app\n"
        "from mnist_service.process import server\n"
        "from mnist_service.settings import Settings\n"
        f"create_app(Settings(model_path={str(model_path)!r}))\n"
        "import tritonclient.grpc\n"
        "ours = ('mnist_service.protos', 'mnist_service.serving.grpc')\n"
        "print(sorted(m for m in sys.modules if m.startswith(ours)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # The package's docstring-only __init__ may load; no module with a message or a servicer does.
    assert result.stdout.strip() == "[]", result.stdout


def test_the_committed_modules_are_what_the_proto_generates() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_grpc.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_message_we_define_is_the_protocol_s_field_for_field(tmp_path: Path) -> None:
    """Our .proto against tritonclient's: same service path, every field's name, number, type and label."""
    descriptor_set = tmp_path / "ours.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT), f"--descriptor_set_out={descriptor_set}",
         "mnist_service/protos/grpc_predict_v2.proto"], check=True, timeout=120,
    )
    ours = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file[0]
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    their_methods = {m.name: m for m in theirs.service[0].method}
    assert ours.service[0].name == theirs.service[0].name == "GRPCInferenceService"
    for method in ours.service[0].method:
        assert (method.input_type, method.output_type) == (
            their_methods[method.name].input_type, their_methods[method.name].output_type
        )

    def fields(message: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict[str, tuple]:
        out = {f"{prefix}{message.name}.{f.name}": (f.number, f.type, f.label, f.type_name) for f in message.field}
        for nested in message.nested_type:
            out.update(fields(nested, f"{prefix}{message.name}."))
        return out

    their_messages = {m.name: m for m in theirs.message_type}
    assert len(ours.message_type) >= 20
    for message in ours.message_type:
        assert fields(message) == fields(their_messages[message.name]), message.name


# --- every RPC, the digits, binary and typed ---------------------------------------------------------


def test_server_and_model_rpcs_answer_as_the_protocol_says(server: GrpcServer) -> None:
    client = grpcclient.InferenceServerClient(server.target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        metadata = client.get_server_metadata()
        assert (metadata.name, metadata.version, list(metadata.extensions)) == (
            "mnist-service", "1.0.0", ["model_repository"]
        )
        assert client.is_model_ready("mnist", headers=dict(KEYED))
        assert client.is_model_ready("mnist", "2", headers=dict(KEYED))
        model = client.get_model_metadata("mnist", headers=dict(KEYED))
        assert (model.name, list(model.versions), model.platform) == ("mnist", ["1", "2"], "pytorch_torchscript")
        assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 1, 28, 28])]
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
            ("probabilities", "FP32", [-1, 10]), ("prediction", "INT64", [-1])
        ]
        assert list(client.get_model_metadata("mnist", "canary", headers=dict(KEYED)).versions) == ["2"]
    finally:
        client.close()


@pytest.mark.parametrize(
    ("datatype", "shape"), [("UINT8", [64, 28, 28]), ("FP32", [64, 1, 28, 28]), ("FP32", [64, 784])]
)
def test_real_digits_over_raw_contents_match_the_labels_and_the_rest_door(
    server: GrpcServer, digits: tuple[np.ndarray, np.ndarray], datatype: str, shape: list[int]
) -> None:
    images, labels = digits
    array = images.reshape(shape) if datatype == "UINT8" else (images.astype(np.float32) / 255).reshape(shape)
    client = grpcclient.InferenceServerClient(server.target)
    try:
        result = client.infer("mnist", [_infer_input(array, datatype)], outputs=_outputs(), headers=dict(KEYED))
    finally:
        client.close()
    response = result.get_response()
    assert len(response.raw_output_contents) == 2 and not response.outputs[0].contents.fp32_contents
    assert response.model_version == "1"
    predicted = result.as_numpy("prediction")
    assert predicted.dtype == np.int64 and (predicted == labels).mean() >= 0.9
    np.testing.assert_allclose(result.as_numpy("probabilities"), _rest_probabilities(server, images), atol=1e-5)


def test_onnx_runtime_serves_grpc_with_the_answers_of_torchscript(
    server: GrpcServer, model_dir: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    # RUNTIME=onnxruntime behind the same servicer: its metadata says so, and its answers are the
    # TorchScript server's digits, with probabilities within the export's agreement.
    images, labels = digits
    running = _start(model_dir / "mnist_cnn.pt", tmp_path, workers=1, RUNTIME="onnxruntime")
    client = grpcclient.InferenceServerClient(running.target)
    try:
        assert client.get_model_metadata("mnist").platform == "onnxruntime_onnx"
        result = client.infer("mnist", [_infer_input(images, "UINT8")], outputs=_outputs())
    finally:
        client.close()
        _stop(running)
    reference = _rest_probabilities(server, images)
    np.testing.assert_array_equal(result.as_numpy("prediction"), reference.argmax(1))
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-4)
    assert (result.as_numpy("prediction") == labels).mean() >= 0.9


def test_typed_contents_come_back_typed_and_equal_the_raw_answer(
    server: GrpcServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images = digits[0][:8]
    reference = _rest_probabilities(server, images)
    channel, stub = _stub(server)
    with channel:
        for request in (_typed_request(images, "FP32", id="typed-1"), _typed_request(images[:, None], "UINT8")):
            response, call = stub.ModelInfer.with_call(request, metadata=KEYED, timeout=30)
            assert not response.raw_output_contents
            by_name = {o.name: o for o in response.outputs}
            probabilities = np.asarray(by_name["probabilities"].contents.fp32_contents).reshape(8, 10)
            np.testing.assert_allclose(probabilities, reference, atol=1e-5)
            assert list(by_name["prediction"].contents.int64_contents) == reference.argmax(axis=1).tolist()
            assert dict(call.trailing_metadata())["x-model-version"] == "1"
        assert response.id == ""
        assert stub.ModelInfer(_typed_request(images, id="typed-1"), metadata=KEYED).id == "typed-1"
        # Typed in, raw out, when the request asks with binary_data_output; one output only when it names one.
        request = _typed_request(images, outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(
            name="prediction")])
        request.parameters["binary_data_output"].bool_param = True
        response = stub.ModelInfer(request, metadata=KEYED, timeout=30)
        assert [o.name for o in response.outputs] == ["prediction"]
        assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == reference.argmax(axis=1).tolist()


def test_the_asyncio_client_answers_concurrent_calls(server: GrpcServer, digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = digits

    async def run() -> list[int]:
        client = aioclient.InferenceServerClient(server.target)
        try:
            assert await client.is_server_ready()
            assert await client.is_model_ready("mnist", headers=dict(KEYED))
            results = await asyncio.gather(*(
                client.infer("mnist", [_infer_input(images[i : i + 1], "UINT8", aioclient)],
                             outputs=_outputs(aioclient), headers=dict(KEYED))
                for i in range(32)
            ))
            return [int(r.as_numpy("prediction")[0]) for r in results]
        finally:
            await client.close()

    predicted = asyncio.run(run())
    assert (np.asarray(predicted) == labels[:32]).mean() >= 0.9


def test_model_version_pins_a_version_as_on_rest(server: GrpcServer, digits: tuple[np.ndarray, np.ndarray]) -> None:
    images = digits[0]
    client = grpcclient.InferenceServerClient(server.target)
    try:
        answers = {}
        for version, served in (("", "1"), ("1", "1"), ("stable", "1"), ("2", "2"), ("canary", "2")):
            result = client.infer("mnist", [_infer_input(images, "UINT8")], model_version=version,
                                  outputs=_outputs(), headers=dict(KEYED))
            assert result.get_response().model_version == served, version
            answers[version] = result.as_numpy("probabilities")
    finally:
        client.close()
    np.testing.assert_allclose(answers["2"], _rest_probabilities(server, images, "2"), atol=1e-5)
    assert np.abs(answers["2"] - answers["1"]).max() > 0.01  # another model answered



def test_kserve_inference_grpc_client_classifies_typed_and_raw(
    server: GrpcServer, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """KServe's own client, from its own venv (scripts/kserve_grpc_client.py makes it once; its pins clash)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from kserve_grpc_client import ensure_kserve_venv
    finally:
        sys.path.pop(0)
    images, labels = digits[0][:16], digits[1][:16]
    np.save(tmp_path / "digits.npy", images)
    result = subprocess.run(
        [str(ensure_kserve_venv()), "scripts/kserve_grpc_client.py", server.target, str(tmp_path / "digits.npy"),
         API_KEY], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["mode"] for a in answers] == ["typed", "raw"]
    for answer in answers:
        assert answer["model_version"] == "1"
        assert (np.asarray(answer["prediction"]) == labels).mean() >= 0.9
    assert answers[0]["prediction"] == answers[1]["prediction"]


def test_the_stress_tester_speaks_grpc(server: GrpcServer, tmp_path: Path) -> None:
    """stress_testing.py --protocol grpc: the same report and JSON as over HTTP, every call counted by the server."""
    before = server.metric("mnist_grpc_requests_total", method="ModelInfer", code="OK")
    command = [sys.executable, "stress_testing.py", "--protocol", "grpc", "--url", server.target, "--requests", "300",
               "--concurrency", "8", "--sequential-requests", "20", "--no-progress"]
    result = subprocess.run([*command, "--api-key", API_KEY, "--json", str(tmp_path / "out.json")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "concurrent: 300 requests" in result.stdout and "errors none" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["sequential"]["requests"] == 20 and report["concurrent"]["requests"] == 300
    assert report["concurrent"]["errors"] == 0 and report["concurrent"]["latency_ms"]["p99"] > 0
    assert server.metric("mnist_grpc_requests_total", method="ModelInfer", code="OK") == before + 320
    # Without the key every call fails, by name, and the tester says so in its exit code.
    result = subprocess.run([*command[:6], "--requests", "5", "--sequential-requests", "0", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "errors UNAUTHENTICATED: 5" in result.stdout, result.stdout + result.stderr

# --- errors -----------------------------------------------------------------------------------------


def _bad_requests(images: np.ndarray) -> list[tuple[str, service_pb2.ModelInferRequest, list, grpc.StatusCode, str]]:
    one = images[:1]
    two_inputs = _raw_request(one, "UINT8")
    two_inputs.inputs.append(two_inputs.inputs[0])
    two_inputs.raw_input_contents.append(one.tobytes())
    unknown_output = _raw_request(one, "UINT8")
    unknown_output.outputs.add(name="logits")
    both = _raw_request(one, "UINT8")
    both.inputs[0].contents.uint_contents.extend([0] * 784)
    wrong_model = _raw_request(one, "UINT8")
    wrong_model.model_name = "resnet"
    wrong_version = _raw_request(one, "UINT8")
    wrong_version.model_version = "7"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("shape", _raw_request(np.zeros((1, 5), np.uint8), "UINT8"), KEYED, invalid, "[N, 1, 28, 28]"),
        ("datatype", _raw_request(one.astype(np.int32), "INT32"), KEYED, invalid, "send FP32"),
        ("batch", _raw_request(np.zeros((65, 784), np.uint8), "UINT8"), KEYED, invalid, "MAX_BATCH_FILES"),
        ("range", _raw_request(one.astype("<f4"), "FP32"), KEYED, invalid, "in [0, 1]"),
        ("size", _raw_request(one[:, :27], "UINT8", [1, 28, 28]), KEYED, invalid, "needs 784"),
        ("typed size", service_pb2.ModelInferRequest(model_name="mnist", inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 784])]),
         KEYED, invalid, "0 values in contents.fp32_contents"),
        ("typed range", _typed_request(np.full((1, 784), 300), "UINT8"), KEYED, invalid, "whole numbers 0-255"),
        ("two inputs", two_inputs, KEYED, invalid, "exactly one"),
        ("both", both, KEYED, invalid, "both contents and raw_input_contents"),
        ("output", unknown_output, KEYED, invalid, "unknown output 'logits'"),
        ("model", wrong_model, KEYED, grpc.StatusCode.NOT_FOUND, "serves 'mnist'"),
        ("version", wrong_version, KEYED, grpc.StatusCode.NOT_FOUND, "model version 7 is not loaded"),
        ("no key", _raw_request(one, "UINT8"), [], grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key"),
        ("wrong key", _raw_request(one, "UINT8"), [("x-api-key", "nope")], grpc.StatusCode.UNAUTHENTICATED, "API key"),
        ("admin key is not the api key", _raw_request(one, "UINT8"), ADMIN, grpc.StatusCode.UNAUTHENTICATED, "key"),
        ("too large", _raw_request(np.zeros((MAX_UPLOAD + 1,), np.uint8), "UINT8", [1, 784]), KEYED,
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]


def test_every_bad_call_gets_its_status_and_a_message_to_act_on(
    server: GrpcServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    channel, stub = _stub(server)
    with channel:
        for name, request, metadata, code, fragment in _bad_requests(digits[0]):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, metadata=metadata, timeout=30)
            error = caught.value
            assert error.code() == code, (name, error.code(), error.details())
            assert fragment in (error.details() or ""), (name, error.details())
            assert "Traceback" not in (error.details() or "")
        # A bearer token is as good as x-api-key.
        assert stub.ModelInfer(_raw_request(digits[0][:1], "UINT8"), metadata=[("authorization", f"Bearer {API_KEY}")])
    assert server.metric("mnist_grpc_requests_total", code="UNKNOWN") == 0


def test_tritonclient_reports_the_status_and_message(server: GrpcServer) -> None:
    client = grpcclient.InferenceServerClient(server.target)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("mnist", [_infer_input(np.zeros((1, 5), np.uint8), "UINT8")], headers=dict(KEYED))
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "[N, 784]" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("mnist", "9", headers=dict(KEYED))
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()


# --- the repository extension, health, metrics, access log ---------------------------------------------


def _health(target: str, service: str = "") -> int:
    """Check on a connection of its own (so on any worker: the kernel picks)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def _until(condition, what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_repository_extension_needs_the_admin_key_and_unloads_and_loads(server: GrpcServer) -> None:
    client = grpcclient.InferenceServerClient(server.target)
    one = np.zeros((1, 28, 28), np.uint8)
    try:
        for headers, status in (({}, "UNAUTHENTICATED"), (dict(KEYED), "UNAUTHENTICATED")):
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_repository_index(headers=headers)
            assert caught.value.status() == f"StatusCode.{status}" and "ADMIN_API_KEY" in caught.value.message()
        index = client.get_model_repository_index(headers=dict(ADMIN))
        assert [(m.version, m.state) for m in index.models if m.name == "mnist"] == [("1", "READY"), ("2", "READY")]
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("resnet", headers=dict(ADMIN))
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("mnist", config='{"backend": "python"}', headers=dict(ADMIN))
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and "own repository" in caught.value.message()

        unloaded = server.process.stderr().count("model version 1 unloaded")
        client.unload_model("mnist", headers=dict(ADMIN))
        # Every worker unloads within a poll: not ready, health NOT_SERVING, inference UNAVAILABLE.
        log = server.process.stderr
        _until(lambda: log().count("model version 1 unloaded") == unloaded + 2, "a worker did not unload")
        _until(lambda: not client.is_server_ready(), "ServerReady stayed true after the unload")
        _until(lambda: _health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING, "health kept SERVING")
        assert not client.is_model_ready("mnist", headers=dict(KEYED))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("mnist", [_infer_input(one, "UINT8")], headers=dict(KEYED))
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        unready = [m.state for m in client.get_model_repository_index(headers=dict(ADMIN)).models]
        assert "READY" not in unready
    finally:
        reloaded = server.process.stderr().count("(was None)")
        client.load_model("mnist", headers=dict(ADMIN))
        # This worker answers once it has loaded; the other follows within REPOSITORY_POLL_S.
        _until(lambda: server.process.stderr().count("(was None)") == reloaded + 2, "a worker did not reload", 30)
        time.sleep(0.5)  # two of health's polls
        client.close()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert all(_health(server.target) == _health(server.target, SERVICE) == serving for _ in range(6))


def test_health_names_the_server_and_the_service(server: GrpcServer) -> None:
    assert _health(server.target) == health_pb2.HealthCheckResponse.SERVING
    assert _health(server.target, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        _health(server.target, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_calls_are_counted_logged_and_carry_their_request_id(server: GrpcServer) -> None:
    before = server.metric("mnist_grpc_requests_total", method="ModelInfer", code="NOT_FOUND")
    channel, stub = _stub(server)
    request = _raw_request(np.zeros((1, 28, 28), np.uint8), "UINT8")
    request.model_name = "elsewhere"
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_raw_request(np.zeros((1, 28, 28), np.uint8), "UINT8"), metadata=KEYED, timeout=30)
        stub.ModelInfer(request, metadata=[*KEYED, ("x-request-id", "grpc-req-42")], timeout=30)
    assert dict(caught.value.trailing_metadata())["x-request-id"] == "grpc-req-42"
    assert server.metric("mnist_grpc_requests_total", method="ModelInfer", code="NOT_FOUND") == before + 1
    assert server.metric("mnist_grpc_requests_total", method="ModelInfer", code="OK", version="1") > 0
    assert server.metric("mnist_grpc_request_latency_seconds_count", method="ModelInfer", version="1") > 0
    _until(lambda: "code=NOT_FOUND version=- " in server.process.stderr(), "no access line")
    line = next(ln for ln in server.process.stderr().splitlines() if "request_id=grpc-req-42" in ln)
    assert "protocol=grpc method=ModelInfer code=NOT_FOUND" in line


# --- limits --------------------------------------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, payload: bytes, stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    head = exactly(9)
    return head[3], head[4], exactly(int.from_bytes(head[:3], "big"))


def test_the_server_advertises_its_stream_limit_and_drops_a_client_that_pings_too_often(slow: GrpcServer) -> None:
    with socket.create_connection(("127.0.0.1", slow.port), timeout=10) as sock:
        sock.sendall(_PREFACE + _frame(4, 0, b""))
        kind, _, payload = _read_frame(sock)
        assert kind == 4  # the server's SETTINGS come first
        settings = dict(struct.unpack(">HI", payload[i : i + 6]) for i in range(0, len(payload), 6))
        assert settings[0x3] == 7  # SETTINGS_MAX_CONCURRENT_STREAMS = GRPC_MAX_CONCURRENT_STREAMS
        sock.sendall(_frame(4, 1, b""))  # ACK
        for n in range(5):  # pings without a call, back to back: far more often than every 10 s
            sock.sendall(_frame(6, 0, struct.pack(">Q", n)))
            time.sleep(0.05)
        while True:
            kind, _, payload = _read_frame(sock)
            if kind == 7:  # GOAWAY
                break
        assert int.from_bytes(payload[4:8], "big") == 0xB and b"too_many_pings" in payload[8:]


def test_an_idle_connection_is_closed(slow: GrpcServer) -> None:
    async def run() -> list[grpc.ChannelConnectivity]:
        async with grpc.aio.insecure_channel(slow.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            states = [channel.get_state()]
            await asyncio.sleep(2.5)  # GRPC_MAX_CONNECTION_IDLE_S=1: the server sends GOAWAY
            states.append(channel.get_state())
            return states

    assert asyncio.run(run()) == [grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE]


# --- overload, deadline and cancel (the slow server) ------------------------------------------------------


async def _slow_calls(slow: GrpcServer, image: np.ndarray, n: int, timeout: float | None = None) -> list[object]:
    client = aioclient.InferenceServerClient(slow.target)
    try:
        return await asyncio.gather(
            *(client.infer("mnist", [_infer_input(image, "UINT8", aioclient)], client_timeout=timeout)
              for _ in range(n)),
            return_exceptions=True,
        )
    finally:
        await client.close()


def test_an_overloaded_server_answers_unavailable_with_retry_after(
    slow: GrpcServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    results = asyncio.run(_slow_calls(slow, digits[0][:1], 6))
    refused = [r for r in results if isinstance(r, InferenceServerException)]
    # Two queued and, if the batcher took one before the rest arrived, one computing.
    assert 1 <= len(refused) <= 4 and len(results) - len(refused) >= 2, results
    assert all(r.status() == "StatusCode.UNAVAILABLE" and "queue is full" in r.message() for r in refused), refused
    channel, stub = _stub(slow)
    with channel:
        calls = [stub.ModelInfer.future(_raw_request(digits[0][:1], "UINT8"), timeout=30) for _ in range(5)]
        errors = [c.exception() for c in calls if c.exception() is not None]
    assert errors and all(dict(e.trailing_metadata()).get("retry-after", "").isdigit() for e in errors)


def _passes(slow: GrpcServer) -> float:
    return slow.metric("mnist_batch_size_count")


def test_a_call_past_its_deadline_is_dropped_from_the_queue(
    slow: GrpcServer, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    image = digits[0][:1]
    before, expired = _passes(slow), slow.metric("mnist_grpc_requests_total", code="DEADLINE_EXCEEDED")

    async def run() -> tuple[object, object]:
        first = asyncio.ensure_future(_slow_calls(slow, image, 1))
        await asyncio.sleep(0.15)  # the first is in its forward pass; the second waits behind it...
        second = await _slow_calls(slow, image, 1, timeout=0.15)  # ...past its deadline
        return (await first)[0], second[0]

    first, second = asyncio.run(run())
    assert not isinstance(first, Exception), first
    assert isinstance(second, InferenceServerException) and second.status() == "StatusCode.DEADLINE_EXCEEDED"
    time.sleep(SLOW_S + 0.4)  # time enough for a second forward pass, had the work been kept
    assert _passes(slow) == before + 1
    assert slow.metric("mnist_grpc_requests_total", code="DEADLINE_EXCEEDED") == expired + 1


def test_a_cancelled_call_is_dropped_from_the_queue(slow: GrpcServer, digits: tuple[np.ndarray, np.ndarray]) -> None:
    image = digits[0][:1]
    before, cancelled = _passes(slow), slow.metric("mnist_grpc_requests_total", code="CANCELLED")
    client = grpcclient.InferenceServerClient(slow.target)
    outcomes: list[object] = []

    def done(result: object, error: object) -> None:
        outcomes.append(error)

    try:
        first = client.async_infer("mnist", [_infer_input(image, "UINT8")], done)
        time.sleep(0.15)
        second = client.async_infer("mnist", [_infer_input(image, "UINT8")], done)
        time.sleep(0.1)
        second.cancel()  # the sync client's cancel...
        _until(lambda: len(outcomes) == 2, "the calls never ended")
    finally:
        client.close()

    async def cancel_aio() -> None:  # ...and the asyncio client's
        task = asyncio.ensure_future(_slow_calls(slow, image, 2))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_aio())
    assert first is not None and outcomes.count(None) == 1
    time.sleep(2 * SLOW_S + 0.4)
    # One pass for the sync client's first call, one for the asyncio client's call that was computing
    # when it was cancelled; none for the two cancelled while queued.
    assert _passes(slow) == before + 2
    assert slow.metric("mnist_grpc_requests_total", code="CANCELLED") == cancelled + 3


def test_json_logs_carry_the_trace_context_of_the_call(slow: GrpcServer) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    channel, stub = _stub(slow)
    with channel:
        stub.ServerReady(service_pb2.ServerReadyRequest(), metadata=[("traceparent", traceparent)], timeout=10)
    _until(lambda: "0af7651916cd43dd8448eb211c80319c" in slow.process.stderr(), "no line with the trace id")
    entries = [json.loads(line) for line in slow.process.stderr().splitlines() if "0af7651916cd" in line]
    assert entries[0]["protocol"] == "grpc" and entries[0]["method"] == "ServerReady" and entries[0]["code"] == "OK"
    assert entries[0]["span_id"] == "b7ad6b7169203331"



def test_the_docs_example_works_as_written(slow: GrpcServer) -> None:
    """docs/grpc.md's tritonclient example, run as a user would, only the address changed."""
    text = (ROOT / "docs" / "grpc.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.DOTALL)[1]  # type: ignore[index]
    assert '"localhost:8001"' in example
    result = subprocess.run([sys.executable, "-c", example.replace("localhost:8001", slow.target)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted, labels = re.search(r"predicted (\[.*?\]) labels (\[.*?\])", result.stdout).groups()  # type: ignore[union-attr]
    assert json.loads(predicted) == json.loads(labels) and "version 1" in result.stdout

# --- SIGTERM ------------------------------------------------------------------------------------------------


def test_sigterm_drains_grpc_like_http_and_drops_nothing(
    model_dir: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """Health NOT_SERVING at once; calls made in the drain window, and those in flight when it ends, answered."""
    repo_root = _controlled_repository(model_dir, tmp_path, base_s=0.0, slow_s=0.3)
    server = _start(model_dir / "mnist_cnn.pt", tmp_path, workers=2, MODEL_REPOSITORY=str(repo_root),
                    MAX_BATCH_SIZE="1", SHUTDOWN_DRAIN_SECONDS="1.5", SHUTDOWN_TIMEOUT_SECONDS="10")
    image = digits[0][:1]
    try:
        async def run() -> tuple[list[object], list[object], float]:
            client = aioclient.InferenceServerClient(server.target)
            try:
                assert await client.is_server_ready()
                server.process.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                early = [asyncio.ensure_future(client.infer("mnist", [_infer_input(image, "UINT8", aioclient)]))
                         for _ in range(3)]
                while await client.is_server_ready():  # the same channel: the same worker
                    await asyncio.sleep(0.05)
                while _health(server.target) != health_pb2.HealthCheckResponse.NOT_SERVING:  # any worker
                    await asyncio.sleep(0.05)
                not_ready_after = time.monotonic() - signalled
                await asyncio.sleep(max(1.0 - (time.monotonic() - signalled), 0))
                late = [asyncio.ensure_future(client.infer("mnist", [_infer_input(image, "UINT8", aioclient)]))
                        for _ in range(4)]  # still computing when the window ends at 1.5 s
                return (await asyncio.gather(*early, return_exceptions=True),
                        await asyncio.gather(*late, return_exceptions=True), not_ready_after)
            finally:
                await client.close()

        early, late, not_ready_after = asyncio.run(run())
        assert not_ready_after < 1.0
        assert all(not isinstance(r, Exception) for r in early + late), early + late
        code, _ = exit_code_within(server.process.proc, 30)
        assert code == 0, server.process.stderr()[-3000:]
        assert "timeout graceful shutdown exceeded" not in server.process.stderr()
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        _stop(server)



def _access_lines(server: GrpcServer) -> list[tuple[int, str, str]]:
    """(worker pid, code, request id) of every ModelInfer access line logged so far (ACCESS_LOG=all, text logs)."""
    line = r" INFO (\d+) mnist_service\.access protocol=grpc method=ModelInfer code=(\w+) .*request_id=(\S+)"
    found = re.findall(line, server.process.stderr())
    return [(int(pid), code, request_id) for pid, code, request_id in found]


def _client(server: GrpcServer) -> grpcclient.InferenceServerClient:
    """A client on a connection of its own (channels to one target share one connection by default)."""
    return grpcclient.InferenceServerClient(server.target, channel_args=[("grpc.use_local_subchannel_pool", 1)])


def _call(client: grpcclient.InferenceServerClient, image: np.ndarray, request_id: str) -> str:
    """One ModelInfer: "OK", or the status code's name."""
    try:
        client.infer("mnist", [_infer_input(image, "UINT8")], headers={"x-request-id": request_id}, client_timeout=10)
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")
    return "OK"


def test_a_killed_worker_s_grpc_connections_move_and_its_replacement_serves_grpc(
    model_dir: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """SIGKILL one of two workers while clients call on both: calls on the dead worker's connections fail
    UNAVAILABLE and their retry succeeds on a new connection; calls on the other worker never fail; the
    replacement binds GRPC_PORT (SO_REUSEPORT) and takes new connections."""
    server = _start(model_dir / "mnist_cnn.pt", tmp_path, workers=2, ACCESS_LOG="all")
    image = digits[0][:1]
    clients: list[grpcclient.InferenceServerClient] = []
    try:
        # Connections until both workers hold one (the kernel picks a worker per connection).
        home: dict[int, int] = {}  # client -> worker pid
        while len(set(home.values())) < 2:
            assert len(clients) < 40, f"40 connections, all to one worker: {home}"
            clients.append(_client(server))
            i = len(clients) - 1
            assert _call(clients[i], image, f"home-{i}") == "OK"
            _until(lambda i=i: any(rid == f"home-{i}" for _, _, rid in _access_lines(server)), "the access line")
            home[i] = next(pid for pid, _, rid in _access_lines(server) if rid == f"home-{i}")
        victim = home[0]
        assert victim in worker_pids(server.process.proc.pid)
        stop = time.monotonic() + 60
        outcomes: dict[int, list[str]] = {i: [] for i in home}
        killed = False

        def keep_calling(i: int) -> None:
            n = 0
            while time.monotonic() < stop:
                outcomes[i].append(_call(clients[i], image, f"load-{i}-{n}"))
                n += 1
                if killed and server.process.stderr().count(SERVING_LINE) >= 3 and outcomes[i][-1] == "OK":
                    return  # the replacement serves, and this client has been answered since the kill

        with ThreadPoolExecutor(len(home)) as pool:
            running = [pool.submit(keep_calling, i) for i in home]
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            killed = True
            for future in running:
                future.result()
        failed = {code for codes in outcomes.values() for code in codes if code != "OK"}
        assert failed <= {"UNAVAILABLE"}, outcomes
        # The survivor's connections saw no failure at all.
        assert all(codes.count("OK") == len(codes) for i, codes in outcomes.items() if home[i] != victim), outcomes
        # Every client of the dead worker ends answered: gRPC reconnected it to a live worker.
        assert all(codes[-1] == "OK" for codes in outcomes.values())
        # The replacement serves gRPC: fresh connections reach it.
        replacement = set(worker_pids(server.process.proc.pid)) - set(home.values())
        assert len(replacement) == 1, (replacement, home)
        for n in range(40):
            fresh = _client(server)
            assert _call(fresh, image, f"fresh-{n}") == "OK"
            fresh.close()
            _until(lambda n=n: any(rid == f"fresh-{n}" for _, _, rid in _access_lines(server)), "the access line")
            if any(pid in replacement for pid, _, rid in _access_lines(server) if rid == f"fresh-{n}"):
                break
        else:
            pytest.fail("40 new connections, none to the replacement worker")
    finally:
        for client in clients:
            client.close()
        _stop(server)


def test_sigterm_under_grpc_load_drops_no_call_the_server_took(
    model_dir: Path, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """Eight clients calling without pause through SIGTERM: every call a worker's handler started (it has an
    access line) is answered OK and reaches its client, including those of the drain window; the calls that
    fail once the listeners close never reached a handler, and fail UNAVAILABLE or CANCELLED (grpc's core
    refusing or cancelling a stream the stopping server never took up), never with a server error."""
    server = _start(model_dir / "mnist_cnn.pt", tmp_path, workers=2, ACCESS_LOG="all", SHUTDOWN_DRAIN_SECONDS="1",
                    SHUTDOWN_TIMEOUT_SECONDS="10")
    image = digits[0][:1]
    clients = [_client(server) for _ in range(8)]
    outcomes: list[list[tuple[float, str, str]]] = [[] for _ in clients]  # (when, code, request id)
    signalled = float("inf")

    def keep_calling(i: int) -> None:
        n = 0
        while not (outcomes[i] and outcomes[i][-1][1] != "OK" and outcomes[i][-1][0] > signalled):  # closed
            request_id = f"drain-{i}-{n}"
            outcomes[i].append((time.monotonic(), _call(clients[i], image, request_id), request_id))
            n += 1

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            running = [pool.submit(keep_calling, i) for i in range(len(clients))]
            time.sleep(1.0)
            server.process.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code, _ = exit_code_within(server.process.proc, 30)
            for future in running:
                future.result(timeout=60)
        assert code == 0, server.process.stderr()[-3000:]
        calls = [outcome for per_client in outcomes for outcome in per_client]
        taken = {request_id: line_code for _, line_code, request_id in _access_lines(server)}
        assert set(taken.values()) == {"OK"}, {rid: c for rid, c in taken.items() if c != "OK"}
        answered = {request_id for _, c, request_id in calls if c == "OK"}
        assert answered == set(taken), (answered ^ set(taken), {c for _, c, _ in calls})
        refused = {c for _, c, request_id in calls if c != "OK"}
        assert refused <= {"UNAVAILABLE", "CANCELLED"}, refused
        assert any(c == "OK" and t > signalled + 0.5 for t, c, _ in calls), "nothing answered in the drain window"
    finally:
        for client in clients:
            client.close()
        _stop(server)
