"""Measure what one catalog item costs in Redis: memory (INFO used_memory) and AOF bytes, per item.

    python deploy/catalog_footprint.py --catalog redis://127.0.0.1:6379/15 --items 20000 --dim 512 --steps 10

Writes synthetic items (unit vectors [E], two code layers [T], a small metadata dict) through the real
RedisCatalog under a throw-away key prefix, reads the two figures before and after, then deletes those keys
again. Use a Redis configured like the deployment's (AOF on); the figures scale linearly with the item count,
so they size Redis for a catalog (docs/DEPLOY.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import uuid

import numpy as np
import redis
from tqdm import tqdm

from srcid.index.catalog import open_catalog
from srcid.index.items import Item

log = logging.getLogger("catalog_footprint")


def redis_figures(client: redis.Redis) -> tuple[int, int]:
    """(used_memory, aof_current_size) in bytes; the AOF size is 0 when AOF is off."""
    memory, persistence = client.info("memory"), client.info("persistence")
    return int(memory["used_memory"]), int(persistence.get("aof_current_size", 0))


def synthetic_items(start: int, count: int, dim: int, steps: int, rng: np.random.Generator) -> list[Item]:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [Item(id=f"clip-{start + i:09d}", modality=("audio", "video", "text")[(start + i) % 3],
                 embedding=vectors[i], metadata={"source": "footprint", "n": start + i},
                 codes={"layer1": rng.integers(0, 400, steps).tolist(), "layer2": rng.integers(0, 400, steps).tolist()})
            for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", required=True, help="redis://host:port/db of a Redis configured like production")
    parser.add_argument("--items", type=int, default=20000, help="synthetic items to write (default 20000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size E (default 512)")
    parser.add_argument("--steps", type=int, default=10, help="time steps T per code layer (default 10)")
    parser.add_argument("--batch", type=int, default=500, help="items per catalog write (default 500)")
    args = parser.parse_args()
    if not args.catalog.startswith("redis://") or "?" in args.catalog:
        raise SystemExit(f"--catalog {args.catalog!r}: expected redis://host:port/db without options")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    prefix = f"footprint-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(args.catalog)
    catalog = open_catalog(f"{args.catalog}?prefix={prefix}", dim=args.dim, bundle_version="footprint")
    rng = np.random.default_rng(0)
    memory0, aof0 = redis_figures(client)
    try:
        for start in tqdm(range(0, args.items, args.batch), desc="write", unit="batch"):
            catalog.add(synthetic_items(start, min(args.batch, args.items - start), args.dim, args.steps, rng))
        memory1, aof1 = redis_figures(client)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
    figures = {"items": args.items, "dim": args.dim, "steps": args.steps,
               "embedding_bytes": 4 * args.dim,
               "memory_bytes_per_item": round((memory1 - memory0) / args.items, 1),
               "aof_bytes_per_item": round((aof1 - aof0) / args.items, 1),
               "aof_enabled": client.config_get("appendonly")["appendonly"]}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
