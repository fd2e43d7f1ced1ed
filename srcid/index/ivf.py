"""IVF for large catalogs: k-means centroids, and an nprobe chosen by measuring recall@10 against exact search."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from srcid.index.backends import FaissBackend

log = logging.getLogger(__name__)

NPROBE_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)


def choose_nlist(n: int) -> int:
    """About 2·sqrt(n) lists (1M items -> 2000), so a list holds ~sqrt(n)/2 items and k-means gets >= 39 points each."""
    return int(min(65536, max(16, min(n // 39, round(2 * math.sqrt(n))))))


def train_centroids(vectors: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means on (a sample of) vectors float32 [n, E] -> unit centroids float32 [nlist, E]."""
    kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=20, spherical=True, seed=seed, max_points_per_centroid=256)
    rng = np.random.default_rng(seed)
    sample = vectors if len(vectors) <= nlist * 256 else vectors[rng.choice(len(vectors), nlist * 256, replace=False)]
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    centroids = kmeans.centroids / np.linalg.norm(kmeans.centroids, axis=1, keepdims=True)
    return centroids.astype(np.float32)


def recall_at_10(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approx ∩ exact| / 10 over rows of keys int64 [Q, 10]."""
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) / exact.shape[1]


def _drop_self(keys: np.ndarray, self_keys: np.ndarray, k: int) -> np.ndarray:
    """Each row of keys [Q, k+1] without the query's own key, cut to k."""
    return np.stack([row[row != own][:k] for row, own in zip(keys, self_keys)])


def tune_nprobe(
    backend: FaissBackend,
    keys: np.ndarray,
    vectors: np.ndarray,
    target: float = 0.95,
    queries: int = 300,
    seed: int = 0,
) -> tuple[int, float]:
    """Smallest nprobe whose recall@10 against exact search reaches `target`, measured on sampled catalog vectors
    as queries (each query's own entry left out); sets it on `backend` and returns (nprobe, recall)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), min(queries, len(vectors)), replace=False)
    q = np.ascontiguousarray(vectors[pick])
    _, rows = faiss.knn(q, np.ascontiguousarray(vectors), 11, metric=faiss.METRIC_INNER_PRODUCT)
    exact = _drop_self(keys[rows], keys[pick], 10)
    nlist = backend.nlist
    recall = 0.0
    for nprobe in [p for p in NPROBE_STEPS if p < nlist] + [nlist]:
        backend.set_nprobe(nprobe)
        _, found = backend.search(q, 11)
        recall = recall_at_10(_drop_self(found, keys[pick], 10), exact)
        log.debug("ivf nlist=%d nprobe=%d recall@10=%.3f", nlist, nprobe, recall)
        if recall >= target:
            break
    log.info("ivf: nlist=%d, nprobe=%d gives recall@10=%.3f against exact search (target %.2f)", nlist, nprobe, recall, target)
    return nprobe, recall
