"""Typed bodies of the Open Inference Protocol (KServe v2 / Triton HTTP), as this server speaks it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

# Numbers only: the protocol's JSON tensors hold numbers, and a typed item schema lets a fuzzer
# and /docs know that. Nesting (a row-major array of arrays) is allowed and flattened.
_TENSOR_DATA = {
    "type": "array",
    "items": {"anyOf": [{"type": "number"}, {"type": "array", "items": {}}]},
}


class ServerMetadata(BaseModel):
    name: str = Field(examples=["mnist-service"])
    version: str = Field(examples=["1.0.0"])
    extensions: list[str] = Field(description="Protocol extensions supported.", examples=[["binary_tensor_data"]])


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: str | None = None
    ready: bool


class RepositoryIndexEntry(BaseModel):
    """One model version in the repository extension's index, as Triton lists them."""

    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE.")
    reason: str = Field("", description="Why a version is not READY.")


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks the batch dimension.")
    parameters: dict[str, Any] | None = Field(None, description="What else this tensor accepts.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="The one loaded version: the sha256 of the model file.")
    platform: str = Field(examples=["pytorch_torchscript"])
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = None


class InputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_size: NonNegativeInt | None = Field(
        None, description="Binary tensor data extension: this input's bytes follow the JSON header."
    )


class RequestInput(BaseModel):
    name: str = Field(description="Any name; the model has one input (documented as 'input').", examples=["input"])
    shape: list[int] = Field(
        description="[N, 1, 28, 28], [N, 28, 28] or [N, 784], 1 <= N <= MAX_BATCH_FILES.",
        examples=[[1, 784]],
    )
    datatype: Literal["FP32", "UINT8"] = Field(
        description="FP32: pixel / 255 in [0, 1]. UINT8: pixels 0-255. White digit on black.", examples=["UINT8"]
    )
    parameters: InputParameters | None = None
    data: list[Any] | None = Field(
        None,
        description="The tensor, row-major, flat or nested. Leave out when sending binary data.",
        json_schema_extra=_TENSOR_DATA,
    )


class OutputParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data: bool | None = Field(None, description="Return this output as binary data after the JSON header.")


class RequestOutput(BaseModel):
    name: Literal["probabilities", "prediction"]
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_output: bool | None = Field(None, description="Default for every output's binary_data.")


class InferenceRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response.", max_length=1024)
    parameters: RequestParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1, description="Exactly one input tensor.")
    outputs: list[RequestOutput] | None = Field(
        None, description="Outputs to return; both 'probabilities' and 'prediction' when left out."
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | list[int] | None = Field(None, description="Flat, row-major; absent when sent as binary.")


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class V2Error(BaseModel):
    error: str = Field(description="What went wrong and what to do about it.")
