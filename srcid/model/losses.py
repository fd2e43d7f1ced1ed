"""Reconstruction and the cross-modal commitment loss, both masked over padded steps."""

from __future__ import annotations

from torch import Tensor


def masked_mse(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error over valid steps; pred/target [B, T, *shape], valid [B, T]."""
    err = (pred.float() - target.float()).pow(2).flatten(2).mean(-1)
    w = valid.float()
    return (err * w).sum() / w.sum().clamp_min(1)


def cross_modal_commitment(z: dict[str, Tensor], q: dict[str, Tensor], valid: dict[str, Tensor], beta: float) -> Tensor:
    """β·(2‖z_m − sg(q_m)‖² + Σ_o w_o‖z_m − sg(q_o)‖²) summed over modalities m, with partner weights summing to 1
    (0.5 each for two partners, as the authors). z, q: {m: [B, T, H]}; a partner term counts only where both are valid.
    """
    names = list(z)
    share = 1.0 / (len(names) - 1)
    total = 0.0
    for m in names:
        total = total + 2 * masked_mse(z[m], q[m].detach(), valid[m])
        for o in names:
            if o != m:
                total = total + share * masked_mse(z[m], q[o].detach(), valid[m] & valid[o])
    return beta * total
