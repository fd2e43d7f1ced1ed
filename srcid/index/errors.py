"""Errors of the catalog and the index, each with a stable `code` and the HTTP status a service should answer.

All derive from ValueError so that the command line prints them as one clear line (see srcid/cli.py).
"""

from __future__ import annotations


class CatalogError(ValueError):
    """Base class: `code` is machine-readable, the message says what was wrong and with which field/item."""

    code = "catalog_error"
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadItemError(CatalogError):
    """An item (id, modality, metadata or codes) is malformed; nothing was written."""

    code = "bad_item"
    http_status = 400


class BadEmbeddingError(BadItemError):
    """An embedding or query vector has the wrong size, a NaN/inf, or zero norm; nothing was written."""

    code = "bad_embedding"


class BadQueryError(BadItemError):
    """A search request is malformed (top_k out of range, unknown modality); the query vector errors are BadEmbeddingError."""

    code = "bad_query"


class DuplicateIdError(CatalogError):
    """An add named an id that the catalog already holds; nothing of that add was written."""

    code = "duplicate_id"
    http_status = 409


class ItemNotFoundError(CatalogError):
    """A get or delete named an id that the catalog does not hold."""

    code = "not_found"
    http_status = 404


class CatalogMismatchError(CatalogError):
    """The catalog is bound to another embedding size or bundle version than the caller asked for."""

    code = "catalog_mismatch"
    http_status = 500


class CatalogUnavailableError(CatalogError):
    """The catalog's store cannot be reached (Redis down) or refused the write; retry later."""

    code = "catalog_unavailable"
    http_status = 503


class ChangeLogGapError(CatalogError):
    """The change log no longer covers a position an index asked for; the index must be rebuilt."""

    code = "change_log_gap"


class NotDurableError(CatalogError):
    """The store would acknowledge writes it could lose (Redis without AOF); refused unless durability=none."""

    code = "catalog_not_durable"
    http_status = 503
