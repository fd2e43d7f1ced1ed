"""Catalog items and change records, and the validation every write and query goes through."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from srcid.index.errors import BadEmbeddingError, BadItemError, DuplicateIdError

MODALITIES: tuple[str, ...] = ("audio", "video", "text")
MAX_ID_LENGTH = 512
MAX_METADATA_BYTES = 64 * 1024
# Below this norm a vector carries no direction; normalising it would amplify rounding noise.
MIN_NORM = 1e-12

Modality = Literal["audio", "video", "text"]


@dataclass(frozen=True)
class Item:
    """One catalog entry. `embedding` is float32 [E], L2-normalised; `key` is the catalog's int64 for it (0 = unset)."""

    id: str
    modality: str
    embedding: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, list[int]] = field(default_factory=dict)
    key: int = 0

    def to_json(self, with_embedding: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "modality": self.modality, "metadata": self.metadata, "codes": self.codes}
        if with_embedding:
            out["embedding"] = self.embedding.tolist()
        return out


@dataclass(frozen=True)
class Change:
    """One entry of the catalog's change log: `seq` is contiguous from 1; `key` names the item version it touched."""

    seq: int
    op: Literal["add", "delete"]
    id: str
    modality: str
    key: int


def normalise_vectors(vectors: Any, dim: int, what: str = "embedding") -> np.ndarray:
    """Check and L2-normalise vectors [B, E] (or one [E], returned as [1, E]) to float32.

    Raises BadEmbeddingError naming the row for a wrong size, NaN/inf or a zero vector.
    """
    try:
        arr = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadEmbeddingError(f"{what}: not a list of numbers ({exc})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        shape = list(np.shape(vectors))
        raise BadEmbeddingError(f"{what}: expected size {dim}, got shape {shape}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise BadEmbeddingError(f"{what}[{row}]: contains NaN or inf")
    norms = np.linalg.norm(arr, axis=1)
    if (norms < MIN_NORM).any():
        row = int(np.flatnonzero(norms < MIN_NORM)[0])
        raise BadEmbeddingError(f"{what}[{row}]: zero vector (norm {norms[row]:.3g}) cannot be normalised")
    return (arr / norms[:, None]).astype(np.float32)


def _check_id(item_id: Any) -> str:
    if not isinstance(item_id, str) or not item_id:
        raise BadItemError(f"id: must be a non-empty string, got {item_id!r}")
    if len(item_id) > MAX_ID_LENGTH:
        raise BadItemError(f"id {item_id[:40]!r}...: longer than {MAX_ID_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in item_id):
        raise BadItemError(f"id {item_id!r}: contains control characters")
    return item_id


def _check_metadata(item_id: str, metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise BadItemError(f"item {item_id!r}: metadata must be a JSON object, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise BadItemError(f"item {item_id!r}: metadata is not plain JSON ({exc})") from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise BadItemError(f"item {item_id!r}: metadata larger than {MAX_METADATA_BYTES} bytes")
    # Round-trip so the caller's later mutations cannot change what was stored.
    return json.loads(text)


def _check_codes(item_id: str, codes: Any) -> dict[str, list[int]]:
    if codes is None:
        return {}
    if not isinstance(codes, dict) or set(codes) - {"layer1", "layer2"}:
        raise BadItemError(f"item {item_id!r}: codes must be an object with keys 'layer1' and 'layer2'")
    out: dict[str, list[int]] = {}
    for layer, values in codes.items():
        if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 2**31 for v in values
        ):
            raise BadItemError(f"item {item_id!r}: codes.{layer} must be a list of non-negative integers")
        out[layer] = [int(v) for v in values]
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise BadItemError(f"item {item_id!r}: codes.layer1 and codes.layer2 differ in length ({sorted(lengths)})")
    return out


def make_item(
    item_id: Any,
    modality: Any,
    embedding: Any,
    dim: int,
    metadata: Any = None,
    codes: Any = None,
) -> Item:
    """Validate one item's fields and return it with its embedding normalised to float32 [dim]."""
    item_id = _check_id(item_id)
    if modality not in MODALITIES:
        raise BadItemError(f"item {item_id!r}: modality must be one of {list(MODALITIES)}, got {modality!r}")
    vec = normalise_vectors(embedding, dim, what=f"item {item_id!r}: embedding")[0]
    return Item(
        id=item_id,
        modality=modality,
        embedding=vec,
        metadata=_check_metadata(item_id, metadata),
        codes=_check_codes(item_id, codes),
    )


def check_batch(items: Sequence[Item], dim: int) -> list[Item]:
    """Validate a batch for a write, every field as make_item does (an Item built by hand gets no shortcut),
    and that its ids are distinct. Returns the validated items."""
    items = list(items)
    if not items:
        raise BadItemError("add: no items given")
    checked: list[Item] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, Item):
            raise BadItemError(f"add: expected Item objects (use make_item), got {type(item).__name__}")
        item = make_item(item.id, item.modality, item.embedding, dim, item.metadata, item.codes)
        if item.id in seen:
            raise DuplicateIdError(f"add: id {item.id!r} appears twice in one request")
        seen.add(item.id)
        checked.append(item)
    return checked
