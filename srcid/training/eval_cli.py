"""`srcid eval`: evaluate a frozen checkpoint (DESIGN §6) and write report.json, report.md and plots."""

from __future__ import annotations

import argparse
import json

from .evaluate import evaluate


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint: cross-modal probes, zero-shot retrieval, codebook use, optional TOC",
        description=(
            "Freeze the checkpoint's encoders, encode the train and test splits of --data, and measure: per-step "
            "classification with linear probes trained on modality A (train split) and tested on modality B (test "
            "split) for every ordered pair (a2v ... t2t); zero-shot clip retrieval by cosine similarity of the "
            "retrieval embeddings (t2a, t2v, a2v, a2t, v2t, v2a: R@1/5/10, median rank); codebook usage and "
            "perplexity per layer; chance levels. With --toc-dims or --toc-fraction the probes and retrieval are "
            "repeated on the dimensions TOC keeps. Writes OUT/report.json, OUT/report.md and PNG plots; see "
            "docs/EVALUATION.md."
        ),
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `srcid train` (.safetensors)")
    parser.add_argument("--data", required=True, help="data folder with labelled train and test splits (native shards)")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and the plots")
    toc = parser.add_mutually_exclusive_group()
    toc.add_argument("--toc-dims", type=int, help="also evaluate on the N most important dimensions (TOC)")
    toc.add_argument("--toc-fraction", type=float, help="also evaluate on this fraction of dimensions (TOC), in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes (default 0)")
    parser.add_argument("--train-split", default="train", help="split the probes train on (default train)")
    parser.add_argument("--test-split", default="test", help="held-out split everything is measured on (default test)")
    parser.add_argument("--batch-size", type=int, default=256, help="clips per encoder batch (default 256)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    report = evaluate(
        args.checkpoint, args.data, args.out, args.toc_dims, args.seed,
        toc_fraction=args.toc_fraction, train_split=args.train_split, test_split=args.test_split,
        batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    print(json.dumps({"out": args.out, **report["summary"], "codebook": report["codebook"]}))
    return 0
