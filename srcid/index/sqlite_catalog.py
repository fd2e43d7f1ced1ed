"""The embedded catalog: one SQLite file in WAL mode with synchronous=FULL, so a commit that returned is on disk.

Several processes may share the file (WAL: readers never block the writer; writers queue on a busy timeout).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import orjson

from srcid.index.catalog import Catalog, resolve_binding
from srcid.index.errors import CatalogUnavailableError, DuplicateIdError
from srcid.index.items import Change, Item, check_batch

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    metadata TEXT NOT NULL,
    codes TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_by_modality ON items (modality, key);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY,
    op TEXT NOT NULL,
    id TEXT NOT NULL,
    modality TEXT NOT NULL,
    key INTEGER NOT NULL
);
"""


def sqlite_path(url: str) -> Path:
    """`sqlite:///abs/catalog.db` -> /abs/catalog.db; `sqlite://rel/catalog.db` -> rel/catalog.db."""
    rest = url[len("sqlite://") :]
    if not rest or rest == "/":
        raise ValueError(f"catalog URL {url!r}: no file path (expected sqlite:///path/catalog.db)")
    return Path(rest)


class SqliteCatalog(Catalog):
    def __init__(self, url: str, dim: int | None, bundle_version: str | None):
        self.url = url
        self.path = sqlite_path(url)
        if self.path.is_dir():
            raise ValueError(f"catalog {url}: {self.path} is a directory, not a database file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each write is exactly one transaction.
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL in WAL mode fsyncs the WAL at every commit: an acknowledged add survives power loss.
            self._db.execute("PRAGMA synchronous=FULL")
            with self._write():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                stored = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
                binding = resolve_binding(stored, dim, bundle_version, url)
                if not stored:
                    self._db.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", binding.items())
        except sqlite3.DatabaseError as exc:
            raise CatalogUnavailableError(f"catalog {url}: cannot open {self.path}: {exc}") from None
        self.dim = int(binding["dim"])
        self.bundle_version = binding["bundle_version"]
        self.uid = binding["uid"]
        log.info("catalog %s opened (E=%d, bundle %s, %d changes)", url, self.dim, self.bundle_version, self.version())

    class _Txn:
        def __init__(self, outer: "SqliteCatalog"):
            self.outer = outer

        def __enter__(self) -> sqlite3.Connection:
            self.outer._lock.acquire()
            try:
                # IMMEDIATE takes the write lock now, so the version we read cannot be raced by another process.
                self.outer._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.outer._lock.release()
                raise
            return self.outer._db

        def __exit__(self, exc_type: object, *rest: object) -> None:
            try:
                self.outer._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.outer._lock.release()

    def _write(self) -> "SqliteCatalog._Txn":
        return SqliteCatalog._Txn(self)

    def _version(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def add(self, items: Sequence[Item]) -> int:
        items = check_batch(items, self.dim)
        try:
            with self._write() as db:
                version = self._version(db)
                present = db.execute(
                    f"SELECT id FROM items WHERE id IN ({','.join('?' * len(items))})", [it.id for it in items]
                ).fetchone()
                if present:
                    raise DuplicateIdError(f"item {present[0]!r} already exists in catalog {self.url}")
                for item in items:
                    version += 1
                    db.execute(
                        "INSERT INTO items (key, id, modality, metadata, codes, embedding) VALUES (?, ?, ?, ?, ?, ?)",
                        (version, item.id, item.modality, json.dumps(item.metadata), json.dumps(item.codes),
                         item.embedding.astype("<f4").tobytes()),
                    )
                    db.execute(
                        "INSERT INTO changes (seq, op, id, modality, key) VALUES (?, 'add', ?, ?, ?)",
                        (version, item.id, item.modality, version),
                    )
                return version
        except sqlite3.OperationalError as exc:
            raise CatalogUnavailableError(f"catalog {self.url}: write failed: {exc}") from None

    def delete(self, item_id: str) -> int:
        try:
            with self._write() as db:
                row = db.execute("SELECT key, modality FROM items WHERE id = ?", (item_id,)).fetchone()
                if row is None:
                    raise self.not_found(item_id)
                version = self._version(db) + 1
                db.execute("DELETE FROM items WHERE key = ?", (row[0],))
                db.execute(
                    "INSERT INTO changes (seq, op, id, modality, key) VALUES (?, 'delete', ?, ?, ?)",
                    (version, item_id, row[1], row[0]),
                )
                return version
        except sqlite3.OperationalError as exc:
            raise CatalogUnavailableError(f"catalog {self.url}: write failed: {exc}") from None

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                raise CatalogUnavailableError(f"catalog {self.url}: read failed: {exc}") from None

    def _item(self, row: tuple) -> Item:
        item_id, key, modality, metadata, codes, blob = row
        return Item(
            id=item_id, modality=modality, embedding=np.frombuffer(blob, dtype="<f4").astype(np.float32),
            metadata=orjson.loads(metadata), codes=orjson.loads(codes), key=int(key),
        )

    def _rows_by_id(self, columns: str, item_ids: Sequence[str]) -> dict[str, tuple]:
        """id -> row of `columns` (the first is `id`) for the ids present."""
        found: dict[str, tuple] = {}
        ids = list(item_ids)
        # SQLite caps bound parameters (32766); chunk well below it.
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            rows = self._read(f"SELECT {columns} FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            found.update((row[0], row) for row in rows)
        return found

    def get_many(self, item_ids: Sequence[str]) -> list[Item | None]:
        rows = self._rows_by_id("id, key, modality, metadata, codes, embedding", item_ids)
        return [self._item(rows[i]) if i in rows else None for i in item_ids]

    def metadata_many(self, item_ids: Sequence[str]) -> list[tuple[str, dict[str, Any]] | None]:
        rows = self._rows_by_id("id, modality, metadata", item_ids)
        return [(rows[i][1], orjson.loads(rows[i][2])) if i in rows else None for i in item_ids]

    def count(self, modality: str | None = None) -> int:
        if modality is None:
            return int(self._read("SELECT COUNT(*) FROM items")[0][0])
        return int(self._read("SELECT COUNT(*) FROM items WHERE modality = ?", (modality,))[0][0])

    def version(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    def _read_changes(self, position: int, limit: int) -> list[Change]:
        rows = self._read(
            "SELECT seq, op, id, modality, key FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (position, limit)
        )
        return [Change(seq=int(s), op=op, id=i, modality=m, key=int(k)) for s, op, i, m, k in rows]

    def scan_embeddings(self, modality: str, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        last = 0
        while True:
            # Keyset pagination: no transaction is held open between batches.
            rows = self._read(
                "SELECT key, id, embedding FROM items WHERE modality = ? AND key > ? ORDER BY key LIMIT ?",
                (modality, last, batch_size),
            )
            if not rows:
                return
            last = int(rows[-1][0])
            keys = np.array([r[0] for r in rows], dtype=np.int64)
            vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
            yield keys, [r[1] for r in rows], vecs.astype(np.float32)

    def ids(self, modality: str) -> dict[str, int]:
        return {i: int(k) for i, k in self._read("SELECT id, key FROM items WHERE modality = ?", (modality,))}

    def close(self) -> None:
        with self._lock:
            self._db.close()
