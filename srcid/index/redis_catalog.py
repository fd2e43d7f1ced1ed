"""The shared catalog: a Redis server with AOF, so several API replicas see one catalog and converge.

Layout under a key prefix (default `srcid:`): `meta` (hash: dim, bundle_version, uid, format), `version`
(the change counter), `log` (a stream whose entry ids are `<seq>-0`), `item:<id>` (hash per item) and
`ids:<modality>` (hash id -> key). Adds and deletes are Lua scripts, so the counter, the item, the id map and
the log entry change together or not at all, even with several replicas writing. Needs a single Redis
(scripts touch keys they compute), not Redis Cluster.

Durability: with `appendonly yes` and `appendfsync always` Redis fsyncs the AOF before it replies, so a
returned add survives a crash of Redis or its host. Opening a catalog on a Redis without AOF is refused
(`?durability=none` accepts it); `appendfsync everysec` is accepted with a warning (up to 1 s lost on power loss).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
import orjson
import redis

from srcid.index.catalog import Catalog, resolve_binding
from srcid.index.errors import (
    CatalogError,
    CatalogUnavailableError,
    DuplicateIdError,
    NotDurableError,
)
from srcid.index.items import Change, Item, check_batch

log = logging.getLogger(__name__)

# KEYS: version, log, item keys [n], id-map keys [n]. ARGV: n, then per item id, modality, metadata, codes, embedding.
_ADD = """
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 + i]) == 1 then
    return redis.error_reply('DUPLICATE ' .. ARGV[2 + (i - 1) * 5])
  end
end
local v = 0
for i = 1, n do
  local b = 1 + (i - 1) * 5
  v = redis.call('INCR', KEYS[1])
  redis.call('HSET', KEYS[2 + i], 'id', ARGV[b + 1], 'modality', ARGV[b + 2], 'metadata', ARGV[b + 3],
             'codes', ARGV[b + 4], 'embedding', ARGV[b + 5], 'key', v)
  redis.call('HSET', KEYS[2 + n + i], ARGV[b + 1], v)
  redis.call('XADD', KEYS[2], v .. '-0', 'op', 'add', 'id', ARGV[b + 1], 'modality', ARGV[b + 2], 'key', v)
end
return v
"""

# KEYS: version, log, item key. ARGV: prefix, id.
_DELETE = """
local f = redis.call('HMGET', KEYS[3], 'modality', 'key')
if not f[1] then return redis.error_reply('NOTFOUND') end
local v = redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[3])
redis.call('HDEL', ARGV[1] .. 'ids:' .. f[1], ARGV[2])
redis.call('XADD', KEYS[2], v .. '-0', 'op', 'delete', 'id', ARGV[2], 'modality', f[1], 'key', f[2])
return v
"""

# KEYS: item keys. What a search answer shows of each, as one JSON array of [modality, metadata] or null (absent):
# one reply to parse instead of two bulk strings an item, which redis-py's parser reads in Python (320 items: 2.2
# against 6.4-8.2 ms for a pipeline of HMGETs; docs/PERFORMANCE.md, Serve). Metadata is stored as JSON already.
_METADATA = """
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'modality', 'metadata')
  if f[1] then out[i] = '[' .. cjson.encode(f[1]) .. ',' .. (f[2] or '{}') .. ']' else out[i] = 'null' end
end
return '[' .. table.concat(out, ',') .. ']'
"""
METADATA_CHUNK = 1000  # items a script call reads: a script blocks Redis while it runs

# KEYS: meta. ARGV: dim, bundle_version, uid, format. Creates the binding once; every caller reads the winner.
_BIND = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'dim', ARGV[1], 'bundle_version', ARGV[2], 'uid', ARGV[3], 'format', ARGV[4])
end
return redis.call('HGETALL', KEYS[1])
"""


def _split_url(url: str) -> tuple[str, str, str]:
    """(redis-py URL without our options, key prefix, durability mode)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", ["srcid:"])[0]
    durability = query.pop("durability", ["strict"])[0]
    if durability not in ("strict", "none"):
        raise ValueError(f"catalog URL {url!r}: durability must be 'strict' or 'none', got {durability!r}")
    rest = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    return rest, prefix, durability


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: list[bytes]) -> dict[str, str]:
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


class RedisCatalog(Catalog):
    def __init__(self, url: str, dim: int | None, bundle_version: str | None):
        self.url = url
        client_url, self.prefix, durability = _split_url(url)
        self._r = redis.Redis.from_url(client_url, socket_timeout=30, socket_connect_timeout=10, decode_responses=False)
        with self._errors():
            self._check_durability(durability)
            stored = {k.decode(): v.decode() for k, v in self._r.hgetall(self._k("meta")).items()}
            binding = resolve_binding(stored, dim, bundle_version, url)
            if not stored:
                stored = _pairs(self._r.eval(_BIND, 1, self._k("meta"), binding["dim"], binding["bundle_version"],
                                             binding["uid"], binding["format"]))
                binding = resolve_binding(stored, dim, bundle_version, url)
            self._add = self._r.register_script(_ADD)
            self._delete = self._r.register_script(_DELETE)
            self._metadata = self._r.register_script(_METADATA)
        self.dim = int(binding["dim"])
        self.bundle_version = binding["bundle_version"]
        self.uid = binding["uid"]
        log.info("catalog %s opened (E=%d, bundle %s, %d changes)", url, self.dim, self.bundle_version, self.version())

    def _k(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise CatalogUnavailableError(f"catalog {self.url}: Redis unreachable: {exc}") from None
        except redis.ResponseError as exc:
            message = str(exc)
            if message.startswith("DUPLICATE "):
                raise DuplicateIdError(f"item {message[10:]!r} already exists in catalog {self.url}") from None
            if message.startswith("NOTFOUND"):
                raise  # translated by delete(), which knows the id
            if "MISCONF" in message or "READONLY" in message or "OOM" in message:
                raise CatalogUnavailableError(f"catalog {self.url}: Redis refused the write: {message}") from None
            raise CatalogError(f"catalog {self.url}: Redis error: {message}") from None

    def _check_durability(self, durability: str) -> None:
        if durability == "none":
            log.warning("catalog %s: durability=none, acknowledged writes may be lost if Redis crashes", self.url)
            return
        try:
            # redis-py decodes CONFIG replies itself (str or bytes depending on version).
            config = {_text(k): _text(v) for k, v in self._r.config_get("append*").items()}
        except redis.ResponseError:
            log.warning("catalog %s: CONFIG is disabled, cannot check that AOF is on", self.url)
            return
        if config.get("appendonly") != "yes":
            raise NotDurableError(
                f"catalog {self.url}: Redis runs without AOF (appendonly={config.get('appendonly')}), so acknowledged "
                "writes could be lost; start it with --appendonly yes --appendfsync always, or add ?durability=none"
            )
        if config.get("appendfsync") != "always":
            log.warning(
                "catalog %s: appendfsync=%s, a power loss can drop the last second of acknowledged writes",
                self.url, config.get("appendfsync"),
            )

    def add(self, items: Sequence[Item]) -> int:
        items = check_batch(items, self.dim)
        keys = [self._k("version"), self._k("log")]
        keys += [self._k("item:", it.id) for it in items]
        keys += [self._k("ids:", it.modality) for it in items]
        args: list[object] = [len(items)]
        for it in items:
            args += [it.id, it.modality, json.dumps(it.metadata), json.dumps(it.codes), it.embedding.astype("<f4").tobytes()]
        with self._errors():
            return int(self._add(keys=keys, args=args))

    def delete(self, item_id: str) -> int:
        keys = [self._k("version"), self._k("log"), self._k("item:", item_id)]
        try:
            with self._errors():
                return int(self._delete(keys=keys, args=[self.prefix, item_id]))
        except redis.ResponseError:
            raise self.not_found(item_id) from None

    def _item(self, fields: dict[bytes, bytes]) -> Item:
        return Item(
            id=fields[b"id"].decode(),
            modality=fields[b"modality"].decode(),
            embedding=np.frombuffer(fields[b"embedding"], dtype="<f4").astype(np.float32),
            metadata=orjson.loads(fields[b"metadata"]),
            codes=orjson.loads(fields[b"codes"]),
            key=int(fields[b"key"]),
        )

    def get_many(self, item_ids: Sequence[str]) -> list[Item | None]:
        with self._errors():
            pipe = self._r.pipeline(transaction=False)
            for item_id in item_ids:
                pipe.hgetall(self._k("item:", item_id))
            return [self._item(f) if f else None for f in pipe.execute()]

    def metadata_many(self, item_ids: Sequence[str]) -> list[tuple[str, dict[str, Any]] | None]:
        keys = [self._k("item:", item_id) for item_id in item_ids]
        found: list[tuple[str, dict[str, Any]] | None] = []
        with self._errors():
            for start in range(0, len(keys), METADATA_CHUNK):
                reply = orjson.loads(self._metadata(keys=keys[start : start + METADATA_CHUNK]))
                found.extend(None if pair is None else (pair[0], pair[1]) for pair in reply)
        return found

    def count(self, modality: str | None = None) -> int:
        if modality is None:
            return sum(self.counts().values())
        with self._errors():
            return int(self._r.hlen(self._k("ids:", modality)))

    def version(self) -> int:
        with self._errors():
            return int(self._r.get(self._k("version")) or 0)

    def _read_changes(self, position: int, limit: int) -> list[Change]:
        with self._errors():
            entries = self._r.xrange(self._k("log"), min=f"{position + 1}-0", max="+", count=limit)
        out = []
        for entry_id, f in entries:
            out.append(Change(
                seq=int(entry_id.split(b"-")[0]), op=f[b"op"].decode(), id=f[b"id"].decode(),
                modality=f[b"modality"].decode(), key=int(f[b"key"]),
            ))
        return out

    def scan_embeddings(self, modality: str, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        with self._errors():
            for ids in self._batches(self._r.hscan_iter(self._k("ids:", modality), count=batch_size), batch_size):
                pipe = self._r.pipeline(transaction=False)
                for item_id in ids:
                    pipe.hmget(self._k("item:", item_id), "embedding", "key")
                rows = [(i, emb, key) for i, (emb, key) in zip(ids, pipe.execute()) if emb is not None]
                if rows:
                    vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
                    yield np.array([int(r[2]) for r in rows], dtype=np.int64), [r[0] for r in rows], vecs.astype(np.float32)

    @staticmethod
    def _batches(pairs: Iterator[tuple[bytes, bytes]], size: int) -> Iterator[list[str]]:
        batch: list[str] = []
        for item_id, _ in pairs:
            batch.append(item_id.decode())
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def ids(self, modality: str) -> dict[str, int]:
        with self._errors():
            return {k.decode(): int(v) for k, v in self._r.hgetall(self._k("ids:", modality)).items()}

    def close(self) -> None:
        self._r.close()
