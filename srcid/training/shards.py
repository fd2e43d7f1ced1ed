"""Native shards: the project's own on-disk format for paired clips.

A shard folder holds `manifest.json` and one sub-folder per split::

    DIR/manifest.json           {"format": "srcid-shards", "version": 1, "T": 10,
                                 "modalities": {"audio": {"shape": [128], "masked": false}, ...},
                                 "num_classes": 11, "splits": {"train": N, "test": M}, "fingerprint": "..."}
    DIR/<split>/<modality>.npy  float16/float32 [N, T, *shape]
    DIR/<split>/<modality>_mask.npy   bool [N, T]      (only for masked modalities, e.g. text)
    DIR/<split>/labels.npy      int64 [N, T] or [N]   (optional)
    DIR/<split>/ids.txt         one clip id per line

Arrays are plain `.npy` files opened memory-mapped (`allow_pickle=False`), so a 40k-clip set is read
from disk on demand instead of loaded into RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.manifest import sha256_file

FORMAT = "srcid-shards"
VERSION = 1


class ShardError(ValueError):
    """A shard folder is missing a file, or a file does not match its manifest."""


def _mask_name(modality: str) -> str:
    return f"{modality}_mask"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(
    out_dir: str | Path,
    splits: dict[str, dict[str, np.ndarray | list[str]]],
    modalities: dict[str, dict],
    T: int,
    num_classes: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Write `splits` ({split: {modality: [N, T, *shape], "<m>_mask": [N, T], "labels": ..., "ids": [...]}})
    under `out_dir`. `modalities` maps a name to {"shape": [...], "masked": bool}. Returns the manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    counts: dict[str, int] = {}
    for split, arrays in splits.items():
        sdir = out / split
        sdir.mkdir(exist_ok=True)
        n = None
        for name, spec in modalities.items():
            x = np.asarray(arrays[name])
            if x.shape[1:] != (T, *spec["shape"]):
                raise ShardError(f"{split}/{name}: shape {x.shape[1:]} != {(T, *spec['shape'])}")
            if not np.isfinite(x).all():
                raise ShardError(f"{split}/{name}: holds NaN or inf")
            n = x.shape[0] if n is None else n
            if x.shape[0] != n:
                raise ShardError(f"{split}/{name}: {x.shape[0]} clips, other modalities have {n}")
            _save_atomic(sdir / f"{name}.npy", x.astype(np.float16 if x.dtype == np.float16 else np.float32))
            if spec.get("masked"):
                m = np.asarray(arrays[_mask_name(name)], dtype=bool)
                if m.shape != (n, T):
                    raise ShardError(f"{split}/{_mask_name(name)}: shape {m.shape} != {(n, T)}")
                _save_atomic(sdir / f"{_mask_name(name)}.npy", m)
        if "labels" in arrays:
            labels = np.asarray(arrays["labels"], dtype=np.int64)
            if labels.shape not in ((n,), (n, T)):
                raise ShardError(f"{split}/labels: shape {labels.shape}, expected {(n,)} or {(n, T)}")
            _save_atomic(sdir / "labels.npy", labels)
        else:
            # a labels.npy left by an earlier write into this folder would be read back as this data's labels
            (sdir / "labels.npy").unlink(missing_ok=True)
        # `ids` may be a numpy array of strings, whose truth value is ambiguous: test for None explicitly.
        ids = [f"{split}-{i:06d}" for i in range(n)] if arrays.get("ids") is None else [str(i) for i in arrays["ids"]]
        if len(ids) != n or len(set(ids)) != n:
            raise ShardError(f"{split}/ids: need {n} distinct ids, got {len(ids)} ({len(set(ids))} distinct)")
        (sdir / "ids.txt").write_text("\n".join(ids) + "\n")
        counts[split] = n
        for f in sorted(sdir.iterdir()):
            digests[f"{split}/{f.name}"] = sha256_file(f)
    fingerprint = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "T": T,
        "modalities": {k: {"shape": list(v["shape"]), "masked": bool(v.get("masked"))} for k, v in modalities.items()},
        "num_classes": num_classes,
        "splits": counts,
        "fingerprint": fingerprint,
        **(extra or {}),
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


@dataclass
class ShardSplit:
    """One split of a shard folder; items are dicts of numpy arrays, read lazily from memory maps."""

    name: str
    T: int
    modalities: dict[str, dict]
    arrays: dict[str, np.ndarray]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = {}
        for name, spec in self.modalities.items():
            item[name] = np.asarray(self.arrays[name][i], dtype=np.float32)
            if spec["masked"]:
                item[_mask_name(name)] = np.asarray(self.arrays[_mask_name(name)][i], dtype=bool)
        if "labels" in self.arrays:
            item["labels"] = np.asarray(self.arrays["labels"][i], dtype=np.int64)
        return item


class Shards:
    """A native shard folder opened for reading; `shards.split("train")` gives a dataset."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no shard manifest (is {self.root} a native shard folder?)")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ShardError(f"{path}: not valid JSON ({exc})") from exc
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ShardError(
                f"{path}: format {self.manifest.get('format')!r} v{self.manifest.get('version')}, "
                f"this srcid reads {FORMAT!r} v{VERSION}"
            )
        self.T: int = self.manifest["T"]
        self.modalities: dict[str, dict] = self.manifest["modalities"]
        self.fingerprint: str = self.manifest["fingerprint"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _open(self, path: Path, shape: tuple[int, ...]) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the shard folder")
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ShardError(f"{path}: not a readable .npy array ({exc})") from exc
        if x.shape != shape:
            raise ShardError(f"{path}: shape {x.shape}, manifest says {shape}")
        return x

    def split(self, name: str) -> ShardSplit:
        if name not in self.manifest["splits"]:
            raise KeyError(f"{self.root}: no split {name!r} (has {self.splits})")
        n = self.manifest["splits"][name]
        sdir = self.root / name
        arrays = {}
        for m, spec in self.modalities.items():
            arrays[m] = self._open(sdir / f"{m}.npy", (n, self.T, *spec["shape"]))
            if spec["masked"]:
                arrays[_mask_name(m)] = self._open(sdir / f"{_mask_name(m)}.npy", (n, self.T))
        if (sdir / "labels.npy").is_file():
            labels = np.load(sdir / "labels.npy", mmap_mode="r", allow_pickle=False)
            if labels.shape not in ((n,), (n, self.T)):
                raise ShardError(f"{sdir / 'labels.npy'}: shape {labels.shape}, expected {(n,)} or {(n, self.T)}")
            arrays["labels"] = labels
        ids_path = sdir / "ids.txt"
        if not ids_path.is_file():
            raise FileNotFoundError(f"{ids_path}: missing from the shard folder")
        ids = ids_path.read_text().splitlines()  # lines, not words: an id may hold a space
        if len(ids) != n:
            raise ShardError(f"{ids_path}: {len(ids)} ids, manifest says {n} clips")
        return ShardSplit(name, self.T, self.modalities, arrays, ids)
