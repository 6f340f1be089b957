"""The v2 tensor codec alone: JSON and binary tensors in, digits out; outputs back as a real client reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from mnist_service.errors import BadRequest
from mnist_service.serving import v2_codec
from mnist_service.serving.v2_schemas import InferenceRequest, RequestInput

RNG = np.random.default_rng(0)


def _input(**fields: object) -> RequestInput:
    return RequestInput.model_validate({"name": "input", **fields})


@pytest.mark.parametrize("shape", [[2, 784], [2, 28, 28], [2, 1, 28, 28]])
def test_uint8_json_in_any_accepted_shape_gives_the_same_digits(shape: list[int]) -> None:
    pixels = RNG.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    digits = v2_codec.decode_input(_input(shape=shape, datatype="UINT8", data=pixels.ravel().tolist()), b"", 64)
    assert digits.dtype == np.uint8
    np.testing.assert_array_equal(digits, pixels)


def test_nested_json_data_is_read_row_major() -> None:
    pixels = RNG.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    digits = v2_codec.decode_input(_input(shape=[1, 28, 28], datatype="UINT8", data=pixels.tolist()), b"", 64)
    np.testing.assert_array_equal(digits, pixels)


def test_fp32_is_scaled_to_pixel_units() -> None:
    pixels = RNG.integers(0, 256, (3, 28, 28)).astype(np.float32)
    raw = (pixels / 255).astype("<f4").tobytes()
    tensor = _input(shape=[3, 1, 28, 28], datatype="FP32", parameters={"binary_data_size": len(raw)})
    digits = v2_codec.decode_input(tensor, raw, 64)
    assert digits.dtype == np.float32 and digits.shape == (3, 28, 28)
    np.testing.assert_allclose(digits, pixels, atol=1e-3)


@pytest.mark.parametrize(
    ("fields", "binary", "message"),
    [
        ({"shape": [1, 785], "datatype": "UINT8", "data": [0] * 785}, b"", "shape"),
        ({"shape": [1, 28], "datatype": "UINT8", "data": [0] * 28}, b"", "shape"),
        ({"shape": [0, 784], "datatype": "UINT8", "data": []}, b"", "N=0"),
        ({"shape": [65, 784], "datatype": "UINT8", "data": [0] * 784}, b"", "N=65"),
        ({"shape": [2, 784], "datatype": "UINT8", "data": [0] * 784}, b"", "1568"),
        ({"shape": [1, 784], "datatype": "UINT8", "data": [[0] * 700, [0] * 84]}, b"", "ragged"),
        ({"shape": [1, 784], "datatype": "UINT8", "data": ["0"] * 784}, b"", "numbers"),
        ({"shape": [1, 784], "datatype": "UINT8", "data": [256] * 784}, b"", "0-255"),
        ({"shape": [1, 784], "datatype": "UINT8", "data": [0.5] * 784}, b"", "0-255"),
        ({"shape": [1, 784], "datatype": "FP32", "data": [255.0] * 784}, b"", "UINT8"),
        ({"shape": [1, 784], "datatype": "UINT8"}, b"", "no 'data'"),
        ({"shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}, b"\0", "binary_data_size"),
        ({"shape": [1, 784], "datatype": "UINT8", "parameters": {"binary_data_size": 783}}, b"\0" * 783, "needs 784"),
        ({"shape": [1, 784], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}, b"\0" * 700, "700 bytes"),
        (
            {"shape": [1, 784], "datatype": "UINT8", "data": [0] * 784, "parameters": {"binary_data_size": 784}},
            b"\0" * 784,
            "both",
        ),
    ],
)
def test_bad_tensors_are_refused_with_a_reason(fields: dict, binary: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        v2_codec.decode_input(_input(**fields), binary, 64)
    assert caught.value.status_code == 400
    assert message in caught.value.detail


def test_fp32_nan_is_refused() -> None:
    raw = np.full(784, np.nan, dtype="<f4").tobytes()
    with pytest.raises(BadRequest, match="finite"):
        v2_codec.decode_input(_input(shape=[1, 784], datatype="FP32", parameters={"binary_data_size": 3136}), raw, 64)


def test_split_body_checks_the_header_length() -> None:
    assert v2_codec.split_body(b'{"a":1}xyz', 7) == (b'{"a":1}', b"xyz")
    assert v2_codec.split_body(b'{"a":1}', None) == (b'{"a":1}', b"")
    with pytest.raises(BadRequest, match="body has 3 bytes"):
        v2_codec.split_body(b"{}x", 4)


@pytest.mark.parametrize("header", [b"{", b"\xff\xfe", b"[" * 100_000, b"[]", b'{"inputs": []}', b'{"inputs": 3}'])
def test_malformed_headers_are_a_400(header: bytes) -> None:
    with pytest.raises(BadRequest):
        v2_codec.parse_request(header)


def _request(**fields: object) -> InferenceRequest:
    tensor = {"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}
    return InferenceRequest.model_validate({"inputs": [tensor], **fields})


def test_requested_outputs_follow_the_binary_flags() -> None:
    assert v2_codec.requested_outputs(_request()) == [("probabilities", False), ("prediction", False)]
    assert v2_codec.requested_outputs(_request(parameters={"binary_data_output": True})) == [
        ("probabilities", True),
        ("prediction", True),
    ]
    chosen = _request(
        parameters={"binary_data_output": True},
        outputs=[{"name": "prediction", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
    )
    assert v2_codec.requested_outputs(chosen) == [("prediction", False), ("probabilities", True)]
    with pytest.raises(BadRequest, match="twice"):
        v2_codec.requested_outputs(_request(outputs=[{"name": "prediction"}, {"name": "prediction"}]))


@pytest.mark.parametrize("binary", [False, True])
def test_encoded_response_reads_back_in_tritonclient(binary: bool) -> None:
    probs = RNG.dirichlet(np.ones(10), size=5).astype(np.float32)
    outputs = [("probabilities", binary), ("prediction", binary)]
    body, header_length = v2_codec.encode_response(probs, outputs, "mnist", "v1", "req-7")
    assert (header_length is not None) == binary
    result = httpclient.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    prediction = result.as_numpy("prediction")
    assert prediction.dtype == np.int64
    np.testing.assert_array_equal(prediction, probs.argmax(1))
    header = json.loads(body[:header_length] if binary else body)
    assert header["id"] == "req-7" and header["model_name"] == "mnist" and header["model_version"] == "v1"
