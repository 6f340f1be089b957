"""Open Inference Protocol messages over gRPC <-> numpy: pure functions on the generated messages.

The checks and the outputs REST's v2 codec (serving/v2_codec.py) defines are the same here: accepted
shapes and datatypes, value ranges, output names. A tensor travels either typed (`contents`) or as
little-endian bytes (`raw_input_contents`, as tritonclient sends it); the answer comes back the same
way (`raw_output_contents` for raw inputs), unless the request's `binary_data_output` parameter says.
"""

from __future__ import annotations

import numpy as np

from mnist_service.errors import BadRequest
from mnist_service.protos import grpc_predict_v2_pb2 as pb
from mnist_service.serving import v2_codec

# The typed field of InferTensorContents that holds each datatype's values.
_CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents", "INT64": "int64_contents"}
_TYPED = {"FP32": np.float32, "UINT8": np.uint32}


def decode_request(request: pb.ModelInferRequest, max_batch: int) -> np.ndarray:
    """The request's one input tensor as digits (n, 28, 28) in pixel units; a 400 that says what is wrong."""
    if len(request.inputs) != 1:
        raise BadRequest(f"the request has {len(request.inputs)} input tensors: send exactly one")
    tensor = request.inputs[0]
    name = tensor.name[:64]
    dtype = v2_codec.dtype_of(tensor.datatype, name)
    shape = list(tensor.shape)
    n = v2_codec.batch_size(shape, max_batch)
    expected = n * v2_codec.PIXELS
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadRequest(f"{len(request.raw_input_contents)} raw_input_contents for one input: send one")
        if tensor.contents.ListFields():
            raise BadRequest(f"input '{name}' has both contents and raw_input_contents: send one of them")
        raw = request.raw_input_contents[0]
        if len(raw) != expected * dtype.itemsize:
            raise BadRequest(
                f"input '{name}' has {len(raw)} bytes in raw_input_contents but shape {shape[:8]} of "
                f"{tensor.datatype} needs {expected * dtype.itemsize} (little-endian)"
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        field = _CONTENTS[tensor.datatype]
        typed = getattr(tensor.contents, field)
        if len(typed) != expected:
            raise BadRequest(
                f"input '{name}' has {len(typed)} values in contents.{field} but shape {shape[:8]} needs {expected}; "
                f"{tensor.datatype} values go in contents.{field}, or all of them as bytes in raw_input_contents"
            )
        values = np.fromiter(typed, dtype=_TYPED[tensor.datatype], count=expected)
    return v2_codec.to_digits(values, tensor.datatype, n)


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The outputs to answer with, in order: those the request names, or every one; a 400 for an unknown name."""
    return [name for name, _ in v2_codec.choose_outputs([(o.name, None) for o in request.outputs], False)]


def wants_raw(request: pb.ModelInferRequest) -> bool:
    """Answer in raw_output_contents: when the inputs came raw, unless the request's binary_data_output says."""
    chosen = request.parameters.get("binary_data_output")
    if chosen is not None and chosen.WhichOneof("parameter_choice") == "bool_param":
        return chosen.bool_param
    return bool(request.raw_input_contents)


def encode_response(
    probs: np.ndarray, outputs: list[str], raw: bool, model_name: str, model_version: str, request_id: str
) -> pb.ModelInferResponse:
    """The answer for probabilities (n, 10): the named outputs, all typed or all raw, as the protocol says."""
    tensors = v2_codec.output_tensors(probs)
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for name in outputs:
        datatype, array = tensors[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(array.tobytes())
        else:
            getattr(tensor.contents, _CONTENTS[datatype]).extend(array.ravel().tolist())
    return response
