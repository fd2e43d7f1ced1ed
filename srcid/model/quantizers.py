"""Quantisers: an EMA codebook with multimodal EMA (MM-EMA) and dead-code re-seeding, RVQ-n, and FSQ.

Every quantiser maps z [N, D] to (q [N, D], indices [N, S]) with S codes per vector (1 for VQ and FSQ, n for RVQ-n)
and exposes `codebook()` [K, D], the vectors L_cmcm scores against. Codebook statistics are updated explicitly by
`update()` after the optimiser step, from all modalities at once, so MM-EMA can mix paired vectors.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def multimodal_targets(z: dict[str, Tensor], valid: dict[str, Tensor]) -> dict[str, Tensor]:
    """MM-EMA targets: for modality m at (b, t), 0.5·z_m + 0.5·mean of its valid partners' z at the same (b, t).

    With three modalities that is 0.5·z_m + 0.25·z_o1 + 0.25·z_o2. A masked-out partner's share goes to z_m.
    z: {m: [N, D]}, valid: {m: [N] bool} -> {m: [N, D]}
    """
    names = list(z)
    share = 0.5 / (len(names) - 1)
    out = {}
    for m in names:
        target = z[m].clone()
        for o in names:
            if o == m:
                continue
            w = share * valid[o].to(z[m].dtype).unsqueeze(-1)
            target = target + w * (z[o] - z[m])
        out[m] = target
    return out


class EMACodebook(nn.Module):
    """K × D codebook updated by exponential moving averages (no VQ loss), with Laplace-smoothed counts.

    Invariant kept by every write: embedding = ema_sum / smoothed(ema_count). A re-seeded dead code gets its
    embedding, count and sum reset together, so the next EMA step keeps the new seed instead of overwriting it.
    """

    def __init__(self, size: int, dim: int, decay: float = 0.99, eps: float = 1e-5, dead_after: int = 100):
        super().__init__()
        self.size, self.dim, self.decay, self.eps, self.dead_after = size, dim, decay, eps, dead_after
        init = torch.randn(size, dim) / math.sqrt(dim)
        self.register_buffer("embedding", init.clone())
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("unused_steps", torch.zeros(size, dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def nearest(self, z: Tensor) -> Tensor:
        """z [N, D] -> index of the nearest code [N] (squared Euclidean distance)."""
        z = z.float()
        dist2 = z.pow(2).sum(-1, keepdim=True) - 2 * z @ self.embedding.t() + self.embedding.pow(2).sum(-1)
        return dist2.argmin(-1)

    def lookup(self, idx: Tensor) -> Tensor:
        return self.embedding[idx]

    def _broadcast_from_rank0(self, x: Tensor) -> Tensor:
        if distributed():
            dist.broadcast(x, src=0)
        return x

    @torch.no_grad()
    def update(self, targets: Tensor, idx: Tensor, weights: Tensor, candidates: Tensor) -> None:
        """One EMA step.

        targets [M, D]: what each assignment pulls its code towards (MM-EMA mixes); idx [M]: the chosen codes;
        weights [M]: 1 for valid assignments, 0 for padding; candidates [P, D]: encoder outputs to re-seed from.
        Runs without host synchronisation; under DistributedDataParallel the statistics are all-reduced and seeds
        come from rank 0, so every rank keeps an identical codebook.
        """
        targets, weights, candidates = targets.float(), weights.float(), candidates.float()
        counts = torch.zeros(self.size, device=targets.device).index_add_(0, idx, weights)
        sums = torch.zeros(self.size, self.dim, device=targets.device).index_add_(
            0, idx, targets * weights.unsqueeze(-1)
        )
        if distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.embedding.copy_(self.ema_sum / self._smoothed_count().unsqueeze(-1))

        self.unused_steps.copy_(torch.where(counts > 0, 0, self.unused_steps + 1))
        pick = torch.randint(0, candidates.shape[0], (self.size,), device=candidates.device)
        seeds = self._broadcast_from_rank0(candidates[pick].contiguous())
        # The first update seeds every code from data: a random init sits far from where encoder outputs live.
        dead = (self.unused_steps >= self.dead_after) | ~self.initialized
        self.reseed(dead, seeds)
        self.initialized.fill_(True)

    @torch.no_grad()
    def reseed(self, dead: Tensor, seeds: Tensor) -> None:
        """Replace codes where dead [K] is true by seeds [K, D]; embedding, EMA count and EMA sum move together."""
        mask = dead.unsqueeze(-1)
        self.ema_count.copy_(torch.where(dead, 1.0, self.ema_count))
        self.ema_sum.copy_(torch.where(mask, seeds, self.ema_sum))
        self.embedding.copy_(self.ema_sum / self._smoothed_count().unsqueeze(-1))
        self.unused_steps.copy_(torch.where(dead, 0, self.unused_steps))

    def _smoothed_count(self) -> Tensor:
        n = self.ema_count.sum()
        return (self.ema_count + self.eps) / (n + self.size * self.eps) * n


class VectorQuantizer(nn.Module):
    """Plain VQ over one EMA codebook. z [N, D] -> q [N, D] (straight-through), indices [N, 1]."""

    uses_commitment = True

    def __init__(self, size: int, dim: int, decay: float, eps: float, dead_after: int):
        super().__init__()
        self.book = EMACodebook(size, dim, decay, eps, dead_after)
        self.size = size

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.book.nearest(z)
        q = self.book.lookup(idx).to(z.dtype)
        return z + (q - z).detach(), idx.unsqueeze(-1)

    def decode(self, idx: Tensor) -> Tensor:
        """indices [..., 1] -> code vectors [..., D]."""
        return self.book.lookup(idx[..., 0])

    def codebook(self) -> Tensor:
        return self.book.embedding

    @torch.no_grad()
    def update(self, z: dict[str, Tensor], idx: dict[str, Tensor], valid: dict[str, Tensor]) -> None:
        """z: {m: [N, D]} pre-quantisation vectors; idx: {m: [N, 1]}; valid: {m: [N] bool}."""
        targets = multimodal_targets(z, valid)
        names = list(z)
        self.book.update(
            torch.cat([targets[m] for m in names]),
            torch.cat([idx[m][:, 0] for m in names]),
            torch.cat([valid[m] for m in names]),
            torch.cat([z[m] for m in names]),
        )


class ResidualVectorQuantizer(nn.Module):
    """RVQ-n: n EMA codebooks, each quantising the numeric residual the previous ones left.

    z [N, D] -> q [N, D] = sum of the n stage vectors (straight-through), indices [N, n].
    """

    uses_commitment = True

    def __init__(self, stages: int, size: int, dim: int, decay: float, eps: float, dead_after: int):
        super().__init__()
        self.books = nn.ModuleList(EMACodebook(size, dim, decay, eps, dead_after) for _ in range(stages))
        self.size = size

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        residual, q, indices = z.float(), torch.zeros_like(z, dtype=torch.float32), []
        for book in self.books:
            idx = book.nearest(residual)
            step = book.lookup(idx)
            q, residual = q + step, residual - step
            indices.append(idx)
        return z + (q.to(z.dtype) - z).detach(), torch.stack(indices, -1)

    def residuals(self, z: Tensor, idx: Tensor) -> list[Tensor]:
        """What each stage quantised, rebuilt from the chosen codes: z [N, D], idx [N, n] -> n × [N, D]."""
        out, residual = [], z.float()
        for s, book in enumerate(self.books):
            out.append(residual)
            residual = residual - book.lookup(idx[:, s])
        return out

    def decode(self, idx: Tensor) -> Tensor:
        """indices [..., n] -> sum of the n stage vectors [..., D]."""
        return sum(book.lookup(idx[..., s]) for s, book in enumerate(self.books))

    def codebook(self) -> Tensor:
        return self.books[0].embedding

    @torch.no_grad()
    def update(self, z: dict[str, Tensor], idx: dict[str, Tensor], valid: dict[str, Tensor]) -> None:
        names = list(z)
        per_stage = {m: self.residuals(z[m], idx[m]) for m in names}
        for s, book in enumerate(self.books):
            residual = {m: per_stage[m][s] for m in names}
            targets = multimodal_targets(residual, valid)
            book.update(
                torch.cat([targets[m] for m in names]),
                torch.cat([idx[m][:, s] for m in names]),
                torch.cat([valid[m] for m in names]),
                torch.cat([residual[m] for m in names]),
            )


class FiniteScalarQuantizer(nn.Module):
    """FSQ (Mentzer et al. 2023): project to len(levels) dims, bound, round to a fixed grid, project back.

    No codebook to learn, so no EMA and no commitment. z [N, D] -> q [N, D], indices [N, 1] (mixed radix).
    """

    uses_commitment = False

    def __init__(self, levels: tuple[int, ...], dim: int):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        basis = torch.cumprod(torch.tensor((1, *levels[:-1]), dtype=torch.long), 0)
        self.register_buffer("basis", basis)
        self.size = math.prod(levels)
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    def bound(self, h: Tensor) -> Tensor:
        """Squash h [N, d] into the open interval each level count rounds evenly over."""
        half = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(h + shift) * half - offset

    def quantize(self, h: Tensor) -> Tensor:
        """h [N, d] -> grid values in [-1, 1] [N, d]; rounding passes gradients straight through."""
        bounded = self.bound(h.float())
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / (self.levels // 2)

    def grid_to_index(self, grid: Tensor) -> Tensor:
        level = (grid * (self.levels // 2) + self.levels // 2).round().long()
        return (level * self.basis).sum(-1)

    def index_to_grid(self, idx: Tensor) -> Tensor:
        level = (idx.unsqueeze(-1) // self.basis) % self.levels.long()
        return (level - self.levels // 2) / (self.levels // 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.quantize(self.project_in(z))
        return self.project_out(grid.to(z.dtype)), self.grid_to_index(grid).unsqueeze(-1)

    def decode(self, idx: Tensor) -> Tensor:
        """indices [..., 1] -> projected grid points [..., D]."""
        return self.project_out(self.index_to_grid(idx[..., 0]))

    def codebook(self) -> Tensor:
        return self.decode(torch.arange(self.size, device=self.levels.device).unsqueeze(-1))

    def update(self, z: dict[str, Tensor], idx: dict[str, Tensor], valid: dict[str, Tensor]) -> None:
        """FSQ's grid is fixed: nothing to update."""


Quantizer = VectorQuantizer | ResidualVectorQuantizer | FiniteScalarQuantizer


def build_quantizer(
    kind: str, size: int, dim: int, decay: float, eps: float, dead_after: int, fsq_levels: tuple[int, ...]
) -> Quantizer:
    if kind == "vq":
        return VectorQuantizer(size, dim, decay, eps, dead_after)
    if kind.startswith("rvq"):
        return ResidualVectorQuantizer(int(kind[3:]), size, dim, decay, eps, dead_after)
    if kind == "fsq":
        return FiniteScalarQuantizer(fsq_levels, dim)
    raise ValueError(f"unknown quantizer {kind!r}")


def code_usage(indices: Tensor, valid: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Fraction of codes used and perplexity of the code histogram; indices [N], valid [N] -> two scalars."""
    counts = torch.zeros(size, device=indices.device).index_add_(0, indices, valid.float())
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return (counts > 0).float().mean(), perplexity
