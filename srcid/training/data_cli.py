"""`srcid data`: build the AV-Digits data set and featurise raw media folders into native shards."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from srcid.training import avdigits

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build AV-Digits; featurise raw media folders into native shards",
        description="Data preparation. `avdigits` builds the AV-Digits set (DESIGN §5) from FSDD recordings and "
        "scikit-learn's digits: raw media under OUT/raw, native shards under OUT/shards. `featurize` turns any raw "
        "folder (manifest.csv with clip_id,split,audio,frames,text,labels) into native shards.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    build = actions.add_parser(
        "avdigits",
        help="build AV-Digits (raw media + shards)",
        description="Build AV-Digits: T one-second steps per clip, each a digit (FSDD recording, sklearn 8x8 image, "
        "its word) or background (label 10). Train speakers jackson, nicolas, theo, yweweler and sklearn images "
        "0-1199; test speakers george, lucas and the remaining images. Writes OUT/raw and OUT/shards "
        "(and OUT/probe.json with --probe).",
    )
    build.add_argument("--fsdd", required=True, type=Path, help="folder of FSDD WAVs named DIGIT_SPEAKER_TAKE.wav")
    build.add_argument("--out", required=True, type=Path, help="output folder (gets raw/ and shards/)")
    defaults = avdigits.BuildConfig()
    build.add_argument("--train-clips", type=int, default=defaults.train_clips,
                       help="training clips (default %(default)s)")
    build.add_argument("--test-clips", type=int, default=defaults.test_clips, help="test clips (default %(default)s)")
    build.add_argument("--background", type=float, default=defaults.background,
                       help="probability that a new event is background (default %(default)s)")
    build.add_argument("--stay", type=float, default=defaults.stay,
                       help="probability that a step continues the previous step's event (default %(default)s)")
    build.add_argument("--T", type=int, default=defaults.T, help="steps (seconds) per clip (default %(default)s)")
    build.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    _add_featurize_options(build)
    build.set_defaults(func=run_avdigits)

    feat = actions.add_parser(
        "featurize",
        help="raw media folder -> native shards",
        description="Featurise a raw folder: manifest.csv (clip_id,split,audio,frames,text,labels; audio a WAV/FLAC/"
        "OGG path, frames a folder of one image per second, text words one per step, labels T integers or empty) "
        "-> native shards with one split per value of the split column.",
    )
    feat.add_argument("--raw", required=True, type=Path, help="raw folder holding manifest.csv")
    feat.add_argument("--out", required=True, type=Path, help="shard folder to write")
    feat.add_argument("--T", type=int, default=10, help="steps (seconds) per clip (default %(default)s)")
    feat.add_argument("--num-classes", type=int, help="label classes (default: largest label + 1)")
    _add_featurize_options(feat)
    feat.set_defaults(func=run_featurize)


def _add_featurize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-frontend", default="logmel-pooled",
                        help="logmel-pooled (default, 128-d), vggish (needs --audio-weights), logmel (96x64)")
    parser.add_argument("--video-frontend", default="pixels",
                        help="pixels (default, 64-d), vgg19-pool5 (needs --video-weights)")
    parser.add_argument("--text-frontend", default="minilm", help="minilm (default, 384-d), bert (needs --text-model)")
    parser.add_argument("--audio-weights", type=Path, help="safetensors file for vggish")
    parser.add_argument("--video-weights", type=Path, help="safetensors file for vgg19-pool5")
    parser.add_argument("--text-model", type=Path, help="local transformers folder for bert")
    parser.add_argument("--text-context", choices=["word", "sentence"], default="word",
                        help="word: each word encoded alone (default, AV-Digits); sentence: contextual sub-word mean")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per front-end batch (default %(default)s)")
    parser.add_argument("--probe", action="store_true",
                        help="afterwards fit per-step logistic-regression probes (train -> test) and write probe.json")


def _frontends(args: argparse.Namespace) -> avdigits.FrontEndChoice:
    def opts(**kw) -> tuple:
        return tuple((k, str(v)) for k, v in kw.items() if v is not None)

    return avdigits.FrontEndChoice(
        audio=args.audio_frontend,
        video=args.video_frontend,
        text=args.text_frontend,
        audio_options=opts(weights=args.audio_weights),
        video_options=opts(weights=args.video_weights),
        text_options=opts(model_dir=args.text_model, context=args.text_context),
    )


def _probe(shards: Path, out: Path) -> None:
    result = avdigits.probe(shards)
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def run_avdigits(args: argparse.Namespace) -> int:
    config = avdigits.BuildConfig(args.train_clips, args.test_clips, args.T, args.background, args.stay, args.seed)
    started = time.perf_counter()
    avdigits.build_raw(args.fsdd, args.out / "raw", config)
    built = time.perf_counter()
    avdigits.featurize(args.out / "raw", args.out / "shards", _frontends(args), args.T, args.batch_size,
                       avdigits.NUM_CLASSES)
    done = time.perf_counter()
    timing = {"raw_s": round(built - started, 1), "featurize_s": round(done - built, 1),
              "total_s": round(done - started, 1)}
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2))
    log.info("avdigits built in %.1f s (raw %.1f s, featurize %.1f s) -> %s", done - started, built - started,
             done - built, args.out)
    if args.probe:
        _probe(args.out / "shards", args.out)
    return 0


def run_featurize(args: argparse.Namespace) -> int:
    avdigits.featurize(args.raw, args.out, _frontends(args), args.T, args.batch_size, args.num_classes)
    if args.probe:
        _probe(args.out, args.out)
    return 0
