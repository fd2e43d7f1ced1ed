"""Search backends and the per-modality index: exactness, deletions (also on backends without removal), IVF recall."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from srcid.index import modality_index
from srcid.index.backends import (BlasFlatBackend, FaissBackend, IvfParams, TorchBlockedBackend, choose_backend_kind,
                                   cpu_has_amx_bf16, cpu_has_avx2, cpu_has_avx512_vnni, faiss_gpu_count, make_backend,
                                   torch_cuda_available)
from srcid.index.config import IndexConfig
from srcid.index.ivf import recall_at_10
from srcid.index.modality_index import ModalityIndex
from srcid.index.prefilter import (MLAS_QUERY_LEVELS, Bf16ExactBackend, Int8ExactBackend, MlasInt8ExactBackend,
                                    bf16_error_bound, int8_query_codes)
from srcid.index.rows import INT8_LEVELS, ROW_ALIGNMENT, VectorStore, aligned_empty, bf16_bits, int8_codes

PREFILTERS = {"bf16": Bf16ExactBackend, "int8": Int8ExactBackend, "int8-mlas": MlasInt8ExactBackend}


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, keys: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]
    return keys[order]


def test_faiss_exact_matches_numpy_brute_force():
    rng = np.random.default_rng(0)
    keys, vectors = np.arange(100, 2100, dtype=np.int64), unit(rng, 2000, 32)
    backend = FaissBackend(32)
    backend.add(keys, vectors)
    queries = unit(rng, 20, 32)
    scores, found = backend.search(queries, 10)
    assert (found == brute_force(queries, keys, vectors, 10)).all()
    assert np.allclose(scores, np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


BLOCKED = {"torch": lambda dim, budget, group: TorchBlockedBackend(dim, device="cpu", score_budget_bytes=budget, group=group),
           "blas": lambda dim, budget, group: BlasFlatBackend(dim, score_budget_bytes=budget, group=group)}


@pytest.mark.parametrize("blocked", sorted(BLOCKED))
@pytest.mark.parametrize(
    "batch,k,budget,group",
    [(1, 10, 4096, 8), (7, 1, 4096, 32), (64, 10, 64 * 4 * 300, 1), (33, 50, 1 << 30, 4), (33, 50, 1 << 30, 32)],
)
def test_blocked_topk_equals_faiss_exact(blocked, batch, k, budget, group):
    rng = np.random.default_rng(batch)
    n, dim = 3001, 48  # not a multiple of any block size used
    keys, vectors = rng.permutation(10**6)[:n].astype(np.int64), unit(rng, n, dim)
    torch_backend = BLOCKED[blocked](dim, budget, group)
    faiss_backend = FaissBackend(dim)
    for start in range(0, n, 1000):  # several appends: exercises capacity growth
        torch_backend.add(keys[start : start + 1000], vectors[start : start + 1000])
        faiss_backend.add(keys[start : start + 1000], vectors[start : start + 1000])
    rows = torch_backend.block_rows(batch, k)
    assert budget > 1 << 29 or rows < n, "the small budgets must split the database into several blocks"
    grouped = group > 1 and min(rows, n) >= 4 * k * group
    assert grouped == ((batch, group) in [(1, 8), (7, 32), (33, 4)]), "cases must cover both selection paths"
    queries = unit(rng, batch, dim)
    t_scores, t_keys = torch_backend.search(queries, k)
    f_scores, f_keys = faiss_backend.search(queries, k)
    assert (t_keys == f_keys).all()
    assert np.allclose(t_scores, f_scores, atol=1e-5)


@pytest.mark.parametrize("make", [lambda d: FaissBackend(d), lambda d: TorchBlockedBackend(d, device="cpu", score_budget_bytes=2048),
                                  lambda d: BlasFlatBackend(d, score_budget_bytes=2048),
                                  lambda d: Bf16ExactBackend(d, group=4, block_rows=256, min_rows=0, min_rows_single=0),
                                  lambda d: Int8ExactBackend(d, group=4, block_rows=256, min_rows=0, min_rows_single=0),
                                  lambda d: MlasInt8ExactBackend(d, group=4, min_rows=0, min_rows_single=0)],
                         ids=["faiss", "torch", "blas", "bf16", "int8", "int8-mlas"])
def test_backend_deletions_match_a_fresh_build(make):
    rng = np.random.default_rng(1)
    n, dim = 1500, 24
    keys, vectors = np.arange(1, n + 1, dtype=np.int64), unit(rng, n, dim)
    backend = make(dim)
    backend.add(keys, vectors)
    gone = rng.choice(keys, 400, replace=False)
    backend.remove(gone[:150].tolist())
    backend.remove(gone[150:].tolist())
    live = ~np.isin(keys, gone)
    queries = unit(rng, 16, dim)
    _, found = backend.search(queries, 20)
    assert len(backend) == n - 400
    assert (found == brute_force(queries, keys[live], vectors[live], 20)).all()
    assert not np.isin(found, gone).any()


@pytest.mark.parametrize("blocked", sorted(BLOCKED))
def test_search_pads_when_fewer_items_than_k(blocked):
    backend = BLOCKED[blocked](8, 32 << 20, 32)
    backend.add(np.array([5, 6], dtype=np.int64), unit(np.random.default_rng(0), 2, 8))
    scores, keys = backend.search(unit(np.random.default_rng(1), 3, 8), 4)
    assert (keys[:, 2:] == -1).all() and set(keys[:, :2].ravel()) == {5, 6} and np.isinf(scores[:, 2:]).all()


class NoRemoveFaiss(FaissBackend):
    """faiss-gpu's limitation on the CPU: adds and searches, but cannot remove ids."""

    supports_remove = False

    def remove(self, keys):
        raise AssertionError("a backend without removal must never be asked to remove")


def _exact_ids(index: ModalityIndex, queries: np.ndarray, k: int) -> list[list[str]]:
    keys, vectors = index.store.live()
    return [[index.id_of[key] for key in row] for row in brute_force(queries, keys, vectors, k).tolist()]


def test_masked_deletions_and_background_rebuild(monkeypatch):
    monkeypatch.setattr(modality_index, "make_backend", lambda kind, dim, ivf, device, store: NoRemoveFaiss(dim, ivf))
    rng = np.random.default_rng(2)
    dim = 16
    index = ModalityIndex("audio", dim, IndexConfig(backend="faiss-cpu", max_masked=10**6), "faiss-cpu")
    vectors = unit(rng, 600, dim)
    index.add(np.arange(1, 601, dtype=np.int64), [f"i{n}" for n in range(1, 601)], vectors)
    index.remove(list(range(1, 301, 5)))  # 60 deletions, all masked
    assert len(index.masked) == 60 and len(index.backend) == 600 and len(index) == 540
    queries = unit(rng, 10, dim)
    assert [[i for i, _ in hits] for hits in index.search(queries, 15)] == _exact_ids(index, queries, 15)

    # Hold the rebuild between its snapshot and its swap, so these writes must travel through its journal.
    writes_done = threading.Event()
    build = index._build_backend

    def held_build(*args, **kwargs):
        writes_done.wait(10)
        return build(*args, **kwargs)

    monkeypatch.setattr(index, "_build_backend", held_build)
    index.rebuild(background=True)
    old_backend = index.backend
    index.add(np.arange(601, 651, dtype=np.int64), [f"i{n}" for n in range(601, 651)], unit(rng, 50, dim))
    index.remove([2, 3, 620])
    writes_done.set()
    index.wait_for_rebuild()
    assert index.backend is not old_backend and index.masked == {2, 3, 620}
    assert len(index) == 540 + 50 - 3
    assert len(index.backend) - len(index.masked) == len(index)
    assert [[i for i, _ in hits] for hits in index.search(queries, 15)] == _exact_ids(index, queries, 15)

    # Past max_masked, the index starts the rebuild itself.
    index.config = IndexConfig(backend="faiss-cpu", max_masked=20)
    index.remove(list(range(400, 430)))
    index.wait_for_rebuild()
    assert len(index.masked) <= 20 and len(index.backend) - len(index.masked) == len(index)
    assert [[i for i, _ in hits] for hits in index.search(queries, 15)] == _exact_ids(index, queries, 15)


def test_blas_index_searches_its_store_in_place():
    """One copy of the vectors: adds, removals, a rebuild with writes during it and a reload all stay exact."""
    rng = np.random.default_rng(4)
    dim = 12
    index = ModalityIndex("video", dim, IndexConfig(backend="blas"), "blas")
    assert index.backend.store is index.store
    index.add(np.arange(1, 2001, dtype=np.int64), [f"i{n}" for n in range(1, 2001)], unit(rng, 2000, dim))
    index.remove(list(range(1, 2001, 7)))
    queries = unit(rng, 9, dim)
    assert [[i for i, _ in hits] for hits in index.search(queries, 12)] == _exact_ids(index, queries, 12)
    assert len(index.backend) == len(index) == 2000 - len(range(1, 2001, 7))
    held = threading.Event()
    build = index._build_backend
    index._build_backend = lambda *args, **kwargs: (held.wait(10), build(*args, **kwargs))[1]
    index.rebuild(background=True)
    index.add(np.arange(3001, 3101, dtype=np.int64), [f"i{n}" for n in range(3001, 3101)], unit(rng, 100, dim))
    index.remove([2, 3, 3050])
    held.set()
    index.wait_for_rebuild()
    assert index.backend.store is index.store and len(index.backend) == len(index)
    assert [[i for i, _ in hits] for hits in index.search(queries, 12)] == _exact_ids(index, queries, 12)
    keys, ids, vectors, _ = index.snapshot()
    index.load(keys, ids, vectors, None)
    assert index.backend.store is index.store
    assert [[i for i, _ in hits] for hits in index.search(queries, 12)] == _exact_ids(index, queries, 12)


def test_readding_an_id_under_a_new_key_replaces_it():
    index = ModalityIndex("text", 8, IndexConfig(backend="faiss-cpu"), "faiss-cpu")
    rng = np.random.default_rng(3)
    first, second = unit(rng, 2, 8)
    index.add(np.array([1]), ["x"], first[None])
    index.add(np.array([1]), ["x"], first[None])  # the same change applied twice: no effect
    index.add(np.array([9]), ["x"], second[None])
    assert len(index) == 1 and index.key_of == {"x": 9}
    assert index.search(second[None], 1)[0][0][0] == "x" and index.search(second[None], 1)[0][0][1] == pytest.approx(1.0)


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    x = centers[rng.integers(len(centers), size=n)] + 1.0 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_reaches_recall_at_10_of_095_against_exact():
    rng = np.random.default_rng(4)
    dim, n = 64, 20_000
    centers = unit(rng, 100, dim)
    vectors = clustered(rng, n, dim, centers)
    config = IndexConfig(kind="ivf", backend="faiss-cpu", ivf_min_items=10_000)
    index = ModalityIndex("video", dim, config, "faiss-cpu")
    keys = np.arange(1, n + 1, dtype=np.int64)
    index.load(keys, [str(k) for k in keys], vectors, ivf=None)
    assert index.backend.name == "faiss-cpu-ivf" and index.ivf is not None
    nlist = len(index.ivf.centroids)
    assert index.ivf.nprobe < nlist, "an nprobe equal to nlist would be exact search, not IVF"
    assert index.ivf.recall_at_10 >= 0.95
    # Fresh queries from the same distribution, never seen by the tuning.
    queries = clustered(rng, 500, dim, centers)
    _, approx = index.backend.search(queries, 10)
    exact = brute_force(queries, keys, vectors, 10)
    recall = recall_at_10(approx, exact)
    assert recall >= 0.95, f"recall@10 {recall:.3f} with nlist={nlist}, nprobe={index.ivf.nprobe}"


def clustered_unit(rng: np.random.Generator, n: int, dim: int, centres: int, spread: float) -> np.ndarray:
    c = rng.normal(size=(centres, dim))
    return unit_rows(c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, dim)))


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(PREFILTERS))
@pytest.mark.parametrize("data", ["random", "clustered"])
@pytest.mark.parametrize("batch,k", [(1, 10), (4, 1), (16, 10), (37, 50)])
def test_prefilter_backends_equal_faiss_exact(kind, data, batch, k):
    """The bf16 or int8 first pass settles (most) queries itself, and every answer is faiss's exact one."""
    rng = np.random.default_rng(batch + k)
    n, dim = 9001, 64  # not a multiple of the group or the block
    vectors = unit(rng, n, dim) if data == "random" else clustered_unit(rng, n, dim, 50, 0.5)
    keys = rng.permutation(10**6)[:n].astype(np.int64)
    backend = PREFILTERS[kind](dim, group=8, block_rows=1000, min_rows=0, min_rows_single=0)
    faiss_backend = FaissBackend(dim)
    for start in range(0, n, 3000):  # several appends: the bf16 or int8 rows grow with the float32 ones
        backend.add(keys[start : start + 3000], vectors[start : start + 3000])
        faiss_backend.add(keys[start : start + 3000], vectors[start : start + 3000])
    queries = unit(rng, batch, dim) if data == "random" else unit_rows(vectors[:batch] + 0.3 * rng.normal(size=(batch, dim)))
    b_scores, b_keys = backend.search(queries, k)
    f_scores, f_keys = faiss_backend.search(queries, k)
    assert (b_keys == f_keys).all()
    np.testing.assert_allclose(b_scores, f_scores, atol=1e-5)
    assert backend.fallbacks < batch, "the first pass settled no query: the blas backend answered them all"


@pytest.mark.parametrize("kind", sorted(PREFILTERS))
def test_prefilter_backends_hand_crowded_queries_to_the_exact_search(kind):
    """Rows crowded within the first pass's error of a query's k-th best cannot be told apart in bf16 or int8: a
    query with more of them than it keeps as candidates is searched again in float32, and its answer is still the
    exact one. (Without the error bound in the test, that is taking the bf16 scores at their word, 6 of these 8
    crowded queries get a wrong top 10.) A crowd the candidates hold whole is settled by the first pass."""
    rng = np.random.default_rng(11)
    n, dim = 6000, 32
    centres = unit(rng, 8, dim)
    queries = np.concatenate([unit_rows(centres + 1e-2 * rng.normal(size=(8, dim))), unit(rng, 7, dim)])
    keys = np.arange(n, dtype=np.int64)
    want = PREFILTERS[kind].per_k * 10 + PREFILTERS[kind].extra  # 36 for bf16, 56 for int8
    for crowd, fallbacks in [(want + 14, 8), (want - 6, 0)]:
        crowds = unit_rows(np.repeat(centres, crowd, axis=0) + 1e-2 * rng.normal(size=(8 * crowd, dim)))
        vectors = np.concatenate([unit(rng, n - 8 * crowd, dim), crowds])
        backend = PREFILTERS[kind](dim, group=8, min_rows=0)
        backend.add(keys, vectors)
        assert (backend.search(queries, 10)[1] == brute_force(queries, keys, vectors, 10)).all()
        assert backend.fallbacks == fallbacks, f"crowds of {crowd}"


@pytest.mark.parametrize("kind", sorted(PREFILTERS))
def test_prefilter_backends_where_the_thresholds_are_negative(kind):
    """The bf16 first pass ranks the scores by their bits as int16, which order like the scores only where these are
    >= 0, so a query whose selection thresholds fall below zero (fewer rows than it keeps score above zero) is
    searched again in float32. Here 20 rows score above zero against the opposite queries, fewer than the 2k + 16 =
    36 kept: those queries go to the exact search and get the exact answer; the others are settled by the first pass.
    The int8 pass ranks its int32 products, which order negative scores too: it settles every query itself."""
    rng = np.random.default_rng(5)
    n, dim = 6000, 32
    vectors = unit_rows(np.abs(rng.normal(size=(n, dim))))  # in the positive orthant
    vectors[:20] *= -1  # but 20, which score > 0 against any query in the negative orthant
    keys = np.arange(n, dtype=np.int64)
    backend = PREFILTERS[kind](dim, group=8, min_rows=0)
    backend.add(keys, vectors)
    opposite = unit_rows(-np.abs(rng.normal(size=(6, dim))))
    queries = np.concatenate([opposite, unit_rows(np.abs(rng.normal(size=(6, dim))))])
    scores, found = backend.search(queries, 10)
    assert (found == brute_force(queries, keys, vectors, 10)).all()
    assert (found[:6] < 20).all()
    assert backend.fallbacks == (6 if kind == "bf16" else 0)  # the opposite queries only, and only in bf16


@pytest.mark.parametrize("kind", sorted(PREFILTERS))
def test_prefilter_backends_leave_small_stores_to_blas(kind):
    """Any batch, one query too (for bf16 a matrix-vector product), takes the first pass, except on a store under
    `min_rows` rows (`min_rows_single` for one query): there the blas backend is faster (docs/PERFORMANCE.md,
    Search). Both give the exact answer."""
    rng = np.random.default_rng(8)
    n, dim = 6000, 32
    vectors = unit(rng, n, dim)
    keys = np.arange(n, dtype=np.int64)
    for min_rows, min_rows_single, to_blas in [(0, 0, []), (0, n + 1, [1]), (n + 1, n + 1, [1, 2, 3])]:
        backend = PREFILTERS[kind](dim, group=8, min_rows=min_rows, min_rows_single=min_rows_single)
        backend.add(keys, vectors)
        sizes: list[int] = []
        exact_search = backend.exact.search
        backend.exact.search = lambda q, k, exact_search=exact_search: sizes.append(len(q)) or exact_search(q, k)
        for batch in (1, 2, 3):
            queries = unit(rng, batch, dim)
            assert (backend.search(queries, 10)[1] == brute_force(queries, keys, vectors, 10)).all()
        assert sizes == to_blas and backend.fallbacks == 0


@pytest.mark.parametrize("kind", sorted(PREFILTERS))
def test_prefilter_stores_stay_columns_until_the_first_pass_can_run(kind):
    """Below the smaller of `min_rows` and `min_rows_single` every search is the blas backend's, so the store keeps
    the blas layout (columns, where that search is fastest) and no mirror; from that size on, rows and the mirror,
    kept after removals take it back below. A store that is already that large gets them when the backend is made
    over it (as the index's load does). Every answer is exact."""
    rng = np.random.default_rng(9)
    n, dim = 4000, 16
    keys, vectors = np.arange(n, dtype=np.int64), unit(rng, n, dim)
    queries = unit(rng, 3, dim)
    backend = PREFILTERS[kind](dim, group=8, min_rows=3000, min_rows_single=2000)
    backend.add(keys[:1999], vectors[:1999])
    assert not backend.store.row_major and backend.store.bf16 is None and backend.store.int8 is None
    assert (backend.search(queries, 10)[1] == brute_force(queries, keys[:1999], vectors[:1999], 10)).all()
    backend.add(keys[1999:], vectors[1999:])
    assert backend.store.row_major and (backend.store.bf16 is not None) != (backend.store.int8 is not None)
    backend.remove(keys[:2500].tolist())
    assert backend.store.row_major
    live_keys, live = backend.store.live()
    assert (backend.search(queries, 10)[1] == brute_force(queries, live_keys, live, 10)).all()
    store = VectorStore(dim)
    store.add(keys, vectors)
    assert PREFILTERS[kind](dim, store, min_rows=3000, min_rows_single=2000).store.row_major


def test_bf16_error_bound_holds_for_torch_bf16_products():
    """The bound the bf16 backend's proof rests on, checked on this machine's bf16 kernel (a kernel that summed in
    bf16 instead of float32 would break it), vectors of unequal norms included."""
    import torch

    rng = np.random.default_rng(2)
    dim = 128
    x = rng.normal(size=(20000, dim)).astype(np.float32) * rng.uniform(0.1, 3, size=(20000, 1)).astype(np.float32)
    q = rng.normal(size=(32, dim)).astype(np.float32)
    exact = q.astype(np.float64) @ x.T.astype(np.float64)
    approx = (torch.from_numpy(q).bfloat16() @ torch.from_numpy(x).bfloat16().T).double().numpy()
    allowed = bf16_error_bound(dim) * np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(x, axis=1)[None, :]
    assert (np.abs(approx - exact) <= allowed).all()
    assert np.abs(approx - exact).max() > 0.05 * allowed.max(), "bf16 products this close: not rounded as bf16?"


def test_bf16_bits_round_like_torch_and_follow_the_store():
    import torch

    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=5000).astype(np.float32),
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0, -0.0], dtype=np.float32)])  # ties
    assert (torch.from_numpy(bf16_bits(x)).view(torch.bfloat16) == torch.from_numpy(x).bfloat16()).all()
    store = VectorStore(4)
    store.add(np.arange(3, dtype=np.int64), np.eye(3, 4, dtype=np.float32) * 2)
    store.keep_bf16()
    store.add(np.arange(3, 2003, dtype=np.int64), unit(rng, 2000, 4))  # grows past the first capacity
    store.remove([0, 5, 1999])
    _, live = store.live()
    assert (store.bf16[: len(store)] == bf16_bits(live)).all()
    assert store.max_norm == pytest.approx(2.0)


@pytest.mark.parametrize("engine", [Int8ExactBackend, MlasInt8ExactBackend], ids=["torch", "mlas"])
def test_int8_error_bound_holds_for_each_engines_products(engine):
    """The int8 backend's bound (its module's docstring) on this machine's int8 products, torch's `_int_mm` and
    onnxruntime's MatMulInteger, from a store's own codes and scale, vectors of unequal norms included: the sums are
    exact, and the scores they give are within the bound, which is tight enough to mean something."""
    rng = np.random.default_rng(12)
    n, dim = 20000, 128  # n a multiple of the group: no padding rows
    x = rng.normal(size=(n, dim)).astype(np.float32) * rng.uniform(0.1, 3, size=(n, 1)).astype(np.float32)
    q = rng.normal(size=(32, dim)).astype(np.float32) * rng.uniform(0.1, 3, size=(32, 1)).astype(np.float32)
    backend = engine(dim, min_rows=0, min_rows_single=0)  # the mirror from the first row on
    backend.add(np.arange(n, dtype=np.int64), x)
    store = backend.store
    keys, (scales, errors) = backend._first_pass(q, n)
    products = keys.numpy().T.astype(np.int64)  # [B, n]
    codes, _, _ = int8_query_codes(q, MLAS_QUERY_LEVELS if engine is MlasInt8ExactBackend else INT8_LEVELS)
    row_codes = store.int8[:n].astype(np.int64) - (128 if engine is MlasInt8ExactBackend else 0)
    assert (products == codes.astype(np.int64) @ row_codes.T).all()  # exact sums
    approx = products * store.int8_scale * scales[:, None]
    exact = q.astype(np.float64) @ x.T.astype(np.float64)
    norms = np.linalg.norm(q.astype(np.float64), axis=1)[:, None]
    allowed = norms * store.int8_error + errors[:, None] * (store.max_norm + store.int8_error)
    assert (np.abs(approx - exact) <= allowed).all()
    assert np.abs(approx - exact).max() > 0.05 * allowed.max(), "int8 scores this close: not coded as int8?"


def test_mlas_int8_products_are_exact_at_the_codes_extremes():
    """MLAS's AVX2 kernel adds pairs of u8·s8 products in int16, saturating: with rows of 0..255 (codes ±127 + 128)
    and query codes of at most 63, every pair is within int16 and every sum exact, in both signs."""
    dim = 128
    backend = MlasInt8ExactBackend(dim)
    rows = np.array([np.full(dim, 255), np.full(dim, 1), np.tile([255, 1], dim // 2), np.full(dim, 128)],
                    dtype=np.uint8)
    queries = np.stack([np.full(dim, MLAS_QUERY_LEVELS), np.full(dim, -MLAS_QUERY_LEVELS),
                        np.tile([MLAS_QUERY_LEVELS, -MLAS_QUERY_LEVELS], dim // 2)], axis=1).astype(np.int8)  # [E, B]
    products = backend._product().run(None, {"rows": rows, "queries": queries})[0]
    expected = (rows.astype(np.int64) - 128) @ queries.astype(np.int64)
    assert expected.max() == 127 * 63 * dim and expected.min() == -127 * 63 * dim
    assert (products == expected).all()


def test_int8_backend_refuses_sizes_whose_sums_could_overflow():
    assert Int8ExactBackend(133_144).name == "int8-cpu-exact"  # 133144 * 127^2 < 2^31
    with pytest.raises(ValueError, match="too large for int32 sums"):
        Int8ExactBackend(133_145)


@pytest.mark.parametrize("unsigned", [False, True], ids=["int8", "uint8+128"])
def test_int8_codes_follow_the_store_and_its_scale(unsigned):
    """The int8 codes (as int8, or as uint8 + 128) stay those of the live rows at the store's scale through growth
    and removals; a row past the scale codes every row again at a larger one; the error bound covers every row; an
    empty store takes its scale from its first nonzero rows."""
    rng = np.random.default_rng(13)
    store = VectorStore(16)
    store.keep_int8(unsigned=unsigned)
    offset = 128 if unsigned else 0
    assert store.int8.dtype == (np.uint8 if unsigned else np.int8)
    store.add(np.arange(3, dtype=np.int64), np.zeros((3, 16), dtype=np.float32))  # all zero: no scale yet
    assert store.int8_scale == 0 and (store.int8[:3] == offset).all() and store.int8_error == 0
    store.add(np.arange(3, 1503, dtype=np.int64), 0.5 * unit(rng, 1500, 16))
    first = store.int8_scale
    assert 0 < first <= 0.5 / 127 and np.abs(store.int8[:1503].astype(int) - offset).max() == 127  # nothing clipped
    store.add(np.arange(1503, 1504, dtype=np.int64), np.full((1, 16), 0.9, dtype=np.float32))  # past the scale
    assert store.int8_scale == pytest.approx(0.9 / 127)
    store.add(np.arange(1504, 3004, dtype=np.int64), 0.5 * unit(rng, 1500, 16))  # grows past the first capacity
    store.remove([0, 5, 1503, 2999])
    assert store.int8_scale == pytest.approx(0.9 / 127)  # removal leaves the scale
    _, live = store.live()
    codes, errors = int8_codes(live, store.int8_scale)
    assert store.int8.dtype == (np.uint8 if unsigned else np.int8)  # grown as it was kept
    assert (store.int8[: len(store)].astype(int) - offset == codes).all()
    assert errors.max() <= store.int8_error


def test_vector_store_holds_the_same_vectors_column_by_column_or_row_by_row():
    """The blas layout (columns) and the bf16 and int8 ones (rows, from `keep_bf16()` or `keep_int8()` on, which
    convert what is there) keep every key's vector through growth and removals; `live()` and `get()` read either."""
    rng = np.random.default_rng(6)
    expected: dict[int, np.ndarray] = {}
    stores = [VectorStore(8), VectorStore(8), VectorStore(8)]
    stores[1].keep_bf16()
    stores[2].keep_int8()
    late = VectorStore(8)  # converted after its first rows
    for step in range(4):
        keys = np.arange(step * 900, (step + 1) * 900, dtype=np.int64)
        vectors = unit(rng, 900, 8)
        expected.update(zip(keys.tolist(), vectors))
        for store in (*stores, late):
            store.add(keys, vectors)
        if step == 0:
            late.keep_bf16()
        gone = rng.choice(list(expected), 150, replace=False).tolist()
        for key in gone:
            del expected[key]
        for store in (*stores, late):
            store.remove(gone)
    assert stores[0].vectors.flags.f_contiguous and not stores[0].vectors.flags.c_contiguous
    assert all(store.vectors.flags.c_contiguous for store in (*stores[1:], late))
    for store in (*stores, late):
        keys, live = store.live()
        assert sorted(keys.tolist()) == sorted(expected)
        assert np.array_equal(live, np.stack([expected[k] for k in keys.tolist()]))
        some = rng.choice(list(expected), 20, replace=False).tolist()
        assert np.array_equal(store.get(some), np.stack([expected[k] for k in some]))
    assert (late.bf16[: len(late)] == bf16_bits(late.live()[1])).all()


def test_aligned_empty_starts_on_the_boundary_and_holds_its_shape():
    for shape, dtype in [((1000, 128), np.uint16), ((3, 5), np.float32), ((1, 7), np.uint16), ((17,), np.int64)]:
        for _ in range(8):  # fresh buffers land at different offsets
            a = aligned_empty(shape, dtype)
            assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
            assert a.ctypes.data % ROW_ALIGNMENT == 0
            a[...] = 1
            assert (a == 1).all()
    # A store's bf16 rows, large enough to be allocated apart from the heap (where malloc's 16-byte header lands
    # them off the boundary), when first kept and when grown.
    rng = np.random.default_rng(5)
    store = VectorStore(128)
    store.add(np.arange(3000, dtype=np.int64), unit(rng, 3000, 128))
    store.keep_bf16()
    assert store.bf16.ctypes.data % ROW_ALIGNMENT == 0
    store.add(np.arange(3000, 70000, dtype=np.int64), unit(rng, 67000, 128))
    assert store.bf16.ctypes.data % ROW_ALIGNMENT == 0


def test_amx_and_vnni_detection_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n")
    assert cpu_has_amx_bf16(info) and cpu_has_avx512_vnni(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert not cpu_has_amx_bf16(info) and cpu_has_avx512_vnni(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx_vnni\n")
    assert not cpu_has_amx_bf16(info) and not cpu_has_avx512_vnni(info) and cpu_has_avx2(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    assert not cpu_has_avx2(info)
    assert not cpu_has_amx_bf16(tmp_path / "missing") and not cpu_has_avx512_vnni(tmp_path / "missing")


def test_backend_choice():
    if faiss_gpu_count() == 0:
        with pytest.raises(ValueError, match="no GPU"):
            choose_backend_kind("faiss-gpu")
        expected = ("torch" if torch_cuda_available() else "bf16" if cpu_has_amx_bf16()
                    else "int8" if cpu_has_avx512_vnni() or cpu_has_avx2() else "blas")
    else:
        expected = "faiss-gpu"
    assert choose_backend_kind("auto") == expected
    with pytest.raises(ValueError, match="expected one of"):
        choose_backend_kind("annoy")


def test_blas_kind_searches_exactly_with_blas_and_approximately_with_faiss_ivf():
    rng = np.random.default_rng(3)
    ivf = IvfParams(unit(rng, 4, 8), nprobe=2, recall_at_10=1.0)
    assert make_backend("blas", 8).name == "blas-cpu-fp32"
    assert make_backend("blas", 8, ivf).name == "faiss-cpu-ivf"
    assert make_backend("bf16", 8).name == "bf16-cpu-exact"
    assert make_backend("bf16", 8, ivf).name == "faiss-cpu-ivf"
    assert make_backend("int8", 8).name == ("int8-cpu-exact" if cpu_has_avx512_vnni() else "int8-mlas-cpu-exact")
    assert make_backend("int8", 8, ivf).name == "faiss-cpu-ivf"


@pytest.mark.skipif(faiss_gpu_count() == 0, reason="the installed faiss has no GPU support or sees no GPU")
def test_faiss_gpu_matches_cpu():
    rng = np.random.default_rng(5)
    keys, vectors = np.arange(5000, dtype=np.int64), unit(rng, 5000, 64)
    gpu, cpu = FaissBackend(64, gpu=True), FaissBackend(64)
    gpu.add(keys, vectors)
    cpu.add(keys, vectors)
    queries = unit(rng, 32, 64)
    assert (gpu.search(queries, 10)[1] == cpu.search(queries, 10)[1]).mean() > 0.99
    assert not gpu.supports_remove


@pytest.mark.skipif(not torch_cuda_available(), reason="torch sees no CUDA device")
def test_torch_cuda_fp16_matches_faiss():
    rng = np.random.default_rng(6)
    keys, vectors = np.arange(20000, dtype=np.int64), unit(rng, 20000, 128)
    cuda, cpu = TorchBlockedBackend(128, device="cuda", score_budget_bytes=1 << 20), FaissBackend(128)
    cuda.add(keys, vectors)
    cpu.add(keys, vectors)
    queries = unit(rng, 64, 128)
    approx, exact = cuda.search(queries, 10)[1], cpu.search(queries, 10)[1]
    # fp16 scores may swap near-ties; the sets must still agree almost everywhere.
    assert recall_at_10(approx, exact) > 0.98
