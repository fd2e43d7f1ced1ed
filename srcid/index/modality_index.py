"""The index of one modality: str ids <-> int64 keys, a host copy of the vectors, and a search backend.

A backend may search the host copy in place (blas, given `store`): its add and remove then do nothing.

Backends that cannot remove (faiss GPU) keep deleted entries; they are masked out of results (queries ask
for k + masked and drop them) until a rebuild, started in the background once `max_masked` is passed,
swaps in a backend built from the live vectors plus the writes that arrived while it was built.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import numpy as np
from tqdm import tqdm

from srcid.index.backends import IvfParams, SearchBackend, make_backend
from srcid.index.config import IndexConfig
from srcid.index.ivf import choose_nlist, train_centroids, tune_nprobe
from srcid.index.rows import VectorStore

log = logging.getLogger(__name__)

# faiss GPU k-selection handles k <= 2048; more masked entries than that force a rebuild before searching.
GPU_MAX_K = 2048
ADD_CHUNK = 65536

Hit = tuple[str, float]


class ModalityIndex:
    def __init__(self, modality: str, dim: int, config: IndexConfig, backend_kind: str):
        self.modality = modality
        self.dim = dim
        self.config = config
        self.backend_kind = backend_kind
        self.store = VectorStore(dim)
        self.id_of: dict[int, str] = {}
        self.key_of: dict[str, int] = {}
        self.ivf: IvfParams | None = None
        self.backend: SearchBackend = make_backend(backend_kind, dim, None, config.torch_device, self.store)
        self.masked: set[int] = set()
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        self._rebuilder: threading.Thread | None = None
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.store)

    # -- writes -------------------------------------------------------------------------------------------
    def add(self, keys: np.ndarray, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add new keys int64 [n] with ids [n] and unit vectors float32 [n, E]; an id present under an older key
        is replaced. Keys already present are skipped (applying a change twice is harmless)."""
        with self.lock:
            fresh = [i for i, key in enumerate(keys.tolist()) if key not in self.store]
            if not fresh:
                return
            keys, vectors = keys[fresh], vectors[fresh]
            ids = [ids[i] for i in fresh]
            replaced = [self.key_of[i] for i in ids if i in self.key_of]
            if replaced:
                self.remove(replaced)
            self.store.add(keys, vectors)
            self.backend.add(keys, vectors)
            self.id_of.update(zip(keys.tolist(), ids))
            self.key_of.update(zip(ids, keys.tolist()))
            if self._journal is not None:
                self._journal.append(("add", keys.copy(), vectors.copy()))

    def remove(self, keys: Sequence[int]) -> None:
        """Remove present keys (absent ones are skipped)."""
        with self.lock:
            keys = [int(k) for k in keys if int(k) in self.store]
            if not keys:
                return
            self.store.remove(keys)
            for key in keys:
                del self.key_of[self.id_of.pop(key)]
            if self.backend.supports_remove:
                self.backend.remove(keys)
            else:
                self.masked.update(keys)
            if self._journal is not None:
                self._journal.append(("remove", np.asarray(keys, dtype=np.int64), None))
            if len(self.masked) > self.config.max_masked:
                self.rebuild(background=True)

    # -- search -------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Unit queries float32 [B, E] -> per query up to k (id, score), best first."""
        if self.masked and len(self.masked) + k > GPU_MAX_K and not self.backend.supports_remove:
            self.wait_for_rebuild()
            if len(self.masked) + k > GPU_MAX_K:
                self.rebuild(background=False)
        with self.lock:
            fetch = min(k + len(self.masked), len(self.backend))
            if fetch == 0:
                return [[] for _ in range(len(queries))]
            scores, keys = self.backend.search(queries, fetch)
            id_of = self.id_of  # masked keys were dropped from it at removal
            return [
                [(id_of[key], float(s)) for s, key in zip(row_s.tolist(), row_k.tolist()) if key in id_of][:k]
                for row_s, row_k in zip(scores, keys)
            ]

    # -- (re)building --------------------------------------------------------------------------------------
    def _build_backend(self, keys: np.ndarray, vectors: np.ndarray, retrain: bool) -> tuple[SearchBackend, IvfParams | None]:
        """A backend holding keys [n] / vectors [n, E]: IVF when configured and large enough, else exact."""
        ivf, needs_tuning = None, False
        if self.config.kind == "ivf" and len(keys) >= self.config.ivf_min_items and self.backend_kind != "torch":
            ivf = self.ivf
            needs_tuning = retrain or ivf is None
            if needs_tuning:
                nlist = self.config.ivf_nlist or choose_nlist(len(keys))
                log.info("%s: training IVF with %d lists on %d vectors", self.modality, nlist, len(keys))
                ivf = IvfParams(train_centroids(vectors, nlist), nprobe=1, recall_at_10=0.0)
        backend = make_backend(self.backend_kind, self.dim, ivf, self.config.torch_device, self.store)
        chunks = range(0, len(keys), ADD_CHUNK)
        for start in tqdm(chunks, desc=f"index {self.modality}", unit="chunk", disable=len(chunks) < 4):
            backend.add(keys[start : start + ADD_CHUNK], vectors[start : start + ADD_CHUNK])
        if ivf is not None and needs_tuning:
            nprobe, recall = tune_nprobe(backend, keys, vectors, self.config.ivf_target_recall)  # type: ignore[arg-type]
            ivf = IvfParams(ivf.centroids, nprobe, recall)
        return backend, ivf

    def rebuild(self, background: bool = False, retrain: bool = False) -> None:
        """Rebuild the backend from the live vectors; writes during the build are replayed onto it before the swap."""
        with self.lock:
            if self._rebuilder is not None and self._rebuilder.is_alive():
                return
            keys, vectors = (a.copy() for a in self.store.live())
            self._journal = []
        if background:
            self._rebuilder = threading.Thread(
                target=self._finish_rebuild, args=(keys, vectors, retrain), name=f"rebuild-{self.modality}", daemon=True
            )
            self._rebuilder.start()
        else:
            self._finish_rebuild(keys, vectors, retrain)

    def _finish_rebuild(self, keys: np.ndarray, vectors: np.ndarray, retrain: bool) -> None:
        try:
            backend, ivf = self._build_backend(keys, vectors, retrain)
        except Exception:
            log.exception("%s: index rebuild failed; keeping the current one", self.modality)
            with self.lock:
                self._journal = None
            raise
        with self.lock:
            masked: set[int] = set()
            for op, op_keys, op_vectors in self._journal or []:
                if op == "add":
                    backend.add(op_keys, op_vectors)  # type: ignore[arg-type]
                elif backend.supports_remove:
                    backend.remove(op_keys.tolist())
                else:
                    masked.update(op_keys.tolist())
            self.backend, self.ivf, self.masked, self._journal = backend, ivf, masked, None
        log.info("%s: rebuilt %s with %d vectors", self.modality, backend.name, len(backend))

    def wait_for_rebuild(self) -> None:
        if self._rebuilder is not None:
            self._rebuilder.join()

    def load(self, keys: np.ndarray, ids: Sequence[str], vectors: np.ndarray, ivf: IvfParams | None) -> None:
        """Replace the content with keys [n], ids [n], vectors [n, E] (a persisted snapshot) and build the backend,
        reusing the persisted IVF centroids and nprobe when given."""
        self.wait_for_rebuild()  # a rebuild in flight would otherwise swap its older content in after us
        with self.lock:
            self.store = VectorStore(self.dim)
            self.store.add(keys, vectors)
            self.id_of = dict(zip(keys.tolist(), ids))
            self.key_of = dict(zip(ids, keys.tolist()))
            self.ivf = ivf
            self.masked = set()
            self.backend, self.ivf = self._build_backend(keys, vectors, retrain=False)

    def snapshot(self) -> tuple[np.ndarray, list[str], np.ndarray, IvfParams | None]:
        """Copies of keys int64 [n], ids [n], vectors float32 [n, E] and the IVF parameters, for persistence."""
        with self.lock:
            keys, vectors = (a.copy() for a in self.store.live())
            return keys, [self.id_of[k] for k in keys.tolist()], vectors, self.ivf
