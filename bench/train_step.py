"""Samples/s and peak memory of the full SRCID training step at the paper's dims, fp32 vs AMP, side by side.

    python bench/train_step.py [--batch 80] [--steps 3] [--device auto]

Each precision runs in its own child process so its peak memory is its own: peak resident memory (ru_maxrss) on
the CPU, torch.cuda.max_memory_allocated on a GPU. The reference point from the issue: the authors' one-layer step
does 79 samples/s in float64 on an H100 at batch 80 (276 samples/s cast to float32, 29 GiB peak in float64).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from model_step import build, device_of, paper_batch, time_steps

from srcid.model import SRCIDConfig


def measure(mode: str, device_name: str, batch_size: int, steps: int) -> dict:
    device = device_of(device_name)
    batch = paper_batch(SRCIDConfig(), batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(build(mode, device), batch, steps, warmup=1)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"mode": mode, "device": str(device), "batch": batch_size, "samples_per_s": round(batch_size / seconds, 2),
            "peak_memory_gib": round(peak / 2**30, 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=80)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.batch, args.steps)))
        return
    results = {}
    for mode in ("fp32", "amp"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--device", args.device, "--batch", str(args.batch),
             "--steps", str(args.steps)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    print(json.dumps({"amp_over_fp32": round(results["amp"]["samples_per_s"] / results["fp32"]["samples_per_s"], 2),
                      "vs_authors_fp64_h100_79_samples_per_s": round(results["amp"]["samples_per_s"] / 79, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
