"""Search speed: the CPU exact backends side by side (faiss flat, the blas backend, the bf16 and int8 backends, the
int8 kind's products torch's with VNNI and onnxruntime's without, a plain numpy brute force); IVF recall and speed;
with --gpu, the torch-CUDA blocked fp16 exact search against its roofline.

    python bench/search.py                          # CPU: 10k, 100k, 1M items x E=512, batch 1 and 64
    python bench/search.py --sizes 100000 --dim 128 --batches 1 4 16 64 --ivf-sizes   # the embedded bundle's E
    python bench/search.py --sizes 10000 100000     # choose sizes
    python bench/search.py --gpu                    # CUDA: 1M x 512 fp16 at batch 1 and 1024 (needs a GPU)
    git worktree add /tmp/before HEAD~1 && python bench/search.py --against /tmp/before --sizes 100000 --dim 128
                                                    # also this checkout's blas and bf16 backends against another's

Every figure is measured in this run; ratios compare implementations timed on the same data, same queries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from srcid.index.backends import (BlasFlatBackend, FaissBackend, IvfParams, TorchBlockedBackend, cpu_has_amx_bf16,
                                   cpu_has_avx2, cpu_has_avx512_vnni, make_backend)
from srcid.index.ivf import choose_nlist, recall_at_10, train_centroids, tune_nprobe
from srcid.index.prefilter import Bf16ExactBackend

K = 10


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors float32 [n, dim] around random centers (retrieval embeddings cluster; exact-search speed does not care)."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centers[rng.integers(len(centers), size=m)] + 2.0 * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_topk(queries: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """Brute force: scores [B, n] by BLAS, argpartition to k, sort those k."""
    scores = queries @ db.T
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def timed(fns: dict[str, Callable[[np.ndarray], object]], batches: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per implementation: queries/s over all batches and p50/p99 latency per call in ms. Implementations take
    turns on each batch, so a load spike on this shared machine hits them alike; one warm-up call each."""
    lat: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(batches[0])
    for batch in batches:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(batch)
            lat[name].append(time.perf_counter() - t0)
    out = {}
    for name, times in lat.items():
        ms = np.array(times) * 1e3
        out[name] = {"qps": sum(len(b) for b in batches) / sum(times), "p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99)), "calls": len(batches)}
    return out


def backends_of(checkout: Path) -> tuple[type, type]:
    """The blas and bf16 backend classes of another checkout of this project, imported beside this one's: its srcid
    modules are loaded afresh from `checkout`, then taken out of sys.modules again (the classes keep them)."""
    def ours() -> dict:
        return {name: m for name, m in sys.modules.items() if name == "srcid" or name.startswith("srcid.")}

    mine = ours()
    for name in mine:
        del sys.modules[name]
    sys.path.insert(0, str(checkout))
    try:
        from srcid.index.backends import BlasFlatBackend as blas
        from srcid.index.prefilter import Bf16ExactBackend as bf16
    finally:
        sys.path.remove(str(checkout))
        for name in ours():
            del sys.modules[name]
        sys.modules.update(mine)
    if not Path(bf16.search.__code__.co_filename).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"--against {checkout}: holds no srcid package of its own")
    return blas, bf16


def query_budget(n: int, batch: int) -> int:
    """Calls per measurement: ~1e8 scored pairs (5..200 calls), so the 1M rows stay bounded in time."""
    return int(max(5, min(200, 1e8 / (n * batch))))


def run_cpu(sizes: list[int], dim: int, batches: list[int], ivf_sizes: list[int], seed: int,
            against: Path | None = None) -> list[dict]:
    before = backends_of(against) if against else None
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(1000, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows = []
    for n in sizes:
        db = clustered(rng, n, dim, centers)
        keys = np.arange(n, dtype=np.int64)
        flat, blas = FaissBackend(dim), BlasFlatBackend(dim)
        prefilters = {"bf16": Bf16ExactBackend(dim), "int8": make_backend("int8", dim)}  # the int8 kind's engine here
        earlier = {name: make(dim) for name, make in zip(("blas", "bf16"), before)} if before else {}
        for backend in (flat, blas, *prefilters.values(), *earlier.values()):
            backend.add(keys, db)
        for batch in batches:
            calls = query_budget(n, batch)
            queries = [clustered(rng, batch, dim, centers) for _ in range(calls)]
            reference = numpy_topk(queries[0], db, K)
            same = {name: float((b.search(queries[0], K)[1] == reference).mean())
                    for name, b in (("faiss", flat), ("blas", blas), *prefilters.items())}
            for backend in prefilters.values():
                backend.fallbacks = 0
            t = timed({"faiss": lambda q: flat.search(q, K), "blas": lambda q: blas.search(q, K),
                       **{name: (lambda q, b=b: b.search(q, K)) for name, b in prefilters.items()},
                       "numpy": lambda q: numpy_topk(q, db, K),
                       **{f"{name} before": (lambda q, b=b: b.search(q, K)) for name, b in earlier.items()}}, queries)
            row = {"n": n, "dim": dim, "batch": batch, "faiss_flat": t["faiss"], "blas": t["blas"],
                   **{name: t[name] for name in prefilters}, "numpy": t["numpy"],
                   "blas_over_faiss_qps": t["blas"]["qps"] / t["faiss"]["qps"],
                   **{f"{name}_over_blas_qps": t[name]["qps"] / t["blas"]["qps"] for name in prefilters},
                   **{f"{name}_fallback_share": b.fallbacks / ((calls + 1) * batch) for name, b in prefilters.items()},
                   "same_top10_ids_as_numpy": same,
                   **{f"{name}_before": t[f"{name} before"] for name in earlier},
                   **{f"{name}_over_before_qps": t[name]["qps"] / t[f"{name} before"]["qps"] for name in earlier}}
            rows.append(row)
            print(f"n={n:>8} batch={batch:>3}  " + "  ".join(
                f"{name} {f['qps']:>8.1f} q/s (p50 {f['p50_ms']:.2f}, p99 {f['p99_ms']:.2f} ms)" for name, f in t.items())
                + f"  blas/faiss {row['blas_over_faiss_qps']:.2f}x" + "".join(
                    f"  {name}/blas {row[name + '_over_blas_qps']:.2f}x (fallbacks {row[name + '_fallback_share']:.1%})"
                    for name in prefilters)
                + "  same ids " + " ".join(f"{v:.3f}" for v in same.values())
                + "".join(f"  {name} now/before {row[name + '_over_before_qps']:.2f}x" for name in earlier), flush=True)
        if n in ivf_sizes:
            rows.append(run_ivf(n, dim, db, keys, flat, centers, rng, batches))
        del flat, blas, prefilters, db
    return rows


def run_ivf(n: int, dim: int, db: np.ndarray, keys: np.ndarray, flat: FaissBackend, centers: np.ndarray,
            rng: np.random.Generator, batches: list[int]) -> dict:
    """IVF as the index builds it (nlist ~ 2 sqrt(n), nprobe tuned to recall@10 >= 0.95), on fresh queries."""
    t0 = time.perf_counter()
    nlist = choose_nlist(n)
    ivf = FaissBackend(dim, IvfParams(train_centroids(db, nlist), 1, 0.0))
    ivf.add(keys, db)
    nprobe, tuned_recall = tune_nprobe(ivf, keys, db, target=0.95)
    build_s = time.perf_counter() - t0
    fresh = clustered(rng, 1000, dim, centers)
    recall = recall_at_10(ivf.search(fresh, K)[1], flat.search(fresh, K)[1])
    row: dict = {"n": n, "dim": dim, "ivf": {"nlist": nlist, "nprobe": nprobe, "tuned_recall_at_10": tuned_recall,
                                              "fresh_recall_at_10": recall, "build_s": build_s}}
    for batch in batches:
        queries = [clustered(rng, batch, dim, centers) for _ in range(query_budget(n, batch))]
        t = timed({"ivf": lambda q: ivf.search(q, K), "flat": lambda q: flat.search(q, K)}, queries)
        i, f = t["ivf"], t["flat"]
        row[f"batch{batch}"] = {"ivf": i, "faiss_flat": f, "ivf_over_flat_qps": i["qps"] / f["qps"]}
        print(f"n={n:>8} batch={batch:>3}  IVF nlist={nlist} nprobe={nprobe}: {i['qps']:.1f} q/s (p50 {i['p50_ms']:.2f} ms)"
              f" vs flat {f['qps']:.1f} q/s: {i['qps'] / f['qps']:.1f}x; recall@10 {recall:.3f} on fresh queries", flush=True)
    return row


def run_gpu(n: int, dim: int, batches: list[int], peak_tflops: float, budget_mb: int, group: int, repeats: int) -> list[dict]:
    """torch-CUDA blocked fp16 exact search over n x dim, each batch against its roofline."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def cuda_time(fn: Callable[[], object], reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return float(np.median(times))

    backend = TorchBlockedBackend(dim, device="cuda", score_budget_bytes=budget_mb << 20, group=group)
    for start in range(0, n, 262_144):  # fill through the backend's own add path
        m = min(262_144, n - start)
        x = torch.randn(m, dim, device=dev, generator=gen)
        backend.add(np.arange(start, start + m, dtype=np.int64), torch.nn.functional.normalize(x, dim=1).cpu().numpy())
    db = backend.db[:n]
    db_bytes = db.numel() * db.element_size()
    scratch = torch.empty_like(db)
    copy_s = cuda_time(lambda: scratch.copy_(db), repeats)
    copy_bw = 2 * db_bytes / copy_s  # a copy reads and writes every byte
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    gemm_tflops = 2 * 8192**3 / cuda_time(lambda: a @ a, repeats) / 1e12
    del scratch, a
    print(f"GPU {torch.cuda.get_device_name()}: database {n} x {dim} fp16 = {db_bytes / 1e9:.2f} GB; "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; 8192^3 fp16 GEMM {gemm_tflops:.0f} TFLOP/s; peak given {peak_tflops:.0f}")
    rows = []
    for batch in batches:
        q_host = torch.nn.functional.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch)), dim=1).numpy()
        q = torch.from_numpy(q_host).to(dev, torch.float16)

        def blocked() -> object:  # the backend's device work; search() adds the host copies, timed below
            return backend.topk_on_device(q, K)

        device_s = cuda_time(blocked, repeats)
        naive_s = cuda_time(lambda: (q @ db.T).topk(K, dim=1), repeats)
        t0 = time.perf_counter()
        for _ in range(repeats):
            backend.search(q_host, K)
        end_to_end_s = (time.perf_counter() - t0) / repeats
        if batch == 1:
            roof_s, bound = db_bytes / copy_bw, f"reading {db_bytes / 1e9:.2f} GB at the measured copy bandwidth"
        else:
            roof_s, bound = 2 * batch * n * dim / (peak_tflops * 1e12), f"{2 * batch * n * dim / 1e12:.2f} TFLOP at {peak_tflops:.0f} TFLOP/s"
        row = {"batch": batch, "blocked_ms": device_s * 1e3, "naive_ms": naive_s * 1e3, "search_call_ms": end_to_end_s * 1e3,
               "qps": batch / device_s, "roofline_ms": roof_s * 1e3, "fraction_of_roofline": roof_s / device_s,
               "block_rows": backend.block_rows(batch, K), "group": backend.group}
        rows.append(row)
        print(f"batch {batch:>5}: blocked {device_s * 1e3:.3f} ms ({batch / device_s:,.0f} q/s), naive topk(q@db.T) "
              f"{naive_s * 1e3:.3f} ms, search() incl. host copies {end_to_end_s * 1e3:.3f} ms; roofline {roof_s * 1e3:.3f} ms "
              f"({bound}) -> {roof_s / device_s:.0%} of roofline", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 64 (CPU), 1 1024 (--gpu)")
    parser.add_argument("--ivf-sizes", type=int, nargs="*", default=[100_000], help="sizes that also get an IVF row")
    parser.add_argument("--gpu", action="store_true", help="torch-CUDA blocked fp16 exact search vs its roofline")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16 tensor-core peak (H100 SXM: 989)")
    parser.add_argument("--score-budget-mb", type=int, default=32, help="--gpu: MiB of scores per block")
    parser.add_argument("--group", type=int, default=32, help="--gpu: scores per group in two-stage selection (1: plain topk)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--against", type=Path, default=None, help="another checkout of this project (git worktree add "
                        "DIR REV): its blas and bf16 backends are timed too, taking turns with this one's on each batch")
    parser.add_argument("--json", type=str, default=None, help="also write the figures here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of faiss (OpenMP), torch and BLAS, as the service's "
                        "SRCID_INDEX_THREADS (0: their defaults)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads, user_api="blas")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "amx_bf16": cpu_has_amx_bf16(),
               "avx512_vnni": cpu_has_avx512_vnni(), "avx2": cpu_has_avx2(),
               "faiss": faiss.__version__, "numpy": np.__version__, "torch": torch.__version__,
               "faiss_threads": faiss.omp_get_max_threads(), "threads": args.threads, "load_average": os.getloadavg()}
    print(json.dumps(machine))
    if args.gpu:
        rows = run_gpu(max(args.sizes), args.dim, args.batches or [1, 1024], args.peak_tflops, args.score_budget_mb, args.group, args.repeats)
    else:
        rows = run_cpu(args.sizes, args.dim, args.batches or [1, 64], args.ivf_sizes, args.seed, args.against)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
