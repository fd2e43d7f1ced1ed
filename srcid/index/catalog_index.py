"""The retrieval index of a catalog: one ModalityIndex per modality, kept in step with the catalog's change log.

Consistency model: the catalog is the truth; an index is a cache of it at `position` (the last change seq it
applied). `sync()` applies the changes after `position` (every replica calls it, so replicas converge on the
catalog's state); `open_index_for_catalog` loads a persisted index, refuses one built for another bundle,
embedding size or catalog, and rebuilds or catches up so that it returns an index equal to the catalog.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from srcid.index import persist
from srcid.index.backends import choose_backend_kind
from srcid.index.catalog import Catalog
from srcid.index.config import IndexConfig
from srcid.index.errors import BadQueryError, CatalogMismatchError, ChangeLogGapError
from srcid.index.items import MODALITIES, Change, normalise_vectors
from srcid.index.modality_index import Hit, ModalityIndex

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
SYNC_CHUNK = 10_000


class CatalogIndex:
    def __init__(self, catalog: Catalog, config: IndexConfig | None = None):
        self.catalog = catalog
        self.config = config or IndexConfig()
        self.dim = catalog.dim
        self.bundle_version = catalog.bundle_version
        self.backend_kind = choose_backend_kind(self.config.backend)
        self.modalities = {m: ModalityIndex(m, self.dim, self.config, self.backend_kind) for m in MODALITIES}
        self.position = 0
        self._lock = threading.RLock()
        log.info("index backend %s (requested %s, kind %s)", self.backend_name, self.config.backend, self.config.kind)

    @property
    def backend_name(self) -> str:
        """e.g. "faiss-cpu-flat", "torch-cuda-fp16"; modalities large enough for IVF may differ ("a / b")."""
        return " / ".join(sorted({m.backend.name for m in self.modalities.values()}))

    def counts(self) -> dict[str, int]:
        return {m: len(ix) for m, ix in self.modalities.items()}

    def fallbacks(self) -> dict[str, int]:
        """Per modality, queries the bf16 or int8 backend's first pass could not settle (searched again in float32)
        since its backend was built; 0 for backends without a first pass."""
        return {m: ix.backend.fallbacks for m, ix in self.modalities.items()}

    # -- keeping up with the catalog ----------------------------------------------------------------------
    def rebuild(self) -> None:
        """Build every modality from a scan of the catalog, then apply the changes made during the scan."""
        with self._lock:
            position = self.catalog.version()
            for modality, index in self.modalities.items():
                keys, ids, vectors = [], [], []
                for batch_keys, batch_ids, batch_vectors in self.catalog.scan_embeddings(modality):
                    keys.append(batch_keys)
                    ids.extend(batch_ids)
                    vectors.append(batch_vectors)
                index.load(
                    np.concatenate(keys) if keys else np.empty(0, dtype=np.int64),
                    ids,
                    np.concatenate(vectors) if vectors else np.empty((0, self.dim), dtype=np.float32),
                    ivf=None,  # a rebuild retrains IVF on the current data
                )
            self.position = position
            log.info("index rebuilt from catalog %s at position %d: %s", self.catalog.url, position, self.counts())
            self.sync()

    def sync(self) -> int:
        """Apply the catalog's changes after `position`; return how many. Rebuilds if the log has a gap."""
        with self._lock:
            applied = 0
            while True:
                try:
                    changes = self.catalog.changes_since(self.position, SYNC_CHUNK)
                except ChangeLogGapError as exc:
                    log.warning("%s; rebuilding the index from the catalog", exc)
                    self.rebuild()
                    return applied
                if not changes:
                    return applied
                self._apply(changes)
                self.position = changes[-1].seq
                applied += len(changes)

    def _apply(self, changes: list[Change]) -> None:
        """Net effect of a run of changes: removals of deleted keys, then adds of items still current in the catalog
        (an add whose item was since deleted or re-added under a newer key is skipped; its later change covers it)."""
        removals: dict[str, list[int]] = defaultdict(list)
        adds = {c.id: c for c in changes if c.op == "add"}
        for change in changes:
            if change.op == "delete":
                removals[change.modality].append(change.key)
        current = dict(zip(adds, self.catalog.get_many(list(adds))))
        grouped: dict[str, list] = defaultdict(list)
        for item_id, change in adds.items():
            item = current[item_id]
            if item is not None and item.key == change.key:
                grouped[item.modality].append(item)
        for modality, keys in removals.items():
            self.modalities[modality].remove(keys)
        for modality, items in grouped.items():
            self.modalities[modality].add(
                np.array([it.key for it in items], dtype=np.int64),
                [it.id for it in items],
                np.stack([it.embedding for it in items]),
            )

    # -- search -------------------------------------------------------------------------------------------
    def search(self, modality: str, queries: Any, k: int = 10) -> list[list[Hit]]:
        """Queries [B, E] (or one [E]) -> per query up to k (id, cosine score) among items of `modality`."""
        if modality not in self.modalities:
            raise BadQueryError(f"target modality must be one of {list(MODALITIES)}, got {modality!r}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_TOP_K:
            raise BadQueryError(f"top_k must be an integer in [1, {MAX_TOP_K}], got {k!r}")
        return self.modalities[modality].search(normalise_vectors(queries, self.dim, what="query"), k)

    # -- persistence and inspection -----------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {
            "bundle_version": self.bundle_version,
            "dim": self.dim,
            "catalog_uid": self.catalog.uid,
            "position": self.position,
            "kind": self.config.kind,
        }

    def save(self, index_dir: str | Path) -> dict[str, Any]:
        """Persist atomically (see persist.py); return the manifest written."""
        with self._lock:
            header = {**self.header(), "backend": self.backend_name}
            snapshots = {m: ix.snapshot() for m, ix in self.modalities.items()}
        manifest = persist.write_index(Path(index_dir), header, snapshots)
        log.info("index saved to %s at position %d: %s", index_dir, header["position"], self.counts())
        return manifest

    def load(self, index_dir: str | Path, manifest: dict[str, Any]) -> None:
        with self._lock:
            for modality, index in self.modalities.items():
                entry = manifest["modalities"].get(modality)
                if entry is None:
                    raise ValueError(f"{index_dir}/{persist.MANIFEST}: no entry for modality {modality!r}")
                index.load(*persist.read_modality(Path(index_dir), entry, self.dim))
            self.position = int(manifest["position"])

    def refusal_reason(self, manifest: dict[str, Any]) -> str | None:
        """Why a persisted index cannot serve this catalog, or None if it can (possibly after catching up)."""
        version = self.catalog.version()
        if manifest.get("bundle_version") != self.bundle_version:
            return f"it was built for bundle {manifest.get('bundle_version')!r}, the catalog holds bundle {self.bundle_version!r}"
        if manifest.get("dim") != self.dim:
            return f"it holds embeddings of size {manifest.get('dim')}, the catalog holds size {self.dim}"
        if manifest.get("catalog_uid") != self.catalog.uid:
            return f"it was built from another catalog (uid {manifest.get('catalog_uid')}, this one is {self.catalog.uid})"
        if int(manifest.get("position", -1)) > version:
            return (f"it is ahead of the catalog (position {manifest.get('position')} > version {version}): "
                    "the catalog lost writes or was replaced")
        if manifest.get("kind") != self.config.kind:
            return f"it is a {manifest.get('kind')!r} index, {self.config.kind!r} was asked for"
        return None

    def train_grown_ivf(self) -> bool:
        """With kind="ivf", give IVF to every exact modality that has grown past ivf_min_items; True if any did."""
        if self.config.kind != "ivf" or self.backend_kind == "torch":
            return False
        grown = [m for m, ix in self.modalities.items() if ix.ivf is None and len(ix) >= self.config.ivf_min_items]
        for modality in grown:
            log.info("%s has %d items, past ivf_min_items: training its IVF", modality, len(self.modalities[modality]))
            self.modalities[modality].rebuild(retrain=True)
        return bool(grown)

    def describe(self) -> dict[str, Any]:
        """What /readyz and `srcid index stats` show."""
        with self._lock:
            return {
                **self.header(),
                "backend": self.backend_name,
                "catalog_version": self.catalog.version(),
                "counts": self.counts(),
                "masked": {m: len(ix.masked) for m, ix in self.modalities.items() if ix.masked},
                "ivf": {
                    m: {"nlist": len(ix.ivf.centroids), "nprobe": ix.ivf.nprobe, "recall_at_10": ix.ivf.recall_at_10}
                    for m, ix in self.modalities.items() if ix.ivf is not None
                },
            }

    def check_against_catalog(self, sample: int = 100, seed: int = 0) -> list[str]:
        """Problems found comparing the index to the catalog: counts, ids and keys per modality, and for a sample
        of items the stored vector and that searching it finds the item at score ~1. Empty when consistent."""
        problems: list[str] = []
        rng = np.random.default_rng(seed)
        for modality, index in self.modalities.items():
            truth = self.catalog.ids(modality)
            if len(truth) != len(index):
                problems.append(f"{modality}: catalog has {len(truth)} items, index has {len(index)}")
            missing = sorted(set(truth) - set(index.key_of))[:5]
            extra = sorted(set(index.key_of) - set(truth))[:5]
            if missing:
                problems.append(f"{modality}: in catalog, not in index: {missing}")
            if extra:
                problems.append(f"{modality}: in index, not in catalog: {extra}")
            wrong_key = [i for i, key in truth.items() if i in index.key_of and index.key_of[i] != key][:5]
            if wrong_key:
                problems.append(f"{modality}: index holds an older version of {wrong_key}")
            shared = sorted(set(truth) & set(index.key_of))
            picked = [shared[i] for i in rng.choice(len(shared), min(sample, len(shared)), replace=False)] if shared else []
            for item in self.catalog.get_many(picked):
                if item is None:
                    continue
                stored = index.store.get([index.key_of[item.id]])[0]
                if not np.allclose(stored, item.embedding, atol=1e-6):
                    problems.append(f"{modality}: vector of {item.id!r} differs from the catalog's")
                hits = index.search(item.embedding[None, :], 1)[0]
                if not hits or hits[0][1] < 1.0 - 1e-2:
                    problems.append(f"{modality}: searching {item.id!r} by its own vector gives {hits[:1]}")
        return problems


def load_persisted(index: CatalogIndex, index_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Load the index persisted at `index_dir` into `index` as it is (not caught up). Returns (manifest, None), or
    (manifest or None, why it cannot serve this catalog) leaving `index` empty."""
    with persist.locked(index_dir, exclusive=False):  # no save by another process deletes files while we read
        manifest, reason = persist.read_manifest(index_dir)
        if manifest is not None:
            reason = index.refusal_reason(manifest)
        if reason is None:
            try:
                index.load(index_dir, manifest)  # type: ignore[arg-type]
            except (OSError, ValueError, KeyError) as exc:
                reason = f"its files are unreadable ({exc})"
    return manifest, reason


def open_index_for_catalog(
    catalog: Catalog,
    index_dir: str | Path,
    bundle_version: str | None = None,
    dim: int | None = None,
    config: IndexConfig | None = None,
    save: bool = True,
) -> CatalogIndex:
    """A ready index equal to the catalog: the persisted one at `index_dir`, caught up, or, if it is missing,
    unreadable or built for another bundle/E/catalog/kind, one rebuilt from the catalog (and persisted if `save`)."""
    if bundle_version is not None and str(bundle_version) != catalog.bundle_version:
        raise CatalogMismatchError(
            f"catalog {catalog.url} holds bundle {catalog.bundle_version!r}, the service runs {bundle_version!r}"
        )
    if dim is not None and int(dim) != catalog.dim:
        raise CatalogMismatchError(f"catalog {catalog.url} holds embeddings of size {catalog.dim}, the service makes {dim}")
    index = CatalogIndex(catalog, config)
    index_dir = Path(index_dir)
    manifest, reason = load_persisted(index, index_dir)
    if reason is None:
        behind = catalog.version() - index.position
        applied = index.sync()
        log.info("index at %s loaded at position %d, caught up %d changes (%d behind)", index_dir,
                 int(manifest["position"]), applied, behind)  # type: ignore[index]
        changed = index.train_grown_ivf() or applied > 0
    else:
        level = logging.INFO if manifest is None and "no manifest" in reason else logging.WARNING
        log.log(level, "index at %s not used: %s; rebuilding from catalog %s", index_dir, reason, catalog.url)
        index.rebuild()
        changed = True
    if save and changed:
        index.save(index_dir)
    return index
