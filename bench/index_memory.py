"""Host memory of an exact index per CPU backend: RSS growth while a ModalityIndex takes n unit vectors of size E.

    python bench/index_memory.py                     # 200k x 512, backends blas and faiss-cpu
    python bench/index_memory.py --items 1000000 --dim 128

Each backend is measured in its own child process (RSS is per process and never shrinks), adding the vectors in
chunks of 5000 as the catalog sync does; the printed growth includes the index's capacity doubling and id maps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def measure(kind: str, n: int, dim: int, chunk: int = 5000) -> dict:
    from srcid.index.config import IndexConfig
    from srcid.index.modality_index import ModalityIndex

    rng = np.random.default_rng(0)
    before = rss_mib()
    index = ModalityIndex("audio", dim, IndexConfig(backend=kind), kind)
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - start), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        keys = np.arange(start, start + len(x), dtype=np.int64)
        index.add(keys, [str(k) for k in keys.tolist()], x)
    return {"backend": index.backend.name, "items": n, "dim": dim, "add_s": time.perf_counter() - t0,
            "rss_growth_mib": rss_mib() - before, "vectors_mib": n * dim * 4 / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["blas", "faiss-cpu"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.items, args.dim)))
        return 0
    for kind in args.backends:
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--items", str(args.items), "--dim", str(args.dim)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['backend']:15s} {r['items']} x {r['dim']}: RSS +{r['rss_growth_mib']:.0f} MiB for "
              f"{r['vectors_mib']:.0f} MiB of vectors ({r['rss_growth_mib'] / r['vectors_mib']:.2f}x), adds {r['add_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
