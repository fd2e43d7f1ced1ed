"""The training loop: config, data, one TrainStep per batch, JSONL figures, safetensors checkpoints, resume, DDP.

    srcid train --data data/avdigits/shards --out runs/srcid            # or --synthetic
    torchrun --nproc_per_node 4 -m srcid.cli train --data ... --out ...  # DistributedDataParallel
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..model import SRCID, ModalitySpec, SRCIDConfig
from .checkpoint import load_model_state, read_checkpoint, restore_trainer, save_checkpoint
from .data import make_loader
from .step import OptimConfig, TrainStep, WarmStartConfig

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any] = Field(default_factory=dict, description="SRCIDConfig fields; modalities come from the data")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    warm: WarmStartConfig = Field(default_factory=WarmStartConfig)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(80, ge=1)
    seed: int = 0
    deterministic: bool = Field(False, description="deterministic kernels (slower on GPU)")
    log_every: int = Field(50, ge=1)
    ckpt_every: int = Field(500, ge=1)
    num_workers: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    tensorboard: bool = False

    def model_config_for(self, dataset: Any) -> SRCIDConfig:
        if "modalities" in self.model:
            raise ValueError("model.modalities come from the data; remove them from the config")
        mods = {m: ModalitySpec(shape=tuple(s["shape"]), masked=bool(s["masked"])) for m, s in dataset.modalities.items()}
        return SRCIDConfig(modalities=mods, T=dataset.T, **self.model)


def _distributed_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def select_device(name: str, local_rank: int) -> torch.device:
    """auto: this rank's GPU when torch sees one, else the CPU; a CUDA device asked for without CUDA is an error."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _codebooks(model: SRCID) -> torch.Tensor:
    return torch.cat([b.flatten() for name, b in model.named_buffers() if name.endswith("embedding")])


def _codebooks_identical_across_ranks(model: SRCID) -> bool:
    """Every rank's codebooks gathered and compared bit for bit (the point of all-reducing EMA statistics)."""
    mine = _codebooks(model)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


class MetricsLog:
    """Accumulates the step figures on the device and writes their window means to JSONL every N steps."""

    def __init__(self, path: Path | None, tensorboard_dir: Path | None):
        self.file = open(path, "a") if path else None
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("tensorboard logging needs `pip install 'srcid[tensorboard]'`") from exc
            self.writer = SummaryWriter(str(tensorboard_dir))
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, figures: dict[str, torch.Tensor]) -> None:
        for k, v in figures.items():
            self.sums[k] = self.sums[k] + v.detach().float() if k in self.sums else v.detach().float()
        self.count += 1

    def flush(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        keys = sorted(self.sums)
        means = (torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)).tolist()  # one host sync
        record = {"step": step, **{k: round(v, 6) for k, v in zip(keys, means)}, **extra}
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)
        self.sums, self.count = {}, 0
        return record

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def train(cfg: TrainConfig, dataset: Any, out_dir: str | Path, resume: str | Path | None = None) -> dict[str, Any]:
    """Train on `dataset` (any reader of training.data) into `out_dir`; returns the last logged figures.

    Writes `metrics.jsonl`, `ckpt-<step>.safetensors` every `ckpt_every` steps and `last.safetensors` at the end
    (and on Ctrl-C). `resume` is a checkpoint path: the run continues exactly where that one stopped.
    """
    rank, world, local_rank = _distributed_env()
    distributed = world > 1
    device = select_device(cfg.device, local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _seed_everything(cfg.seed + rank, cfg.deterministic)
    if len(dataset) < cfg.batch_size * world:
        raise ValueError(f"{len(dataset)} clips cannot fill one batch of {cfg.batch_size} x {world} rank(s)")

    model = SRCID(cfg.model_config_for(dataset)).to(device)
    forward: torch.nn.Module = model
    if distributed:
        # CLUB estimators are fitted outside DDP (several backward passes a step); TrainStep averages their grads.
        club = {f"{n}" for n, _ in model.named_parameters() if ".club." in n}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(club))
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    trainer = TrainStep(model, cfg.optim, cfg.warm, forward=forward)
    loader = make_loader(
        dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers, drop_last=True,
        rank=rank, world_size=world,
    )
    steps_per_epoch = len(loader)

    out = Path(out_dir)
    fingerprint = getattr(dataset, "fingerprint", None)
    if resume is not None:
        tensors, metadata = read_checkpoint(resume)
        saved = json.loads(metadata["config"])
        if saved["model"] != model.cfg.model_dump(mode="json"):
            raise ValueError(f"{resume}: was trained with another model config; resume with the same config")
        load_model_state(model, tensors, resume)
        restore_trainer(trainer, tensors, metadata, resume)
        done = trainer.step_count
        loader.sampler.set_epoch(done // steps_per_epoch, (done % steps_per_epoch) * cfg.batch_size)
        log.info("resumed from %s at step %d", resume, done)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            json.dumps({**cfg.model_dump(mode="json"), "model": model.cfg.model_dump(mode="json")}, indent=2)
        )
    metrics = MetricsLog(out / "metrics.jsonl" if is_main else None, out / "tensorboard" if cfg.tensorboard and is_main else None)

    def checkpoint(name: str) -> Path | None:
        if not is_main:
            return None
        meta = {
            "config": {**cfg.model_dump(mode="json"), "model": model.cfg.model_dump(mode="json")},
            "step": str(trainer.step_count),
            "data_fingerprint": fingerprint or "",
            "world_size": str(world),
        }
        return save_checkpoint(out / name, model, trainer, meta)

    log.info(
        "training %s (%.1fM parameters) on %s, %d clips, batch %d x %d rank(s), %d steps",
        model.cfg.quantizer, sum(p.numel() for p in model.parameters()) / 1e6, device, len(dataset),
        cfg.batch_size, world, cfg.steps,
    )
    record: dict[str, Any] = {}
    bar = tqdm(total=cfg.steps, initial=trainer.step_count, disable=not is_main, desc="train", unit="step")
    window_start, window_samples = time.perf_counter(), 0
    try:
        while trainer.step_count < cfg.steps:
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                metrics.add(trainer.step(batch))
                window_samples += cfg.batch_size * world
                step = trainer.step_count
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    switch = int(trainer.warm.switch_step)
                    record = metrics.flush(step, {
                        "samples_per_s": round(window_samples / elapsed, 1),
                        "warm_switch_step": switch if switch >= 0 else None,
                        "epoch": step // steps_per_epoch,
                    })
                    if not np.isfinite(record["loss"]):
                        raise FloatingPointError(f"loss became {record['loss']} at step {step}; last figures: {record}")
                    bar.set_postfix(loss=f"{record['loss']:.3f}", mi1=f"{record['l1_mi']:.3f}",
                                    use1=f"{record['l1_usage']:.2f}", l2=int(record["layer2_active"] > 0))
                    if is_main:
                        shown = ("loss", "l1_recon", "l1_mi", "l1_cpc_acc", "l1_usage", "l2_mi", "l2_usage")
                        bar.write(json.dumps({"step": step, **{k: record[k] for k in shown if k in record},
                                              "samples_per_s": record["samples_per_s"]}))  # fmt: skip
                    window_start, window_samples = time.perf_counter(), 0
                if step % cfg.ckpt_every == 0:
                    checkpoint(f"ckpt-{step:07d}.safetensors")
                if step >= cfg.steps:
                    break
    except KeyboardInterrupt:
        path = checkpoint("last.safetensors")
        log.warning("interrupted at step %d; checkpoint written to %s", trainer.step_count, path)
        raise
    finally:
        bar.close()
        metrics.close()
    checkpoint("last.safetensors")
    if distributed:
        identical = _codebooks_identical_across_ranks(model)
        record["codebooks_identical_across_ranks"] = identical
        if is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": trainer.step_count, "codebooks_identical_across_ranks": identical}) + "\n")
        dist.destroy_process_group()
    return record
