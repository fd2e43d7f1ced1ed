"""Exact search on a CPU with fast low-precision products: a bf16 or int8 first pass, an exact float32 second one.

A batch of queries [B, E] is scored against every row in low precision: bfloat16 on CPUs with AMX (torch, whose
oneDNN kernels use AMX tiles: at 100k × 128 and 32 queries ~2.5x faster than the float32 product), int8 on CPUs
with VNNI but no AMX (torch's `_int_mm`, whose oneDNN kernels use VNNI: at 100k × 128 and 32 queries ~3.5x faster
than float32; bf16 there is no faster than float32). Each query's best `want` rows by that score are then scored
again in float32 from the VectorStore, and their top k is the answer when it is provably the exact one.

Why it is exact: each first pass bounds how far its score of a row can be from the exact inner product (`eps`, per
query, below). Every row not scored again has a first-pass score of at most `left_out`, hence an exact score of at
most `left_out + eps`; if the k-th exact score found exceeds that, no row left out can belong in the top k. A query
for which it does not (rows crowded within eps of its k-th best, near-duplicates say) is searched again by the
float32 backend over the same store, so every answer is exact; `fallbacks` counts those queries.

- bf16: with rounding u = 2^-8 of both operands and of the result, and float32 accumulation over E terms,

      eps = (3u + 4u² + E·2^-23) · ‖q‖ · max ‖x‖

  (each product q_i·x_i is off by at most (2u + u²)·|q_i·x_i|, whose sum Cauchy-Schwarz bounds by ‖q‖·‖x‖; the
  sum's float32 rounding and the result's bf16 rounding add the rest).
- int8: rows coded x ≈ s·c (one scale s for the store, every row's error ‖x - s·c‖ at most e, VectorStore), a
  query q ≈ t·d (its own scale t = max |q_i| / 127, error ‖q - t·d‖ = f); the score s·t·(c·d) has an exact integer
  product c·d, and since q·x - s·t·(c·d) = q·(x - s·c) + (q - t·d)·(s·c),

      eps = ‖q‖·e + f·(max ‖x‖ + e) + E·2^-23·‖q‖·max ‖x‖

  (the last term, as for bf16, covers the float32 sums of the exact second pass).

The first pass picks the candidates without sorting all scores: the scores [n, B] are grouped (group j holds rows
j, j + n/g, j + 2n/g, ..., so its maximum is an elementwise max of g contiguous slices), the best `want` groups by
maximum are kept, and the best `want` rows within them: the same exact two-stage selection as the blas backend's.
It ranks integer keys: int8's int32 products themselves (one positive factor s·t per query away from its scores),
bf16's scores' bits read as int16, which order like the scores wherever these are >= 0 and put every negative one
below; a bf16 query whose thresholds (the best group and row not kept) are negative is searched again too.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np

from srcid.index.backends import BlasFlatBackend, StoreBackend
from srcid.index.rows import INT8_LEVELS, VectorStore, bf16_bits, int8_codes

UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits
FLOAT32_SUMS = 2.0**-23  # per term: the float32 re-scoring's own rounding


def bf16_error_bound(dim: int) -> float:
    """The bound on |bf16 score - exact score| per unit of ‖q‖·‖x‖ (the module docstring derives it)."""
    u = UNIT_ROUNDOFF
    return 3 * u + 4 * u * u + dim * FLOAT32_SUMS


def int8_query_codes(q: np.ndarray, levels: int = INT8_LEVELS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries float32 [B, E] -> int8 codes in -levels..levels [B, E], each query's scale t [B] and its error
    ‖q - t·codes‖ [B]."""
    top = np.abs(q).max(axis=1).astype(np.float64)
    scales = np.where(top > 0, top / levels, 1.0)
    codes, errors = int8_codes(q, scales[:, None], levels)
    return codes, scales, errors


class PrefilterBackend(StoreBackend):
    """Exact search over a VectorStore (the index's own, searched in place like the blas backend's, or one of its own):
    a low-precision first pass over the store's mirror of its rows (`_first_pass`), float32 re-scoring of the best
    `want` = per_k·k + extra rows per query (2k + 16 for bf16, 4k + 16 for int8, 6k + 16 for int8 through
    onnxruntime) from the store's float32 rows, the blas backend for the queries whose answer that cannot prove
    (`_left_out_bound`). Stores under `min_rows` rows (`min_rows_single` for one query), or too few for the
    candidates, go to the blas backend directly: there the pass's fixed cost, a dozen small torch calls, outweighs
    its speed. Until a store first reaches the smaller of the two, it stays column by column and keeps no mirror, so
    those searches are as fast as the blas backend's own (over rows its product is slower: 100k x 128, one query 3.8
    against 1.9 ms, 2 queries 10.9 against 5.1)."""

    per_k, extra = 2, 16  # want = per_k·k + extra candidates a query
    min_rows, min_rows_single = 10_000, 40_000  # each kind's own, from its crossovers with the blas backend

    def __init__(self, dim: int, store: VectorStore | None = None, group: int = 32, block_rows: int = 1 << 17,
                 min_rows: int | None = None, min_rows_single: int | None = None):
        import torch

        super().__init__(dim, store)
        self.torch = torch
        self.exact = BlasFlatBackend(dim, self.store)
        self.group = group
        self.block_rows = -(-block_rows // group) * group
        if min_rows is not None:
            self.min_rows = min_rows
        if min_rows_single is not None:
            self.min_rows_single = min_rows_single
        self._keep_mirror_once_large()

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        super().add(keys, vectors)
        self._keep_mirror_once_large()

    def _keep_mirror_once_large(self) -> None:
        """The mirror (and the rows) from the size on where a search may take the first pass; kept once kept."""
        if len(self.store) >= min(self.min_rows, self.min_rows_single):
            self._keep_mirror()

    @abstractmethod
    def _keep_mirror(self) -> None:
        """Have the store keep the rows as this pass reads them."""

    @abstractmethod
    def _first_pass(self, q: np.ndarray, padded: int) -> tuple[Any, Any]:
        """Scores of queries [B, E] against rows [padded, E] as integer keys [padded, B] that order like them (rows
        >= n at the keys' minimum), and what `_left_out_bound` needs of this pass."""

    @abstractmethod
    def _left_out_bound(self, q: np.ndarray, edge: Any, context: Any) -> np.ndarray:
        """From each query's two selection thresholds (keys [B, 2]: the best group and row not kept), the highest
        exact score a row not scored again can have [B]; +inf where it cannot tell."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n, g = len(self.store), self.group
        kk = min(k, n)
        want = self.per_k * kk + self.extra
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if n < max(self.min_rows_single if len(q) == 1 else self.min_rows, 4 * want * g):
            return self.exact.search(q, k)
        torch = self.torch
        batch, padded = len(q), -(-n // g) * g
        m = padded // g
        with torch.inference_mode():
            keys, context = self._first_pass(q, padded)
            group_max, groups = keys.view(g, m, batch).amax(0).T.topk(want + 1, dim=1)  # [B, want + 1]
            members = (groups[:, :want, None] + torch.arange(g) * m).reshape(batch, want * g)
            member_keys, best = keys.view(-1).take(members * batch + torch.arange(batch)[:, None]).topk(want + 1, dim=1)
            candidates = members.gather(1, best[:, :want]).numpy()  # [B, want] rows
            bound = self._left_out_bound(q, torch.stack([group_max[:, want], member_keys[:, want]], 1), context)
        exact = np.matmul(np.take(self.store.vectors, candidates, axis=0), q[:, :, None])[:, :, 0]  # [B, want] float32
        order = np.argsort(-exact, axis=1, kind="stable")[:, :kk]
        scores = np.full((batch, k), -np.inf, dtype=np.float32)
        found = np.full((batch, k), -1, dtype=np.int64)
        scores[:, :kk] = np.take_along_axis(exact, order, 1)
        found[:, :kk] = self.store.table.keys[np.take_along_axis(candidates, order, 1)]
        unsure = np.flatnonzero(~(scores[:, kk - 1] > bound))
        if len(unsure):
            self.fallbacks += len(unsure)
            scores[unsure], found[unsure] = self.exact.search(q[unsure], k)
        return scores, found


class Bf16ExactBackend(PrefilterBackend):
    """The bf16 first pass (for one query a matrix-vector product) over the store's bf16 rows. At E = 128 on this
    project's AMX machine, against the blas backend over the same rows: 2 queries 0.83 vs 1.32 ms at 10k rows, 32
    queries 2.18 vs 2.57 ms at 10k but 1.95 vs 1.50 at 5k; one query 2.29 vs 2.52 ms at 40k, 1.05 vs 0.68 at 20k
    (docs/PERFORMANCE.md, Search); hence `min_rows` 10k, `min_rows_single` 40k."""

    name = "bf16-cpu-exact"

    def _keep_mirror(self) -> None:
        self.store.keep_bf16()

    def _first_pass(self, q: np.ndarray, padded: int) -> tuple[Any, Any]:
        torch, batch = self.torch, len(q)
        rows16 = torch.from_numpy(self.store.bf16[:padded]).view(torch.bfloat16)  # type: ignore[index]
        q16 = torch.from_numpy(bf16_bits(q)).view(torch.bfloat16)
        # Rows as the product's long side (twice as fast as queries @ rows.T here), in as few calls as the memory
        # allows: each oneDNN call costs ~0.25-0.3 ms of its own (100k x 128, 32 queries: 4.3 ms in one call, 7.4 in
        # 13 blocks of 8192 rows). The scores [n, B] in bf16 are 2 bytes a row and query: 6.4 MB at 100k rows and 32 queries.
        approx = torch.empty((padded, batch), dtype=torch.bfloat16)  # [n', B]
        for start in range(0, padded, self.block_rows):
            block = slice(start, start + self.block_rows)
            if batch == 1:  # torch's bf16 matrix-vector product: at 100k, 3.0 ms against 3.7 in float32
                torch.mv(rows16[block], q16[0], out=approx[block, 0])
            else:
                torch.matmul(rows16[block], q16.T, out=approx[block])
        approx[len(self.store):] = float("-inf")
        # The scores' bits as int16 keys: torch's maxima of int16 run ~5x faster than of bf16 (which it converts
        # value by value), its top-k ~1.15x, and a key orders like its score wherever the score is >= 0 (sign bit
        # clear), below every such one where it is not. So the selection is exact where its thresholds are >= 0.
        return approx.view(torch.int16), None

    def _left_out_bound(self, q: np.ndarray, edge: Any, context: Any) -> np.ndarray:
        # A negative threshold means the keys did not order those scores; +inf sends the query to the exact search.
        left_out = edge.amax(1).view(self.torch.bfloat16).float().numpy()
        left_out[(edge.amin(1) < 0).numpy()] = np.inf
        return left_out + bf16_error_bound(self.dim) * np.linalg.norm(q, axis=1) * self.store.max_norm


class Int8ExactBackend(PrefilterBackend):
    """The int8 first pass over the store's int8 codes: exact int32 products of codes (torch's `_int_mm`, for one
    query too). At E = 128 on this project's VNNI machine (no AMX), against the blas backend over the same rows: 2
    queries 1.47 vs 2.22 ms at 20k rows, 32 queries 3.40 vs 4.47 ms at 20k but 2.95 vs 2.47 at 10k; one query 1.05
    vs 1.60 ms at 40k, 0.87 vs 0.73 at 20k (docs/PERFORMANCE.md, Search); hence `min_rows` 20k, `min_rows_single`
    40k."""

    name = "int8-cpu-exact"
    per_k = 4  # its bound is wider than bf16's: at 2k + 16, 5.6 % of random queries at 100k were searched again
    min_rows, min_rows_single = 20_000, 40_000
    unsigned_rows = False  # the store's codes as int8, or as uint8 + 128

    def __init__(self, dim: int, *args: Any, **kwargs: Any):
        if dim * INT8_LEVELS**2 >= 2**31:
            raise ValueError(f"int8 backend: E = {dim} is too large for int32 sums of int8 products (it takes "
                             f"E < {2**31 // INT8_LEVELS**2}); use the blas backend")
        super().__init__(dim, *args, **kwargs)

    def _keep_mirror(self) -> None:
        self.store.keep_int8(unsigned=self.unsigned_rows)

    def _first_pass(self, q: np.ndarray, padded: int) -> tuple[Any, Any]:
        torch, batch = self.torch, len(q)
        rows8 = torch.from_numpy(self.store.int8[:padded])  # type: ignore[index]
        codes, scales, errors = int8_query_codes(q)
        q8 = torch.from_numpy(codes)
        approx = torch.empty((padded, batch), dtype=torch.int32)  # [n', B]: 4 bytes a row and query
        for start in range(0, padded, self.block_rows):
            block = slice(start, start + self.block_rows)
            torch._int_mm(rows8[block], q8.T, out=approx[block])
        approx[len(self.store):] = torch.iinfo(torch.int32).min
        return approx, (scales, errors)

    def _left_out_bound(self, q: np.ndarray, edge: Any, context: Any) -> np.ndarray:
        scales, errors = context
        store, norms = self.store, np.linalg.norm(q.astype(np.float64), axis=1)
        left_out = edge.amax(1).numpy().astype(np.float64) * store.int8_scale * scales
        eps = (norms * store.int8_error + errors * (store.max_norm + store.int8_error)
               + self.dim * FLOAT32_SUMS * norms * store.max_norm)
        return left_out + eps


# Codes of a query for MLAS's u8 x s8 product: on AVX2 without VNNI its kernel (vpmaddubsw) adds each pair of u8·s8
# products in int16 and saturates there; with rows of 0..255 and queries of -63..63, 2 · 255 · 63 = 32130 < 2^15.
MLAS_QUERY_LEVELS = 63


class MlasInt8ExactBackend(Int8ExactBackend):
    """The int8 first pass through onnxruntime's MatMulInteger, whose MLAS kernels multiply uint8 by int8 with the
    CPU's integer SIMD: on CPUs without VNNI, where torch's `_int_mm` has no fast kernel (212 ms for 100k x 128 and
    32 queries on an AVX2 Zen 2, against 12 for the blas backend's float32 product). The store keeps its codes as
    uint8 + 128 (onnxruntime subtracts the zero point 128 back, exactly); queries are coded on 63 levels
    (MLAS_QUERY_LEVELS), which only widens their error term in the bound. At E = 128 on an AVX2 Zen 2, one thread
    (docs/PERFORMANCE.md, Search): the product of 100k rows and 32 queries 9.0 ms against 12.2 for the float32 one,
    of 8 queries 2.7 against 5.5; the whole search of 100k rows 4.1 against 6.2 ms for 8 queries, 13.2 against 13.9
    for 32, 26.6 against 24.9 for 64 and 3.8 against 2.3 for one (the blas backend over its columns). Against the
    blas search over rows (the one a store kept row by row takes): at 20k rows that was as fast or faster for 1 and
    32 queries (0.38 against 0.98 ms, 3.2 against 3.6), at 50k this pass won at every batch size tried (1.08-2.81x);
    hence `min_rows` and `min_rows_single` 50k, below which the store stays column by column (PrefilterBackend). In
    the service, with the int8 kind's two search threads, /retrieve served 1.20x and 1.43x the blas backend's
    requests at 64 and 16 in flight."""

    name = "int8-mlas-cpu-exact"
    per_k = 6  # coarser query codes widen the bound: at 4k + 16, 1.3 % of random queries at 100k were searched again
    min_rows, min_rows_single = 50_000, 50_000
    unsigned_rows = True
    _session: Any = None

    def _product(self) -> Any:
        """The MatMulInteger session, made in the first searching thread: with as many threads as torch's there
        (which the service sets per search thread), asleep when idle, as its other threads are."""
        if self._session is None:
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper

            graph = helper.make_graph(
                [helper.make_node("MatMulInteger", ["rows", "queries", "zero"], ["products"])], "int8_products",
                [helper.make_tensor_value_info("rows", TensorProto.UINT8, ["n", self.dim]),
                 helper.make_tensor_value_info("queries", TensorProto.INT8, [self.dim, "B"])],
                [helper.make_tensor_value_info("products", TensorProto.INT32, ["n", "B"])],
                initializer=[helper.make_tensor("zero", TensorProto.UINT8, [], [128])])
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            onnx.checker.check_model(model)
            self._session = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def _first_pass(self, q: np.ndarray, padded: int) -> tuple[Any, Any]:
        n = len(self.store)
        codes, scales, errors = int8_query_codes(q, MLAS_QUERY_LEVELS)
        approx = np.empty((padded, len(q)), dtype=np.int32)  # [n', B]
        session = self._product()
        binding = session.io_binding()  # onnxruntime writes into approx itself, no copy of its 4 bytes a row and query
        binding.bind_cpu_input("rows", self.store.int8[:n])  # type: ignore[index]
        binding.bind_cpu_input("queries", np.ascontiguousarray(codes.T))
        binding.bind_output("products", "cpu", 0, np.int32, [n, len(q)], approx.ctypes.data)
        session.run_with_iobinding(binding)
        approx[n:] = np.iinfo(np.int32).min
        return self.torch.from_numpy(approx), (scales, errors)
