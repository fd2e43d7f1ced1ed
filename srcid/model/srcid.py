"""SRCID: two layers of cross-modal information disentanglement; layer 2 works on layer 1's modal-specific results.

Per modality m and layer l: z = Φ(x) is quantised with the layer's shared codebook (codes c, vectors q), s = Ψ(x)
keeps what is specific to m, and a decoder rebuilds x from [q ; s]. Layer 1 reads the input features; layer 2 reads
s¹ (the semantic residual) and rebuilds it. The retrieval embedding is concat(mean_t q¹, mean_t q²), L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .club import CLUB
from .cmcm import cmcm_loss
from .config import SRCIDConfig
from .cpc import CrossModalCPC
from .encoders import Decoder, GeneralEncoder, SpecificEncoder
from .losses import cross_modal_commitment, masked_mse
from .quantizers import build_quantizer, code_usage


@dataclass
class LayerOutput:
    """What one layer computed for every modality; each dict is keyed by modality."""

    z: dict[str, Tensor]  # modal-general, before quantisation [B, T, H]
    s: dict[str, Tensor]  # modal-specific [B, T, H]
    q: dict[str, Tensor]  # quantised z, straight-through [B, T, H]
    codes: dict[str, Tensor]  # [B, T, S]
    recon: dict[str, Tensor]  # decoder output [B, T, *shape]
    target: dict[str, Tensor]  # what the decoder rebuilds [B, T, *shape]


@dataclass
class SRCIDOutput:
    layers: list[LayerOutput]
    valid: dict[str, Tensor]  # [B, T] bool


class SRCIDLayer(nn.Module):
    """One layer: Φ_m, Ψ_m, a decoder and a CLUB estimator per modality, one shared quantiser, cross-modal CPC."""

    def __init__(self, cfg: SRCIDConfig, shapes: dict[str, tuple[int, ...]], quantizer: str):
        super().__init__()
        H = cfg.hidden
        self.general = nn.ModuleDict(
            {m: GeneralEncoder(shp, H, cfg.heads, cfg.ff, cfg.transformer_layers, cfg.T, cfg.dropout,
                               cfg.attention_window)
             for m, shp in shapes.items()}
        )
        self.specific = nn.ModuleDict({m: SpecificEncoder(shp, H) for m, shp in shapes.items()})
        self.decoder = nn.ModuleDict({m: Decoder(shp, H) for m, shp in shapes.items()})
        self.club = nn.ModuleDict({m: CLUB(H, H, cfg.club_hidden) for m in shapes})
        self.quantizer = build_quantizer(
            quantizer, cfg.codebook_size, H, cfg.ema_decay, cfg.ema_eps, cfg.dead_code_steps, cfg.fsq_levels
        )
        self.cpc = CrossModalCPC(list(shapes), H, cfg.cpc_horizon, cfg.cpc_same_weight)
        self.cfg = cfg

    def encode_modality(self, m: str, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, T, *shape], valid [B, T] -> z, s, q (straight-through) [B, T, H], codes [B, T, S]."""
        z = self.general[m](x, valid)
        s = self.specific[m](x)
        B, T, H = z.shape
        q, codes = self.quantizer(z.reshape(B * T, H))
        return z, s, q.view(B, T, H), codes.view(B, T, -1)

    def forward(
        self, x: dict[str, Tensor], valid: dict[str, Tensor], target: dict[str, Tensor] | None = None
    ) -> LayerOutput:
        """target: what the decoders rebuild, x itself unless given."""
        z, s, q, codes, recon = {}, {}, {}, {}, {}
        for m in self.general:
            z[m], s[m], q[m], codes[m] = self.encode_modality(m, x[m], valid[m])
            recon[m] = self.decoder[m](q[m], s[m])
        return LayerOutput(z, s, q, codes, recon, target=x if target is None else target)

    def losses(
        self, out: LayerOutput, valid: dict[str, Tensor], t: Tensor, perm: Tensor, with_cmcm: bool
    ) -> dict[str, Tensor]:
        """The layer's loss terms (unweighted) and figures. t: CPC step; perm [B]: the batch shuffle for CLUB."""
        terms = {
            "recon": sum(masked_mse(out.recon[m], out.target[m], valid[m]) for m in out.z),
            "mi": torch.stack([self._mi(m, out, valid, perm) for m in out.z]).mean(),
        }
        terms["commit"] = (
            cross_modal_commitment(out.z, out.q, valid, self.cfg.beta)
            if self.quantizer.uses_commitment
            else torch.zeros((), device=t.device)
        )
        terms["cpc"], terms["cpc_acc"] = self.cpc(out.z, valid, t)
        if with_cmcm:
            terms["cmcm"] = cmcm_loss(out.z, valid, self.quantizer.codebook())
        return terms

    def _mi(self, m: str, out: LayerOutput, valid: dict[str, Tensor], perm: Tensor) -> Tensor:
        # Shuffle across the batch at the same step: s' is another clip's specific result at t.
        z, s, w = out.z[m].flatten(0, 1), out.s[m].flatten(0, 1), valid[m].flatten().float()
        s_shuffled = out.s[m][perm].flatten(0, 1)
        return self.club[m].mi_upper_bound(z.float(), s.float(), s_shuffled.float(), w)

    def club_nll(self, out: LayerOutput, valid: dict[str, Tensor]) -> Tensor:
        """Negative log-likelihood of q_θ(s | z) on detached pairs: what the CLUB estimators are fitted on."""
        return -sum(
            self.club[m].log_likelihood(
                out.z[m].detach().flatten(0, 1).float(),
                out.s[m].detach().flatten(0, 1).float(),
                valid[m].flatten().float(),
            )
            for m in out.z
        )

    @torch.no_grad()
    def update_codebook(self, out: LayerOutput, valid: dict[str, Tensor]) -> None:
        H = self.cfg.hidden
        self.quantizer.update(
            {m: z.detach().reshape(-1, H) for m, z in out.z.items()},
            {m: c.reshape(-1, c.shape[-1]) for m, c in out.codes.items()},
            {m: v.flatten() for m, v in valid.items()},
        )

    def usage(self, out: LayerOutput, valid: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Codebook usage and perplexity over the batch, all modalities pooled (first stage for RVQ)."""
        idx = torch.cat([out.codes[m][..., 0].flatten() for m in out.codes])
        return code_usage(idx, torch.cat([valid[m].flatten() for m in out.codes]), self.quantizer.size)


class SRCID(nn.Module):
    """The full model. `forward` runs every encoder once; `losses`, `club_nll` and `update_codebooks` reuse it."""

    def __init__(self, cfg: SRCIDConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        self.layer1 = SRCIDLayer(cfg, {m: spec.shape for m, spec in cfg.modalities.items()}, cfg.quantizer)
        # Layer 2 is plain VQ: the baselines swap only layer 1's quantiser.
        self.layer2 = (
            SRCIDLayer(cfg, {m: (cfg.hidden,) for m in self.modalities}, "vq") if cfg.layers == 2 else None
        )

    def layers(self) -> list[SRCIDLayer]:
        return [self.layer1] if self.layer2 is None else [self.layer1, self.layer2]

    def club_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers() for p in layer.club.parameters()]

    def main_parameters(self) -> list[nn.Parameter]:
        club = {id(p) for p in self.club_parameters()}
        return [p for p in self.parameters() if id(p) not in club]

    def valid_mask(self, modality: str, x: Tensor, mask: Tensor | None) -> Tensor:
        """Check x [B, T, *shape] against the config; return [B, T] bool: the mask, or all-true when there is none."""
        expected = (self.cfg.T, *self.cfg.modalities[modality].shape)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{modality} features have shape {tuple(x.shape)}, expected [B, {', '.join(map(str, expected))}]"
            )
        if mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{modality} mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}")
        return mask.bool()

    def valid_masks(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [m for m in self.modalities if m not in batch]
        if missing:
            raise ValueError(f"batch has no features for {missing} (model modalities: {self.modalities})")
        return {m: self.valid_mask(m, batch[m], batch.get(f"{m}_mask")) for m in self.modalities}

    def forward(self, batch: dict[str, Tensor]) -> SRCIDOutput:
        valid = self.valid_masks(batch)
        out1 = self.layer1({m: batch[m] for m in self.modalities}, valid)
        layers = [out1]
        if self.layer2 is not None:
            # Layer 2 rebuilds s¹ but must not pull s¹ towards whatever is easy to rebuild.
            layers.append(self.layer2(out1.s, valid, target={m: s.detach() for m, s in out1.s.items()}))
        return SRCIDOutput(layers, valid)

    def losses(self, out: SRCIDOutput, t: Tensor, perm: Tensor, layer2_weight: Tensor) -> dict[str, Tensor]:
        """All loss terms and figures, keyed `l1_recon`, `l2_mi`, ..., plus `loss` (what to minimise).

        layer2_weight: 0-dim tensor, λ₂ once warm and 0 before, so the switch needs no host synchronisation.
        """
        cfg = self.cfg
        figures: dict[str, Tensor] = {}
        total = torch.zeros((), device=t.device)
        for i, layer in enumerate(self.layers()):
            terms = layer.losses(out.layers[i], out.valid, t, perm, with_cmcm=(i == 0))
            loss = (
                cfg.w_recon * terms["recon"]
                + terms["commit"]
                + cfg.w_cpc * terms["cpc"]
                + cfg.w_mi * terms["mi"]
                + cfg.w_cmcm * terms.get("cmcm", 0.0)
            )
            total = total + (loss if i == 0 else layer2_weight * loss)
            usage, perplexity = layer.usage(out.layers[i], out.valid)
            figures.update({f"l{i + 1}_{k}": v.detach() for k, v in terms.items()})
            figures[f"l{i + 1}_usage"], figures[f"l{i + 1}_perplexity"] = usage, perplexity
        figures["loss"] = total
        return figures

    def club_nll(self, out: SRCIDOutput, layer2_weight: Tensor) -> Tensor:
        nll = self.layer1.club_nll(out.layers[0], out.valid)
        if self.layer2 is not None:
            # Layer-2 CLUB fitting joins with the layer-2 losses.
            nll = nll + (layer2_weight > 0).float() * self.layer2.club_nll(out.layers[1], out.valid)
        return nll

    @torch.no_grad()
    def update_codebooks(self, out: SRCIDOutput) -> None:
        for i, layer in enumerate(self.layers()):
            layer.update_codebook(out.layers[i], out.valid)

    @torch.no_grad()
    def quantized_steps(
        self, modality: str, x: Tensor, mask: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Per-step codes and quantised vectors of one modality, what probes and retrieval are built on.

        x [B, T, *shape], mask [B, T] bool (masked modalities) -> (codes per layer [B, T, S], vectors
        concat(q¹, q²) [B, T, H·layers], valid [B, T]).
        """
        if modality not in self.cfg.modalities:
            raise ValueError(f"unknown modality {modality!r}; this model encodes {self.modalities}")
        valid = self.valid_mask(modality, x, mask)
        codes, vectors = [], []
        h = x
        for layer in self.layers():
            _, s, _, c = layer.encode_modality(modality, h, valid)
            codes.append(c)
            vectors.append(layer.quantizer.decode(c))
            h = s  # layer 2 reads layer 1's modal-specific result
        return codes, torch.cat(vectors, -1), valid

    @torch.no_grad()
    def encode(self, modality: str, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Features of one modality -> codes and retrieval embedding; deterministic in eval mode.

        x [B, T, *shape], mask [B, T] bool (masked modalities) -> {"layer1": [B, T], "layer2": [B, T] (two-layer
        models), "embedding": [B, E]}: the embedding is concat(mean_t q¹, mean_t q²) over valid steps,
        L2-normalised. Layer-1 codes of RVQ-n are the first stage; all stages are "layer1_stages".
        """
        codes, vectors, valid = self.quantized_steps(modality, x, mask)
        result = {f"layer{i + 1}": c[..., 0] for i, c in enumerate(codes)}
        if codes[0].shape[-1] > 1:
            result["layer1_stages"] = codes[0]
        w = valid.unsqueeze(-1).float()
        result["embedding"] = F.normalize((vectors * w).sum(1) / w.sum(1).clamp_min(1), dim=-1)
        return result
