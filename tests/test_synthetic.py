"""The synthetic paired set: deterministic, class recoverable from every modality by a linear probe, paired
step by step across modalities, rendered by different maps, and written/read back as native shards."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from srcid.training.data import open_dataset
from srcid.training.synthetic import make_synthetic, synthetic_split, write_synthetic_shards

C = 8


@pytest.fixture(scope="module")
def train_test():
    return make_synthetic(300, num_classes=C, seed=11, stream=0), make_synthetic(150, num_classes=C, seed=11, stream=1)


def _steps(ds, modality: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [S, D], labels [S] and a validity flag [S] over all (clip, step)."""
    x = ds.arrays[modality]
    valid = ds.arrays.get(f"{modality}_mask", np.ones(x.shape[:2], bool))
    return x.reshape(x.shape[0] * x.shape[1], -1), ds.arrays["labels"].reshape(-1), valid.reshape(-1)


def _fit(x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    # One BLAS thread: on a shared 2-core machine a threaded solve of this small problem is ~50x slower.
    with threadpool_limits(1):
        return LogisticRegression(max_iter=300).fit(x, y)


def _probe(ds, modality: str) -> LogisticRegression:
    x, y, valid = _steps(ds, modality)
    return _fit(x[valid], y[valid])


def test_linear_probe_recovers_the_class_from_every_modality(train_test):
    train, test = train_test
    for modality in ("audio", "video", "text"):
        x, y, valid = _steps(test, modality)
        accuracy = _probe(train, modality).score(x[valid], y[valid])
        assert accuracy > 0.8, (modality, accuracy)  # chance is 1/8


def test_modalities_are_paired_step_by_step(train_test):
    train, test = train_test
    predicted = {m: _probe(train, m).predict(_steps(test, m)[0]) for m in ("audio", "video")}
    agree = (predicted["audio"] == predicted["video"]).mean()
    clips = np.random.default_rng(0).permutation(len(test))  # break the pairing: other clips' video
    shuffled = predicted["video"].reshape(len(test), -1)[clips].reshape(-1)
    assert agree > 0.8 and (predicted["audio"] == shuffled).mean() < 0.3


def test_each_modality_has_its_own_map_and_its_own_nuisance():
    ds = make_synthetic(300, num_classes=C, dims={"audio": 24, "video": 24, "text": 24}, seed=11)
    x, y, _ = _steps(ds, "audio")
    video, _, _ = _steps(ds, "video")
    probe = _fit(x, y)
    assert probe.score(video, y) < 0.4  # the audio probe does not read video: a different rendering
    means = np.stack([x[y == c].mean(0) for c in range(C)])
    within = ((x - means[y]) ** 2).sum(1).mean() / ((x - x.mean(0)) ** 2).sum(1).mean()
    assert 0.2 < within < 0.8  # a modal-specific part beside the class, not class alone and not noise alone


def test_class_sequences_are_sticky_and_masks_trail(train_test):
    train, _ = train_test
    labels = train.arrays["labels"]
    assert labels.shape == (300, 10) and labels.dtype == np.int64 and set(np.unique(labels)) == set(range(C))
    assert 0.1 < (labels[:, 1:] != labels[:, :-1]).mean() < 0.3
    mask = train.arrays["text_mask"]
    assert 0.15 < (~mask.all(1)).mean() < 0.45 and mask[:, 0].all()
    assert (np.diff(mask.astype(int), axis=1) <= 0).all()  # once masked, masked to the end
    assert not train.arrays["text"][~mask].any()
    assert "audio_mask" not in train[0] and train[0]["text_mask"].shape == (10,)


def test_deterministic_given_seed_and_stream():
    a, b = make_synthetic(20, seed=3), make_synthetic(20, seed=3)
    assert a.fingerprint == b.fingerprint
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    for other in (make_synthetic(20, seed=4), make_synthetic(20, seed=3, stream=1), make_synthetic(20, seed=3, noise=0.5)):
        assert other.fingerprint != a.fingerprint and not np.array_equal(other.arrays["audio"], a.arrays["audio"])


def test_shards_round_trip_and_open_dataset_synthetic(tmp_path):
    options = {"seed": 5, "dims": {"audio": 8, "video": (2, 2, 3), "text": 6}, "T": 6, "num_classes": 4}
    write_synthetic_shards(tmp_path / "syn", {"train": 40, "test": 10}, **options)
    shards = open_dataset(tmp_path / "syn", "test")
    direct = open_dataset("synthetic", "test", n_clips=10, **options)
    assert synthetic_split("test", n_clips=10, **options).fingerprint == direct.fingerprint
    assert shards.modalities == direct.modalities and shards.num_classes == 4 and shards.T == 6
    for i in (0, 9):
        for key, value in direct[i].items():
            np.testing.assert_array_equal(shards[i][key], value)
    assert len(open_dataset(tmp_path / "syn", "train")) == 40


def test_open_dataset_synthetic_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"synthetic: unknown option\(s\) \['n_classes'\]; this format accepts \[.*'num_classes'"):
        open_dataset("synthetic", "train", n_classes=3)
