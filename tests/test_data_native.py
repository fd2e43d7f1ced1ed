"""Native shard reader: memory-mapped items, fingerprint, and a clear DataError for each kind of bad folder."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from srcid.training.data import DataError, NativeDataset, open_dataset
from srcid.training.shards import write_shards

T = 10
MODALITIES = {"audio": {"shape": [16], "masked": False}, "video": {"shape": [2, 2, 3], "masked": False},
              "text": {"shape": [8], "masked": True}}  # fmt: skip


def _arrays(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, T), dtype=bool)
    mask[0, -3:] = False
    return {
        "audio": rng.standard_normal((n, T, 16)).astype(np.float32),
        "video": rng.standard_normal((n, T, 2, 2, 3)).astype(np.float16),
        "text": rng.standard_normal((n, T, 8)).astype(np.float32),
        "text_mask": mask,
        "labels": rng.integers(0, 5, (n, T)),
        "ids": [f"clip {i}" for i in range(n)],
    }


@pytest.fixture()
def shard_dir(tmp_path):
    splits = {"train": _arrays(7, 0), "test": _arrays(3, 1)}
    write_shards(tmp_path / "shards", splits, MODALITIES, T, num_classes=5)
    return tmp_path / "shards", splits


def test_items_match_what_was_written_and_stay_memory_mapped(shard_dir):
    root, splits = shard_dir
    ds = open_dataset(root, "train")
    assert isinstance(ds, NativeDataset)
    assert ds.is_memory_mapped()
    assert len(ds) == 7 and ds.T == T and ds.num_classes == 5
    assert ds.modalities == MODALITIES
    assert ds.ids[2] == "clip 2"  # an id with a space survives the round trip
    item = ds[0]
    assert set(item) == {"audio", "video", "text", "text_mask", "labels"}
    np.testing.assert_array_equal(item["audio"], splits["train"]["audio"][0])
    np.testing.assert_array_equal(item["video"], splits["train"]["video"][0].astype(np.float32))
    assert item["video"].dtype == np.float32 and item["text_mask"].dtype == bool
    assert item["text_mask"].tolist() == [True] * 7 + [False] * 3
    np.testing.assert_array_equal(item["labels"], splits["train"]["labels"][0])


def test_a_pickled_copy_reopens_the_memory_maps_instead_of_carrying_the_data(tmp_path):
    big = {"train": _arrays(50)}  # ~65 kB of arrays
    write_shards(tmp_path / "s", big, MODALITIES, T)
    ds = open_dataset(tmp_path / "s", "train")
    blob = pickle.dumps(ds)  # what a spawn-started DataLoader worker receives
    assert len(blob) < 2000
    copy = pickle.loads(blob)
    assert copy.is_memory_mapped() and copy.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(copy[1]["audio"], big["train"]["audio"][1])


def test_open_accepts_the_manifest_path_and_rejects_an_unknown_split(shard_dir):
    root, _ = shard_dir
    assert len(open_dataset(root / "manifest.json", "test")) == 3
    with pytest.raises(DataError, match="no split 'val'"):
        open_dataset(root, "val")


def test_fingerprint_is_stable_and_tracks_content_and_split(shard_dir, tmp_path):
    root, splits = shard_dir
    a, b = open_dataset(root, "train"), open_dataset(root, "train")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert open_dataset(root, "test").fingerprint != a.fingerprint
    changed = {"train": _arrays(7, 5), "test": splits["test"]}
    write_shards(tmp_path / "other", changed, MODALITIES, T, num_classes=5)
    assert open_dataset(tmp_path / "other", "train").fingerprint != a.fingerprint


def test_missing_file_names_it(shard_dir):
    root, _ = shard_dir
    (root / "train" / "text_mask.npy").unlink()
    with pytest.raises(DataError, match=r"train/text_mask\.npy: missing"):
        open_dataset(root, "train")


def test_wrong_shape_names_the_file(shard_dir):
    root, _ = shard_dir
    np.save(root / "train" / "audio.npy", np.zeros((7, T, 15), np.float32))
    with pytest.raises(DataError, match=r"train/audio\.npy: shape \(7, 10, 15\), manifest says \(7, 10, 16\)"):
        open_dataset(root, "train")


def test_truncated_array_is_a_data_error(shard_dir):
    root, _ = shard_dir
    path = root / "train" / "audio.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"audio\.npy"):
        open_dataset(root, "train")


def test_nan_features_are_reported_per_item(shard_dir):
    root, splits = shard_dir
    audio = splits["train"]["audio"].copy()
    audio[4, 2, 1] = np.nan
    np.save(root / "train" / "audio.npy", audio)
    ds = open_dataset(root, "train")
    ds[3]  # other clips stay readable
    with pytest.raises(DataError, match=r"clip 4, id clip 4\): audio holds NaN"):
        ds[4]


def test_bad_manifest_is_a_data_error(shard_dir):
    root, _ = shard_dir
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="v99"):
        open_dataset(root, "train")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        open_dataset(root, "train")


def test_rewriting_without_labels_drops_the_old_labels(shard_dir):
    root, splits = shard_dir
    unlabeled = {k: v for k, v in splits["train"].items() if k != "labels"}
    write_shards(root, {"train": unlabeled}, MODALITIES, T)
    assert "labels" not in open_dataset(root, "train")[0]


def test_open_dataset_on_unknown_paths_and_options(shard_dir, tmp_path):
    root, _ = shard_dir
    with pytest.raises(DataError, match="no such file or folder"):
        open_dataset(tmp_path / "absent", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a data folder srcid can read; expected one of \['manifest.json'"):
        open_dataset(tmp_path / "empty", "train")
    with pytest.raises(DataError, match=r"unknown option\(s\) \['zip_dirs'\]"):
        open_dataset(root, "train", zip_dirs="zips")
