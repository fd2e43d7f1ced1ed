"""On-disk form of an index: per modality keys.npy int64 [n], vectors.npy float32 [n, E], ids.json [n] (and
centroids.npy float32 [nlist, E] for IVF), plus manifest.json, the commit point that names them.

Every file is written to a temporary name, fsynced, renamed into place, and the directory fsynced; the data
files carry a fresh token in their names, so the manifest is replaced only after everything it names is
durable, and a crash at any moment leaves either the old complete index or the new one. Arrays are loaded
with allow_pickle=False.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from srcid.index.backends import IvfParams

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
_DATA_FILE = re.compile(r"^(audio|video|text)-[0-9a-f-]+\.(keys\.npy|vectors\.npy|ids\.json|centroids\.npy)$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` via a temporary file in the same directory: fsync, rename over, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def locked(index_dir: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on the index folder, exclusive for a save (which deletes what its manifest does not name),
    shared for a load: processes that share a folder (uvicorn --workers, replicas on one volume) then never delete
    files another is writing or reading. Without it a second worker's save removed the first's half-written files."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / LOCK, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(index_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, why it cannot be used)."""
    path = Path(index_dir) / MANIFEST
    if not path.exists():
        return None, f"no {MANIFEST} in {index_dir}"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"{path} is unreadable ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        return None, f"{path} has format_version {found!r}, this code reads {FORMAT_VERSION}"
    return manifest, None


def write_index(
    index_dir: Path,
    header: dict[str, Any],
    snapshots: dict[str, tuple[np.ndarray, list[str], np.ndarray, IvfParams | None]],
) -> dict[str, Any]:
    """Persist modality snapshots (keys [n], ids [n], vectors [n, E], ivf) under a new manifest; return it."""
    index_dir = Path(index_dir)
    with locked(index_dir, exclusive=True):
        return _write_locked(index_dir, header, snapshots)


def _write_locked(
    index_dir: Path,
    header: dict[str, Any],
    snapshots: dict[str, tuple[np.ndarray, list[str], np.ndarray, IvfParams | None]],
) -> dict[str, Any]:
    token = f"{int(header['position']):012d}-{uuid.uuid4().hex[:8]}"
    modalities: dict[str, Any] = {}
    for modality, (keys, ids, vectors, ivf) in snapshots.items():
        stem = f"{modality}-{token}"
        entry: dict[str, Any] = {
            "count": len(keys),
            "keys": f"{stem}.keys.npy",
            "vectors": f"{stem}.vectors.npy",
            "ids": f"{stem}.ids.json",
        }
        atomic_write(index_dir / entry["keys"], lambda f, a=keys: np.save(f, a.astype(np.int64), allow_pickle=False))
        atomic_write(index_dir / entry["vectors"], lambda f, a=vectors: np.save(f, a.astype(np.float32), allow_pickle=False))
        atomic_write(index_dir / entry["ids"], lambda f, a=ids: f.write(json.dumps(a).encode()))
        if ivf is not None:
            entry["centroids"] = f"{stem}.centroids.npy"
            entry["nlist"], entry["nprobe"], entry["recall_at_10"] = len(ivf.centroids), ivf.nprobe, ivf.recall_at_10
            atomic_write(index_dir / entry["centroids"], lambda f, a=ivf.centroids: np.save(f, a, allow_pickle=False))
        modalities[modality] = entry
    manifest = {"format_version": FORMAT_VERSION, **header, "written_at": time.time(), "modalities": modalities}
    atomic_write(index_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    _remove_unreferenced(index_dir, manifest)
    return manifest


def _remove_unreferenced(index_dir: Path, manifest: dict[str, Any]) -> None:
    keep = {name for entry in manifest["modalities"].values() for k, name in entry.items() if isinstance(name, str)}
    for path in index_dir.iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if (stale_tmp or _DATA_FILE.match(path.name)) and path.name not in keep:
            path.unlink(missing_ok=True)


def read_modality(index_dir: Path, entry: dict[str, Any], dim: int) -> tuple[np.ndarray, list[str], np.ndarray, IvfParams | None]:
    """Load one modality's arrays and check them against the manifest entry; ValueError naming the file if not."""
    index_dir = Path(index_dir)
    count = int(entry["count"])
    keys = np.load(index_dir / entry["keys"], allow_pickle=False)
    vectors = np.load(index_dir / entry["vectors"], allow_pickle=False)
    ids = json.loads((index_dir / entry["ids"]).read_text())
    if keys.shape != (count,) or keys.dtype != np.int64:
        raise ValueError(f"{entry['keys']}: expected int64 [{count}], found {keys.dtype} {list(keys.shape)}")
    if vectors.shape != (count, dim) or vectors.dtype != np.float32:
        raise ValueError(f"{entry['vectors']}: expected float32 [{count}, {dim}], found {vectors.dtype} {list(vectors.shape)}")
    if not isinstance(ids, list) or len(ids) != count or len(set(ids)) != count:
        raise ValueError(f"{entry['ids']}: expected {count} distinct ids")
    if len(np.unique(keys)) != count:
        raise ValueError(f"{entry['keys']}: keys are not distinct")
    ivf = None
    if "centroids" in entry:
        centroids = np.load(index_dir / entry["centroids"], allow_pickle=False)
        if centroids.ndim != 2 or centroids.shape[1] != dim:
            raise ValueError(f"{entry['centroids']}: expected [nlist, {dim}], found {list(centroids.shape)}")
        ivf = IvfParams(centroids.astype(np.float32), int(entry["nprobe"]), float(entry["recall_at_10"]))
    return keys, ids, vectors, ivf
