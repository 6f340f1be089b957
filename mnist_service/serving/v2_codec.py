"""Open Inference Protocol tensors <-> numpy: JSON and the binary tensor data extension. Pure functions.

A request body is a JSON header, optionally followed by raw little-endian tensor bytes; the
`Inference-Header-Content-Length` HTTP header says where the JSON ends. The server turns the one
input tensor into digits (n, 28, 28) in pixel units, the form every other endpoint feeds the predictor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
from pydantic import ValidationError

from mnist_service.errors import BadRequest
from mnist_service.serving.v2_schemas import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput

PIXELS = 28 * 28
ACCEPTED_SHAPES = "[N, 1, 28, 28], [N, 28, 28] or [N, 784]"
_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
OUTPUTS = ("probabilities", "prediction")


def describe_errors(errors: Iterable[Any]) -> str:
    """pydantic errors as one line a person can act on: 'inputs.0.shape: Input should be a valid list'."""
    parts = [f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in errors]
    return "; ".join(parts[:5])


def split_body(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a request body, checking the declared header length."""
    if header_length is None:
        return body, b""
    if not 0 < header_length <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes: "
            "it must be the length of the JSON header, which the binary tensor data follows"
        )
    return body[:header_length], body[header_length:]


def parse_request(header: bytes) -> InferenceRequest:
    """The JSON header as a typed request; malformed JSON or fields are a 400 that says what is wrong."""
    try:
        raw = json.loads(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        hint = " (binary tensor data needs the Inference-Header-Content-Length header)" if header[:1] == b"{" else ""
        raise BadRequest(f"the request body is not valid JSON: {str(exc)[:200]}{hint}") from None
    try:
        return InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise BadRequest(f"invalid inference request: {describe_errors(exc.errors())}") from None


def batch_size(shape: list[int], max_batch: int) -> int:
    """N of an accepted input shape, or a 400 naming the accepted shapes and limits."""
    if len(shape) not in (2, 3, 4) or list(shape[1:]) not in ([PIXELS], [28, 28], [1, 28, 28]):
        raise BadRequest(f"input shape {shape[:8]} is not accepted: send {ACCEPTED_SHAPES}, white digits on black")
    n = shape[0]
    if not 1 <= n <= max_batch:
        raise BadRequest(f"batch size N={n} is out of range: send 1 to {max_batch} images (MAX_BATCH_FILES)")
    return n


def decode_input(tensor: RequestInput, binary: bytes, max_batch: int) -> np.ndarray:
    """The input tensor as digits (n, 28, 28) in pixel units: uint8 as sent, FP32 scaled by 255."""
    n = batch_size(tensor.shape, max_batch)
    dtype = _DTYPES[tensor.datatype]
    declared = tensor.parameters.binary_data_size if tensor.parameters else None
    if declared is not None:
        values = _from_binary(tensor, binary, declared, n * PIXELS * dtype.itemsize, dtype)
    elif binary:
        raise BadRequest(
            f"{len(binary)} bytes follow the JSON header but input '{tensor.name}' has no "
            "parameters.binary_data_size: declare it, or send the tensor as JSON 'data'"
        )
    else:
        values = _from_json(tensor, n * PIXELS)
    return to_digits(values, tensor.datatype, n)


def dtype_of(datatype: str, name: str) -> np.dtype:
    """The numpy type of an accepted input datatype, or a 400 naming the accepted ones."""
    dtype = _DTYPES.get(datatype)
    if dtype is None:
        raise BadRequest(
            f"input '{name[:64]}' has datatype '{datatype[:16]}': send FP32 (pixel / 255 in [0, 1]) "
            "or UINT8 (pixels 0-255)"
        )
    return dtype


def to_digits(values: np.ndarray, datatype: str, n: int) -> np.ndarray:
    """n * 784 values of an input tensor as digits (n, 28, 28) in pixel units: UINT8 as sent, FP32 scaled by 255.

    Checks the range: whole numbers 0-255 for UINT8 (unless already uint8), finite [0, 1] for FP32.
    """
    if datatype == "UINT8":
        whole = values.dtype.kind != "f" or bool((values == np.floor(values)).all())
        if values.dtype != np.uint8 and not (values.min() >= 0 and values.max() <= 255 and whole):
            raise BadRequest("UINT8 input must hold whole numbers 0-255; for pixel / 255 in [0, 1] send datatype FP32")
        return values.astype(np.uint8, copy=False).reshape(n, 28, 28)
    if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        raise BadRequest(
            "FP32 input must hold pixel / 255, finite and in [0, 1]; for pixel values 0-255 send datatype UINT8"
        )
    return (values.astype(np.float32, copy=False) * np.float32(255.0)).reshape(n, 28, 28)


def _from_binary(tensor: RequestInput, binary: bytes, declared: int, expected: int, dtype: np.dtype) -> np.ndarray:
    if tensor.data is not None:
        raise BadRequest(f"input '{tensor.name}' has both JSON 'data' and binary_data_size: send one of them")
    if declared != expected:
        raise BadRequest(
            f"input '{tensor.name}' declares binary_data_size {declared} but shape {tensor.shape} of "
            f"{tensor.datatype} needs {expected} bytes"
        )
    if len(binary) != declared:
        raise BadRequest(
            f"input '{tensor.name}' declares binary_data_size {declared} but {len(binary)} bytes follow "
            "the JSON header: check Inference-Header-Content-Length and the data sent"
        )
    return np.frombuffer(binary, dtype=dtype)


def _from_json(tensor: RequestInput, expected: int) -> np.ndarray:
    if tensor.data is None:
        raise BadRequest(f"input '{tensor.name}' has no 'data': send the tensor as a JSON list or as binary data")
    try:
        values = np.asarray(tensor.data).ravel()
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(
            f"input '{tensor.name}' data is ragged or nested too deep: send numbers, flat or nested to match the shape"
        ) from None
    if values.size != expected:
        raise BadRequest(
            f"input '{tensor.name}' has {values.size} values but shape {tensor.shape} needs {expected}"
        )
    if values.dtype.kind not in "iuf":
        raise BadRequest(f"input '{tensor.name}' data must hold only numbers")
    return values


def requested_outputs(request: InferenceRequest) -> list[tuple[str, bool]]:
    """(output name, as binary?) in response order; both outputs when none are asked for."""
    default = bool(request.parameters and request.parameters.binary_data_output)
    asked = [(o.name, o.parameters.binary_data if o.parameters else None) for o in request.outputs or ()]
    return choose_outputs(asked, default)


def choose_outputs(asked: list[tuple[str, bool | None]], default: bool) -> list[tuple[str, bool]]:
    """(output name, as binary?) for the outputs a request names, each with its own choice of binary or
    `default`; every output (as `default`) when it names none. A 400 for an unknown or repeated name."""
    if not asked:
        return [(name, default) for name in OUTPUTS]
    chosen: list[tuple[str, bool]] = []
    for name, binary in asked:
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output '{name[:64]}': this model's outputs are {', '.join(OUTPUTS)}")
        if any(name == seen for seen, _ in chosen):
            raise BadRequest(f"output '{name}' is requested twice")
        chosen.append((name, default if binary is None else binary))
    return chosen


def output_tensors(probs: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    """Every output of the model as (datatype, little-endian array) for probabilities (n, 10)."""
    return {
        "probabilities": ("FP32", np.ascontiguousarray(probs, dtype="<f4")),
        "prediction": ("INT64", probs.argmax(axis=1).astype("<i8")),
    }


def encode_response(
    probs: np.ndarray, outputs: list[tuple[str, bool]], model_name: str, model_version: str, request_id: str | None
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is all JSON) of an inference response."""
    tensors = output_tensors(probs)
    described, tail = [], []
    for name, binary in outputs:
        datatype, array = tensors[name]
        if binary:
            raw = array.tobytes()
            tail.append(raw)
            described.append(
                ResponseOutput(name=name, shape=list(array.shape), datatype=datatype,
                               parameters={"binary_data_size": len(raw)})
            )
        else:
            data = array.ravel().tolist()
            described.append(ResponseOutput(name=name, shape=list(array.shape), datatype=datatype, data=data))
    response = InferenceResponse(model_name=model_name, model_version=model_version, id=request_id, outputs=described)
    header = response.model_dump_json(exclude_none=True).encode()
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)
