"""`srcid train`: the training loop from the command line, a config file, and overrides."""

from __future__ import annotations

import argparse
import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import yaml

from .data import open_dataset
from .synthetic import synthetic_split
from .train import TrainConfig, train

log = logging.getLogger(__name__)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot parse config ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping at the top, got {type(data).__name__}")
    return data


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """`optim.lr=1e-3` sets config["optim"]["lr"]; the value is parsed as YAML (numbers, booleans, null, lists)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes KEY=VALUE (e.g. optim.lr=1e-3), got {assignment!r}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def build_config(args: argparse.Namespace) -> TrainConfig:
    config = load_config_file(args.config) if args.config else {}
    shortcuts = {
        "model.quantizer": args.quantizer, "model.layers": args.layers, "steps": args.steps,
        "batch_size": args.batch_size, "seed": args.seed, "device": args.device, "optim.amp": args.amp,
        "warm.force_step": args.warm_force_step, "num_workers": args.num_workers, "log_every": args.log_every,
        "ckpt_every": args.ckpt_every,
    }  # fmt: skip
    for key, value in shortcuts.items():
        if value is not None:
            apply_override(config, f"{key}={json.dumps(value)}")
    for assignment in args.set or []:
        apply_override(config, assignment)
    if args.tensorboard:
        config["tensorboard"] = True
    if args.deterministic:
        config["deterministic"] = True
    return TrainConfig.model_validate(config)


def run(args: argparse.Namespace) -> int:
    if (args.data is None) == (not args.synthetic):
        raise ValueError("give exactly one of --data PATH or --synthetic")
    cfg = build_config(args)
    dataset = (
        synthetic_split(args.split, n_clips=args.synthetic_clips, seed=cfg.seed)
        if args.synthetic
        else open_dataset(args.data, args.split)
    )
    try:
        record = train(cfg, dataset, args.out, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    figures = {k: record[k] for k in ("loss", "l1_recon", "l1_mi", "l1_cpc_acc", "l1_usage", "l1_perplexity") if k in record}
    if "l2_mi" in record:
        figures.update(l2_mi=record["l2_mi"], l2_usage=record["l2_usage"], warm_switch_step=record["warm_switch_step"])
    print(json.dumps({"step": record.get("step"), **figures, "checkpoint": str(Path(args.out) / "last.safetensors")}))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an SRCID model (or a DCID baseline) on paired features",
        description=(
            "Train SRCID on paired audio/video/text features. Data: a native shard folder, a VGGSound-AVEL40K "
            "folder or AVE-ECCV18 h5 files (--data), or a built-in synthetic paired set (--synthetic). "
            "Settings come from defaults, then --config (YAML or TOML with sections model/optim/warm), then the "
            "flags below, then --set KEY=VALUE. Writes metrics.jsonl, checkpoints (safetensors) and config.json "
            "to --out. Baselines: --quantizer vq|rvq2|rvq3|rvq4|fsq --layers 1. Multi-GPU: run under torchrun."
        ),
    )
    p.add_argument("--data", help="native shards / VGGSound-AVEL40K folder / AVE-ECCV18 folder")
    p.add_argument("--synthetic", action="store_true", help="train on the built-in synthetic paired set")
    p.add_argument("--synthetic-clips", type=int, default=1024, help="clips in the synthetic set (default 1024)")
    p.add_argument("--split", default="train", help="split to train on (default train)")
    p.add_argument("--out", required=True, help="output folder for checkpoints and metrics")
    p.add_argument("--config", help="YAML or TOML config file")
    p.add_argument("--resume", help="checkpoint to continue from (e.g. OUT/last.safetensors)")
    p.add_argument("--quantizer", choices=["vq", "rvq2", "rvq3", "rvq4", "fsq"], help="layer-1 quantiser")
    p.add_argument("--layers", type=int, choices=[1, 2], help="1: layer 1 only (baselines); 2: SRCID")
    p.add_argument("--steps", type=int, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, help="clips per step and rank (default 80)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast")
    p.add_argument("--warm-force-step", type=int, help="switch layer 2 on at this step instead of by MI")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument("--log-every", type=int, help="write figures to metrics.jsonl every N steps")
    p.add_argument("--ckpt-every", type=int, help="write a checkpoint every N steps")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. optim.lr=1e-3")
    p.set_defaults(func=run)
