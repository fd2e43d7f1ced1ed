"""A pickle reader that only rebuilds numpy arrays and plain containers.

Foreign feature files (the authors' VGGSound-AVEL40K zips) hold pickles, and `pickle.load` on a file from
the internet runs whatever callable the file names. This unpickler resolves only the handful of globals
that numpy uses to pickle arrays, dtypes and scalars (under both the numpy 1.x `numpy.core.*` and the
numpy 2.x `numpy._core.*` module paths) plus plain containers; any other global raises
`ForbiddenPickleError` naming the source and the global, before anything is called.
"""

from __future__ import annotations

import collections
import importlib
import io
import pickle
from typing import Any

import numpy as np


class ForbiddenPickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (code execution, a custom class, ...)."""


def _numpy_core(submodule: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core (numpy.core remains as a deprecated alias); resolve the real one
    # so that pickles written by either major version load without importing the alias.
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_core("multiarray")
    numeric = _numpy_core("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 2 / protocol-2 pickles encode bytes through _codecs.encode(str, "latin1").
        ("_codecs", "encode"): __import__("codecs").encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    for builtins in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray)):
            allowed[(builtins, name)] = obj
    return allowed


_ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only allow-listed globals; `source` names the data in errors."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        # latin1 is what numpy needs to read arrays pickled by Python 2; Python 3 pickles are unaffected.
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenPickleError(
                f"{self.source}: pickle refers to forbidden global {module}.{name}; "
                "only numpy arrays and plain containers are accepted"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPickleError(f"{self.source}: pickle uses persistent ids, which are not accepted")


def load_restricted(data: bytes, source: str) -> Any:
    """Unpickle `data` allowing numpy arrays, numpy scalars/dtypes and plain containers only.

    Raises ForbiddenPickleError for any other global; other malformed input raises what pickle raises.
    """
    return RestrictedUnpickler(io.BytesIO(data), source).load()
