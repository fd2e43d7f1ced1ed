"""L_cmcm (Liu et al. 2021): cross-modal code matching over soft code distributions."""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_code_log_distribution(z: Tensor, valid: Tensor, codebook: Tensor) -> Tensor:
    """log of mean_t softmax(-‖z_t - e_k‖) over valid steps: z [B, T, H], valid [B, T], codebook [K, H] -> [B, K].

    Averaging probabilities over T is done in log space (log-sum-exp), so no probability underflows.
    """
    dist = torch.cdist(z.float(), codebook.float().unsqueeze(0).expand(z.shape[0], -1, -1))
    log_p = F.log_softmax(-dist, dim=-1)
    log_w = torch.where(valid, 0.0, -math.inf).unsqueeze(-1)
    return torch.logsumexp(log_p + log_w, dim=1) - torch.log(valid.sum(1, keepdim=True).clamp_min(1).float())


def cmcm_loss(z: dict[str, Tensor], valid: dict[str, Tensor], codebook: Tensor) -> Tensor:
    """For each modality pair (x, y): S[i, j] = Σ_k p_x[i,k]·log p_y[j,k] + p_y[j,k]·log p_x[i,k];
    InfoNCE over rows with the diagonal as positives; averaged over pairs. z: {m: [B, T, H]}."""
    log_p = {m: clip_code_log_distribution(z[m], valid[m], codebook) for m in z}
    pairs = list(combinations(z, 2))
    total = 0.0
    for x, y in pairs:
        scores = log_p[x].exp() @ log_p[y].t() + log_p[x] @ log_p[y].exp().t()
        labels = torch.arange(scores.shape[0], device=scores.device)
        total = total + F.cross_entropy(scores, labels)
    return total / len(pairs)
