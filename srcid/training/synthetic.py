"""A synthetic paired data set: one latent class sequence per clip, rendered into each modality differently.

Used by the training test and the README demo, where no real features can be downloaded. A clip has T
steps; its class sequence is sticky (it keeps its class, and switches to a different one with probability
`switch_prob` per step). Each modality m renders step t as

    x_m[t] = W2_m · tanh(W1_m · [E[class_t] ; s_m[t]] + b1_m) + noise · ε

with E a class embedding shared by all modalities, s_m a modal-specific nuisance latent (a per-clip style
plus per-step jitter, independent of the class and of the other modalities), and (W1_m, b1_m, W2_m) a fixed
random 2-layer map of m's own. So the class is the only thing the modalities share, paired step by step,
and no modality's features are a linear copy of another's. Masked modalities (text) lose up to T/4 trailing
steps in `mask_fraction` of the clips (mask False, features zero there).

Everything is a function of `seed` (the maps and embeddings) and the stream (the clips): splits drawn
from one seed share the maps and differ in clips.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from srcid.training.data.items import Item, fingerprint_of, mask_key
from srcid.training.shards import write_shards

DEFAULT_DIMS: dict[str, int | tuple[int, ...]] = {"audio": 32, "video": 48, "text": 24}
VERSION = 1


class SyntheticPaired(Dataset):
    """In-memory paired clips with the reader attributes (T, modalities, fingerprint, num_classes, ids).

    `arrays`: each modality float32 [N, T, *shape], "<m>_mask" bool [N, T], "labels" int64 [N, T].
    """

    def __init__(self, arrays: dict[str, np.ndarray], T: int, modalities: dict[str, dict], num_classes: int, fingerprint: str):
        self.arrays = arrays
        self.T = T
        self.modalities = modalities
        self.num_classes: int | None = num_classes
        self.fingerprint = fingerprint
        self.ids = [f"synthetic-{fingerprint[:8]}-{i:06d}" for i in range(len(arrays["labels"]))]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Item:
        return {key: a[i] for key, a in self.arrays.items()}


def _shape(dim: int | Sequence[int]) -> tuple[int, ...]:
    return (int(dim),) if np.isscalar(dim) else tuple(int(d) for d in dim)


def _stream(split: str) -> int:
    return zlib.crc32(split.encode())


def _class_sequences(rng: np.random.Generator, n: int, T: int, num_classes: int, switch_prob: float) -> np.ndarray:
    labels = np.empty((n, T), dtype=np.int64)
    labels[:, 0] = rng.integers(num_classes, size=n)
    switch = rng.random((n, T)) < switch_prob
    # a switch moves to a *different* class: add 1..C-1 modulo C
    step = rng.integers(1, num_classes, size=(n, T))
    for t in range(1, T):
        labels[:, t] = np.where(switch[:, t], (labels[:, t - 1] + step[:, t]) % num_classes, labels[:, t - 1])
    return labels


def make_synthetic(
    n_clips: int,
    T: int = 10,
    num_classes: int = 8,
    dims: Mapping[str, int | Sequence[int]] | None = None,
    noise: float = 0.3,
    seed: int = 0,
    *,
    stream: int = 0,
    switch_prob: float = 0.2,
    masked: Sequence[str] = ("text",),
    mask_fraction: float = 0.3,
    latent_dim: int = 16,
    nuisance_dim: int = 4,
    hidden: int = 64,
) -> SyntheticPaired:
    """`n_clips` paired clips. dims: modality -> feature size (an int, or a shape such as (7, 7, 8));
    default audio 32, video 48, text 24. Same (seed, stream, options) -> identical arrays."""
    if num_classes < 2 or T < 1 or n_clips < 1:
        raise ValueError(f"need n_clips >= 1, T >= 1, num_classes >= 2; got {n_clips}, {T}, {num_classes}")
    dims = dict(DEFAULT_DIMS if dims is None else dims)
    unknown = sorted(set(masked) - set(dims))
    if unknown:
        raise ValueError(f"masked modalities {unknown} are not in dims {sorted(dims)}")
    class_embedding = np.random.default_rng([seed, 0]).standard_normal((num_classes, latent_dim))
    clips = np.random.default_rng([seed, 1, stream])
    labels = _class_sequences(clips, n_clips, T, num_classes, switch_prob)
    arrays: dict[str, np.ndarray] = {"labels": labels}
    modalities: dict[str, dict] = {}
    for name, dim in dims.items():
        shape = _shape(dim)
        maps = np.random.default_rng([seed, 2, zlib.crc32(name.encode())])
        w1 = maps.standard_normal((latent_dim + nuisance_dim, hidden)) / np.sqrt(latent_dim + nuisance_dim)
        b1 = 0.5 * maps.standard_normal(hidden)
        w2 = maps.standard_normal((hidden, int(np.prod(shape)))) / np.sqrt(hidden)
        style = clips.standard_normal((n_clips, 1, nuisance_dim))
        nuisance = style + 0.5 * clips.standard_normal((n_clips, T, nuisance_dim))
        z = np.concatenate([class_embedding[labels], nuisance], axis=-1)
        x = np.tanh(z @ w1 + b1) @ w2 + noise * clips.standard_normal((n_clips, T, w2.shape[1]))
        x = x.reshape(n_clips, T, *shape).astype(np.float32)
        if name in masked:
            mask = np.ones((n_clips, T), dtype=bool)
            cut = clips.random(n_clips) < mask_fraction
            lengths = clips.integers(1, max(1, T // 4) + 1, size=n_clips)
            for i in np.flatnonzero(cut):
                mask[i, T - min(lengths[i], T - 1) :] = False
            x[~mask] = 0.0
            arrays[mask_key(name)] = mask
        arrays[name] = x
        modalities[name] = {"shape": list(shape), "masked": name in masked}
    params: dict[str, Any] = {
        "n_clips": n_clips, "T": T, "num_classes": num_classes, "dims": {k: list(_shape(v)) for k, v in dims.items()},
        "noise": noise, "seed": seed, "stream": stream, "switch_prob": switch_prob, "masked": list(masked),
        "mask_fraction": mask_fraction, "latent_dim": latent_dim, "nuisance_dim": nuisance_dim, "hidden": hidden,
    }  # fmt: skip
    fingerprint = fingerprint_of({"format": "synthetic", "version": VERSION, **params})
    return SyntheticPaired(arrays, T, modalities, num_classes, fingerprint)


def synthetic_split(split: str, *, n_clips: int = 512, **options: Any) -> SyntheticPaired:
    """The `split` of the synthetic set: same maps for every split of one seed, clips drawn per split name."""
    return make_synthetic(n_clips, stream=_stream(split), **options)


def write_synthetic_shards(out_dir: str | Path, sizes: Mapping[str, int] | None = None, **options: Any) -> Path:
    """Write the synthetic set as native shards (default {"train": 512, "test": 128} clips); returns the
    manifest path. `options` as for make_synthetic; `open_dataset(out_dir, split)` then reads it back."""
    sizes = dict(sizes or {"train": 512, "test": 128})
    splits, first = {}, None
    for split, n in sizes.items():
        ds = synthetic_split(split, n_clips=n, **options)
        first = first or ds
        splits[split] = {**ds.arrays, "ids": ds.ids}
    extra = {"synthetic": {"options": {k: v for k, v in options.items() if k != "dims"}, "dims": first.modalities}}
    return write_shards(out_dir, splits, first.modalities, first.T, num_classes=first.num_classes, extra=extra)
