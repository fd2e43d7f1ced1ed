"""Cross-modal contrastive predictive coding (Oord et al. 2018) on the pre-quantisation z."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CrossModalCPC(nn.Module):
    """An LSTM per modality summarises z up to step t; linear heads predict the next `horizon` steps of every
    modality (itself included, at a lower weight). InfoNCE scores each prediction against the same step of the
    other batch items.
    """

    def __init__(self, modalities: list[str], hidden: int, horizon: int, same_weight: float):
        super().__init__()
        self.modalities, self.hidden, self.horizon, self.same_weight = list(modalities), hidden, horizon, same_weight
        self.lstm = nn.ModuleDict({m: nn.LSTM(hidden, hidden, batch_first=True) for m in self.modalities})
        self.heads = nn.ModuleDict(
            {f"{m}_to_{n}": nn.Linear(hidden, hidden * horizon) for m in self.modalities for n in self.modalities}
        )

    def forward(self, z: dict[str, Tensor], valid: dict[str, Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
        """z: {m: [B, T, H]}, valid: {m: [B, T] bool}, t: 0-dim long tensor, 0 <= t < T - horizon.

        Returns (loss, accuracy of the cross-modal predictions); no host synchronisation.
        """
        # Recurrent kernels have no bf16 path on every backend (oneDNN's CPU LSTM refuses it): run CPC in fp32.
        with torch.autocast(device_type=t.device.type, enabled=False):
            return self._infonce(z, valid, t)

    def _infonce(self, z: dict[str, Tensor], valid: dict[str, Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
        B = next(iter(z.values())).shape[0]
        labels = torch.arange(B, device=t.device)
        # The LSTM is causal, so one pass over all T gives the context at every step; take step t.
        context = {m: self.lstm[m](z[m].float())[0].index_select(1, t.view(1)).squeeze(1) for m in self.modalities}
        total, weight_sum, correct, cross_count = 0.0, 0.0, 0.0, 0
        for m in self.modalities:
            for n in self.modalities:
                pred = self.heads[f"{m}_to_{n}"](context[m]).view(B, self.horizon, self.hidden)
                w = 1.0 if m != n else self.same_weight
                for r in range(self.horizon):
                    step = (t + 1 + r).view(1)
                    target = z[n].float().index_select(1, step).squeeze(1)
                    keep = (valid[m].index_select(1, t.view(1)) & valid[n].index_select(1, step)).squeeze(1).float()
                    logits = pred[:, r] @ target.t()
                    nll = F.cross_entropy(logits, labels, reduction="none")
                    total = total + w * (nll * keep).sum() / keep.sum().clamp_min(1)
                    weight_sum += w
                    if m != n:
                        correct = correct + ((logits.argmax(-1) == labels).float() * keep).sum() / keep.sum().clamp_min(1)
                        cross_count += 1
        return total / weight_sum, correct / max(cross_count, 1)
