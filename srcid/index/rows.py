"""Dense row bookkeeping shared by the host vector store and the torch backend.

Keys (int64) live in rows 0..n-1 without holes: removal moves surviving tail rows into the holes, so search
scans one contiguous block and removal costs O(removed) row copies instead of a shift of the whole matrix.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def grown_capacity(needed: int, current: int, minimum: int = 1024) -> int:
    """Capacity to allocate for `needed` rows: doubling, so n appends cost O(n) copies in total."""
    capacity = max(current, minimum)
    while capacity < needed:
        capacity *= 2
    return capacity


class RowTable:
    """int64 key -> row, for rows 0..n-1. Holders keep their data matrix in the same row order."""

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.int64)  # [capacity], rows >= n are garbage
        self.row_of: dict[int, int] = {}
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def __contains__(self, key: int) -> bool:
        return int(key) in self.row_of

    def append(self, keys: np.ndarray) -> slice:
        """Give rows to new keys [m] (none may be present); return the rows they took."""
        start, end = self.n, self.n + len(keys)
        if end > len(self.keys):
            grown = np.empty(grown_capacity(end, len(self.keys)), dtype=np.int64)
            grown[: self.n] = self.keys[: self.n]
            self.keys = grown
        self.keys[start:end] = keys
        self.row_of.update(zip(keys.tolist(), range(start, end)))
        self.n = end
        return slice(start, end)

    def remove(self, keys: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Drop present keys; return (holes, movers): the holder must copy data rows movers -> holes (all distinct)."""
        rows = np.array(sorted(self.row_of.pop(int(k)) for k in keys), dtype=np.int64)
        new_n = self.n - len(rows)
        holes = rows[rows < new_n]
        tail = np.arange(new_n, self.n, dtype=np.int64)
        movers = np.setdiff1d(tail, rows, assume_unique=True)
        self.keys[holes] = self.keys[movers]
        self.row_of.update(zip(self.keys[holes].tolist(), holes.tolist()))
        self.n = new_n
        return holes, movers

    def rows(self, keys: Sequence[int]) -> np.ndarray:
        return np.array([self.row_of[int(k)] for k in keys], dtype=np.int64)


# oneDNN's bf16 product reads rows on a 64-byte boundary faster: [100k, 128] by 32 queries took 1.91 against 2.62 ms
# from rows at a 16-byte offset (where numpy's allocator puts them), one thread, when the machine was quiet; within
# the noise when it was busy (bench/bf16_alignment.py; docs/PERFORMANCE.md, Search).
ROW_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: type | np.dtype, alignment: int = ROW_ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous array whose first element sits on an `alignment`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buffer = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Finite float32 values -> the nearest bfloat16 of each (ties to even), as its uint16 bit pattern: the upper
    half of the float32 after rounding the lower half away. numpy has no bfloat16; torch views these bits as one."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


INT8_LEVELS = 127  # symmetric codes -127..127, so a product of two codes never overflows a 32-bit sum at E < 2^17


def int8_codes(x: np.ndarray, scale: float | np.ndarray, levels: int = INT8_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows [m, E] -> their int8 codes round(x / scale) in -levels..levels [m, E] and each row's rounding
    error ‖x - scale·codes‖ [m] (float64), clipped codes included (a scale under max |x| / levels makes the errors
    larger, not wrong). `scale` is one for all rows or one a row [m, 1]."""
    scale = np.asarray(scale, dtype=np.float64)
    codes = np.clip(np.rint(x / scale.astype(np.float32)), -levels, levels).astype(np.int8)
    errors = np.linalg.norm(x.astype(np.float64) - scale * codes.astype(np.float64), axis=1)
    return codes, errors


class VectorStore:
    """Host copy of an index's vectors, in RowTable order: what is persisted, rebuilt from and, by the blas, bf16 and
    int8 backends, searched in place. `vectors` is float32 [capacity, E] (rows >= n are garbage), laid out for the
    backend that searches it:
    - column by column (a view of a C-contiguous [E, capacity]) for the blas backend: a batch of queries [B, E] is
      scored fastest as one BLAS product with it (100k x 128, 2 queries: 6.7 against 12.9 ms row by row);
    - row by row once `keep_bf16()` or `keep_int8()` is called: those backends re-score each query's candidates from
      whole rows (32 queries' 36 candidates: 0.05 against 0.5-0.8 ms gathered from columns). The blas search they
      leave small stores and unsettled queries to is slower over rows (5k rows, 2 queries: 0.56 against 0.38 ms),
      where searches are cheap anyway (docs/PERFORMANCE.md, Search).

    `keep_bf16()` also keeps the rows rounded to bfloat16, uint16 bits [capacity, E] (`bf16`), for the bf16 backend's
    first pass. `keep_int8()` keeps them as int8 codes [capacity, E] (`int8`; with `unsigned=True`, uint8 codes + 128,
    the operand onnxruntime's u8 x s8 product takes) of one scale for all rows
    (`int8_scale`, max |x| / 127 over the rows; a row past it makes every row coded again at a new scale, so a
    store coded while it was empty gets its scale from its first rows), and
    `int8_error`, a bound on every row's ‖x - int8_scale·codes‖. Both keep `max_norm`, a bound on the rows' norms.
    Removal leaves the bounds as they were."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.table = RowTable()
        self.vectors = self._empty(0, row_major=False)
        self.bf16: np.ndarray | None = None  # rows >= n are garbage
        self.int8: np.ndarray | None = None  # rows >= n are garbage
        self.int8_scale = 0.0
        self.int8_error = 0.0
        self.max_norm = 0.0

    def _empty(self, capacity: int, row_major: bool) -> np.ndarray:
        """Uninitialised float32 [capacity, E], row by row or a view of [E, capacity]."""
        if row_major:
            return np.empty((capacity, self.dim), dtype=np.float32)
        return np.empty((self.dim, capacity), dtype=np.float32).T

    @property
    def row_major(self) -> bool:
        return self.bf16 is not None or self.int8 is not None

    def _to_rows(self) -> np.ndarray:
        """The live float32 rows, the store converted to rows first if it is not yet."""
        n = self.table.n
        if not self.row_major:
            rows = self._empty(self.vectors.shape[0], row_major=True)
            rows[:n] = self.vectors[:n]
            self.vectors = rows
            self.max_norm = float(np.linalg.norm(rows[:n], axis=1).max(initial=0.0))
        return self.vectors[:n]

    def keep_bf16(self) -> None:
        if self.bf16 is None:
            live = self._to_rows()
            self.bf16 = aligned_empty((len(self.vectors), self.dim), np.uint16)
            self.bf16[: len(live)] = bf16_bits(live)

    def keep_int8(self, unsigned: bool = False) -> None:
        if self.int8 is None:
            live = self._to_rows()
            self.int8 = aligned_empty((len(self.vectors), self.dim), np.uint8 if unsigned else np.int8)
            self._code_int8(float(np.abs(live).max(initial=0.0)))

    def _code_int8(self, max_abs: float) -> None:
        """Every live row coded again at the scale `max_abs` calls for (0 while every row is zero)."""
        assert self.int8 is not None
        n = self.table.n
        self.int8_scale = max_abs / INT8_LEVELS
        self.int8_error = 0.0
        self._code_int8_rows(slice(0, n), self.vectors[:n])

    def _code_int8_rows(self, rows: slice, vectors: np.ndarray) -> None:
        assert self.int8 is not None
        if self.int8_scale == 0:  # all zero so far, as these vectors are: coded exactly
            codes, errors = np.zeros(vectors.shape, dtype=np.int8), np.zeros(1)
        else:
            codes, errors = int8_codes(vectors, self.int8_scale)
        # Flipping the sign bit of a two's complement int8 adds 128: -127..127 -> 1..255.
        self.int8[rows] = codes.view(np.uint8) ^ np.uint8(0x80) if self.int8.dtype == np.uint8 else codes
        self.int8_error = max(self.int8_error, float(errors.max(initial=0.0)))

    def __len__(self) -> int:
        return self.table.n

    def __contains__(self, key: int) -> bool:
        return key in self.table

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """New keys int64 [m] (none present) with vectors float32 [m, E]."""
        rows = self.table.append(np.asarray(keys, dtype=np.int64))
        if rows.stop > len(self.vectors):
            capacity = len(self.table.keys)
            grown = self._empty(capacity, row_major=self.row_major)
            grown[: rows.start] = self.vectors[: rows.start]
            self.vectors = grown
            for name in ("bf16", "int8"):
                if (old := getattr(self, name)) is not None:
                    mirror = aligned_empty((capacity, self.dim), old.dtype)
                    mirror[: rows.start] = old[: rows.start]
                    setattr(self, name, mirror)
        vectors = np.asarray(vectors, dtype=np.float32)
        self.vectors[rows] = vectors
        if self.row_major:
            self.max_norm = max(self.max_norm, float(np.linalg.norm(vectors, axis=1).max(initial=0.0)))
        if self.bf16 is not None:
            self.bf16[rows] = bf16_bits(vectors)
        if self.int8 is not None:
            max_abs = float(np.abs(vectors).max(initial=0.0))
            if max_abs > INT8_LEVELS * self.int8_scale:  # every earlier row is within 127 · scale < max_abs
                self._code_int8(max_abs)
            else:
                self._code_int8_rows(rows, vectors)

    def remove(self, keys: Sequence[int]) -> None:
        holes, movers = self.table.remove(keys)
        self.vectors[holes] = self.vectors[movers]
        for mirror in (self.bf16, self.int8):
            if mirror is not None:
                mirror[holes] = mirror[movers]

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Views of keys int64 [n] and vectors float32 [n, E]; copy before releasing the owner's lock."""
        return self.table.keys[: self.table.n], self.vectors[: self.table.n]

    def get(self, keys: Sequence[int]) -> np.ndarray:
        """Vectors float32 [len(keys), E] of present keys (a copy)."""
        return self.vectors[self.table.rows(keys)]
