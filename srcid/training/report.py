"""Write an evaluation report: report.json, report.md (Markdown tables) and PNG plots (matplotlib, Agg).

Plots: classification.png (source x target accuracy heat map), retrieval.png (R@1/5/10 per direction), and with
TOC toc.png (full vs TOC-reduced accuracy and R@1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

NAMES = {"a": "audio", "v": "video", "t": "text"}


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots into out_dir (created); returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown(report))
    paths["classification_plot"] = plot_classification(report["classification"], out / "classification.png")
    paths["retrieval_plot"] = plot_retrieval(report["retrieval"], out / "retrieval.png")
    if "toc" in report:
        paths["toc_plot"] = plot_toc(report, out / "toc.png")
    return paths


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: classification (with chance), retrieval (strict and label-match), codebook, TOC."""
    meta = report.get("meta", {})
    chance = report["chance"]
    toc = report.get("toc")
    parts = ["# SRCID evaluation"]
    if meta:
        parts.append(
            f"Checkpoint `{meta.get('checkpoint')}` (step {meta.get('checkpoint_step')}, {meta.get('quantizer')}, "
            f"{meta.get('layers')} layer(s)), data `{meta.get('data')}`: {meta.get('clips', {}).get('train')} train / "
            f"{meta.get('clips', {}).get('test')} test clips, {meta.get('num_classes')} classes, "
            f"seed {meta.get('seed')}."
        )
    header = ["probe (train → test)", "accuracy %", "macro F1 %", "majority-class chance %"]
    if toc:
        header.insert(3, f"TOC {toc['dims']}/{toc['of']} dims: accuracy %")
    rows = []
    for key, acc in report["classification"].items():
        row = [f"{NAMES[key[0]]} → {NAMES[key[2]]}", _pct(acc), _pct(report["classification_macro_f1"][key]),
               _pct(chance["classification"][key])]  # fmt: skip
        if toc:
            row.insert(3, _pct(toc["classification"][key]))
        rows.append(row)
    parts += ["## Per-step classification (linear probe, held-out split)", _table(header, rows),
              f"Uniform guess: {_pct(chance['uniform'])} %."]  # fmt: skip

    header = ["query → gallery", "R@1 %", "R@5 %", "R@10 %", "medR", "label-match R@1 %"]
    if toc:
        header.append("TOC R@1 %")
    rows = []
    for key, r in report["retrieval"].items():
        row = [f"{NAMES[key[0]]} → {NAMES[key[2]]}", _pct(r["r1"]), _pct(r["r5"]), _pct(r["r10"]), f"{r['medr']:g}",
               _pct(report["retrieval_label_match"][key]["r1"])]  # fmt: skip
        if toc:
            row.append(_pct(toc["retrieval"][key]["r1"]))
        rows.append(row)
    c = chance["retrieval"]
    parts += ["## Zero-shot retrieval (cosine, test clips; strict: the same clip)", _table(header, rows),
              f"Random ranking: R@1 {_pct(c['r1'])} %, R@5 {_pct(c['r5'])} %, R@10 {_pct(c['r10'])} %, "
              f"medR {c['medr']:g}."]  # fmt: skip

    cb = report["codebook"]
    rows = []
    for who, figures in (("all", cb), *cb.get("by_modality", {}).items()):
        for i in (1, 2):
            perplexity = figures[f"layer{i}_perplexity"]
            rows.append([f"layer {i}", who, _pct(figures[f"layer{i}_usage"]),
                         "–" if perplexity is None else f"{perplexity:.1f}",
                         _pct(figures.get(f"layer{i}_purity")) if who != "all" else "",
                         "–" if cb.get(f"layer{i}_size") is None else str(cb[f"layer{i}_size"])])  # fmt: skip
    parts += ["## Codebook (test split; label purity: share of steps whose label is their code's most common)",
              _table(["", "modality", "usage %", "perplexity", "label purity %", "size"], rows)]  # fmt: skip

    if toc:
        full, reduced = report["summary"], toc["summary"]
        rows = [[name, _pct(full[k]), _pct(reduced[k]), f"{100 * (reduced[k] - full[k]):+.1f}"] for name, k in (
            ("mean cross-modal accuracy", "cross_modal_accuracy"), ("mean unimodal accuracy", "unimodal_accuracy"),
            ("mean cross-modal macro F1", "cross_modal_macro_f1"),
            ("mean R@1", "retrieval_r1"), ("mean R@10", "retrieval_r10"))]  # fmt: skip
        parts += [f"## TOC: {toc['dims']} of {toc['of']} dimensions kept",
                  _table(["", "full %", "TOC %", "change (points)"], rows)]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def plot_classification(classification: dict[str, float], path: Path) -> Path:
    letters = [m for m in "avt" if f"{m}2{m}" in classification]
    grid = np.array([[classification[f"{s}2{t}"] for t in letters] for s in letters])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(letters)), [NAMES[m] for m in letters])
    ax.set_yticks(range(len(letters)), [NAMES[m] for m in letters])
    ax.set_xlabel("tested on (test split)")
    ax.set_ylabel("probe trained on (train split)")
    for i in range(len(letters)):
        for j in range(len(letters)):
            ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center",
                    color="white" if grid[i, j] < 0.6 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title("per-step classification")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_retrieval(retrieval: dict[str, dict[str, float]], path: Path) -> Path:
    keys = list(retrieval)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, k in enumerate(("r1", "r5", "r10")):
        ax.bar(x + (i - 1) * 0.27, [retrieval[q][k] for q in keys], width=0.27, label=f"R@{k[1:]}")
    ax.set_xticks(x, keys)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_title("zero-shot retrieval (same clip)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_toc(report: dict[str, Any], path: Path) -> Path:
    toc = report["toc"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, full, reduced, title in (
        (left, report["classification"], toc["classification"], "accuracy"),
        (right, {k: v["r1"] for k, v in report["retrieval"].items()},
         {k: v["r1"] for k, v in toc["retrieval"].items()}, "R@1"),
    ):  # fmt: skip
        keys = list(full)
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [full[k] for k in keys], width=0.4, label=f"all {toc['of']} dims")
        ax.bar(x + 0.2, [reduced[k] for k in keys], width=0.4, label=f"TOC {toc['dims']} dims")
        ax.set_xticks(x, keys)
        ax.set_ylim(0, 1)
        ax.set_title(title)
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
