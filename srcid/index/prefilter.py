"""Exact search on a CPU with bfloat16 matrix units (Intel AMX): a bf16 first pass, an exact float32 second one.

A batch of queries [B, E] is scored against every row in bfloat16 (torch, whose oneDNN kernels use AMX tiles: at
100k × 128 and 32 queries ~2.5x faster than the float32 product). Each query's best `want` rows by that score are
then scored again in float32 from the VectorStore, and their top k is the answer when it is provably the exact one.

Why it is exact: with bf16 rounding u = 2^-8 of both operands and of the result, and float32 accumulation over E
terms, a bf16 score differs from the exact inner product by at most

    eps = (3u + 4u² + E·2^-23) · ‖q‖ · max ‖x‖

(each product q_i·x_i is off by at most (2u + u²)·|q_i·x_i|, whose sum Cauchy-Schwarz bounds by ‖q‖·‖x‖; the
sum's float32 rounding and the result's bf16 rounding add the rest). Every row not scored again has a bf16 score of
at most `left_out`, hence an exact score of at most `left_out + eps`; if the k-th exact score found exceeds that,
no row left out can belong in the top k. A query for which it does not (rows crowded within eps of its k-th best,
near-duplicates say) is searched again by the float32 backend over the same store, so every answer is exact;
`fallbacks` counts those queries.

The first pass picks the candidates without sorting all scores: the bf16 scores [n, B] are grouped (group j holds
rows j, j + n/g, j + 2n/g, ..., so its maximum is an elementwise max of g contiguous slices), the best `want` groups
by maximum are kept, and the best `want` rows within them: the same exact two-stage selection as the blas backend's.
It ranks the scores by their bits read as int16, which order like the scores wherever these are >= 0 and put every
negative one below; a query whose thresholds (the best group and row not kept) are negative is searched again too.
"""

from __future__ import annotations

import numpy as np

from srcid.index.backends import BlasFlatBackend, StoreBackend
from srcid.index.rows import VectorStore, bf16_bits

UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits


def bf16_error_bound(dim: int) -> float:
    """The bound on |bf16 score - exact score| per unit of ‖q‖·‖x‖ (the module docstring derives it)."""
    u = UNIT_ROUNDOFF
    return 3 * u + 4 * u * u + dim * 2.0**-23


class Bf16ExactBackend(StoreBackend):
    """Exact search over a VectorStore (the index's own, searched in place like the blas backend's, or one of its
    own): a bf16 first pass over the store's bf16 rows (for one query a matrix-vector product), float32
    re-scoring of the best `want` = 2k + 16 rows per query from the store's float32 rows, the blas backend for the
    queries whose answer that cannot prove. Stores under `min_rows` rows (`min_rows_single` for one query), or too
    few for the candidates, go to the blas backend directly: there the pass's fixed cost, a dozen small torch calls,
    outweighs its speed. At E = 128 on this project's AMX machine, against the blas backend over the same rows: 2
    queries 0.83 vs 1.32 ms at 10k rows, 32 queries 2.18 vs 2.57 ms at 10k but 1.95 vs 1.50 at 5k; one query 2.29 vs
    2.52 ms at 40k, 1.05 vs 0.68 at 20k (docs/PERFORMANCE.md, Search)."""

    def __init__(self, dim: int, store: VectorStore | None = None, group: int = 32, block_rows: int = 1 << 17,
                 min_rows: int = 10_000, min_rows_single: int = 40_000):
        import torch

        super().__init__(dim, store)
        self.torch = torch
        self.store.keep_bf16()
        self.exact = BlasFlatBackend(dim, self.store)
        self.group = group
        self.block_rows = -(-block_rows // group) * group
        self.min_rows, self.min_rows_single = min_rows, min_rows_single
        self.eps = bf16_error_bound(dim)
        self.name = "bf16-cpu-exact"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n, g = len(self.store), self.group
        kk = min(k, n)
        want = 2 * kk + 16
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if n < max(self.min_rows_single if len(q) == 1 else self.min_rows, 4 * want * g):
            return self.exact.search(q, k)
        torch = self.torch
        batch, padded = len(q), -(-n // g) * g
        m = padded // g
        with torch.inference_mode():
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
            approx[n:] = float("-inf")
            # The scores' bits as int16 keys: torch's maxima of int16 run ~5x faster than of bf16 (which it converts
            # value by value), its top-k ~1.15x, and a key orders like its score wherever the score is >= 0 (sign bit
            # clear), below every such one where it is not. So the selection is exact where its thresholds are >= 0.
            keys = approx.view(torch.int16)
            group_max, groups = keys.view(g, m, batch).amax(0).T.topk(want + 1, dim=1)  # [B, want + 1]
            members = (groups[:, :want, None] + torch.arange(g) * m).reshape(batch, want * g)
            member_keys, best = keys.view(-1).take(members * batch + torch.arange(batch)[:, None]).topk(want + 1, dim=1)
            candidates = members.gather(1, best[:, :want]).numpy()  # [B, want] rows
            # The highest bf16 score of any row not scored again: in a group not kept, or kept but not among the best.
            # A negative threshold means the keys did not order those scores; +inf sends the query to the exact search.
            edge = torch.stack([group_max[:, want], member_keys[:, want]], 1)  # [B, 2]
            left_out = edge.amax(1).view(torch.bfloat16).float().numpy()
            left_out[(edge.amin(1) < 0).numpy()] = np.inf
        exact = np.matmul(np.take(self.store.vectors, candidates, axis=0), q[:, :, None])[:, :, 0]  # [B, want] float32
        order = np.argsort(-exact, axis=1, kind="stable")[:, :kk]
        scores = np.full((batch, k), -np.inf, dtype=np.float32)
        keys = np.full((batch, k), -1, dtype=np.int64)
        scores[:, :kk] = np.take_along_axis(exact, order, 1)
        keys[:, :kk] = self.store.table.keys[np.take_along_axis(candidates, order, 1)]
        bound = left_out + self.eps * np.linalg.norm(q, axis=1) * self.store.max_norm
        unsure = np.flatnonzero(~(scores[:, kk - 1] > bound))
        if len(unsure):
            self.fallbacks += len(unsure)
            scores[unsure], keys[unsure] = self.exact.search(q[unsure], k)
        return scores, keys
