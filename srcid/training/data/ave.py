"""Reader for the AVE-ECCV18 feature files (the downstream event-localisation set).

    ROOT/audio_feature.h5    avadataset float [N, T, 128]          (N = 4143, T = 10 in the release)
    ROOT/visual_feature.h5   avadataset float [N, T, 7, 7, 512]
    ROOT/labels.h5           avadataset one-hot [N, T, 29]        (last class = background)
    ROOT/{train,val,test}_order.h5   order int [n]                (3339 / 402 / 402 row indices)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from torch.utils.data import Dataset

from srcid.training.data.errors import DataError
from srcid.training.data.items import Item, check_item, file_signature, fingerprint_of

FEATURE_FILES = {"audio": "audio_feature.h5", "video": "visual_feature.h5"}
LABELS_FILE = "labels.h5"
SPLITS = ("train", "val", "test")


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _dataset(f: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{path}: no dataset {key!r} (has {sorted(f.keys())})")
    return f[key]


class AVEECCV18(Dataset):
    """One split ("train", "val", "test") of the AVE-ECCV18 h5 files.

    Items: "audio" float32 [T, 128], "video" float32 [T, 7, 7, 512] (shapes as stored), "labels" int64 [T]
    = the argmax of the one-hot row (the last class, 28, is background). Shapes and order indices are
    checked at open; the h5 files are then reopened lazily in each process that reads items, because an
    h5py handle must not cross a fork into DataLoader workers.
    """

    def __init__(self, root: str | Path, split: str, *, key: str = "avadataset", order_key: str = "order"):
        if split not in SPLITS:
            raise DataError(f"{root}: AVE split must be one of {list(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.key = key
        self.paths = {**{m: self.root / f for m, f in FEATURE_FILES.items()}, "labels": self.root / LABELS_FILE}
        order_path = self.root / f"{split}_order.h5"
        shapes = {}
        for name, path in self.paths.items():
            with _open_h5(path) as f:
                shapes[name] = _dataset(f, key, path).shape
        with _open_h5(order_path) as f:
            order = np.asarray(_dataset(f, order_key, order_path)[()])
        self._check_shapes(shapes)
        n, self.T = shapes["audio"][:2]
        # whole numbers stored as floats are still indices; anything else is not
        integral = order.dtype.kind in "iu" or (order.dtype.kind == "f" and np.array_equal(order, np.round(order)))
        if not integral or order.ndim not in (1, 2) or (order.ndim == 2 and order.shape[1] != 1):
            raise DataError(f"{order_path}: {order_key} is {order.dtype} {list(order.shape)}, expected integer [n]")
        self.order = order.reshape(-1).astype(np.int64)
        if len(self.order) and (self.order.min() < 0 or self.order.max() >= n):
            raise DataError(f"{order_path}: indices must lie in [0, {n}), got [{self.order.min()}, {self.order.max()}]")
        self.num_classes: int | None = int(shapes["labels"][2])
        self.background_class = self.num_classes - 1
        self.modalities = {m: {"shape": list(shapes[m][2:]), "masked": False} for m in FEATURE_FILES}
        self.ids = [str(i) for i in self.order]
        self.fingerprint = fingerprint_of(
            {
                "format": "ave-eccv18",
                "files": [file_signature(p) for p in self.paths.values()],
                "key": key,
                "split": split,
                "order_sha256": hashlib.sha256(self.order.tobytes()).hexdigest(),
            }
        )
        self._files: dict[str, h5py.File] | None = None
        self._pid: int | None = None

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        audio, video, labels = shapes["audio"], shapes["video"], shapes["labels"]
        if len(audio) != 3:
            raise DataError(f"{self.paths['audio']}: {self.key} has shape {list(audio)}, expected [N, T, D]")
        if len(video) < 3:
            raise DataError(f"{self.paths['video']}: {self.key} has shape {list(video)}, expected [N, T, ...]")
        if len(labels) != 3 or labels[2] < 2:
            raise DataError(f"{self.paths['labels']}: {self.key} has shape {list(labels)}, expected one-hot [N, T, C]")
        for name in ("video", "labels"):
            if shapes[name][:2] != audio[:2]:
                raise DataError(
                    f"{self.paths[name]}: {self.key} has shape {list(shapes[name])}, but "
                    f"{self.paths['audio'].name} has [N, T] = {list(audio[:2])}"
                )

    def _handles(self) -> dict[str, h5py.File]:
        if self._files is None or self._pid != os.getpid():
            # After a fork the parent's handles are unusable (and must not be closed from here); open anew.
            self._files = {name: _open_h5(path) for name, path in self.paths.items()}
            self._pid = os.getpid()
        return self._files

    def __getstate__(self) -> dict[str, Any]:
        # spawn-started workers get a pickled copy: send paths, not open handles.
        return {**self.__dict__, "_files": None, "_pid": None}

    def close(self) -> None:
        if self._files is not None and self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = None

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Item:
        row = int(self.order[i])
        source = f"{self.root} (row {row})"
        try:
            files = self._handles()
            item = {m: np.asarray(files[m][self.key][row], dtype=np.float32) for m in FEATURE_FILES}
            onehot = np.asarray(files["labels"][self.key][row])
        except (OSError, KeyError) as exc:
            raise DataError(f"{source}: cannot read ({exc})") from exc
        empty = np.flatnonzero(onehot.max(axis=-1) <= 0)
        if len(empty):
            raise DataError(f"{self.paths['labels']}: row {row} has no class at steps {empty.tolist()}")
        item["labels"] = onehot.argmax(axis=-1).astype(np.int64)
        return check_item(item, self.modalities, self.T, source)
