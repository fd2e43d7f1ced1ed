"""The restricted unpickler: numpy arrays and plain containers load under every protocol and both numpy
module layouts; any other global is refused before it is called."""

from __future__ import annotations

import builtins
import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from srcid.training.restricted_pickle import ForbiddenPickleError, load_restricted

ARR = np.arange(24, dtype=np.float32).reshape(2, 3, 4)


def _payload() -> dict:
    return {
        "audio": ARR,
        "video": ARR.astype(np.float64)[:, ::-1].T,  # non-contiguous, other dtype
        "f16": ARR.astype(np.float16),
        "ints": np.array([[1, 2]], dtype=np.int64),
        "scalar": np.float32(2.5),
        "dtype": np.dtype("<i2"),
        "nested": collections.OrderedDict(a=[1, (2.0, "x")], b={3, 4}, c=frozenset([5]), d=bytearray(b"xy"), e=None),
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_and_containers_round_trip(protocol):
    out = load_restricted(pickle.dumps(_payload(), protocol=protocol), "mem")
    want = _payload()
    for key in ("audio", "video", "f16", "ints"):
        assert out[key].dtype == want[key].dtype
        np.testing.assert_array_equal(out[key], want[key])
    assert out["scalar"] == np.float32(2.5) and out["dtype"] == np.dtype("<i2")
    assert out["nested"] == want["nested"] and isinstance(out["nested"], collections.OrderedDict)


@pytest.mark.parametrize("protocol", [0, 2])
def test_pickles_from_numpy_1_module_paths_load(protocol):
    # numpy 2 writes numpy._core.multiarray; pickles made with numpy 1.x say numpy.core.multiarray.
    data = pickle.dumps({"audio": ARR, "s": np.int64(7)}, protocol=protocol)
    legacy = data.replace(b"numpy._core", b"numpy.core")
    assert b"numpy.core.multiarray" in legacy or np.__version__.startswith("1.")
    out = load_restricted(legacy, "legacy")
    np.testing.assert_array_equal(out["audio"], ARR)
    assert out["s"] == 7


class Custom:
    def __init__(self):
        self.x = 1


class _Reduces:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize(
    ("obj", "forbidden"),
    [
        (_Reduces(os.system, "true"), "posix.system"),
        (_Reduces(builtins.eval, "1+1"), "builtins.eval"),
        (_Reduces(getattr, "text", "upper"), "builtins.getattr"),
        (_Reduces(np.load, "x.npy"), "numpy.load"),
        (Custom(), "Custom"),
        ({"audio": [ARR, Custom()]}, "Custom"),  # nested in an allowed container
        (np.array([_Reduces(builtins.exec, "1")], dtype=object), "builtins.exec"),  # inside an object array
    ],
)
def test_other_globals_are_refused_with_source_and_name(obj, forbidden):
    with pytest.raises(ForbiddenPickleError, match=rf"^clip\.zip:f\.pkl: pickle refers to forbidden global .*{forbidden}"):
        load_restricted(pickle.dumps(obj, protocol=4), "clip.zip:f.pkl")


def test_refused_call_never_runs(tmp_path: Path):
    marker = tmp_path / "ran"
    for protocol in (0, 2, 5):
        with pytest.raises(ForbiddenPickleError):
            load_restricted(pickle.dumps(_Reduces(os.system, f"touch {marker}"), protocol=protocol), "p")
    assert not marker.exists()


def test_persistent_ids_are_refused():
    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext" if obj == "external" else None

    import io

    buf = io.BytesIO()
    WithPid(buf, protocol=2).dump(["external"])
    with pytest.raises(ForbiddenPickleError, match="persistent ids"):
        load_restricted(buf.getvalue(), "p")
