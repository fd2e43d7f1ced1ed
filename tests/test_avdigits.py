"""AV-Digits: raw build (synthetic FSDD-like recordings and, when present, the real FSDD), manifest checks,
featurisation into native shards, probes, and the `srcid data` CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from sklearn.datasets import load_digits

from srcid.cli import main as cli_main
from srcid.training.avdigits import (
    BACKGROUND,
    MANIFEST_COLUMNS,
    TEST_SPEAKERS,
    TRAIN_IMAGES,
    TRAIN_SPEAKERS,
    WORDS,
    BuildConfig,
    build_raw,
    featurize,
    probe,
    read_manifest,
)
from srcid.training.shards import Shards

REAL_FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"


def write_fake_fsdd(folder: Path, takes: int = 2) -> Path:
    """FSDD-like WAVs (8 kHz, `{digit}_{speaker}_{take}.wav`): a digit is a two-tone chirp whose pitch
    depends on the digit, slightly detuned per speaker and take."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(int(0.35 * 8000)) / 8000
    for s, speaker in enumerate(TRAIN_SPEAKERS + TEST_SPEAKERS):
        for d in range(10):
            for take in range(takes):
                f0 = (300 + 280 * d) * (1 + 0.01 * s + 0.005 * take)
                wave = np.where(t < 0.17, np.sin(2 * np.pi * f0 * t), np.sin(2 * np.pi * 1.3 * f0 * t))
                wave = 0.5 * wave * np.hanning(len(t)) + 0.003 * rng.standard_normal(len(t))
                sf.write(folder / f"{d}_{speaker}_{take}.wav", wave.astype(np.float32), 8000, subtype="PCM_16")
    return folder


@pytest.fixture(scope="module")
def fake_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("avd")
    fsdd = write_fake_fsdd(root / "fsdd")
    config = BuildConfig(train_clips=40, test_clips=20, seed=3)
    build_raw(fsdd, root / "raw", config)
    featurize(root / "raw", root / "shards", batch_size=16)
    return root, config


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_manifest_columns_pairing_and_media(fake_build):
    root, config = fake_build
    rows = read_csv(root / "raw" / "manifest.csv")
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert [r["split"] for r in rows].count("train") == config.train_clips
    assert [r["split"] for r in rows].count("test") == config.test_clips
    digits = load_digits()
    sources = {(s["clip_id"], int(s["step"])): s for s in read_csv(root / "raw" / "sources.csv")}
    labels_all = []
    for row in rows[:: max(1, len(rows) // 12)]:
        labels = [int(x) for x in row["labels"].split()]
        labels_all += labels
        assert row["text"].split() == [WORDS[l] for l in labels]
        wave, rate = sf.read(root / "raw" / row["audio"])
        assert rate == 16000 and len(wave) == config.T * 16000
        frames = sorted((root / "raw" / row["frames"]).iterdir())
        assert [f.name for f in frames] == [f"{i:03d}.png" for i in range(config.T)]
        for step, label in enumerate(labels):
            src = sources[(row["clip_id"], step)]
            frame = np.asarray(Image.open(frames[step]), dtype=np.float64) / 255
            small = frame.reshape(8, 4, 8, 4).mean(axis=(1, 3))
            second = wave[step * 16000 : (step + 1) * 16000]
            if label == BACKGROUND:
                assert src["image"] == "" and src["recording"] == "" and small.max() < 0.15
                assert np.abs(second).max() < 0.05
            else:
                image = int(src["image"])
                assert digits.target[image] == label and src["recording"].startswith(f"{label}_")
                np.testing.assert_allclose(small, digits.images[image] / 16, atol=0.05)
                assert np.abs(second).max() > 0.25
    assert BACKGROUND in labels_all and set(labels_all) - {BACKGROUND}


def test_speaker_and_image_split(fake_build):
    root, _ = fake_build
    for s in read_csv(root / "raw" / "sources.csv"):
        if s["recording"]:
            speakers, images = (TRAIN_SPEAKERS, range(TRAIN_IMAGES)) if s["clip_id"].startswith("train") else \
                (TEST_SPEAKERS, range(TRAIN_IMAGES, 1797))
            assert s["speaker"] in speakers and int(s["image"]) in images


def test_recordings_are_used_evenly(fake_build):
    root, _ = fake_build
    used: dict[str, int] = {}
    for s in read_csv(root / "raw" / "sources.csv"):
        if s["clip_id"].startswith("train") and s["recording"]:
            used[s["recording"]] = used.get(s["recording"], 0) + 1
    per_digit: dict[str, list[int]] = {}
    for name, n in used.items():
        per_digit.setdefault(name[0], []).append(n)
    assert all(max(v) - min(v) <= 1 for v in per_digit.values())


def test_shards_shapes_labels_and_probe(fake_build):
    root, config = fake_build
    shards = Shards(root / "shards")
    assert shards.modalities == {"audio": {"shape": [128], "masked": False}, "video": {"shape": [64], "masked": False},
                                 "text": {"shape": [384], "masked": True}}
    assert shards.manifest["num_classes"] == 11 and shards.manifest["frontends"]["audio"]["name"] == "logmel-pooled"
    rows = {r["clip_id"]: r for r in read_csv(root / "raw" / "manifest.csv")}
    for split, n in (("train", config.train_clips), ("test", config.test_clips)):
        data = shards.split(split)
        assert len(data) == n and data.arrays["audio"].shape == (n, config.T, 128)
        assert data.arrays["video"].shape == (n, config.T, 64) and data.arrays["text"].shape == (n, config.T, 384)
        assert np.asarray(data.arrays["text_mask"]).all()
        for i, clip_id in enumerate(data.ids):
            assert data.arrays["labels"][i].tolist() == [int(x) for x in rows[clip_id]["labels"].split()]
    # The features carry the step's class: probes trained on train speakers read held-out ones.
    result = probe(root / "shards")
    assert result["text"]["step_acc"] == 1.0
    assert result["video"]["step_acc"] > 0.6
    assert result["audio"]["step_acc"] > 0.6


def test_build_is_deterministic(tmp_path, fake_build):
    root, _ = fake_build
    build_raw(root / "fsdd", tmp_path / "again", BuildConfig(train_clips=40, test_clips=20, seed=3))
    assert (tmp_path / "again" / "manifest.csv").read_text() == (root / "raw" / "manifest.csv").read_text()
    for clip in ("train-00007", "test-00003"):
        assert (tmp_path / "again" / "audio" / f"{clip}.wav").read_bytes() == \
            (root / "raw" / "audio" / f"{clip}.wav").read_bytes()
        assert (tmp_path / "again" / "frames" / clip / "004.png").read_bytes() == \
            (root / "raw" / "frames" / clip / "004.png").read_bytes()


def test_missing_speaker_is_a_clear_error(tmp_path):
    fsdd = write_fake_fsdd(tmp_path / "fsdd", takes=1)
    for f in fsdd.glob("*_lucas_*.wav"):
        f.unlink()
    with pytest.raises(ValueError, match="lucas"):
        build_raw(fsdd, tmp_path / "raw", BuildConfig(train_clips=2, test_clips=2))


def test_manifest_errors_name_the_line_and_field(tmp_path, fake_build):
    root, _ = fake_build
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "audio").symlink_to(root / "raw" / "audio")
    (raw / "frames").symlink_to(root / "raw" / "frames")
    good = (root / "raw" / "manifest.csv").read_text().splitlines()
    (raw / "manifest.csv").write_text("\n".join(good[:3]) + "\n")
    assert len(read_manifest(raw)) == 2
    header, first = good[0], good[1].split(",")
    cases = {
        "labels": (first[:5] + ["1 2 x"], "line 2.*'labels'"),
        "audio": (first[:2] + ["audio/none.wav"] + first[3:], "line 2.*'audio'.*none.wav"),
        "text": (first[:4] + [""] + first[5:], "line 2.*'text'"),
    }
    for row, pattern in cases.values():
        (raw / "manifest.csv").write_text(header + "\n" + ",".join(row) + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            read_manifest(raw)
    (raw / "manifest.csv").write_text("clip_id,split,audio\nx,train,a.wav\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_manifest(raw)


def test_cli_featurize_and_its_errors(tmp_path, fake_build, capsys):
    root, _ = fake_build
    out = tmp_path / "shards"
    assert cli_main(["data", "featurize", "--raw", str(root / "raw"), "--out", str(out), "--batch-size", "32"]) == 0
    assert Shards(out).manifest["splits"] == {"train": 40, "test": 20}
    assert cli_main(["data", "featurize", "--raw", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "manifest.csv" in capsys.readouterr().err
    assert cli_main(["data", "featurize", "--raw", str(root / "raw"), "--out", str(out),
                     "--audio-frontend", "vggish"]) == 2
    assert "no weights file given" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_FSDD.is_dir(), reason=f"FSDD recordings not at {REAL_FSDD}")
def test_tiny_build_from_real_fsdd(tmp_path):
    assert cli_main(["data", "avdigits", "--fsdd", str(REAL_FSDD), "--out", str(tmp_path),
                     "--train-clips", "4", "--test-clips", "3"]) == 0
    sources = read_csv(tmp_path / "raw" / "sources.csv")
    train_speakers = {s["speaker"] for s in sources if s["clip_id"].startswith("train") and s["speaker"]}
    test_speakers = {s["speaker"] for s in sources if s["clip_id"].startswith("test") and s["speaker"]}
    assert train_speakers <= set(TRAIN_SPEAKERS) and test_speakers <= set(TEST_SPEAKERS) and test_speakers
    shards = Shards(tmp_path / "shards")
    assert shards.split("train").arrays["audio"].shape == (4, 10, 128)
    assert shards.split("test").arrays["video"].shape == (3, 10, 64)
    assert "CC BY-SA 4.0" in (tmp_path / "raw" / "README.md").read_text()
