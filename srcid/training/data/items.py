"""What an ITEM is, the attributes every reader carries, and the checks all readers share.

An ITEM is one clip as a dict of numpy arrays:
    "<modality>"       float32 [T, *shape]      for every modality of the data set
    "<modality>_mask"  bool    [T]              for a masked modality (text); True = a real step, False = padding
    "labels"           int64   [T] or []        optional: per-step class, or one class for the clip
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from srcid.training.data.errors import DataError

Item = dict[str, np.ndarray]


@runtime_checkable
class ItemDataset(Protocol):
    """A map-style data set of ITEMs; what the training loop, export and evaluation read."""

    T: int
    modalities: dict[str, dict[str, Any]]  # name -> {"shape": [...], "masked": bool}
    fingerprint: str  # stable hash identifying the data (source files and split)
    num_classes: int | None
    ids: list[str]  # one clip id per item

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Item: ...


def mask_key(modality: str) -> str:
    return f"{modality}_mask"


def fingerprint_of(parts: dict[str, Any]) -> str:
    """sha256 of a JSON-serialisable description of the data; key order does not matter."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_signature(path: Path, edge_bytes: int = 1 << 20) -> dict[str, Any]:
    """Size plus sha256 of the first and last `edge_bytes`: identifies a multi-GB feature file without
    reading it all (hashing a 4 GB h5 at every open would dominate start-up)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(edge_bytes))
        if size > edge_bytes:
            f.seek(max(edge_bytes, size - edge_bytes))
            h.update(f.read(edge_bytes))
    return {"name": path.name, "size": size, "edges_sha256": h.hexdigest()}


def check_item(item: Item, modalities: dict[str, dict], T: int, source: str) -> Item:
    """Validate one ITEM against the data set's declared modalities; `source` names the file(s) it came from."""
    for name, spec in modalities.items():
        if name not in item:
            raise DataError(f"{source}: no {name!r} features")
        x = item[name]
        expected = (T, *spec["shape"])
        if x.shape != expected:
            raise DataError(f"{source}: {name} has shape {list(x.shape)}, expected {list(expected)}")
        if not np.isfinite(x).all():
            raise DataError(f"{source}: {name} holds NaN or inf ({int((~np.isfinite(x)).sum())} values)")
        if spec.get("masked"):
            m = item.get(mask_key(name))
            if m is None or m.shape != (T,) or m.dtype != np.bool_:
                got = None if m is None else f"{m.dtype} {list(m.shape)}"
                raise DataError(f"{source}: {mask_key(name)} must be bool [{T}], got {got}")
    labels = item.get("labels")
    if labels is not None and labels.shape not in ((T,), ()):
        raise DataError(f"{source}: labels have shape {list(labels.shape)}, expected [{T}] or []")
    return item
