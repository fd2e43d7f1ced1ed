"""The per-modality encoder graph that a bundle ships: a thin wrapper whose forward is `SRCID.encode`.

Both the ONNX export and the torch backends run this module, so every backend returns the same outputs with the
same meaning, and `SRCID.encode` stays the one definition of what encoding is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model import SRCID

# A one-layer model has no layer-2 codes; its `layer2` output is this value at every step (never a valid code).
NO_CODE = -1


def output_names(model: SRCID) -> list[str]:
    """Names of the graph's outputs, in order; RVQ-n models add every stage's layer-1 code."""
    names = ["layer1", "layer2", "embedding"]
    if model.cfg.stages > 1:
        names.append("layer1_stages")
    return names


def input_names(model: SRCID, modality: str) -> list[str]:
    return ["features", "mask"] if model.cfg.modalities[modality].masked else ["features"]


class EncoderGraph(nn.Module):
    """features [B, T, *shape] float32 (+ mask [B, T] bool for masked modalities) ->
    layer1 [B, T] int64, layer2 [B, T] int64 (NO_CODE for one-layer models), embedding [B, E] float32
    (L2-normalised), and layer1_stages [B, T, n] int64 for RVQ-n."""

    def __init__(self, model: SRCID, modality: str):
        super().__init__()
        self.model = model
        self.modality = modality

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        out = self.model.encode(self.modality, features, mask)
        layer2 = out["layer2"] if "layer2" in out else torch.full_like(out["layer1"], NO_CODE)
        result = (out["layer1"], layer2, out["embedding"])
        if "layer1_stages" in out:
            result += (out["layer1_stages"],)
        return result
