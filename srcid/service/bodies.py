"""Request bodies of listed features, parsed without a Python float per number.

A /encode body of `[10, 128]` features as a nested JSON list cost the event loop ~76 µs before validation: orjson
makes 1,280 Python floats (35 µs) and `np.asarray` walks them again (41 µs), against ~4 µs to parse the same
features as `features_b64`. This project's C parser (srcid/service/_bodyjson.c) reads such a body in one pass and
writes each rectangular list of numbers straight into one buffer of doubles, ~22 µs for that body; simdjson, which
did this before, took 38.5 µs (its parse 18.5, the walk through its arrays from Python 15, the count of `[` that
guarded it 3.3; docs/PERFORMANCE.md, Serve).

`parse_body(raw)` is what `parse_json(raw)` gives, except that every list under a "features" key that is a
rectangular nest of numbers is a float64 ndarray of that shape (numpy's doubles for the same numbers; an integer
past 2^53 keeps the list, as numpy's int64 conversion of it may round differently). The parser reads a subset of
JSON and declines the rest, which goes to `parse_json`, as does a body without "features" in its first LOOK_BYTES,
so a bad body gets the same answer either way: anything that is not JSON (NaN, a number past float64, text after
the body), a string with a backslash escape or bytes that are not UTF-8, an object with a key twice, nesting
deeper than 64 and an integer of 19 digits or more. Features that are ragged, empty or hold a non-number are read
as lists, as parse_json reads them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from . import _bodyjson

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


def parse_body(raw: bytes) -> Any:
    """A /encode or /retrieve body, its rectangles of listed features as arrays (the module docstring)."""
    if raw.find(FEATURES_KEY, 0, LOOK_BYTES) < 0:
        return parse_json(raw)
    try:
        return _bodyjson.parse(raw, _float64_array)
    except _bodyjson.Declined:
        return parse_json(raw)


def _float64_array(buffer: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.float64).reshape(shape)
