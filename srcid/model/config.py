"""The SRCID model configuration, validated at construction so a bad config fails before any tensor exists."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODALITIES = ("audio", "video", "text")
QUANTIZERS = ("vq", "rvq2", "rvq3", "rvq4", "fsq")


class ModalitySpec(BaseModel):
    """Per-step feature shape of one modality (e.g. audio (128,), video (7, 7, 512)); text carries a mask."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, ...]
    masked: bool = False

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"feature shape must be non-empty and positive, got {shape}")
        return shape

    @property
    def flat_dim(self) -> int:
        return math.prod(self.shape)


def paper_modalities() -> dict[str, ModalitySpec]:
    """The paper's features: VGGish audio, VGG19 pool5 video, BERT token vectors for text."""
    return {
        "audio": ModalitySpec(shape=(128,)),
        "video": ModalitySpec(shape=(7, 7, 512)),
        "text": ModalitySpec(shape=(768,), masked=True),
    }


class SRCIDConfig(BaseModel):
    """Everything that fixes the network's shapes and the losses' constants (DESIGN §3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: dict[str, ModalitySpec] = Field(default_factory=paper_modalities)
    T: int = Field(10, gt=0, description="time steps per clip")
    hidden: int = Field(256, gt=0)
    heads: int = Field(4, gt=0)
    ff: int = Field(1024, gt=0)
    transformer_layers: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_window: int | None = Field(
        None, ge=0, description="Φ attends only to steps this close (None: the whole clip, as the authors)"
    )
    layers: Literal[1, 2] = Field(2, description="1: layer 1 only (DCID baselines, SRCID-only1); 2: full SRCID")
    quantizer: Literal["vq", "rvq2", "rvq3", "rvq4", "fsq"] = "vq"
    codebook_size: int = Field(400, gt=0)
    fsq_levels: tuple[int, ...] = (5, 5, 4, 4)
    beta: float = Field(0.25, ge=0.0, description="commitment weight")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    ema_eps: float = Field(1e-5, gt=0.0)
    dead_code_steps: int = Field(100, ge=1, description="re-seed a code unused for this many updates")
    club_hidden: int = Field(256, gt=0)
    cpc_horizon: int = Field(1, ge=1, description="future steps CPC predicts")
    cpc_same_weight: float = Field(0.1, ge=0.0, description="weight of same-modality CPC pairs (cross-modal: 1)")
    lambda2: float = Field(0.3, ge=0.0, description="weight of the layer-2 losses once warm")
    w_recon: float = Field(1.0, ge=0.0)
    w_cpc: float = Field(1.0, ge=0.0)
    w_cmcm: float = Field(1.0, ge=0.0)
    w_mi: float = Field(1.0, ge=0.0)

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, mods: dict[str, ModalitySpec]) -> dict[str, ModalitySpec]:
        unknown = sorted(set(mods) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown modality {unknown}; choose from {list(MODALITIES)}")
        if not 2 <= len(mods) <= 3:
            raise ValueError(f"SRCID pairs two or three modalities, got {len(mods)}: {list(mods)}")
        # A fixed order keeps parameter names and code tables identical across configs written in any order.
        return {m: mods[m] for m in MODALITIES if m in mods}

    @model_validator(mode="after")
    def _consistent(self) -> "SRCIDConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.cpc_horizon >= self.T:
            raise ValueError(f"cpc_horizon={self.cpc_horizon} must be smaller than T={self.T}")
        if self.quantizer == "fsq":
            if any(level < 2 for level in self.fsq_levels):
                raise ValueError(f"fsq_levels need at least 2 levels each, got {self.fsq_levels}")
            if math.prod(self.fsq_levels) != self.codebook_size:
                raise ValueError(
                    f"fsq_levels {self.fsq_levels} give {math.prod(self.fsq_levels)} codes "
                    f"but codebook_size={self.codebook_size}"
                )
        return self

    @property
    def stages(self) -> int:
        """Codes per step on layer 1: n for RVQ-n, else 1."""
        return int(self.quantizer[3:]) if self.quantizer.startswith("rvq") else 1

    @property
    def embedding_dim(self) -> int:
        """Size of the retrieval embedding: concat of mean-pooled quantised vectors, one per layer."""
        return self.hidden * self.layers
