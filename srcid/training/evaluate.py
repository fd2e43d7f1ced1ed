"""Evaluation of a frozen SRCID encoder (DESIGN §6): cross-modal probes, zero-shot retrieval, codebook use, TOC.

    report = evaluate("runs/x/last.safetensors", "data/avdigits", "runs/x/eval", toc_dims=64, seed=0)

Probes train on the "train" split and are scored on the held-out "test" split; retrieval and codebook figures
come from the test split only. Every number is a fraction in [0, 1] except median ranks and perplexities.
The protocols, chance levels and the TOC formula are written down in docs/EVALUATION.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from srcid.model import SRCID
from srcid.model.quantizers import code_usage
from srcid.training.checkpoint import load_model
from srcid.training.data import make_loader, mask_key, open_dataset
from srcid.training.toc import dimension_importance, select_dimensions, toc_size
from srcid.training.train import select_device

log = logging.getLogger(__name__)

LETTER = {"audio": "a", "video": "v", "text": "t"}
CLASSIFICATION_KEYS = ("a2v", "v2a", "a2t", "t2a", "v2t", "t2v", "a2a", "v2v", "t2t")
RETRIEVAL_KEYS = ("t2a", "t2v", "a2v", "a2t", "v2t", "v2a")
RECALL_AT = (1, 5, 10)
# Scores this close to the positive's count as ties, and ties count against the query: a collapsed encoder
# that maps every clip to the same embedding must score chance, not R@1 = 1.
TIE_TOLERANCE = 1e-6
QUERY_BLOCK = 1024


@dataclass
class EncodedSplit:
    """Frozen-encoder output of one split, per modality m:
    vectors[m] float32 [N, T, D] (concat(q¹, q²) per step), valid[m] bool [N, T], codes[m] one int64 [N, T, S]
    per layer; labels int64 [N, T] (a per-clip label is repeated over T); ids: N clip ids."""

    vectors: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    codes: dict[str, list[np.ndarray]]
    labels: np.ndarray
    ids: list[str]

    @property
    def modalities(self) -> list[str]:
        return list(self.vectors)


def pair_key(source: str, target: str) -> str:
    return f"{LETTER[source]}2{LETTER[target]}"


def check_data(model: SRCID, dataset: Any, source: str) -> None:
    """Raise ValueError naming `source` when the data cannot be evaluated with this model."""
    cfg = model.cfg
    if len(dataset) == 0:
        raise ValueError(f"{source}: no clips")
    if dataset.T != cfg.T:
        raise ValueError(f"{source}: clips have T={dataset.T} steps, the checkpoint's model expects T={cfg.T}")
    missing = [m for m in cfg.modalities if m not in dataset.modalities]
    if missing:
        raise ValueError(
            f"{source}: no {missing} features; the checkpoint encodes {list(cfg.modalities)}, "
            f"the data holds {list(dataset.modalities)}"
        )
    for m, spec in cfg.modalities.items():
        shape = tuple(dataset.modalities[m]["shape"])
        if shape != tuple(spec.shape):
            raise ValueError(
                f"{source}: {m} features are {list(shape)} per step, the checkpoint expects {list(spec.shape)}"
            )
    if "labels" not in dataset[0]:
        raise ValueError(f"{source}: clips have no labels; the classification probes need per-step or per-clip labels")


@torch.no_grad()
def encode_split(model: SRCID, dataset: Any, batch_size: int = 256, desc: str = "encode") -> EncodedSplit:
    """Run the frozen encoders of every model modality over `dataset` in order (batched, on the model's device)."""
    device = next(model.parameters()).device
    T = model.cfg.T
    vectors: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
    valid: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
    codes: dict[str, list[list[np.ndarray]]] = {m: [] for m in model.modalities}
    labels: list[np.ndarray] = []
    loader = make_loader(dataset, batch_size, shuffle=False, pin_memory=False)
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        y = batch["labels"]
        labels.append((y[:, None].expand(-1, T) if y.dim() == 1 else y).numpy())
        for m in model.modalities:
            mask = batch.get(mask_key(m))
            c, v, ok = model.quantized_steps(m, batch[m].to(device), None if mask is None else mask.to(device))
            vectors[m].append(v.float().cpu().numpy())
            valid[m].append(ok.cpu().numpy())
            codes[m].append([layer.cpu().numpy() for layer in c])
    return EncodedSplit(
        vectors={m: np.concatenate(v) for m, v in vectors.items()},
        valid={m: np.concatenate(v) for m, v in valid.items()},
        codes={m: [np.concatenate(layer) for layer in zip(*c)] for m, c in codes.items()},
        labels=np.concatenate(labels).astype(np.int64),
        ids=list(dataset.ids),
    )


# ---------------------------------------------------------------- per-step linear probes


def step_samples(split: EncodedSplit, modality: str, dims: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The valid steps of one modality: x [n, D'] (the `dims` columns, or all), y [n], clip index [n]."""
    ok = split.valid[modality]
    x = split.vectors[modality][ok]
    return (x if dims is None else x[:, dims]), split.labels[ok], np.nonzero(ok)[0]


@dataclass
class LinearProbe:
    """Standardise with the source modality's training statistics, then one linear layer to class logits."""

    mean: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]
    linear: nn.Linear

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """x [n, D] -> predicted class [n]."""
        z = (torch.from_numpy(np.ascontiguousarray(x, np.float32)) - self.mean) / self.scale
        return self.linear(z).argmax(-1).numpy()


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    num_classes: int,
    seed: int = 0,
    *,
    holdout: float = 0.1,
    max_epochs: int = 100,
    patience: int = 8,
    batch_size: int = 512,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
) -> LinearProbe:
    """Train a linear probe with Adam, stopping early on a held-out slice of whole clips.

    x [n, D] float, y [n] int in [0, num_classes), groups [n]: the clip each step belongs to, so that steps of
    one clip never sit on both sides of the early-stopping split. Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    clips = np.unique(groups)
    held_clips = rng.permutation(clips)[: int(round(holdout * len(clips)))] if len(clips) > 1 else clips[:0]
    held = np.isin(groups, held_clips)
    fit = ~held
    x_fit = torch.from_numpy(np.ascontiguousarray(x[fit], np.float32))
    y_fit = torch.from_numpy(y[fit].astype(np.int64))
    mean = x_fit.mean(0)
    scale = x_fit.std(0, correction=0)
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
    x_fit = (x_fit - mean) / scale
    x_held = (torch.from_numpy(np.ascontiguousarray(x[held], np.float32)) - mean) / scale
    y_held = torch.from_numpy(y[held].astype(np.int64))
    # Without a held-out slice (a single clip) the probe is judged on what it fits.
    x_check, y_check = (x_held, y_held) if held.any() else (x_fit, y_fit)

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        linear = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    best_acc, best_state, stale = -1.0, None, 0
    for _ in range(max_epochs):
        order = torch.randperm(len(y_fit), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(linear(x_fit[idx]), y_fit[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (linear(x_check).argmax(-1) == y_check).float().mean().item()
        if acc > best_acc:
            best_acc, best_state, stale = acc, {k: v.clone() for k, v in linear.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= patience:
                break
    linear.load_state_dict(best_state)
    return LinearProbe(mean, scale, linear.eval())


def cross_modal_probes(
    train: EncodedSplit, test: EncodedSplit, num_classes: int, seed: int = 0, dims: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Probes trained on modality A (train split) and applied to modality B (test split), for every ordered pair
    (A, B), same-modality pairs included. Returns {"accuracy": {"a2v": ..., ..., "t2t": ...}, "macro_f1": {...}}:
    per-step accuracy, and the F1 averaged over the classes present in B's test steps."""
    accuracy: dict[str, float] = {}
    macro_f1: dict[str, float] = {}
    for source in train.modalities:
        x, y, groups = step_samples(train, source, dims)
        if len(y) == 0:
            raise ValueError(f"{source}: no valid step in the training split to train a probe on")
        probe = fit_probe(x, y, groups, num_classes, seed)
        for target in test.modalities:
            xt, yt, _ = step_samples(test, target, dims)
            predicted = probe.predict(xt)
            key = pair_key(source, target)
            accuracy[key] = float((predicted == yt).mean())
            macro_f1[key] = float(f1_score(yt, predicted, labels=np.unique(yt), average="macro", zero_division=0))
    order = [k for k in CLASSIFICATION_KEYS if k in accuracy]
    return {"accuracy": {k: accuracy[k] for k in order}, "macro_f1": {k: macro_f1[k] for k in order}}


# ---------------------------------------------------------------- zero-shot retrieval


def clip_embeddings(vectors: np.ndarray, valid: np.ndarray, dims: np.ndarray | None = None) -> np.ndarray:
    """vectors [N, T, D], valid [N, T] -> [N, D'] L2-normalised mean over valid steps: SRCID.encode's embedding
    (concat(mean_t q¹, mean_t q²)), computed on the `dims` columns when given."""
    v = vectors if dims is None else vectors[..., dims]
    w = valid[..., None].astype(np.float64)
    mean = (v * w).sum(1) / np.maximum(w.sum(1), 1.0)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.maximum(norm, 1e-12)).astype(np.float32)


def ranks_of_positives(similarity: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """similarity [Q, K], positive [Q, K] bool (each row holds at least one) -> rank [Q] (1 = best) of each
    query's best-scoring positive: 1 + the number of other keys scoring at least as high (ties count against)."""
    if not positive.any(1).all():
        raise ValueError("every query needs at least one positive key")
    best = np.where(positive, similarity, -np.inf).max(1, keepdims=True)
    return 1 + ((similarity >= best - TIE_TOLERANCE) & ~positive).sum(1)


def recall_figures(ranks: np.ndarray) -> dict[str, float]:
    """ranks [Q] -> {"r1", "r5", "r10": fraction of queries ranked within k, "medr": median rank}."""
    figures = {f"r{k}": float((ranks <= k).mean()) for k in RECALL_AT}
    figures["medr"] = float(np.median(ranks))
    return figures


def zero_shot_retrieval(
    test: EncodedSplit, dims: np.ndarray | None = None, match: str = "clip"
) -> dict[str, dict[str, float]]:
    """Cosine retrieval between the clip embeddings of two modalities, keys "t2a", ... (query 2 gallery).

    match="clip": the one positive is the same clip (strict); match="labels": every clip whose label sequence
    equals the query's is a positive (clips with identical label sequences are indistinguishable by content).
    """
    if match not in ("clip", "labels"):
        raise ValueError(f"match must be 'clip' or 'labels', got {match!r}")
    n = len(test.labels)
    emb = {m: clip_embeddings(test.vectors[m], test.valid[m], dims) for m in test.modalities}
    by_letter = {LETTER[m]: m for m in test.modalities}
    result = {}
    for key in RETRIEVAL_KEYS:
        q, g = key.split("2")
        if q not in by_letter or g not in by_letter:
            continue
        queries, gallery = emb[by_letter[q]], emb[by_letter[g]]
        ranks = []
        # Blocks of queries keep the similarity and positive matrices [block, N] on large test splits.
        for start in range(0, n, QUERY_BLOCK):
            rows = np.arange(start, min(n, start + QUERY_BLOCK))
            if match == "clip":
                positive = rows[:, None] == np.arange(n)[None]
            else:
                positive = (test.labels[rows, None, :] == test.labels[None]).all(-1)
            ranks.append(ranks_of_positives(queries[rows] @ gallery.T, positive))
        result[key] = recall_figures(np.concatenate(ranks))
    return result


# ---------------------------------------------------------------- codebook, chance


def _code_figures(codes: np.ndarray, labels: np.ndarray, size: int) -> tuple[float, float, float]:
    """codes [n], labels [n] -> (usage, perplexity, label purity: the fraction of steps whose label is the most
    frequent label of their code)."""
    idx = torch.from_numpy(codes)
    usage, perplexity = code_usage(idx, torch.ones_like(idx, dtype=torch.bool), size)
    n_labels = int(labels.max()) + 1
    table = np.zeros((size, n_labels), np.int64)
    np.add.at(table, (codes, labels), 1)
    return float(usage), float(perplexity), float(table.max(1).sum() / max(1, len(codes)))


def codebook_figures(model: SRCID, split: EncodedSplit) -> dict[str, Any]:
    """Usage (fraction of codes used) and perplexity per layer over the valid steps of all modalities pooled
    (first stage for RVQ, as in training); layer-2 figures are None for one-layer models. "by_modality" adds
    the same per modality, with the label purity of the codes (how much of the label a code alone tells)."""
    figures: dict[str, Any] = {}
    by_modality: dict[str, dict[str, float | None]] = {m: {} for m in split.modalities}
    layers = model.layers()
    for i in range(2):
        name = f"layer{i + 1}"
        keys = (f"{name}_usage", f"{name}_perplexity", f"{name}_purity")
        if i >= len(layers):
            figures.update({keys[0]: None, keys[1]: None, f"{name}_size": None})
            for m in split.modalities:
                by_modality[m].update(dict.fromkeys(keys))
            continue
        size = layers[i].quantizer.size
        codes = {m: split.codes[m][i][..., 0][split.valid[m]] for m in split.modalities}
        labels = {m: split.labels[split.valid[m]] for m in split.modalities}
        pooled = _code_figures(np.concatenate(list(codes.values())), np.concatenate(list(labels.values())), size)
        figures.update({keys[0]: pooled[0], keys[1]: pooled[1], f"{name}_size": int(size)})
        for m in split.modalities:
            by_modality[m].update(zip(keys, _code_figures(codes[m], labels[m], size)))
    figures["by_modality"] = by_modality
    return figures


def chance_levels(train: EncodedSplit, test: EncodedSplit, num_classes: int) -> dict[str, Any]:
    """What a probe without information scores: always the training split's majority class ("classification",
    per key), a uniform guess ("uniform"); and a random ranking of the N test clips ("retrieval")."""
    pooled = np.concatenate([train.labels[train.valid[m]] for m in train.modalities])
    majority = int(np.bincount(pooled, minlength=num_classes).argmax())
    target_acc = {m: float((test.labels[test.valid[m]] == majority).mean()) for m in test.modalities}
    n = len(test.labels)
    return {
        "majority_class": majority,
        "classification": {
            pair_key(a, b): target_acc[b] for a in train.modalities for b in test.modalities
        },
        "uniform": 1.0 / num_classes,
        "retrieval": {**{f"r{k}": min(k, n) / n for k in RECALL_AT}, "medr": (n + 1) / 2},
    }


def summary(
    classification: dict[str, float], macro_f1: dict[str, float], retrieval: dict[str, dict[str, float]]
) -> dict[str, float]:
    def mean(figures: dict[str, float], cross: bool) -> float:
        return float(np.mean([v for k, v in figures.items() if (k[0] != k[2]) == cross]))

    return {
        "cross_modal_accuracy": mean(classification, cross=True),
        "unimodal_accuracy": mean(classification, cross=False),
        "cross_modal_macro_f1": mean(macro_f1, cross=True),
        "retrieval_r1": float(np.mean([r["r1"] for r in retrieval.values()])),
        "retrieval_r10": float(np.mean([r["r10"] for r in retrieval.values()])),
    }


# ---------------------------------------------------------------- the whole protocol


def protocol(train: EncodedSplit, test: EncodedSplit, num_classes: int, seed: int, dims: np.ndarray | None = None):
    """Probes, strict and label-match retrieval, and their summary on the full vectors or the `dims` columns."""
    probes = cross_modal_probes(train, test, num_classes, seed, dims)
    classification = probes["accuracy"]
    retrieval = zero_shot_retrieval(test, dims, match="clip")
    return {
        "classification": classification,
        "classification_macro_f1": probes["macro_f1"],
        "retrieval": retrieval,
        "retrieval_label_match": zero_shot_retrieval(test, dims, match="labels"),
        "summary": summary(classification, probes["macro_f1"], retrieval),
    }


def _difference(after: Any, before: Any) -> Any:
    if isinstance(after, dict):
        return {k: _difference(after[k], before[k]) for k in after}
    return float(after) - float(before)


def evaluate_encoded(
    model: SRCID,
    train: EncodedSplit,
    test: EncodedSplit,
    num_classes: int,
    seed: int = 0,
    toc_dims: int | None = None,
) -> dict[str, Any]:
    """The report (without file/run metadata) from already encoded splits."""
    started = time.perf_counter()
    report: dict[str, Any] = protocol(train, test, num_classes, seed)
    report["codebook"] = codebook_figures(model, test)
    report["chance"] = chance_levels(train, test, num_classes)
    log.info("eval full: %s codebook=%s (%.1f s)", report["summary"], report["codebook"], time.perf_counter() - started)
    if toc_dims is not None:
        importance = dimension_importance(train.vectors, train.valid)
        dims = select_dimensions(importance, toc_dims)
        reduced = protocol(train, test, num_classes, seed, dims)
        keep = ("classification", "classification_macro_f1", "retrieval", "summary")
        report["toc"] = {
            "dims": int(toc_dims),
            "of": int(importance.shape[0]),
            "selected": dims.tolist(),
            **reduced,
            "effect": {k: _difference(reduced[k], report[k]) for k in keep},
        }
        log.info("eval toc (%d of %d dims): %s", toc_dims, importance.shape[0], reduced["summary"])
    return report


def num_classes_of(dataset: Any, *splits: EncodedSplit) -> int:
    seen = max(int(s.labels.max()) for s in splits) + 1
    declared = getattr(dataset, "num_classes", None)
    if declared is not None and seen > declared:
        raise ValueError(f"labels reach {seen - 1}, but the data declares num_classes={declared}")
    if min(int(s.labels.min()) for s in splits) < 0:
        raise ValueError("labels must be class indices >= 0")
    return int(declared or seen)


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    out_dir: str | Path | None,
    toc_dims: int | None = None,
    seed: int = 0,
    *,
    toc_fraction: float | None = None,
    train_split: str = "train",
    test_split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate a checkpoint on a data set; write report.json, report.md and plots to `out_dir` (when given).

    toc_dims / toc_fraction: also evaluate on the TOC-selected dimensions (a count, or a fraction of H·layers).
    Returns the report: {"classification", "retrieval", "codebook", "chance", "summary", "toc"?, "meta", ...}.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
    # The encoders run on the device (CUDA when "auto" finds one); probes and retrieval run on the CPU.
    model, metadata = load_model(checkpoint, select_device(device, local_rank=0))
    n_dims = model.cfg.hidden * model.cfg.layers
    toc_n = toc_size(n_dims, toc_dims, toc_fraction)
    datasets = {}
    for split in (train_split, test_split):
        datasets[split] = open_dataset(data, split)
        check_data(model, datasets[split], f"{data} ({split} split)")
    encoded = {
        split: encode_split(model, ds, batch_size, desc=f"encode {split}") for split, ds in datasets.items()
    }
    train, test = encoded[train_split], encoded[test_split]
    num_classes = num_classes_of(datasets[train_split], train, test)
    trained_on = metadata.get("data_fingerprint") or None
    probed_on = getattr(datasets[train_split], "fingerprint", None)
    if trained_on and probed_on and trained_on != probed_on:
        # Legitimate (other data, rebuilt shards), but figures are then not comparable with the training run's.
        log.warning("%s was trained on data %s…, the %s split here is %s…", checkpoint, trained_on[:12],
                    train_split, probed_on[:12])  # fmt: skip
    report = evaluate_encoded(model, train, test, num_classes, seed, toc_n)
    report["meta"] = {
        "checkpoint": str(checkpoint),
        "checkpoint_step": int(metadata["step"]),
        "data": str(data),
        "checkpoint_data_fingerprint": trained_on,
        "data_fingerprint": probed_on,
        "same_data_as_training": None if not (trained_on and probed_on) else trained_on == probed_on,
        "splits": {"train": train_split, "test": test_split},
        "clips": {"train": len(train.labels), "test": len(test.labels)},
        "num_classes": num_classes,
        "seed": seed,
        "modalities": model.modalities,
        "quantizer": model.cfg.quantizer,
        "layers": model.cfg.layers,
        "vector_dims": n_dims,
    }
    if out_dir is not None:
        # Imported here: plotting pulls in matplotlib, which the in-process API need not pay for without out_dir.
        from srcid.training.report import write_report

        write_report(report, out_dir)
    return report
