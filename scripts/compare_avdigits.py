"""Reproduce the AV-Digits comparison (paper Tables I and II, made honest) in one command.

    python scripts/compare_avdigits.py --fsdd ../shared/data/fsdd --out runs/compare [--seeds 0 1 2] [--jobs 2]

Builds AV-Digits if `--data` is absent, trains DCID(VQ), DCID(RVQ-2/3/4), DCID(FSQ) (one layer) and SRCID (two
layers) for every seed with configs/avdigits.yaml, evaluates each on the held-out split (SRCID twice: both layers,
and layer 1 only = "SRCID(only1)"), also with TOC keeping half of the dimensions, and writes OUT/results.json and
OUT/RESULTS.md (mean ± std over seeds). Runs `--jobs` trainings at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAINED = {
    "DCID(VQ)": {"quantizer": "vq", "layers": 1},
    "DCID(RVQ-2)": {"quantizer": "rvq2", "layers": 1},
    "DCID(RVQ-3)": {"quantizer": "rvq3", "layers": 1},
    "DCID(RVQ-4)": {"quantizer": "rvq4", "layers": 1},
    "DCID(FSQ)": {"quantizer": "fsq", "layers": 1},
    "SRCID": {"quantizer": "vq", "layers": 2},
}
ROWS = ["DCID(VQ)", "DCID(RVQ-2)", "DCID(RVQ-3)", "DCID(RVQ-4)", "DCID(FSQ)", "SRCID(only1)", "SRCID"]
CROSS = ["a2v", "v2a", "a2t", "t2a", "v2t", "t2v"]
UNI = ["a2a", "v2v", "t2t"]


def slug(method: str) -> str:
    return method.lower().replace("(", "-").replace(")", "")


def worker(method: str, seed: int, data: str, config: str, out: Path) -> None:
    """Train one method with one seed and write its evaluation reports (run in a child process)."""
    import torch

    from srcid.training.data import open_dataset
    from srcid.training.evaluate import encode_split, evaluate_encoded, protocol, codebook_figures, num_classes_of
    from srcid.training.checkpoint import load_model
    from srcid.training.train import TrainConfig, train
    from srcid.training.train_cli import apply_override, load_config_file

    torch.set_num_threads(1)
    raw = load_config_file(config)
    for key, value in TRAINED[method].items():
        apply_override(raw, f"model.{key}={value}")
    raw["seed"] = seed
    started = time.perf_counter()
    train(TrainConfig.model_validate(raw), open_dataset(data, "train"), out)
    train_s = time.perf_counter() - started
    model, _ = load_model(out / "last.safetensors")
    splits = {s: open_dataset(data, s) for s in ("train", "test")}
    enc = {s: encode_split(model, ds, 256, desc=f"encode {s}") for s, ds in splits.items()}
    classes = num_classes_of(splits["train"], enc["train"], enc["test"])
    dims = model.cfg.hidden * model.cfg.layers
    report = evaluate_encoded(model, enc["train"], enc["test"], classes, seed, toc_dims=dims // 2)
    report["train_seconds"] = round(train_s, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if model.cfg.layers == 2:
        only1 = protocol(enc["train"], enc["test"], classes, seed, np.arange(model.cfg.hidden))
        only1["codebook"] = {k: v for k, v in codebook_figures(model, enc["test"]).items() if k.startswith("layer1")}
        (out / "report_only1.json").write_text(json.dumps(only1, indent=1))


def figures(report: dict) -> dict[str, float]:
    cls, ret = report["classification"], report["retrieval"]
    f = {k: cls[k] for k in CROSS + UNI}
    f["cross_avg"] = float(np.mean([cls[k] for k in CROSS]))
    f["uni_avg"] = float(np.mean([cls[k] for k in UNI]))
    for k in ("t2a", "t2v", "a2v"):
        f[f"{k}_r1"], f[f"{k}_r10"] = ret[k]["r1"], ret[k]["r10"]
    f["ret_r1_avg"] = float(np.mean([r["r1"] for r in ret.values()]))
    f["ret_r10_avg"] = float(np.mean([r["r10"] for r in ret.values()]))
    cb = report.get("codebook", {})
    f["l1_usage"], f["l1_perplexity"] = cb.get("layer1_usage"), cb.get("layer1_perplexity")
    if "toc" in report:
        f["toc_cross_avg"] = float(np.mean([report["toc"]["classification"][k] for k in CROSS]))
        f["toc_ret_r1_avg"] = float(np.mean([r["r1"] for r in report["toc"]["retrieval"].values()]))
    return f


def collect(out: Path, seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    table: dict[str, dict[str, list[float]]] = {}
    for row in ROWS:
        method, name = ("SRCID", "report_only1.json") if row == "SRCID(only1)" else (row, "report.json")
        for seed in seeds:
            path = out / slug(method) / f"seed{seed}" / name
            if path.is_file():
                for k, v in figures(json.loads(path.read_text())).items():
                    if v is not None:
                        table.setdefault(row, {}).setdefault(k, []).append(float(v))
    return table


def markdown(table: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    def cell(row: str, key: str, scale: float = 100) -> str:
        values = table.get(row, {}).get(key)
        if not values:
            return "–"
        return f"{scale * np.mean(values):.1f} ± {scale * np.std(values):.1f}"

    cols = [("a→v", "a2v"), ("v→a", "v2a"), ("a→t", "a2t"), ("t→a", "t2a"), ("v→t", "v2t"), ("t→v", "t2v"),
            ("cross avg", "cross_avg"), ("a→a", "a2a"), ("v→v", "v2v"), ("t→t", "t2t"), ("uni avg", "uni_avg")]
    lines = [f"Seeds {seeds}; mean ± std; accuracies and recalls in %.", "",
             "**Per-step classification** (probe trained on one modality's quantised vectors, tested on another's)", "",
             "| method | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(row, k) for _, k in cols) + " |" for row in ROWS]
    rcols = [("t→a R@1", "t2a_r1"), ("t→a R@10", "t2a_r10"), ("t→v R@1", "t2v_r1"), ("t→v R@10", "t2v_r10"),
             ("a→v R@1", "a2v_r1"), ("a→v R@10", "a2v_r10"), ("avg R@1", "ret_r1_avg"), ("avg R@10", "ret_r10_avg")]
    lines += ["", "**Zero-shot retrieval** (test clips, the same clip must be found)", "",
              "| method | " + " | ".join(c for c, _ in rcols) + " |", "|---" * (len(rcols) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(row, k) for _, k in rcols) + " |" for row in ROWS]
    lines += ["", "**Codebook (layer 1, test split) and TOC (half of the dimensions kept)**", "",
              "| method | usage % | perplexity | cross avg % | TOC cross avg % | avg R@1 % | TOC avg R@1 % |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {row} | {cell(row, 'l1_usage')} | {cell(row, 'l1_perplexity', 1)} | {cell(row, 'cross_avg')} | "
              f"{cell(row, 'toc_cross_avg')} | {cell(row, 'ret_r1_avg')} | {cell(row, 'toc_ret_r1_avg')} |" for row in ROWS]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare", type=Path)
    p.add_argument("--data", default="runs/avdigits/shards", help="AV-Digits shards (built here if absent)")
    p.add_argument("--fsdd", default=str(ROOT.parent / "shared" / "data" / "fsdd"), help="FSDD recordings")
    p.add_argument("--config", default=str(ROOT / "configs" / "avdigits.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(TRAINED), choices=list(TRAINED))
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (one CPU thread each)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        method, seed = args.worker[0], int(args.worker[1])
        worker(method, seed, args.data, args.config, args.out / slug(method) / f"seed{seed}")
        return
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "srcid.cli", "data", "avdigits", "--fsdd", args.fsdd,
                        "--out", str(data.parent)], check=True)  # fmt: skip
    jobs = [(m, s) for s in args.seeds for m in args.methods
            if not (args.out / slug(m) / f"seed{s}" / "report.json").is_file()]  # fmt: skip
    started = time.perf_counter()

    def launch(job: tuple[str, int]) -> tuple[str, int, int]:
        method, seed = job
        log = args.out / slug(method) / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.call([sys.executable, __file__, "--worker", method, str(seed), "--out", str(args.out),
                                  "--data", str(data), "--config", args.config],
                                 stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        print(f"{method} seed {seed}: {'ok' if rc == 0 else f'FAILED ({log})'} "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)  # fmt: skip
        return method, seed, rc

    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [j for j in pool.map(launch, jobs) if j[2] != 0]
    table = collect(args.out, args.seeds)
    (args.out / "results.json").write_text(json.dumps(table, indent=1))
    text = markdown(table, args.seeds)
    (args.out / "RESULTS.md").write_text(text)
    print(text)
    print(f"total {time.perf_counter() - started:.0f} s; failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
