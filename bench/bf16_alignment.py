"""The bf16 backend's first pass over rows on a 64-byte boundary (what the VectorStore allocates) against rows 16
bytes past one (where numpy's own allocator put them), side by side in one run.

    python bench/bf16_alignment.py                      # 100k rows, E = 128 (the embedded bundle's), one thread
    python bench/bf16_alignment.py --rows 400000 --batches 1 16 32 64

Two copies of the same bf16 rows, one at each offset, take turns: the oneDNN product alone (`rows @ queries.T`
into a reused output, as the backend's first pass) and the whole `Bf16ExactBackend.search`, whose answers the run
checks are the same from both copies.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from srcid.index.prefilter import Bf16ExactBackend
from srcid.index.rows import ROW_ALIGNMENT, aligned_empty

OFFSET = 16  # bytes past the boundary: numpy's arrays of this size start there on glibc (malloc's chunk header)


def at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `a` whose first byte sits `offset` bytes past a ROW_ALIGNMENT boundary."""
    copy = aligned_empty((offset + a.nbytes,), np.uint8)[offset:].view(a.dtype).reshape(a.shape)
    copy[...] = a
    return copy


def median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 32, 48])
    parser.add_argument("--rounds", type=int, default=9, help="alternations per batch size (medians are printed)")
    parser.add_argument("--calls", type=int, default=5, help="calls per copy and round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one of the service's search threads)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    backends = {}
    for name, offset in (("aligned", 0), ("offset", OFFSET)):
        backend = Bf16ExactBackend(args.dim)
        backend.add(np.arange(args.rows, dtype=np.int64), vectors)
        backend.store.bf16 = at_offset(backend.store.bf16, offset)
        backends[name] = backend
    print(f"{platform.processor() or platform.machine()}, {args.rows} rows x {args.dim}, torch {torch.__version__}, "
          f"{args.threads} thread(s); bf16 rows at offset 0 and {OFFSET} from a {ROW_ALIGNMENT}-byte boundary")
    figures = []
    for batch in args.batches:
        queries = rng.standard_normal((batch, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        answers = [b.search(queries, 10) for b in backends.values()]
        if not all((x == y).all() for x, y in zip(*answers)):
            raise SystemExit("the two copies gave different answers")
        q16 = torch.from_numpy(queries).bfloat16()
        out = torch.empty((args.rows, batch), dtype=torch.bfloat16)
        timed: dict[str, dict[str, list[float]]] = {"product": {n: [] for n in backends},
                                                    "search": {n: [] for n in backends}}
        for r in range(args.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for name in order:
                store = backends[name].store
                rows = torch.from_numpy(store.bf16[: args.rows]).view(torch.bfloat16)
                timed["product"][name].append(median_ms(lambda: torch.matmul(rows, q16.T, out=out), args.calls))
                timed["search"][name].append(median_ms(lambda: backends[name].search(queries, 10), args.calls))
        row = {"batch": batch}
        for what, by_name in timed.items():
            aligned, offset = (float(np.median(by_name[n])) for n in ("aligned", "offset"))
            row[what] = {"aligned_ms": aligned, "offset_ms": offset, "gain": offset / aligned}
        figures.append(row)
        print(f"batch {batch:3d}: product {row['product']['aligned_ms']:.2f} vs {row['product']['offset_ms']:.2f} ms "
              f"({row['product']['gain']:.2f}x), search {row['search']['aligned_ms']:.2f} vs "
              f"{row['search']['offset_ms']:.2f} ms ({row['search']['gain']:.2f}x)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "dim": args.dim, "threads": args.threads,
                                        "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
