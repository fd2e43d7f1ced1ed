"""Per-modality networks: the modal-general encoder Φ, the modal-specific encoder Ψ, and the decoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FeatureStem(nn.Module):
    """Flatten each step's features and project them: [B, T, *shape] -> [B, T, H]."""

    def __init__(self, shape: tuple[int, ...], hidden: int):
        super().__init__()
        self.shape = tuple(shape)
        self.proj = nn.Linear(math.prod(shape), hidden)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) != self.shape:
            raise ValueError(f"features have per-step shape {tuple(x.shape[2:])}, expected {self.shape}")
        return self.proj(x.flatten(2))


class GeneralEncoder(nn.Module):
    """Φ: Linear to H, learned positions, then a transformer encoder. [B, T, *shape] -> z [B, T, H]."""

    def __init__(
        self, shape: tuple[int, ...], hidden: int, heads: int, ff: int, layers: int, T: int, dropout: float,
        window: int | None = None,
    ):
        super().__init__()
        self.stem = FeatureStem(shape, hidden)
        self.position = nn.Parameter(torch.zeros(T, hidden))
        # window: each step attends only to steps at most this far away (None: the whole clip, as the authors).
        steps = torch.arange(T)
        far = (steps[:, None] - steps[None, :]).abs() > window if window is not None else torch.zeros(T, T, dtype=torch.bool)
        self.register_buffer("far", far, persistent=False)
        self.register_buffer("not_self", steps[:, None] != steps[None, :], persistent=False)
        self.heads = heads
        layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout, batch_first=True, norm_first=True)
        # No nested-tensor fast path: it changes numerics with the padding pattern, breaking batch invariance.
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x [B, T, *shape], valid [B, T] bool -> z [B, T, H]."""
        T = x.shape[1]
        h = self.stem(x) + self.position[:T]
        # A query may not look at padded keys nor outside its window, but always at itself: a row with no allowed
        # key gives NaN, and the next layer spreads it to every step (0 attention weight times a NaN value).
        blocked = (self.far[:T, :T] | ~valid[:, None, :]) & self.not_self[:T, :T]
        mask = blocked.repeat_interleave(self.heads, dim=0)
        return self.norm(self.transformer(h, mask=mask))


class SpecificEncoder(nn.Module):
    """Ψ: a per-step MLP. [B, T, *shape] -> s [B, T, H]."""

    def __init__(self, shape: tuple[int, ...], hidden: int):
        super().__init__()
        self.stem = FeatureStem(shape, hidden)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.stem(x))


class Decoder(nn.Module):
    """Reconstruct a step's input from [q ; s]: [B, T, 2H] -> [B, T, *shape]."""

    def __init__(self, shape: tuple[int, ...], hidden: int):
        super().__init__()
        self.shape = tuple(shape)
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, math.prod(shape))
        )

    def forward(self, q: Tensor, s: Tensor) -> Tensor:
        out = self.mlp(torch.cat([q, s], -1))
        return out.view(*out.shape[:2], *self.shape)
