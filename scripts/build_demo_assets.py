#!/usr/bin/env python
"""Regenerate srcid/assets/demo: the demo catalog `srcid serve` loads beside the embedded bundle.

Real clips from AV-Digits' EVALUATION sources only (never trained on): FSDD recordings of speakers george and
lucas (CC BY-SA 4.0) and scikit-learn digit images past the first 1,200 (CC BY 4.0), plus the ten digit words.

    python scripts/build_demo_assets.py                       # from ../shared/data/fsdd into srcid/assets/demo
    python scripts/build_demo_assets.py --measure BUNDLE      # also print text->audio/video top-1 on the result

Layouts (--steps N): each demo item holds its digit in N consecutive one-second steps (N different takes of the
same speaker; N different images of the digit; the word N times); N = 1 is one recording as FSDD ships it.
docs/SERVICE.md records which layout the shipped demo uses and why.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from srcid.model.frontends import SAMPLE_RATE, load_audio  # noqa: E402
from srcid.training.avdigits import FRAME_SCALE, TRAIN_IMAGES, WORDS, index_fsdd  # noqa: E402

SPEAKER_TAKES = (("george", 0), ("george", 1), ("lucas", 0))  # three audio items per digit
IMAGES_PER_DIGIT = 2
STORE_RATE = 8000  # FSDD's own rate; the service resamples to 16 kHz
WORD_MAX_S = 0.9

ATTRIBUTION = """\
# Demo catalog: attribution and licences

`srcid serve` loads these items into an empty catalog so that /retrieve answers out of the box
(see docs/SERVICE.md; `scripts/build_demo_assets.py` regenerates this folder).

- `audio/*.flac`: adapted from the **Free Spoken Digit Dataset (FSDD)**, Zohar Jackson et al.,
  https://github.com/Jakobovski/free-spoken-digit-dataset, Zenodo DOI 10.5281/zenodo.1342401, licensed under
  **Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0)**,
  https://creativecommons.org/licenses/by-sa/4.0/. Changes: recordings of speakers george and lucas cut to
  their loudest {word_max} s, peak-normalised, placed one per second in a clip with quiet added noise, stored as
  8 kHz FLAC. These adapted files are shared under the same licence, CC BY-SA 4.0. `demo.json` names the
  source recording of every step.
- `frames/*.png`: from scikit-learn's `load_digits` (a copy of the UCI "Optical Recognition of Handwritten
  Digits" test set, Alpaydin & Kaynak), licensed under **Creative Commons Attribution 4.0 International
  (CC BY 4.0)**, https://creativecommons.org/licenses/by/4.0/. Changes: 8x8 images upscaled {scale}x
  (nearest neighbour) to grey PNGs.
- Text items: the English digit words, written for this project.
"""


def _recording(path: Path) -> np.ndarray:
    """One FSDD recording at 16 kHz: DC removed, cut to its loudest WORD_MAX_S, peak 1."""
    wave = load_audio(path)
    wave = wave - wave.mean()
    n = int(WORD_MAX_S * SAMPLE_RATE)
    if len(wave) > n:
        energy = np.convolve(wave.astype(np.float64) ** 2, np.ones(n), mode="valid")
        start = int(np.argmax(energy))
        wave = wave[start : start + n]
    return wave / max(float(np.abs(wave).max()), 1e-6)


def _clip(recordings: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """len(recordings) seconds at 16 kHz: quiet noise, each recording centred in its second."""
    clip = rng.normal(0.0, 10**-2.6, len(recordings) * SAMPLE_RATE)
    for step, wave in enumerate(recordings):
        offset = step * SAMPLE_RATE + (int(0.94 * SAMPLE_RATE) - len(wave)) // 2
        clip[offset : offset + len(wave)] += 0.6 * wave
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def clip_text(digit: int, steps: int, T: int = 10) -> str:
    """The text of a clip whose first `steps` seconds hold `digit`, in the AV-Digits layout: one word per second,
    "nothing" for the rest (the models are trained on T-word texts; see docs/SERVICE.md for shorter ones)."""
    return " ".join([WORDS[digit]] * steps + [WORDS[10]] * (T - steps))


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    big = np.kron(image / 16.0, np.ones((FRAME_SCALE, FRAME_SCALE)))
    buf = io.BytesIO()
    Image.fromarray((np.clip(big, 0, 1) * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def build(fsdd_dir: Path, out: Path, steps: int, seed: int = 0) -> list[dict]:
    import soundfile as sf
    from scipy.signal import resample_poly
    from sklearn.datasets import load_digits

    fsdd = index_fsdd(fsdd_dir)
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "audio").mkdir(parents=True)
    (out / "frames").mkdir()
    items: list[dict] = []
    for digit in range(10):
        for speaker, first in SPEAKER_TAKES:
            takes = fsdd[speaker][digit][first * steps : first * steps + steps]
            wave = _clip([_recording(p) for p in takes], rng)
            name = f"audio/{digit}_{speaker}_{first}.flac"
            sf.write(out / name, resample_poly(wave, 1, SAMPLE_RATE // STORE_RATE), STORE_RATE, format="FLAC")
            items.append({"id": f"audio-{digit}-{speaker}-{first}", "modality": "audio", "file": name,
                          "metadata": {"digit": digit, "word": WORDS[digit], "speaker": speaker,
                                       "source": [f"FSDD {p.name}" for p in takes], "license": "CC BY-SA 4.0"}})
    digits = load_digits()
    test_images = np.arange(TRAIN_IMAGES, len(digits.target))
    for digit in range(10):
        chosen = test_images[digits.target[test_images] == digit][: IMAGES_PER_DIGIT * steps]
        for k in range(IMAGES_PER_DIGIT):
            frames = []
            for index in chosen[k * steps : (k + 1) * steps]:
                name = f"frames/{digit}_{int(index)}.png"
                (out / name).write_bytes(_png(digits.images[index]))
                frames.append(name)
            items.append({"id": f"video-{digit}-{k}", "modality": "video", "frames": frames,
                          "metadata": {"digit": digit, "word": WORDS[digit],
                                       "source": [f"sklearn load_digits #{int(i)}" for i in chosen[k * steps : (k + 1) * steps]],
                                       "license": "CC BY 4.0"}})
    for digit in range(10):
        items.append({"id": f"text-{digit}", "modality": "text", "text": clip_text(digit, steps),
                      "metadata": {"digit": digit, "word": WORDS[digit]}})
    (out / "demo.json").write_text(json.dumps({"steps_per_item": steps, "items": items}, indent=1) + "\n")
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(word_max=WORD_MAX_S, scale=FRAME_SCALE))
    return items


def measure(bundle_dir: Path, demo_dir: Path, queries: list[str]) -> dict[str, float]:
    """Text->audio and text->video on the demo: per query word, is the top item its digit; precision@3."""
    from srcid.runtime import load_bundle
    from srcid.service.demo import demo_input, read_demo
    from srcid.service.media import build_frontends, to_features

    bundle = load_bundle(bundle_dir)
    frontends = build_frontends(bundle)
    entries = read_demo(demo_dir)

    def embed(modality: str, inputs: list) -> np.ndarray:
        x, mask = to_features(inputs, modality, bundle, frontends)
        return bundle.encode(modality, x, mask)["embedding"]

    from srcid.service.models import InputFields

    text = embed("text", [InputFields(text=q) for q in queries])
    figures = {}
    for target in ("audio", "video"):
        group = [e for e in entries if e["modality"] == target]
        labels = np.array([e["metadata"]["digit"] for e in group])
        scores = text @ embed(target, [demo_input(e, demo_dir) for e in group]).T
        order = np.argsort(-scores, axis=1)
        figures[f"text->{target} top1"] = float((labels[order[:, 0]] == np.arange(10)).mean())
        figures[f"text->{target} precision@3"] = float((labels[order[:, :3]] == np.arange(10)[:, None]).mean())
        figures[f"text->{target} digits right at top"] = [d for d in range(10) if labels[order[d, 0]] == d]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdd", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd")
    parser.add_argument("--out", type=Path, default=ROOT / "srcid" / "assets" / "demo")
    parser.add_argument("--steps", type=int, default=5, help="one-second steps per demo item (default 5)")
    parser.add_argument("--measure", type=Path, default=None, metavar="BUNDLE",
                        help="print text->audio/video retrieval figures of BUNDLE on the built demo")
    args = parser.parse_args()
    items = build(args.fsdd, args.out, args.steps)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {len(items)} items, {size / 1e6:.2f} MB")
    if args.measure:
        queries = {"one word": WORDS[:10], "word x10": [" ".join([w] * 10) for w in WORDS[:10]],
                   f"word x{args.steps} + nothing": [clip_text(d, args.steps) for d in range(10)]}
        for name, texts in queries.items():
            print(name, json.dumps(measure(args.measure, args.out, list(texts))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
