"""One SRCID optimisation step: one encoder forward, CLUB fitting on its detached outputs, the loss, the update.

Nothing here reads a value back to the host: the warm-start switch and the layer-2 weight live on the device, so
the step can be queued back to back on a GPU (and compiled).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..model import SRCID
from ..model.quantizers import distributed


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(4e-4, gt=0, description="Adam learning rate of the encoders (the authors' 4e-4)")
    club_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the CLUB estimators")
    club_steps: int = Field(5, ge=0, description="inner CLUB fitting steps per batch")
    grad_clip: float = Field(1.0, gt=0)
    amp: bool = Field(False, description="autocast to bfloat16")


class WarmStartConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.1, description="layer 2 joins once the smoothed layer-1 MI estimate stays below this")
    patience: int = Field(50, ge=1, description="... for this many consecutive steps")
    min_steps: int = Field(200, ge=0, description="... and never before this step")
    force_step: int | None = Field(None, ge=0, description="switch at exactly this step instead (reproducibility)")
    smoothing: float = Field(0.9, ge=0, lt=1, description="EMA factor of the MI estimate")


class WarmStart(nn.Module):
    """Decides, on the device, when layer 2's losses join (DESIGN §3 warm start)."""

    def __init__(self, cfg: WarmStartConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mi_ema", torch.full((), float("nan")))
        self.register_buffer("below", torch.zeros((), dtype=torch.long))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))
        self.register_buffer("switch_step", torch.full((), -1, dtype=torch.long))

    @torch.no_grad()
    def update(self, mi: Tensor, step: int) -> None:
        """mi: this step's layer-1 MI estimate (0-dim); step: the step just taken (0-based)."""
        c = self.cfg
        mi = mi.detach().float()
        self.mi_ema.copy_(torch.where(torch.isnan(self.mi_ema), mi, c.smoothing * self.mi_ema + (1 - c.smoothing) * mi))
        self.below.copy_(torch.where(self.mi_ema < c.threshold, self.below + 1, 0))
        if c.force_step is not None:
            ready = torch.tensor(step + 1 >= c.force_step, device=mi.device)
        else:
            ready = (self.below >= c.patience) & (step + 1 >= c.min_steps)
        self.switch_step.copy_(torch.where(ready & ~self.active, step + 1, self.switch_step))
        self.active.logical_or_(ready)


def _all_reduce_mean(params: list[nn.Parameter]) -> None:
    if distributed():
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)


class TrainStep:
    """Owns the optimisers and the warm start; `step(batch)` returns the step's figures as device tensors.

    `forward` may be a DistributedDataParallel wrapper of `model`; the CLUB estimators stay out of DDP (they are
    fitted on their own, several times a step) and their gradients are averaged across ranks by hand.
    """

    def __init__(self, model: SRCID, optim: OptimConfig, warm: WarmStartConfig, forward: nn.Module | None = None):
        self.model = model
        self.forward = model if forward is None else forward
        self.cfg = optim
        # foreach: one fused kernel per group instead of a loop over ~200 parameters (the default on CUDA only).
        self.opt = torch.optim.Adam(model.main_parameters(), lr=optim.lr, foreach=True)
        self.club_opt = torch.optim.Adam(model.club_parameters(), lr=optim.club_lr, foreach=True)
        device = next(model.parameters()).device
        self.warm = WarmStart(warm).to(device)
        self.device = device
        self.step_count = 0

    def layer2_weight(self) -> Tensor:
        return self.warm.active.float() * self.model.cfg.lambda2

    def _autocast(self):
        if not self.cfg.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        model, cfg = self.model, self.model.cfg
        model.train()
        with self._autocast():
            out = self.forward(batch)
        w2 = self.layer2_weight()

        for _ in range(self.cfg.club_steps):
            self.club_opt.zero_grad(set_to_none=True)
            model.club_nll(out, w2).backward()
            _all_reduce_mean(model.club_parameters())
            self.club_opt.step()

        B = batch[model.modalities[0]].shape[0]
        t = torch.randint(0, cfg.T - cfg.cpc_horizon, (), device=self.device)
        perm = torch.randperm(B, device=self.device)
        with self._autocast():
            figures = model.losses(out, t, perm, w2)
        self.opt.zero_grad(set_to_none=True)
        figures["loss"].backward()
        figures["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.main_parameters(), self.cfg.grad_clip)
        self.opt.step()
        model.update_codebooks(out)
        self.warm.update(figures["l1_mi"], self.step_count)
        figures["layer2_active"] = self.warm.active.float()
        figures["loss"] = figures["loss"].detach()
        self.step_count += 1
        return figures
