"""Shared builders for the export/runtime tests (no tests here): small trained checkpoints and their bundles,
built once per test session because every export traces the model."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from srcid.model import SRCID, ModalitySpec, SRCIDConfig
from srcid.training.checkpoint import save_checkpoint
from srcid.training.export import export_bundle
from srcid.training.step import OptimConfig, TrainStep, WarmStartConfig

# SRCID_AVDIGITS_SHARDS points elsewhere (e.g. a fresh build); the default is where the data set is built.
AVDIGITS_SHARDS = Path(os.environ.get("SRCID_AVDIGITS_SHARDS", "/work/avdigits/shards"))
SMALL_MODALITIES = {
    "audio": ModalitySpec(shape=(20,)),
    "video": ModalitySpec(shape=(3, 3, 4)),
    "text": ModalitySpec(shape=(12,), masked=True),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small models run fastest on one thread, and on a loaded 2-core machine two spinning torch threads make
    them ~100x slower. Import this fixture into a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def avdigits():
    """The AV-Digits shards when another engineer's builder has written them, else None."""
    if not (AVDIGITS_SHARDS / "manifest.json").is_file():
        return None
    from srcid.training.shards import Shards

    return Shards(AVDIGITS_SHARDS)


def random_inputs(spec: ModalitySpec, B: int, T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """features [B, T, *shape] float32 and, for masked modalities, a mask [B, T] with 0..T valid leading steps."""
    x = rng.standard_normal((B, T, *spec.shape)).astype(np.float32)
    if not spec.masked:
        return x, None
    return x, np.arange(T)[None, :] < rng.integers(0, T + 1, (B, 1))


def _train_batches(cfg: SRCIDConfig, steps: int, B: int, seed: int):
    shards = avdigits()
    if shards is not None:
        split = shards.split(shards.splits[0])
        for s in range(steps):
            items = [split[(s * B + i) % len(split)] for i in range(B)]
            yield {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0] if k != "labels"}
        return
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = {}
        for m, spec in cfg.modalities.items():
            x, mask = random_inputs(spec, B, cfg.T, rng)
            batch[m] = torch.from_numpy(x)
            if mask is not None:
                # every training clip keeps at least one valid step
                mask[:, 0] = True
                batch[f"{m}_mask"] = torch.from_numpy(mask)
        yield batch


def make_checkpoint(
    path: Path, cfg: SRCIDConfig, steps: int = 3, B: int = 16, seed: int = 0, **meta
) -> Path:
    """Train `steps` steps on AV-Digits (when present) or random clips and save; `meta` adds checkpoint metadata."""
    torch.manual_seed(seed)
    model = SRCID(cfg)
    trainer = TrainStep(model, OptimConfig(), WarmStartConfig(force_step=1))
    for batch in _train_batches(cfg, steps, B, seed):
        trainer.step(batch)
    meta = {"config": {"model": cfg.model_dump(mode="json")}, "step": trainer.step_count, **meta}
    return save_checkpoint(path, model, trainer, meta)


def small_config(only: tuple[str, ...] | None = None, **overrides) -> SRCIDConfig:
    """Small dims for speed; AV-Digits' feature dims when its shards exist, so a real clip can be encoded.
    only: keep just these modalities (fewer graphs to export)."""
    modalities, T = SMALL_MODALITIES, 10
    shards = avdigits()
    if shards is not None:
        modalities = {m: ModalitySpec(shape=tuple(s["shape"]), masked=s["masked"]) for m, s in shards.modalities.items()}
        T = shards.T
    if only is not None:
        modalities = {m: modalities[m] for m in only}
    kw = dict(modalities=modalities, T=T, hidden=32, heads=4, ff=64, codebook_size=24)
    kw.update(overrides)
    return SRCIDConfig(**kw)


@functools.cache
def _built(root: str, name: str, overrides: tuple) -> tuple[Path, Path]:
    base = Path(root) / name
    base.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(base / "model.safetensors", small_config(**dict(overrides)))
    export_bundle(ckpt, base / "bundle")
    return ckpt, base / "bundle"


def built_bundle(tmp_path_factory, name: str = "vq2", **overrides) -> tuple[Path, Path]:
    """(checkpoint, bundle folder) of a small trained model, exported once per session and config."""
    return _built(str(tmp_path_factory.getbasetemp()), name, tuple(sorted(overrides.items())))
