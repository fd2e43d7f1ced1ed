"""Request bodies of listed features, parsed without a Python float per number.

A /encode body of `[10, 128]` features as a nested JSON list cost the event loop ~76 µs before validation: orjson
makes 1,280 Python floats (35 µs) and `np.asarray` walks them again (41 µs), against ~4 µs to parse the same
features as `features_b64`. simdjson parses the body into its own tape and hands a whole rectangular list of
numbers over as one buffer of doubles: 34-35 µs for the same body (docs/PERFORMANCE.md, Serve).

`parse_body(raw)` is what `parse_json(raw)` gives, except that every list under a "features" key that is a
rectangular nest of numbers is a float64 ndarray of that shape. Anything this cannot read exactly goes to
`parse_json` instead, as does a body without "features" in its first LOOK_BYTES, so a bad body gets the same
answer either way: a body simdjson refuses (NaN, a 65-bit integer, bad UTF-8), an object with a key twice,
features that are ragged, empty or hold a non-number, and any body with more `[` than the arrays accounted for (a
`[` inside a string, or a one-element list where a number belongs, which simdjson's buffer would flatten away).
Its numbers are float64, as numpy reads a list holding any float; integers are exact up to 2^53 (past that, a
list of integers only may round differently from numpy's int64 on its way to float32)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
import simdjson

FEATURES_KEY = b'"features"'
# Where the key is looked for: searching a whole 7 KB `features_b64` body for it cost 3.4 µs, a third of that body's
# parse; a body whose first listed features start later (after a long text, say) is parse_json's, as any other is.
LOOK_BYTES = 1024


def parse_json(body: bytes) -> Any:
    """orjson, falling back to the standard parser for the NaN/Infinity literals Python's json writes (which orjson
    refuses), so the features check can name the NaN (400) instead of the client getting a bare syntax error;
    raises json.JSONDecodeError, as FastAPI expects of a request's json()."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            return json.loads(body)
        except UnicodeDecodeError as exc:  # a ValueError, but not one FastAPI or the routes below read as bad JSON
            raise json.JSONDecodeError(f"not UTF-8 ({exc.reason})", "", exc.start) from None
        except RecursionError:  # nested deeper than orjson's 1,024 levels and than the interpreter's stack
            raise json.JSONDecodeError("nested too deeply", "", 0) from None


class _NotPlain(Exception):
    """This body is for parse_json."""


def parse_body(raw: bytes) -> Any:
    """A /encode or /retrieve body, its rectangles of listed features as arrays (the module docstring)."""
    if raw.find(FEATURES_KEY, 0, LOOK_BYTES) < 0:
        return parse_json(raw)
    arrays = [0]
    try:
        value = _plain(simdjson.Parser().parse(raw), arrays)
    except (_NotPlain, ValueError, TypeError, RuntimeError, KeyError, IndexError):
        return parse_json(raw)
    if arrays[0] != raw.count(b"["):
        return parse_json(raw)
    return value


def _plain(value: Any, arrays: list[int]) -> Any:
    """simdjson's value as Python, with features lists as arrays; `arrays[0]` counts the JSON arrays read."""
    if isinstance(value, simdjson.Object):
        keys = list(value.keys())
        if len(set(keys)) != len(keys):  # simdjson looks a key up as its first, orjson keeps its last
            raise _NotPlain
        return {key: (_features if key == "features" else _plain)(value[key], arrays) for key in keys}
    if isinstance(value, simdjson.Array):
        arrays[0] += 1
        return [_plain(value[i], arrays) for i in range(len(value))]
    return value


def _features(value: Any, arrays: list[int]) -> Any:
    if not isinstance(value, simdjson.Array):
        return _plain(value, arrays)
    shape, count = _rectangle(value)
    data = np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)  # TypeError on a non-number
    if data.size != math.prod(shape):
        raise _NotPlain
    arrays[0] += count
    return data.reshape(shape)


def _rectangle(array: Any) -> tuple[tuple[int, ...], int]:
    """The shape of a nest of lists that are all of one length at each level, down to the level whose first
    element is not a list, and the number of lists in it. Raises _NotPlain where it is ragged or empty."""
    shape: list[int] = []
    level, count = [array], 0
    while True:
        count += len(level)
        n = len(level[0])
        if n == 0 or any(len(a) != n for a in level):
            raise _NotPlain
        shape.append(n)
        if not isinstance(level[0][0], simdjson.Array):
            return tuple(shape), count
        level = [a[i] for a in level for i in range(n)]
        if not all(isinstance(a, simdjson.Array) for a in level):
            raise _NotPlain
