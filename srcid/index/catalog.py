"""The catalog: the source of truth for items (id, modality, metadata, codes, embedding) and their change log.

A catalog is bound, when first created, to an embedding size E and a model-bundle version; opening it with
other values is refused. Every add and delete appends one entry to a change log whose sequence numbers run
1, 2, 3, ... without gaps; an index records the last sequence it applied (its *position*) and catches up from
there. An item's `key` is the sequence number of the add that created it: a stable int64 for FAISS, equal on
every replica, and new when an id is deleted and added again.

Backends: `sqlite:///path/to/catalog.db` (embedded, the default) and `redis://host:port/db` (shared by replicas).
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

import numpy as np

from srcid.index.errors import CatalogMismatchError, ChangeLogGapError, ItemNotFoundError
from srcid.index.items import MODALITIES, Change, Item

CATALOG_FORMAT = 1


class Catalog(ABC):
    """Interface shared by the SQLite and Redis catalogs. Writes return once durable; reads see acknowledged writes."""

    url: str
    dim: int
    bundle_version: str
    uid: str  # random, made with the catalog: an index built from another catalog is told apart by it

    @abstractmethod
    def add(self, items: Sequence[Item]) -> int:
        """Add items atomically (all or none); return the catalog version (last change seq) after the write."""

    @abstractmethod
    def delete(self, item_id: str) -> int:
        """Delete one item; return the catalog version after the write. ItemNotFoundError if absent."""

    @abstractmethod
    def get_many(self, item_ids: Sequence[str]) -> list[Item | None]:
        """Items in the order asked, None where an id is absent."""

    @abstractmethod
    def metadata_many(self, item_ids: Sequence[str]) -> list[tuple[str, dict[str, Any]] | None]:
        """(modality, metadata) of each id in the order asked, None where absent: what a search answer shows, read
        without decoding embeddings and codes (about half of get_many's time for a search batch's hits)."""

    def get(self, item_id: str) -> Item:
        """One item; ItemNotFoundError if absent."""
        found = self.get_many([item_id])[0]
        if found is None:
            raise self.not_found(item_id)
        return found

    def not_found(self, item_id: str) -> ItemNotFoundError:
        """The error for an id this catalog does not hold (404 in the service)."""
        return ItemNotFoundError(f"item {item_id!r} not found in catalog {self.url}")

    @abstractmethod
    def count(self, modality: str | None = None) -> int:
        """Number of items, of one modality or all."""

    @abstractmethod
    def version(self) -> int:
        """Sequence number of the last change (0 for an empty log)."""

    @abstractmethod
    def _read_changes(self, position: int, limit: int) -> list[Change]:
        """Up to `limit` changes with seq > position, in order."""

    def changes_since(self, position: int, limit: int = 10_000) -> list[Change]:
        """Up to `limit` changes after `position`, in order; ChangeLogGapError if the log does not continue it."""
        changes = self._read_changes(position, limit)
        expected = range(position + 1, position + 1 + len(changes))
        if any(c.seq != s for c, s in zip(changes, expected)):
            raise ChangeLogGapError(
                f"catalog {self.url}: change log does not continue position {position} "
                f"(next entries {[c.seq for c in changes[:3]]})"
            )
        return changes

    @abstractmethod
    def scan_embeddings(self, modality: str, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """All items of a modality in batches: keys int64 [n], ids [n], embeddings float32 [n, E].

        Not a snapshot: items written during the scan may or may not appear; an index built from a scan
        started at version V becomes exact by then applying the changes after V (applying is idempotent).
        """

    @abstractmethod
    def ids(self, modality: str) -> dict[str, int]:
        """id -> key of every item of a modality."""

    def counts(self) -> dict[str, int]:
        return {m: self.count(m) for m in MODALITIES}

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "uid": self.uid,
            "dim": self.dim,
            "bundle_version": self.bundle_version,
            "version": self.version(),
            "counts": self.counts(),
        }

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_binding(
    stored: dict[str, str] | None, dim: int | None, bundle_version: str | None, where: str
) -> dict[str, str]:
    """The binding (dim, bundle_version, uid, format) to use: the stored one, checked against what the caller asked,
    or a new one when the catalog is empty. Raises CatalogMismatchError naming both values on a conflict."""
    if not stored:
        if dim is None or bundle_version is None:
            raise CatalogMismatchError(
                f"catalog {where} is new: give the embedding size and bundle version it is for (--dim, --bundle-version)"
            )
        if int(dim) <= 0:
            raise CatalogMismatchError(f"catalog {where}: embedding size must be positive, got {dim}")
        return {"dim": str(int(dim)), "bundle_version": str(bundle_version), "uid": uuid.uuid4().hex, "format": str(CATALOG_FORMAT)}
    if int(stored.get("format", CATALOG_FORMAT)) != CATALOG_FORMAT:
        raise CatalogMismatchError(f"catalog {where}: format {stored['format']} is not {CATALOG_FORMAT}")
    if dim is not None and int(stored["dim"]) != int(dim):
        raise CatalogMismatchError(
            f"catalog {where} holds embeddings of size {stored['dim']}, not {dim}: use a new catalog for this model"
        )
    if bundle_version is not None and stored["bundle_version"] != str(bundle_version):
        raise CatalogMismatchError(
            f"catalog {where} was filled by bundle {stored['bundle_version']!r}, not {bundle_version!r}: "
            "embeddings of different bundles are not comparable; re-embed into a new catalog"
        )
    return stored


def open_catalog(url: str, dim: int | None = None, bundle_version: str | None = None) -> Catalog:
    """Open (or create) the catalog at `url`: `sqlite:///abs/path.db`, `sqlite://rel/path.db` or
    `redis://host:port/db[?prefix=srcid:&durability=strict|none]`. dim/bundle_version may be omitted for an
    existing catalog (its binding is then read from it)."""
    if url.startswith("sqlite://"):
        from srcid.index.sqlite_catalog import SqliteCatalog

        return SqliteCatalog(url, dim, bundle_version)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from srcid.index.redis_catalog import RedisCatalog

        return RedisCatalog(url, dim, bundle_version)
    raise ValueError(f"catalog URL {url!r}: expected sqlite:///path/catalog.db or redis://host:port/db")
