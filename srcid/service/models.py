"""Request and response bodies of the HTTP API (DESIGN §7), as pydantic v2 models; they make /openapi.json."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, WrapValidator, model_validator

Modality = Literal["audio", "video", "text"]
INPUT_FIELDS = ("text", "audio_b64", "video_b64", "frames_b64", "features", "features_b64")
FEATURE_FIELDS = ("features", "features_b64")


def _array_or_list(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A features list the body parser already made an array of (srcid/service/bodies.py) stays one."""
    return value if isinstance(value, np.ndarray) else handler(value)


# In the schema a nested list; in a request parsed by srcid/service/bodies.py, a rectangular one of numbers comes
# as a float64 array of its shape.
FeatureList = Annotated[list[Any], WrapValidator(_array_or_list)]

ONE_INPUT = [{"required": [f]} for f in INPUT_FIELDS]
MASK_NEEDS_FEATURES = {"mask": {"anyOf": [{"required": [f]} for f in FEATURE_FIELDS]}}


class InputFields(BaseModel):
    """One INPUT: exactly one of the six fields below (`mask` goes with either kind of features)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": ONE_INPUT, "dependencies": MASK_NEEDS_FEATURES})

    # Typed without None so the schema says "give it or leave it out" (null is refused); None means absent.
    text: str = Field(None, description="text; one word per step (at most T words)")  # type: ignore[assignment]
    audio_b64: str = Field(None, description="a WAV/FLAC/OGG file, base64")  # type: ignore[assignment]
    video_b64: str = Field(None, description="an MP4/WebM file, base64")  # type: ignore[assignment]
    frames_b64: list[str] = Field(None, description="base64 PNG/JPEG frames, one per second")  # type: ignore[assignment]
    features: FeatureList = Field(None, description="precomputed features, nested list [T][D...]")  # type: ignore[assignment]
    features_b64: str = Field(None, description="precomputed features [T][D...] as little-endian float32 bytes, "  # type: ignore[assignment]
                              "row-major, base64: the same input as `features`, smaller and cheaper to parse")
    mask: list[bool] = Field(None, description="with features of a masked modality: [T], true = real step")  # type: ignore[assignment]

    @cached_property  # a request asks several times; the fields do not change once validated
    def kind(self) -> str:
        """Which of INPUT_FIELDS this input gives."""
        return next(f for f in INPUT_FIELDS if getattr(self, f) is not None)

    @model_validator(mode="after")
    def _exactly_one(self) -> "InputFields":
        return _check_one_input(self)


def _check_one_input(model: InputFields) -> Any:
    given = [f for f in INPUT_FIELDS if getattr(model, f) is not None]
    if len(given) != 1:
        raise ValueError(f"an input needs exactly one of {list(INPUT_FIELDS)}, got {given or 'none'}")
    if model.mask is not None and model.kind not in FEATURE_FIELDS:
        raise ValueError("mask goes only with features or features_b64")
    return model


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Modality
    inputs: list[InputFields] = Field(min_length=1, description="one or more inputs of that modality")
    return_embedding: bool = Field(False, description="add each input's retrieval embedding [E]")


class EncodedItem(BaseModel):
    layer1: list[int] = Field(description="layer-1 code per step [T]")
    layer2: list[int] = Field(description="layer-2 code per step [T]")
    embedding: list[float] | None = Field(None, description="L2-normalised retrieval embedding [E]")


class EncodeResponse(BaseModel):
    bundle: str = Field(description="id of the bundle that made the codes")
    items: list[EncodedItem]


class Query(InputFields):
    """By content (`modality` and one INPUT) or by a catalog item (`item_id`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["item_id"]}, {"required": ["modality"], "oneOf": ONE_INPUT}],
        "dependencies": MASK_NEEDS_FEATURES})

    modality: Modality = None  # type: ignore[assignment]
    item_id: str = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _exactly_one(self) -> "Query":
        given = [f for f in INPUT_FIELDS if getattr(self, f) is not None]
        if self.item_id is not None:
            if given or self.modality is not None:
                raise ValueError("a query by item_id takes no modality or input")
            return self
        if self.modality is None:
            raise ValueError("a query needs item_id, or modality and one input")
        return _check_one_input(self)


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Query
    target: Modality
    top_k: int = Field(10, ge=1, le=1000)


class RetrieveResult(BaseModel):
    id: str
    score: float = Field(description="cosine similarity of the retrieval embeddings")
    modality: Modality
    metadata: dict[str, Any]


class RetrieveResponse(BaseModel):
    results: list[RetrieveResult] = Field(description="best first")


class NewItem(InputFields):
    id: str = Field(min_length=1, max_length=512)
    modality: Modality
    metadata: dict[str, Any] = Field(default_factory=dict)


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[NewItem] = Field(min_length=1)


class AddItemsResponse(BaseModel):
    added: list[str]


class ItemResponse(BaseModel):
    id: str
    modality: Modality
    metadata: dict[str, Any]
    codes: dict[str, list[int]]
    embedding: list[float] | None = None


class DeleteResponse(BaseModel):
    deleted: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        400: "bad input (wrong modality, bad base64, undecodable media, wrong feature shape, NaN, empty)",
        401: "missing or wrong API key",
        404: "unknown id",
        413: "body too large",
        422: "request body of the wrong shape",
        429: "overloaded: the encode queue is full",
        503: "not ready (bundle or index still loading) or the catalog is unreachable",
    }.items()
}
