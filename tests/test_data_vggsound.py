"""VGGSound-AVEL40K reader: csv (with and without header), per-video zips holding a pickle, prompts through a
text encoder, and a DataError naming the file for each way the folder can be broken."""

from __future__ import annotations

import csv
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from srcid.model.frontends.base import Features
from srcid.training.data import DataError, VGGSoundAVEL, make_loader, open_dataset

T = 10
AUDIO, VIDEO = (T, 128), (T, 7, 7, 512)  # the release's VGGish and VGG19 pool5 shapes
CLIPS = [  # category, video_id, split
    ("dog barking", "vid_dog_1", "train"),
    ("church bells", "vid_bell_1", "train"),
    ("dog barking", "vid_dog_2", "train"),
    ("race car", "vid_car_1", "train"),
    ("church bells", "vid_bell_2", "test"),
    ("race car", "vid_car_2", "test"),
]
PROMPTS = {"dog barking": "a dog barks", "church bells": "bells ring in a church", "race car": "a car races by"}


def _features(video_id: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, video_id)))
    return {"audio": rng.standard_normal(AUDIO).astype(np.float32), "video": rng.random(VIDEO, dtype=np.float32)}


def _write_zip(path: Path, obj: object, member: str = "features.pkl", raw: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, pickle.dumps(obj) if raw is None else raw)


def write_folder(root: Path, *, header: bool = True, per_modality: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "vggsound-avel40k.csv", "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["category", "video_id", "split"])
        w.writerows(CLIPS)
    with open(root / "vggsoundCategories2Prompts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "prompt"])
        w.writerows(PROMPTS.items())
    for _, video_id, _ in CLIPS:
        feats = _features(video_id)
        if per_modality:  # the authors' own download: a folder per modality, a bare array per pickle
            _write_zip(root / "audio_zips" / f"{video_id}.zip", feats["audio"], f"{video_id}.pkl")
            _write_zip(root / "video_zips" / f"{video_id}.zip", feats["video"], f"{video_id}.pkl")
        else:
            _write_zip(root / "zips" / f"{video_id}.zip", feats)
    return root


def word_encoder(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic text front-end: one hashed vector per word, one word per step, the rest masked."""
    feats, mask = np.zeros((len(texts), T, 6), np.float32), np.zeros((len(texts), T), bool)
    for i, text in enumerate(texts):
        for t, word in enumerate(text.split()[:T]):
            feats[i, t] = np.random.default_rng(sum(map(ord, word))).standard_normal(6)
            mask[i, t] = True
    return feats, mask


@pytest.fixture()
def folder(tmp_path):
    return write_folder(tmp_path / "vgg")


def test_audio_video_and_clip_labels(folder):
    ds = open_dataset(folder, "train")
    assert isinstance(ds, VGGSoundAVEL)
    assert len(ds) == 4 and ds.T == T
    assert ds.modalities == {"audio": {"shape": [128], "masked": False}, "video": {"shape": [7, 7, 512], "masked": False}}
    assert ds.categories == ["church bells", "dog barking", "race car"] and ds.num_classes == 3
    assert ds.ids == ["vid_dog_1", "vid_bell_1", "vid_dog_2", "vid_car_1"]
    item = ds[3]
    assert set(item) == {"audio", "video", "labels"}
    np.testing.assert_array_equal(item["audio"], _features("vid_car_1")["audio"])
    np.testing.assert_array_equal(item["video"], _features("vid_car_1")["video"])
    assert item["labels"].dtype == np.int64 and item["labels"].shape == () and int(item["labels"]) == 2
    assert [int(ds[i]["labels"]) for i in range(4)] == [1, 0, 1, 2]


def test_csv_without_header_and_per_modality_zip_folders(tmp_path):
    root = write_folder(tmp_path / "vgg", header=False, per_modality=True)
    ds = open_dataset(root, "test", zip_dirs={"audio": "audio_zips", "video": "video_zips"})
    assert ds.ids == ["vid_bell_2", "vid_car_2"]
    np.testing.assert_array_equal(ds[1]["video"], _features("vid_car_2")["video"])


def test_text_from_prompts_through_the_encoder(folder):
    ds = open_dataset(folder, "train", text_encoder=word_encoder)
    assert ds.modalities["text"] == {"shape": [6], "masked": True}
    feats, mask = word_encoder([PROMPTS["church bells"]])
    item = ds[1]
    np.testing.assert_array_equal(item["text"], feats[0])
    assert item["text_mask"].tolist() == mask[0].tolist() == [True] * 5 + [False] * 5
    assert open_dataset(folder, "train").fingerprint != ds.fingerprint  # text is part of the data's identity


def test_text_front_end_returning_features(folder):
    def front_end(texts: list[str]) -> Features:  # the srcid.model.frontends calling convention
        return Features(*word_encoder(texts))

    ds = open_dataset(folder, "train", text_encoder=front_end)
    np.testing.assert_array_equal(ds[0]["text"], word_encoder([PROMPTS["dog barking"]])[0][0])
    with pytest.raises(DataError, match=r"text encoder returned mask float32 \[3, 10\], expected bool"):
        open_dataset(folder, "train", text_encoder=lambda texts: (word_encoder(texts)[0], np.ones((3, T), np.float32)))


def test_label_order_from_the_category_list(folder):
    (folder / "VggsoundAVEL40kCategories.txt").write_text("race car\ndog barking\nchurch bells\nwind\n")
    ds = open_dataset(folder, "train")
    assert ds.num_classes == 4 and [int(ds[i]["labels"]) for i in range(4)] == [1, 2, 1, 0]
    with pytest.raises(DataError, match=r"csv: categories not in the categories option: \['church bells'\] \(1 in all\)"):
        open_dataset(folder, "train", categories=["race car", "dog barking"])


def test_short_audio_is_padded_like_the_authors_and_strict_mode_refuses_it(folder):
    feats = _features("vid_dog_1")
    _write_zip(folder / "zips" / "vid_dog_1.zip", {"audio": feats["audio"][:8], "video": feats["video"]})
    item = open_dataset(folder, "train")[0]
    np.testing.assert_array_equal(item["audio"][:8], feats["audio"][:8])
    np.testing.assert_array_equal(item["audio"][8:], np.repeat(feats["audio"][7:8], 2, axis=0))
    with pytest.raises(DataError, match=r"vid_dog_1\.zip: audio has shape \[8, 128\], expected \[10, 128\]"):
        open_dataset(folder, "train", fit_time=False, shapes={"audio": [128], "video": [7, 7, 512]})


def test_missing_zip_is_reported_at_open(folder):
    os.remove(folder / "zips" / "vid_dog_2.zip")
    with pytest.raises(DataError, match=r"1 feature zip\(s\) of split 'train' missing, e\.g\. \[.*vid_dog_2\.zip"):
        open_dataset(folder, "train")
    assert len(open_dataset(folder, "test")) == 2  # the other split does not need it


def test_missing_csv_unknown_split_and_missing_prompt(folder, tmp_path):
    with pytest.raises(DataError, match="no clips in split 'valid'"):
        open_dataset(folder, "valid")
    with open(folder / "vggsoundCategories2Prompts.csv", "w") as f:
        f.write("category,prompt\ndog barking,a dog barks\n")
    with pytest.raises(DataError, match=r"Prompts\.csv: no prompt for categories \['church bells', 'race car'\]"):
        open_dataset(folder, "train", text_encoder=word_encoder)
    (folder / "vggsound-avel40k.csv").unlink()
    with pytest.raises(DataError, match="not a data folder"):
        open_dataset(folder, "train")
    with pytest.raises(DataError, match=r"vggsound-avel40k\.csv: missing"):
        VGGSoundAVEL(folder, "train")


def test_wrong_feature_shape_in_a_later_clip(folder):
    _write_zip(folder / "zips" / "vid_dog_2.zip", {"audio": np.zeros((T, 64), np.float32), "video": np.zeros(VIDEO, np.float32)})
    ds = open_dataset(folder, "train")
    with pytest.raises(DataError, match=r"vid_dog_2\.zip: audio has shape \[10, 64\], expected \[10, 128\]"):
        ds[2]


def test_nan_features(folder):
    feats = _features("vid_bell_1")
    feats["video"][3, 0, 0, 0] = np.nan
    _write_zip(folder / "zips" / "vid_bell_1.zip", feats)
    with pytest.raises(DataError, match=r"vid_bell_1\.zip: video holds NaN or inf \(1 values\)"):
        open_dataset(folder, "train")[1]


def test_pickle_without_the_modality_or_with_a_non_array(folder):
    _write_zip(folder / "zips" / "vid_dog_2.zip", {"audio": _features("x")["audio"]})
    with pytest.raises(DataError, match=r"vid_dog_2\.zip: pickle has no 'video' entry \(keys: \['audio'\]\)"):
        open_dataset(folder, "train")[2]
    _write_zip(folder / "zips" / "vid_dog_2.zip", {"audio": [[1.0] * 128] * T, "video": _features("x")["video"]})
    with pytest.raises(DataError, match=r"vid_dog_2\.zip: audio is list"):
        open_dataset(folder, "train")[2]


def test_zip_with_no_or_two_pickles(folder):
    path = folder / "zips" / "vid_dog_2.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "no features")
    with pytest.raises(DataError, match=r"vid_dog_2\.zip: holds 0 pickle files"):
        open_dataset(folder, "train")[2]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.pkl", pickle.dumps({}))
        zf.writestr("b.pkl", pickle.dumps({}))
    with pytest.raises(DataError, match=r"holds 2 pickle files \['a\.pkl', 'b\.pkl'\]"):
        open_dataset(folder, "train")[2]


def test_truncated_pickle(folder):
    _write_zip(folder / "zips" / "vid_dog_2.zip", None, raw=pickle.dumps(_features("x"))[:1000])
    with pytest.raises(DataError, match=r"vid_dog_2\.zip:features\.pkl: not a readable pickle"):
        open_dataset(folder, "train")[2]


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_before_running(folder, tmp_path):
    marker = tmp_path / "pwned"
    _write_zip(folder / "zips" / "vid_dog_2.zip", {"audio": _RunsCommand(marker), "video": _features("x")["video"]})
    with pytest.raises(DataError, match=r"vid_dog_2\.zip:features\.pkl: pickle refers to forbidden global posix\.system"):
        open_dataset(folder, "train")[2]
    assert not marker.exists()


def test_corrupt_zip_surfaces_as_data_error_from_a_loader_worker(folder):
    path = folder / "zips" / "vid_car_1.zip"
    path.write_bytes(path.read_bytes()[:5000])  # cut off: the central directory is gone
    ds = open_dataset(folder, "train")  # open only stats the zips; the damage shows when the clip is read
    loader = make_loader(ds, batch_size=2, shuffle=False, num_workers=2)
    with pytest.raises(DataError, match=r"(?s)DataLoader worker.*vid_car_1\.zip: corrupt or unreadable zip"):
        list(loader)


def test_loader_batches(folder):
    ds = open_dataset(folder, "train", text_encoder=word_encoder)
    batches = list(make_loader(ds, batch_size=3, shuffle=True, seed=1, num_workers=2))
    assert [b["audio"].shape[0] for b in batches] == [3, 1]
    b = batches[0]
    assert tuple(b["video"].shape) == (3, *VIDEO) and tuple(b["text"].shape) == (3, T, 6)
    assert str(b["text_mask"].dtype) == "torch.bool" and str(b["labels"].dtype) == "torch.int64"
    assert tuple(b["labels"].shape) == (3,)


def test_object_array_is_not_features(folder):
    video = _features("x")["video"]
    _write_zip(folder / "zips" / "vid_dog_2.zip", {"audio": np.full((T, 128), 1.0, dtype=object), "video": video})
    with pytest.raises(DataError, match=r"vid_dog_2\.zip: audio is ndarray object, expected a numeric array"):
        open_dataset(folder, "train")[2]
