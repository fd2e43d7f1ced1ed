"""Search backends behind one interface: exact inner product over L2-normalised vectors (cosine), or IVF.

- `faiss-cpu-flat`: faiss IndexIDMap over IndexFlatIP (exact), deletions by remove_ids.
- `faiss-cpu-ivf`: faiss IndexIVFFlat (inner product) from stored centroids, nprobe tuned for recall.
- `faiss-gpu-flat` / `faiss-gpu-ivf`: the same on faiss GPU resources; no remove_ids there, so the owner
  masks deleted keys at query time and rebuilds in the background (see ModalityIndex).
- `torch-cuda-fp16` (or `torch-cpu-fp32` when asked for device="cpu"): blocked exact search; each block's
  scores are reduced to top-k on the device before the next block, so the full score matrix never exists.
- `blas-cpu-fp32`: the same blocked search on the CPU, scored by numpy's BLAS over the index's own host copy of
  the vectors (kept column by column), so no second copy; IVF under the `blas` kind is faiss's `faiss-cpu-ivf`.
- `bf16-cpu-exact` (srcid/index/prefilter.py): exact too, on CPUs with AMX: a bf16 first pass over a bf16 copy of
  the host vectors, float32 re-scoring of each query's best candidates, and the blas backend for any query whose
  answer the first pass cannot prove; IVF under the `bf16` kind is faiss's, as under `blas`.
- `int8-cpu-exact` (srcid/index/prefilter.py): the same with an int8 first pass over int8 codes of the host vectors,
  on CPUs with AVX-512 VNNI but no AMX; IVF under the `int8` kind is faiss's too.
- `int8-mlas-cpu-exact`: the `int8` kind on other CPUs, its products onnxruntime's (MLAS's integer kernels; on AVX2,
  for 100k x 128 and 32 queries ~1.35x faster than the float32 product), as torch's have no fast kernel without VNNI.

`choose_backend_kind` picks faiss-gpu if the installed faiss has GPUs, else torch on CUDA, else bf16 on a CPU with
AMX, else int8 on a CPU with AVX-512 VNNI or AVX2, else blas.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from srcid.index.rows import RowTable, VectorStore, grown_capacity

log = logging.getLogger(__name__)

BACKEND_KINDS = ("auto", "blas", "bf16", "int8", "faiss-cpu", "faiss-gpu", "torch")

# faiss 1.15 on the CPU scores small batches with a SIMD loop and large ones with BLAS, but its default switch-over
# sits at hundreds of queries; measured here (bench/search.py, E=512) BLAS wins from 4 queries on (7x at 64).
BLAS_MIN_BATCH = 4
_BLAS_SWITCH = threading.Lock()  # the threshold is a faiss global: one search at a time may lower it


@dataclass(frozen=True)
class IvfParams:
    """A trained IVF: centroids float32 [nlist, E] (unit norm), the nprobe chosen, and the recall@10 measured for it."""

    centroids: np.ndarray
    nprobe: int
    recall_at_10: float


def rows_per_block(batch: int, k: int, element_bytes: int, budget_bytes: int, group: int) -> int:
    """Database rows per scored block for `batch` queries: as many as fit the score budget, at least k, whole groups."""
    rows = max(k, budget_bytes // max(1, batch * element_bytes))
    return -(-rows // group) * group


class SearchBackend(ABC):
    """Holds (key int64, vector float32 [E]) pairs and answers top-k inner-product queries."""

    name: str
    supports_remove: bool = True
    fallbacks: int = 0  # queries answered by a slower exact path when the fast one could not prove them (bf16, int8)
    store: VectorStore | None = None  # set when the backend searches a VectorStore in place (see BlasFlatBackend)

    @abstractmethod
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """keys int64 [n] (new), vectors float32 [n, E]."""

    @abstractmethod
    def remove(self, keys: Sequence[int]) -> None:
        """Drop present keys. Only called when supports_remove."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [B, E] -> (scores float32 [B, k], keys int64 [B, k]), best first, padded with -1 keys."""

    @abstractmethod
    def __len__(self) -> int: ...


class FaissBackend(SearchBackend):
    """faiss flat (IndexIDMap over IndexFlatIP) or IVFFlat, on the CPU or on faiss GPU resources."""

    def __init__(self, dim: int, ivf: IvfParams | None = None, gpu: bool = False):
        if ivf is None:
            cpu_index: Any = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        else:
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(np.ascontiguousarray(ivf.centroids, dtype=np.float32))
            cpu_index = faiss.IndexIVFFlat(quantizer, dim, len(ivf.centroids), faiss.METRIC_INNER_PRODUCT)
            # IVFFlat stores raw vectors: its only trained part is the coarse quantizer we just filled.
            cpu_index.is_trained = True
            self._quantizer = quantizer  # faiss does not own it: keep it alive
        self.gpu = gpu
        self.nlist = 0 if ivf is None else len(ivf.centroids)
        if gpu:
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, 0, cpu_index)
            self.supports_remove = False
        else:
            self.index = cpu_index
        if ivf is not None:
            self.set_nprobe(ivf.nprobe)
        self.name = f"faiss-{'gpu' if gpu else 'cpu'}-{'flat' if ivf is None else 'ivf'}"

    def set_nprobe(self, nprobe: int) -> None:
        if self.gpu:
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
        else:
            self.index.nprobe = nprobe

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.int64))

    def remove(self, keys: Sequence[int]) -> None:
        self.index.remove_ids(np.asarray(keys, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.gpu or len(queries) < BLAS_MIN_BATCH:
            return self.index.search(queries, k)
        with _BLAS_SWITCH:
            saved = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = 0
            try:
                return self.index.search(queries, k)
            finally:
                faiss.cvar.distance_compute_blas_threshold = saved

    def __len__(self) -> int:
        return int(self.index.ntotal)


class TorchBlockedBackend(SearchBackend):
    """Exact search with torch: database [n, E] on `device` (fp16 on CUDA, fp32 on CPU by default).

    A query batch [B, E] is scored against blocks of rows sized so that one block's scores [B, rows] fit in
    `score_budget_bytes` (on an H100 the 50 MB L2 cache): each block is reduced to its top-k on the device,
    and the per-block winners [B, blocks * k] are merged by one more top-k. Batch 1 thus reads the database
    once in a single matrix-vector product; large batches never write a full [B, n] score matrix to memory.

    Selection within a block is two-stage when the block is large: the maximum of each group of `group`
    consecutive scores (a bandwidth-bound reduction), top-k over those maxima, then top-k over the k·group
    scores of the chosen groups. It is exact: each of the k best scores lies in a group whose maximum is at
    least the k-th best, and at most k groups can have such a maximum. It shrinks the costly top-k `group`-fold.
    """

    def __init__(self, dim: int, device: str = "cuda", dtype: Any = None, score_budget_bytes: int = 32 << 20, group: int = 32):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.dim = dim
        self.score_budget_bytes = score_budget_bytes
        self.group = group
        self.table = RowTable()
        self.db = torch.empty((0, dim), dtype=self.dtype, device=self.device)
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(self.dtype, str(self.dtype))
        self.name = f"torch-{self.device.type}-{precision}"

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        rows = self.table.append(np.asarray(keys, dtype=np.int64))
        if rows.stop > self.db.shape[0]:
            grown = self.torch.empty((grown_capacity(rows.stop, self.db.shape[0]), self.dim), dtype=self.dtype, device=self.device)
            grown[: rows.start] = self.db[: rows.start]
            self.db = grown
        self.db[rows] = self.torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device, self.dtype)

    def remove(self, keys: Sequence[int]) -> None:
        holes, movers = self.table.remove(keys)
        if len(holes):
            self.db[self.torch.from_numpy(holes).to(self.device)] = self.db[self.torch.from_numpy(movers).to(self.device)]

    def block_rows(self, batch: int, k: int) -> int:
        return rows_per_block(batch, k, self.torch.finfo(self.dtype).bits // 8, self.score_budget_bytes, self.group)

    def _select(self, scores: Any, k: int) -> tuple[Any, Any]:
        """Top-k (values, column indices) of each row of scores [B, r], k <= r."""
        torch, g = self.torch, self.group
        r = scores.shape[1]
        if g <= 1 or r < 4 * k * g:
            return scores.topk(k, dim=1)
        pad = -r % g
        if pad:
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        grouped = scores.view(scores.shape[0], -1, g)  # [B, r/g, g]
        best_groups = grouped.amax(dim=2).topk(k, dim=1).indices  # [B, k]
        candidates = grouped.gather(1, best_groups[:, :, None].expand(-1, -1, g)).flatten(1)  # [B, k*g]
        columns = (best_groups[:, :, None] * g + torch.arange(g, device=scores.device)).flatten(1)
        values, pos = candidates.topk(k, dim=1)
        return values, columns.gather(1, pos)

    def topk_on_device(self, q: Any, k: int) -> tuple[Any, Any]:
        """Queries q [B, E] (on the device, database dtype), 1 <= k <= n -> (scores [B, k], rows [B, k]) on the device."""
        torch, n = self.torch, self.table.n
        step = self.block_rows(len(q), k)
        values, rows = [], []
        for start in range(0, n, step):
            block = q @ self.db[start : min(n, start + step)].T  # scores [B, rows]
            v, i = self._select(block, min(k, block.shape[1]))
            values.append(v)
            rows.append(i + start)
        if len(values) == 1:
            return values[0], rows[0]
        top, pos = torch.cat(values, dim=1).topk(k, dim=1)
        return top, torch.cat(rows, dim=1).gather(1, pos)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        batch = len(queries)
        scores = np.full((batch, k), -np.inf, dtype=np.float32)
        keys = np.full((batch, k), -1, dtype=np.int64)
        kk = min(k, self.table.n)
        if kk == 0:
            return scores, keys
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device, self.dtype)
            top, rows = self.topk_on_device(q, kk)
            scores[:, :kk] = top.float().cpu().numpy()
            keys[:, :kk] = self.table.keys[rows.cpu().numpy()]
        return scores, keys

    def __len__(self) -> int:
        return self.table.n


class StoreBackend(SearchBackend):
    """A backend over a VectorStore: given the index's own, it searches it in place, holds no copy and leaves the
    writes to the index (its add and remove do nothing); without one it keeps its own and writes to it."""

    def __init__(self, dim: int, store: VectorStore | None = None):
        self.dim = dim
        self.store = store if store is not None else VectorStore(dim)
        self._owns_store = store is None

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if self._owns_store:
            self.store.add(keys, vectors)

    def remove(self, keys: Sequence[int]) -> None:
        if self._owns_store:
            self.store.remove(keys)

    def __len__(self) -> int:
        return len(self.store)


class BlasFlatBackend(StoreBackend):
    """Exact search on the CPU over a VectorStore: a batch of queries [B, E] is scored by one BLAS matrix product
    `q @ vectors.T` (numpy's OpenBLAS) that streams each vector once for the whole batch, fastest over a store kept
    column by column (VectorStore). Blocks of rows and the two-stage selection are TorchBlockedBackend's, in numpy:
    no torch here, whose CPU threads spin and whose float32 GEMM is slower than OpenBLAS for these short, wide
    products.

    Why not faiss's flat index: below its BLAS threshold it takes one dot product per row-major vector and query,
    above it GEMMs of 1024 database rows. bench/search.py measures both side by side (docs/PERFORMANCE.md, Search).
    """

    def __init__(self, dim: int, store: VectorStore | None = None, score_budget_bytes: int = 32 << 20, group: int = 32):
        super().__init__(dim, store)
        self.score_budget_bytes = score_budget_bytes
        self.group = group
        self.name = "blas-cpu-fp32"

    def block_rows(self, batch: int, k: int) -> int:
        return rows_per_block(batch, k, 4, self.score_budget_bytes, self.group)

    def _select(self, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (values, columns) of each row of scores [B, r] (r a multiple of the group, padding at -inf), unordered.
        Group j holds the columns j, j + r/g, j + 2r/g, ...: its maximum is then an elementwise max of g contiguous
        slices, which numpy vectorises (a max over g adjacent columns it does not)."""
        g, (batch, r) = self.group, scores.shape
        if g <= 1 or r < 4 * k * g:
            columns = np.argpartition(scores, r - k, axis=1)[:, r - k :]
        else:
            m = r // g
            maxima = scores.reshape(batch, g, m).max(axis=1)  # [B, m]
            best_groups = np.argpartition(maxima, m - k, axis=1)[:, m - k :]  # [B, k]
            candidates = (best_groups[:, :, None] + np.arange(g) * m).reshape(batch, k * g)
            pick = np.argpartition(np.take_along_axis(scores, candidates, 1), k * g - k, axis=1)[:, k * g - k :]
            columns = np.take_along_axis(candidates, pick, 1)
        return np.take_along_axis(scores, columns, 1), columns

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        batch, n, vectors = len(queries), len(self.store), self.store.vectors
        scores = np.full((batch, k), -np.inf, dtype=np.float32)
        keys = np.full((batch, k), -1, dtype=np.int64)
        kk = min(k, n)
        if kk == 0:
            return scores, keys
        q = np.ascontiguousarray(queries, dtype=np.float32)
        step = self.block_rows(batch, kk)
        block = np.empty((batch, min(step, -(-n // self.group) * self.group)), dtype=np.float32)
        values, rows = [], []
        for start in range(0, n, step):
            stop = min(n, start + step)
            width = -(-(stop - start) // self.group) * self.group
            np.matmul(q, vectors[start:stop].T, out=block[:, : stop - start])
            block[:, stop - start : width] = -np.inf
            v, c = self._select(block[:, :width], min(kk, stop - start))
            values.append(v)
            rows.append(c + start)
        v, r = np.concatenate(values, axis=1), np.concatenate(rows, axis=1)
        order = np.argsort(-v, axis=1, kind="stable")[:, :kk]
        scores[:, :kk] = np.take_along_axis(v, order, 1)
        keys[:, :kk] = self.store.table.keys[np.take_along_axis(r, order, 1)]
        return scores, keys


def faiss_gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them; empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}


def cpu_has_amx_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 in AMX tiles (the bf16 backend's first pass)."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def cpu_has_avx512_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU sums int8 products in AVX-512 VNNI instructions (the int8 backend's first pass)."""
    return "avx512_vnni" in cpu_flags(cpuinfo)


def cpu_has_avx2(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has AVX2, whose integer products (vpmaddubsw) MLAS's int8 kernels use."""
    return "avx2" in cpu_flags(cpuinfo)


def choose_backend_kind(requested: str = "auto") -> str:
    """Resolve "auto" to faiss-gpu, torch (CUDA), bf16 (a CPU with AMX), int8 (a CPU with AVX-512 VNNI or AVX2) or
    blas, in that order of preference; check explicit choices."""
    if requested not in BACKEND_KINDS:
        raise ValueError(f"index backend {requested!r}: expected one of {list(BACKEND_KINDS)}")
    if requested == "faiss-gpu" and faiss_gpu_count() == 0:
        raise ValueError("index backend faiss-gpu: the installed faiss has no GPU support or sees no GPU")
    if requested != "auto":
        return requested
    if faiss_gpu_count() > 0:
        return "faiss-gpu"
    if torch_cuda_available():
        return "torch"
    if cpu_has_amx_bf16():
        return "bf16"
    if cpu_has_avx512_vnni() or cpu_has_avx2():
        return "int8"
    return "blas"


def make_backend(kind: str, dim: int, ivf: IvfParams | None = None, torch_device: str = "cuda",
                 store: VectorStore | None = None) -> SearchBackend:
    """A fresh, empty backend, or with kind="blas", "bf16" or "int8" one that searches `store` in place. IVF runs on
    faiss only: with kind="torch" an IVF request falls back to exact search, with the CPU kinds it is faiss's IVF."""
    # prefilter builds on this module
    from srcid.index.prefilter import Bf16ExactBackend, Int8ExactBackend, MlasInt8ExactBackend

    if kind in ("blas", "bf16", "int8") and ivf is not None:
        return FaissBackend(dim, ivf, gpu=False)
    if kind == "blas":
        return BlasFlatBackend(dim, store)
    if kind == "bf16":
        return Bf16ExactBackend(dim, store)
    if kind == "int8":  # torch's int8 product is fast where oneDNN has VNNI kernels; elsewhere onnxruntime's MLAS
        return (Int8ExactBackend if cpu_has_avx512_vnni() else MlasInt8ExactBackend)(dim, store)
    if kind == "faiss-cpu":
        return FaissBackend(dim, ivf, gpu=False)
    if kind == "faiss-gpu":
        return FaissBackend(dim, ivf, gpu=True)
    if kind == "torch":
        if ivf is not None:
            log.info("torch backend searches exactly; the IVF option is ignored")
        return TorchBlockedBackend(dim, device=torch_device)
    raise ValueError(f"index backend {kind!r}: expected blas, bf16, faiss-cpu, faiss-gpu or torch")
