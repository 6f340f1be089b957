"""Typed request and response bodies: /docs is the API reference because of these."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    prediction: int = Field(description="The predicted digit, 0-9.", examples=[7])
    label: str = Field(description="The class label of the prediction.", examples=["7"])
    confidence: float = Field(description="Probability of the predicted digit.", examples=[0.998])
    probabilities: list[float] = Field(description="Probabilities of digits 0-9; they sum to 1.")
    model_version: str = Field(description="sha256 of the model file that answered.")
    image_png_base64: str | None = Field(
        None, description="With ?debug=1: the 28x28 image the model saw, as a base64 PNG."
    )


_PIXEL = {"type": "integer", "minimum": 0, "maximum": 255}


class PixelsRequest(BaseModel):
    # Typed loosely here and checked by preprocess.pixels_to_digit, which says exactly what is
    # wrong ("got shape [2]") where a union type's validation errors would be a riddle.
    pixels: list[Any] = Field(
        description="784 integers 0-255, flat or as 28 rows of 28; white digit on black, used as given.",
        examples=[[0] * 784],
        json_schema_extra={
            "items": {"anyOf": [_PIXEL, {"type": "array", "items": _PIXEL, "minItems": 28, "maxItems": 28}]},
            "minItems": 28,
            "maxItems": 784,
        },
    )


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong and what to do about it.")
    request_id: str | None = Field(None, description="Quote this when reporting a problem.")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(description="'ready', 'loading' or 'draining'.", examples=["ready"])
    model_version: str | None = None


class ModelInfo(BaseModel):
    """The model's metadata file, as written by training (extra keys pass through)."""

    model_config = {"extra": "allow", "protected_namespaces": ()}

    version: str
    test_accuracy: float
    class_labels: list[str]
    input: dict[str, Any]
    macs: int | None = None
    torch_version: str | None = None
    created_at: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed request (wrong field or content type).",
        401: "Missing or wrong API key (only when API_KEY is set).",
        413: "Upload or image too large.",
        415: "Unsupported content type.",
        422: "The content can't be used: not an image, blank, corrupt, or bad pixels.",
        500: "Inference failed; quote the request id.",
        503: "Overloaded or not ready; retry after the Retry-After seconds.",
    }.items()
}
