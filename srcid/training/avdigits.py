"""AV-Digits (DESIGN §5): real paired audio / video / text clips built from FSDD recordings and sklearn's digits.

A clip is T one-second steps; each step is one digit d, the same in all three modalities (a recording of d by
one speaker, one handwritten 8x8 image of d, the word for d), or background (label 10: quiet noise, a blank
noisy frame, the word "nothing"). Training clips use the training speakers and the first 1,200 images;
test clips the evaluation speakers and the remaining images.

`build_raw` writes the raw folder (media + manifest.csv); `featurize` turns any raw folder in that layout into
native shards; `probe` fits a per-step logistic regression on the training split and scores the test split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from srcid.model.frontends import SAMPLE_RATE, get_frontend, load_audio, load_frames
from srcid.training.shards import Shards, write_shards

log = logging.getLogger(__name__)

TRAIN_SPEAKERS = ("jackson", "nicolas", "theo", "yweweler")
TEST_SPEAKERS = ("george", "lucas")
TRAIN_IMAGES = 1200  # sklearn digits [0, 1200) train, [1200, 1797) test
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "nothing")
BACKGROUND = 10
NUM_CLASSES = 11
MANIFEST_COLUMNS = ("clip_id", "split", "audio", "frames", "text", "labels")
FRAME_SCALE = 4  # 8x8 digits are written as 32x32 PNGs (nearest-neighbour), so image viewers show them
WORD_MAX_S = 0.9  # a recording is cut to its loudest 0.9 s so it fits the 0.96 s log-mel patch of its second
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")

FSDD_ATTRIBUTION = """\
# AV-Digits raw media

Built by `srcid data avdigits` (see docs/FRONTENDS.md). Contents derive from:

- Free Spoken Digit Dataset (FSDD), Jakobovski et al., https://github.com/Jakobovski/free-spoken-digit-dataset,
  Zenodo DOI 10.5281/zenodo.1342401. License: Creative Commons Attribution-ShareAlike 4.0 International
  (CC BY-SA 4.0). The WAV files here are adapted (resampled to 16 kHz, trimmed, scaled, placed in 10 s clips
  with added noise) and are shared under the same license.
- scikit-learn's `load_digits` (UCI Optical Recognition of Handwritten Digits, CC BY 4.0), upscaled to PNG.

manifest.csv: clip_id,split,audio,frames,text,labels. sources.csv: which recording and image each step uses.
"""


@dataclass(frozen=True)
class BuildConfig:
    """Sizes and seeds of an AV-Digits build."""

    train_clips: int = 1600
    test_clips: int = 400
    T: int = 10
    background: float = 0.2  # probability that a new event is background
    # Events last several seconds, as AVE's do: a step repeats the previous step's label with this probability
    # (mean event length 1 / (1 - stay) = 2.5 s). With independent steps, the clip-level objectives (CPC,
    # L_cmcm) are solved by smearing clip identity over every step, and codes stop describing their own step.
    stay: float = 0.6
    seed: int = 0


def event_labels(rng: np.random.Generator, n_clips: int, config: BuildConfig) -> np.ndarray:
    """[n_clips, T] labels: events (a digit 0-9, or background 10) lasting a geometric number of steps."""
    fresh = np.where(rng.random((n_clips, config.T)) < config.background, BACKGROUND,
                     rng.integers(0, 10, (n_clips, config.T)))
    stay = rng.random((n_clips, config.T)) < config.stay
    labels = fresh.copy()
    for t in range(1, config.T):
        labels[:, t] = np.where(stay[:, t], labels[:, t - 1], fresh[:, t])
    return labels


def index_fsdd(fsdd_dir: str | Path) -> dict[str, dict[int, list[Path]]]:
    """{speaker: {digit: [wav, ...]}} from FSDD file names `{digit}_{speaker}_{take}.wav`, sorted."""
    root = Path(fsdd_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: FSDD folder not found")
    index: dict[str, dict[int, list[Path]]] = {}
    for path in sorted(root.glob("*.wav")):
        m = FSDD_NAME.match(path.name)
        if m:
            index.setdefault(m.group(2), {}).setdefault(int(m.group(1)), []).append(path)
    for speaker in TRAIN_SPEAKERS + TEST_SPEAKERS:
        have = sorted(index.get(speaker, {}))
        if have != list(range(10)):
            raise ValueError(f"{root}: speaker {speaker!r} needs recordings of all digits 0-9 "
                             f"(named DIGIT_{speaker}_TAKE.wav); found digits {have}")
    return index


class Deck:
    """Deals items in shuffled rounds, so every item is used equally often (counts differ by at most one)."""

    def __init__(self, items: list, rng: np.random.Generator):
        self.items, self.rng, self.order = items, rng, []

    def deal(self):
        if not self.order:
            self.order = list(self.rng.permutation(len(self.items)))
        return self.items[self.order.pop()]


def _loudest_window(wave: np.ndarray, length: int) -> np.ndarray:
    if len(wave) <= length:
        return wave
    energy = np.convolve(wave.astype(np.float64) ** 2, np.ones(length), mode="valid")
    start = int(np.argmax(energy))
    return wave[start : start + length]


class _Recordings:
    """FSDD recordings decoded once: 16 kHz, DC removed, cut to the loudest WORD_MAX_S."""

    def __init__(self) -> None:
        self.cache: dict[Path, np.ndarray] = {}

    def __call__(self, path: Path) -> np.ndarray:
        if path not in self.cache:
            wave = load_audio(path)
            wave = _loudest_window(wave - wave.mean(), int(WORD_MAX_S * SAMPLE_RATE))
            self.cache[path] = wave / max(float(np.abs(wave).max()), 1e-6)
        return self.cache[path]


def _clip_audio(recordings: list[np.ndarray | None], rng: np.random.Generator, T: int) -> np.ndarray:
    """One 10 s waveform: quiet noise throughout, each recording at a random level and offset in its second."""
    noise_level = 10 ** rng.uniform(-3.0, -2.3)
    clip = rng.normal(0.0, noise_level, T * SAMPLE_RATE)
    room = int(0.94 * SAMPLE_RATE)
    for step, wave in enumerate(recordings):
        if wave is None:
            continue
        offset = step * SAMPLE_RATE + int(rng.integers(0, room - len(wave) + 1))
        clip[offset : offset + len(wave)] += rng.uniform(0.3, 0.9) * wave
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def _frame(image: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 digit (0..16) or a blank, upscaled to 32x32 grey uint8 with mild sensor noise."""
    base = np.zeros((8, 8)) if image is None else image / 16.0
    big = np.kron(base, np.ones((FRAME_SCALE, FRAME_SCALE)))
    noisy = big + rng.normal(0.0, 0.03, big.shape)
    return (np.clip(noisy, 0.0, 1.0) * 255).round().astype(np.uint8)


def build_raw(fsdd_dir: str | Path, out_dir: str | Path, config: BuildConfig = BuildConfig()) -> Path:
    """Write the AV-Digits raw folder under `out_dir`; returns the path of its manifest.csv.

    Layout: manifest.csv, sources.csv, README.md (attribution), audio/<clip>.wav (16 kHz mono, T s),
    frames/<clip>/000.png ... (T PNGs, 32x32 grey).
    """
    import soundfile as sf
    from PIL import Image
    from sklearn.datasets import load_digits

    index = index_fsdd(fsdd_dir)
    digits = load_digits()
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "frames").mkdir(exist_ok=True)
    recordings = _Recordings()
    rows, sources = [], []
    started = time.perf_counter()
    plan = [("train", TRAIN_SPEAKERS, range(0, TRAIN_IMAGES), config.train_clips),
            ("test", TEST_SPEAKERS, range(TRAIN_IMAGES, len(digits.target)), config.test_clips)]
    for split_no, (split, speakers, image_range, n_clips) in enumerate(plan):
        rng = np.random.default_rng([config.seed, split_no])
        voice = {d: Deck([p for s in speakers for p in index[s][d]], rng) for d in range(10)}
        picture = {d: Deck([i for i in image_range if digits.target[i] == d], rng) for d in range(10)}
        labels = event_labels(rng, n_clips, config)
        for c in tqdm(range(n_clips), desc=f"avdigits {split}", unit="clip"):
            clip_id = f"{split}-{c:05d}"
            waves, frame_dir = [], out / "frames" / clip_id
            frame_dir.mkdir(exist_ok=True)
            for step, label in enumerate(labels[c]):
                path = voice[label].deal() if label != BACKGROUND else None
                image = picture[label].deal() if label != BACKGROUND else None
                waves.append(recordings(path) if path is not None else None)
                frame = _frame(digits.images[image] if image is not None else None, rng)
                Image.fromarray(frame, mode="L").save(frame_dir / f"{step:03d}.png")
                sources.append({"clip_id": clip_id, "step": step, "label": int(label),
                                "speaker": FSDD_NAME.match(path.name).group(2) if path else "",
                                "recording": path.name if path else "", "image": "" if image is None else image})
            sf.write(out / "audio" / f"{clip_id}.wav", _clip_audio(waves, rng, config.T), SAMPLE_RATE, subtype="PCM_16")
            rows.append({"clip_id": clip_id, "split": split, "audio": f"audio/{clip_id}.wav",
                         "frames": f"frames/{clip_id}", "text": " ".join(WORDS[l] for l in labels[c]),
                         "labels": " ".join(str(int(l)) for l in labels[c])})
    _write_csv(out / "sources.csv", sources)
    (out / "README.md").write_text(FSDD_ATTRIBUTION)
    build = {"config": asdict(config), "fsdd": str(Path(fsdd_dir).resolve())}
    (out / "build.json").write_text(json.dumps(build, indent=2))
    manifest = _write_csv(out / "manifest.csv", rows)  # last: a manifest means the build completed
    log.info("avdigits raw: %d clips in %.1f s -> %s", len(rows), time.perf_counter() - started, out)
    return manifest


def _write_csv(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


@dataclass
class RawClip:
    """One manifest row, checked: media paths resolved, labels parsed ([T] ints, or None)."""

    clip_id: str
    split: str
    audio: Path
    frames: list[Path]
    text: str
    labels: list[int] | None


def read_manifest(raw_dir: str | Path, T: int = 10) -> list[RawClip]:
    """Read and check `raw_dir/manifest.csv`; errors name the file, the row and the field."""
    root = Path(raw_dir)
    path = root / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (a raw folder holds manifest.csv with columns "
                                f"{','.join(MANIFEST_COLUMNS)})")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no clips")
    clips, seen = [], set()
    for n, row in enumerate(rows, start=2):  # line numbers as an editor shows them
        where = f"{path}: line {n} (clip {row['clip_id']!r})"
        if not row["clip_id"] or row["clip_id"] in seen:
            raise ValueError(f"{where}: field 'clip_id' is empty or repeated")
        seen.add(row["clip_id"])
        if not row["split"]:
            raise ValueError(f"{where}: field 'split' is empty")
        audio = root / row["audio"]
        if not audio.is_file():
            raise FileNotFoundError(f"{where}: field 'audio': {audio} not found")
        frame_dir = root / row["frames"]
        frames = sorted(p for p in frame_dir.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) \
            if frame_dir.is_dir() else []
        if not frames:
            raise FileNotFoundError(f"{where}: field 'frames': no PNG/JPEG images in {frame_dir}")
        if not row["text"].strip():
            raise ValueError(f"{where}: field 'text' is empty")
        labels = None
        if row["labels"].strip():
            try:
                labels = [int(x) for x in row["labels"].split()]
            except ValueError as exc:
                raise ValueError(f"{where}: field 'labels': not integers ({row['labels']!r})") from exc
            if len(labels) != T or min(labels) < 0:
                raise ValueError(f"{where}: field 'labels': need {T} integers >= 0, got {row['labels']!r}")
        clips.append(RawClip(row["clip_id"], row["split"], audio, frames, row["text"], labels))
    if len({c.labels is None for c in clips}) > 1:
        raise ValueError(f"{path}: field 'labels' is filled in some rows and empty in others")
    return clips


@dataclass(frozen=True)
class FrontEndChoice:
    """Which front-end featurises each modality, with its files/options (see `get_frontend`)."""

    audio: str = "logmel-pooled"
    video: str = "pixels"
    text: str = "minilm"
    audio_options: tuple = ()
    video_options: tuple = ()
    text_options: tuple = ()

    def build(self, T: int) -> dict:
        return {m: get_frontend(getattr(self, m), T=T, **dict(getattr(self, f"{m}_options")))
                for m in ("audio", "video", "text")}


def featurize(raw_dir: str | Path, out_dir: str | Path, frontends: FrontEndChoice = FrontEndChoice(),
              T: int = 10, batch_size: int = 64, num_classes: int | None = None) -> Path:
    """Featurise every clip of a raw folder into native shards under `out_dir` (one split per manifest split).

    Writes audio [N, T, *D_a], video [N, T, *D_v], text [N, T, D_t] + text_mask, labels [N, T] when the
    manifest has them, ids. Returns the shard manifest path.
    """
    clips = read_manifest(raw_dir, T)
    models = frontends.build(T)
    labelled = clips[0].labels is not None
    if labelled and num_classes is None:
        num_classes = max(max(c.labels) for c in clips) + 1
    started = time.perf_counter()
    splits = {}
    for split in dict.fromkeys(c.split for c in clips):
        members = [c for c in clips if c.split == split]
        arrays = {m: np.zeros((len(members), T, *models[m].output_shape), np.float32) for m in models}
        arrays["text_mask"] = np.zeros((len(members), T), bool)
        with tqdm(total=len(members), desc=f"featurize {split}", unit="clip") as bar:
            for i in range(0, len(members), batch_size):
                chunk = members[i : i + batch_size]
                media = {"audio": [load_audio(c.audio) for c in chunk],
                         "video": [load_frames(c.frames, T) for c in chunk],
                         "text": [c.text for c in chunk]}
                for m, model in models.items():
                    feats = model(media[m])
                    arrays[m][i : i + len(chunk)] = feats.values
                    if m == "text":
                        arrays["text_mask"][i : i + len(chunk)] = feats.mask
                bar.update(len(chunk))
        arrays["ids"] = [c.clip_id for c in members]
        if labelled:
            arrays["labels"] = np.array([c.labels for c in members], dtype=np.int64)
        splits[split] = arrays
    modalities = {m: {"shape": list(models[m].output_shape), "masked": m == "text"} for m in models}
    digest = hashlib.sha256((Path(raw_dir) / "manifest.csv").read_bytes()).hexdigest()
    path = write_shards(out_dir, splits, modalities, T, num_classes,
                        extra={"frontends": {m: models[m].spec() for m in models},
                               "source": {"raw": str(Path(raw_dir).resolve()), "manifest_sha256": digest}})
    elapsed = time.perf_counter() - started
    log.info("featurized %d clips in %.1f s (%.1f clips/s) -> %s", len(clips), elapsed, len(clips) / elapsed, path)
    return path


def probe(shards_dir: str | Path, train: str = "train", test: str = "test", seed: int = 0) -> dict:
    """Per-step linear probes: for each modality a logistic regression on step features (train split) scores
    the test split. Returns {modality: {"step_acc": 11-class accuracy over all (unmasked) steps,
    "digit_acc": 10-class accuracy over digit steps (a probe fit on digit steps only)}}, plus chance levels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    shards = Shards(shards_dir)
    tr, te = shards.split(train), shards.split(test)
    if "labels" not in tr.arrays or tr.arrays["labels"].ndim != 2:
        raise ValueError(f"{shards_dir}: the probe needs per-step labels [N, T]")

    def steps(split, m):
        x = np.asarray(split.arrays[m], dtype=np.float32).reshape(len(split) * shards.T, -1)
        y = np.asarray(split.arrays["labels"]).reshape(-1)
        keep = np.ones_like(y, bool)
        if shards.modalities[m]["masked"]:
            keep = np.asarray(split.arrays[f"{m}_mask"]).reshape(-1)
        return x[keep], y[keep]

    result = {}
    for m in shards.modalities:
        (xtr, ytr), (xte, yte) = steps(tr, m), steps(te, m)
        scores = {}
        for key, sel_tr, sel_te in (("step_acc", slice(None), slice(None)),
                                    ("digit_acc", ytr < BACKGROUND, yte < BACKGROUND)):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=seed))
            clf.fit(xtr[sel_tr], ytr[sel_tr])
            scores[key] = float(clf.score(xte[sel_te], yte[sel_te]))
        result[m] = scores
        log.info("probe %s: step_acc %.3f digit_acc %.3f", m, scores["step_acc"], scores["digit_acc"])
    yte = np.asarray(te.arrays["labels"]).reshape(-1)
    result["chance"] = {"step_acc": float(np.bincount(yte).max() / len(yte)), "digit_acc": 0.1}
    return result
