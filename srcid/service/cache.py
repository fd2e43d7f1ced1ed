"""The optional Redis encode cache: one entry per input, keyed by content hash and bundle id.

A cache is an optimisation, never a dependency: when Redis is unreachable every lookup is a miss, writes are
skipped, and the cache is tried again after `retry_s` (so a Redis that comes back is used again).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

Encoded = dict[str, np.ndarray]  # one input: layer1 int64 [T], layer2 int64 [T], embedding float32 [E]


def pack(enc: Encoded) -> bytes:
    l1, l2, emb = (np.ascontiguousarray(enc[k]) for k in ("layer1", "layer2", "embedding"))
    header = np.array([len(l1), len(emb)], dtype=np.int64)
    return header.tobytes() + l1.astype(np.int64).tobytes() + l2.astype(np.int64).tobytes() + emb.astype(np.float32).tobytes()


def unpack(data: bytes) -> Encoded:
    T, E = np.frombuffer(data[:16], dtype=np.int64).tolist()
    body = data[16:]
    l1 = np.frombuffer(body[: 8 * T], dtype=np.int64)
    l2 = np.frombuffer(body[8 * T : 16 * T], dtype=np.int64)
    emb = np.frombuffer(body[16 * T : 16 * T + 4 * E], dtype=np.float32)
    return {"layer1": l1, "layer2": l2, "embedding": emb}


class EncodeCache:
    def __init__(self, url: str, on_result: Callable[[str, int], None], ttl_s: int = 7 * 24 * 3600,
                 retry_s: float = 1.0, timeout_s: float = 0.5):
        self.url = url
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._on_result = on_result  # (hit|miss|error, count)
        self.ttl_s, self.retry_s = ttl_s, retry_s
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        if self.available:
            log.warning("encode cache %s unreachable (%s); serving without it, retrying in %.1fs", self.url, exc, self.retry_s)
        self._down_until = time.monotonic() + self.retry_s
        self._on_result("error", 1)

    async def get_many(self, keys: list[str]) -> list[Encoded | None]:
        if not self.available:
            self._on_result("miss", len(keys))
            return [None] * len(keys)
        try:
            values = await self._redis.mget([f"srcid:enc:{k}" for k in keys])
        except (RedisError, OSError) as exc:
            self._failed(exc)
            self._on_result("miss", len(keys))
            return [None] * len(keys)
        hits = [None if v is None else unpack(v) for v in values]
        found = sum(h is not None for h in hits)
        self._on_result("hit", found)
        self._on_result("miss", len(keys) - found)
        return hits

    async def put_many(self, entries: dict[str, Encoded]) -> None:
        if not entries or not self.available:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, enc in entries.items():
                    pipe.set(f"srcid:enc:{key}", pack(enc), ex=self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
