"""Typed request and response bodies: /docs is the API reference because of these."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from mnist_service.inference.runtime import CLASS_LABELS


class Prediction(BaseModel):
    prediction: int = Field(description="The predicted digit, 0-9.", examples=[7])
    label: str = Field(description="The class label of the prediction.", examples=["7"])
    confidence: float = Field(description="Probability of the predicted digit.", examples=[0.998])
    probabilities: list[float] = Field(description="Probabilities of digits 0-9; they sum to 1.")
    model_version: str = Field(description="The model version that answered (also the X-Model-Version header).")
    model_sha256: str = Field(description="sha256 of that version's model file.")
    image_png_base64: str | None = Field(
        None, description="With ?debug=1: the 28x28 image the model saw, as a base64 PNG."
    )


class Comparison(BaseModel):
    default_version: str | None = Field(description="The version that answers requests that name none.")
    agree: bool = Field(description="Whether every version predicted the same digit.")
    predictions: list[Prediction] = Field(description="One answer per loaded version, oldest first.")


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


class VersionInfo(BaseModel):
    model_config = {"protected_namespaces": ()}

    version: str = Field(description="The version number (its folder in the model repository).")
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE.")
    labels: list[str] = Field(description="stable and/or canary, when they point here.")
    reason: str | None = Field(None, description="Why an UNAVAILABLE version can't be served.")
    sha256: str | None = None
    test_accuracy: float | None = None
    created_at: str | None = None
    runtimes: list[str] = Field(
        default_factory=list, description="The runtimes its files allow: torchscript, and onnxruntime once it has an "
        "ONNX export (versions published before that have none).",
    )


class ModelInfo(BaseModel):
    """The default version's metadata file, as written by training (extra keys pass through), and
    every version the answering worker holds."""

    model_config = {"extra": "allow", "protected_namespaces": ()}

    model_version: str = Field(description="The default version: what answers requests that name none.")
    versions: list[VersionInfo]
    labels: dict[str, int] = Field(description="Labels and the versions they point at.")
    version: str = Field(description="sha256 of the default version's model file (the metadata's own field).")
    test_accuracy: float
    class_labels: list[str]
    input: dict[str, Any]
    macs: int | None = None
    torch_version: str | None = Field(None, description="The torch that trained and exported the model.")
    runtime: str = Field(description="What serves it (RUNTIME): torchscript or onnxruntime.")
    runtime_version: str = Field(description="That runtime's version: torch's or onnxruntime's.")
    created_at: str | None = None


def error_responses(model: type[BaseModel], descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error codes, all with the same body model."""
    return {code: {"model": model, "description": text} for code, text in descriptions.items()}


ERROR_RESPONSES = error_responses(
    ErrorResponse,
    {
        400: "Malformed request (wrong field or content type).",
        401: "Missing or wrong API key (only when API_KEY is set).",
        404: "Unknown or unloaded model version (?version=); the message lists the loaded ones.",
        413: "Upload or image too large.",
        415: "Unsupported content type.",
        422: "The content can't be used: not an image, blank, corrupt, or bad pixels.",
        500: "Inference failed; quote the request id.",
        503: "Overloaded or not ready; retry after the Retry-After seconds.",
    },
)


# ---- ground truth (docs/ground-truth.md) -------------------------------------------------------

_CLASSES = len(CLASS_LABELS)


class FeedbackRequest(BaseModel):
    request_id: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$",
        description="The prediction's request id: its X-Request-ID response header.", examples=["3f2a9c0d4e5b6a7f"],
    )
    label: int = Field(ge=0, le=_CLASSES - 1, description="What the digit really was.", examples=[7])
    item: int = Field(
        0, ge=0, description="Which image of a request that sent several (/predict/batch, v2 with N > 1), from 0."
    )


class FeedbackReceipt(BaseModel):
    model_config = {"protected_namespaces": ()}

    request_id: str = Field(description="The request the label belongs to.")
    item: int = Field(description="Which of its images.")
    label: int = Field(description="The label stored.")
    prediction: int = Field(description="What the model answered.")
    model_version: str = Field(description="The version that answered.")
    correct: bool = Field(description="Whether the answer was the label.")
    replaced: bool = Field(description="True when this label replaced an earlier one for the same image.")
    previous_label: int | None = Field(None, description="The label replaced, if any.")
    detail: str = Field(description="What happened, in words.")


class CapturedImage(BaseModel):
    model_config = {"protected_namespaces": ()}

    item: int = Field(description="Its place in the request, from 0.")
    captured_at: float = Field(description="When, in Unix seconds.")
    route: str = Field(description="The front door it came through.")
    model_version: str = Field(description="The version that answered.")
    prediction: int
    probabilities: list[float]
    label: int | None = Field(None, description="What a user said it was, if anyone did.")
    image_png_base64: str = Field(description="The 28x28 image the model saw, as a base64 PNG: all that is kept.")


class Erasure(BaseModel):
    request_id: str
    deleted: int = Field(description="Captured images deleted (one per image of the request).")
