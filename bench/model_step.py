"""Samples/s of one full SRCID training step at the paper's dims (both layers, CLUB fitting included).

    python bench/model_step.py [--batch 80] [--steps 3] [--device auto] [--modes fp32,amp,compile]

Modes run side by side in one process on the same batch: fp32 eager, bf16 autocast (AMP), and torch.compile of
the encoder forward (skipped with the reason if it fails). Prints one JSON line per mode and the ratios to fp32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from srcid.model import SRCID, SRCIDConfig
from srcid.training.step import OptimConfig, TrainStep, WarmStartConfig


def paper_batch(cfg: SRCIDConfig, B: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(B, cfg.T, *spec.shape, generator=g) for m, spec in cfg.modalities.items()}
    for m, spec in cfg.modalities.items():
        if spec.masked:
            batch[f"{m}_mask"] = torch.arange(cfg.T).expand(B, cfg.T) < torch.randint(4, cfg.T + 1, (B, 1), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def build(mode: str, device: torch.device) -> TrainStep:
    torch.manual_seed(0)
    model = SRCID(SRCIDConfig()).to(device)
    forward = torch.compile(model) if mode == "compile" else model
    # Layer 2 on from the start: the benchmark measures the full two-layer step.
    return TrainStep(model, OptimConfig(amp=(mode == "amp")), WarmStartConfig(force_step=0), forward=forward)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: TrainStep, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> float:
    """Seconds per step, after `warmup` steps (compilation, allocator warm-up)."""
    device = trainer.device
    for _ in range(warmup):
        trainer.step(batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
    sync(device)
    return (time.perf_counter() - start) / steps


def device_of(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=80)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default="fp32,amp,compile")
    args = p.parse_args()
    device = device_of(args.device)
    batch = paper_batch(SRCIDConfig(), args.batch, device)
    results = {}
    for mode in args.modes.split(","):
        try:
            trainer = build(mode, device)
            warmup = args.warmup + (2 if mode == "compile" else 0)
            seconds = time_steps(trainer, batch, args.steps, warmup)
        except Exception as exc:  # noqa: BLE001 - a mode that cannot run here is reported, not fatal
            print(json.dumps({"mode": mode, "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}))
            continue
        results[mode] = args.batch / seconds
        print(json.dumps({"mode": mode, "device": str(device), "batch": args.batch,
                          "samples_per_s": round(results[mode], 2), "ms_per_step": round(1000 * seconds, 1)}))  # fmt: skip
    if "fp32" in results:
        print(json.dumps({"ratio_to_fp32": {m: round(v / results["fp32"], 2) for m, v in results.items()}}))


if __name__ == "__main__":
    main()
