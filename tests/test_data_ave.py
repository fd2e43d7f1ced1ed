"""AVE-ECCV18 reader: h5 features selected by the order files, per-step labels, h5 reopened per worker,
and a DataError naming the file for each way the folder can be broken."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from srcid.training.data import AVEECCV18, DataError, make_loader, open_dataset

N, T, C = 12, 10, 29  # the release: N = 4143, video [7, 7, 512]; the last dim is shrunk to keep files small
VIDEO = (7, 7, 16)
ORDERS = {"train": [0, 2, 3, 5, 7, 8, 10, 11], "val": [1, 4], "test": [9, 6]}


def _h5(path: Path, key: str, data: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=data)


def write_folder(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, C - 1, (N, T))
    classes[:, :3] = C - 1  # background opens every clip, as in AVE
    arrays = {
        "audio": rng.standard_normal((N, T, 128)).astype(np.float32),
        "video": rng.random((N, T, *VIDEO), dtype=np.float32),
        "labels": np.eye(C, dtype=np.float32)[classes],
        "classes": classes,
    }
    _h5(root / "audio_feature.h5", "avadataset", arrays["audio"])
    _h5(root / "visual_feature.h5", "avadataset", arrays["video"])
    _h5(root / "labels.h5", "avadataset", arrays["labels"])
    for split, order in ORDERS.items():
        _h5(root / f"{split}_order.h5", "order", np.array(order))
    return arrays


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "ave"
    return root, write_folder(root)


def test_rows_follow_the_order_file_and_labels_are_per_step(folder):
    root, arrays = folder
    ds = open_dataset(root, "test")
    assert isinstance(ds, AVEECCV18)
    assert len(ds) == 2 and ds.T == T and ds.num_classes == C and ds.background_class == 28
    assert ds.modalities == {"audio": {"shape": [128], "masked": False}, "video": {"shape": list(VIDEO), "masked": False}}
    item = ds[1]  # test order [9, 6]: the second test clip is row 6
    np.testing.assert_array_equal(item["audio"], arrays["audio"][6])
    np.testing.assert_array_equal(item["video"], arrays["video"][6])
    assert item["labels"].dtype == np.int64 and item["labels"].tolist() == arrays["classes"][6].tolist()
    assert item["labels"][:3].tolist() == [28, 28, 28]
    assert ds.ids == ["9", "6"]
    assert len(open_dataset(root / "audio_feature.h5", "train")) == 8


def test_fingerprint_stable_per_split_and_content(folder, tmp_path):
    root, _ = folder
    assert open_dataset(root, "train").fingerprint == open_dataset(root, "train").fingerprint
    assert open_dataset(root, "train").fingerprint != open_dataset(root, "val").fingerprint
    write_folder(tmp_path / "other", seed=1)
    assert open_dataset(tmp_path / "other", "train").fingerprint != open_dataset(root, "train").fingerprint


def test_workers_reopen_the_h5_files_after_fork(folder):
    root, arrays = folder
    ds = open_dataset(root, "train")
    ds[0]  # the main process now holds open handles; forked workers must not reuse them
    batches = list(make_loader(ds, batch_size=3, shuffle=False, num_workers=2))
    audio = np.concatenate([b["audio"].numpy() for b in batches])
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    np.testing.assert_array_equal(audio, arrays["audio"][ORDERS["train"]])
    np.testing.assert_array_equal(labels, arrays["classes"][ORDERS["train"]])
    assert tuple(batches[0]["video"].shape) == (3, T, *VIDEO)


def test_a_pickled_copy_carries_paths_not_handles(folder):
    root, arrays = folder
    ds = open_dataset(root, "val")
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker receives
    np.testing.assert_array_equal(copy[1]["audio"], arrays["audio"][4])
    ds.close()


@pytest.mark.parametrize("name", ["audio_feature.h5", "visual_feature.h5", "labels.h5", "val_order.h5"])
def test_missing_file(folder, name):
    root, _ = folder
    (root / name).unlink()
    with pytest.raises(DataError, match=rf"{name}: missing"):
        AVEECCV18(root, "val")


def test_wrong_shapes(folder):
    root, arrays = folder
    _h5(root / "visual_feature.h5", "avadataset", arrays["video"][:-1])
    with pytest.raises(DataError, match=r"visual_feature\.h5: avadataset has shape \[11, 10, 7, 7, 16\], but audio_feature\.h5 has \[N, T\] = \[12, 10\]"):
        open_dataset(root, "train")
    _h5(root / "visual_feature.h5", "avadataset", arrays["video"])
    _h5(root / "labels.h5", "avadataset", arrays["labels"][..., 0])
    with pytest.raises(DataError, match=r"labels\.h5: avadataset has shape \[12, 10\], expected one-hot \[N, T, C\]"):
        open_dataset(root, "train")


def test_wrong_key_not_hdf5_and_bad_order(folder):
    root, arrays = folder
    with pytest.raises(DataError, match=r"audio_feature\.h5: no dataset 'features' \(has \['avadataset'\]\)"):
        open_dataset(root, "train", key="features")
    _h5(root / "test_order.h5", "order", np.array([3, N]))
    with pytest.raises(DataError, match=r"test_order\.h5: indices must lie in \[0, 12\), got \[3, 12\]"):
        open_dataset(root, "test")
    _h5(root / "test_order.h5", "order", np.array([[9.0], [6.0]]))  # whole floats in a column are indices
    assert open_dataset(root, "test").ids == ["9", "6"]
    _h5(root / "test_order.h5", "order", np.array([0.5]))
    with pytest.raises(DataError, match=r"test_order\.h5: order is float64 \[1\], expected integer"):
        open_dataset(root, "test")
    (root / "audio_feature.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match=r"audio_feature\.h5: not a readable HDF5 file"):
        open_dataset(root, "train")
    with pytest.raises(DataError, match="split must be one of"):
        AVEECCV18(root, "training")


def test_nan_and_empty_label_rows_are_reported_per_item(folder):
    root, arrays = folder
    audio = arrays["audio"].copy()
    audio[4, 1, 0] = np.inf
    _h5(root / "audio_feature.h5", "avadataset", audio)
    labels = arrays["labels"].copy()
    labels[1, 5] = 0
    _h5(root / "labels.h5", "avadataset", labels)
    ds = open_dataset(root, "val")  # val order [1, 4]
    with pytest.raises(DataError, match=r"labels\.h5: row 1 has no class at steps \[5\]"):
        ds[0]
    with pytest.raises(DataError, match=r"\(row 4\): audio holds NaN or inf"):
        ds[1]
