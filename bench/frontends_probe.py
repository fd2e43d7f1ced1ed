"""Which compact per-second audio feature for AV-Digits? Linear probes on held-out speakers, side by side.

Reads an AV-Digits raw folder (`srcid data avdigits` writes OUT/raw), computes the VGGish log-mel patches
[N, T, 96, 64] once, derives each candidate feature from them, and fits one logistic regression per candidate
on the train split's steps and scores the test split (speakers george and lucas, never seen in training):
digit accuracy on digit steps (10 classes) and step accuracy on all steps (11 classes, background included).

    python bench/frontends_probe.py --raw /work/avdigits/raw [--train-clips 800]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from srcid.model.frontends import get_frontend, load_audio
from srcid.model.frontends.base import standardise_rows
from srcid.model.frontends.logmel import centre_in_time
from srcid.training.avdigits import BACKGROUND, read_manifest


def pool(p: np.ndarray, time_bins: int, mel_bins: int) -> np.ndarray:
    n, T = p.shape[:2]
    return p.reshape(n, T, time_bins, 96 // time_bins, mel_bins, 64 // mel_bins).mean(axis=(3, 5)).reshape(n, T, -1)


def centred(p: np.ndarray) -> np.ndarray:
    return centre_in_time(torch.from_numpy(p).flatten(0, 1)).reshape(p.shape).numpy()


CANDIDATES = {
    "centred, pooled 8x16, row-standardised [chosen]": lambda p: standardise_rows(pool(centred(p), 8, 16), 1.0),
    "centred, pooled 8x16, raw log-mel": lambda p: pool(centred(p), 8, 16),
    "centred, pooled 4x32, row-standardised": lambda p: standardise_rows(pool(centred(p), 4, 32), 1.0),
    "centred, pooled 12x16 (192-d), row-standardised": lambda p: standardise_rows(pool(centred(p), 12, 16), 1.0),
    "not centred, pooled 8x16, row-standardised": lambda p: standardise_rows(pool(p, 8, 16), 1.0),
    "not centred, pooled 8x16, raw log-mel": lambda p: pool(p, 8, 16),
    "time mean, 64 bands (no temporal shape)": lambda p: standardise_rows(pool(p, 1, 64), 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True)
    parser.add_argument("--train-clips", type=int, default=800, help="train clips used (fit time grows with it)")
    args = parser.parse_args()
    clips = read_manifest(args.raw)
    logmel = get_frontend("logmel")
    data = {}
    for split, limit in (("train", args.train_clips), ("test", None)):
        chosen = [c for c in clips if c.split == split][:limit]
        started = time.perf_counter()
        p = np.concatenate([logmel([load_audio(c.audio) for c in chosen[i : i + 64]]).values
                            for i in range(0, len(chosen), 64)])
        data[split] = (p, np.array([c.labels for c in chosen]).reshape(-1))
        print(f"{split}: {len(chosen)} clips, log-mel in {time.perf_counter() - started:.1f} s")
    print(f"| candidate | dims | digit acc (10 cl.) | step acc (11 cl.) |\n|---|---|---|---|")
    for name, make in CANDIDATES.items():
        xtr, xte = (make(data[s][0]) for s in ("train", "test"))
        xtr, xte = xtr.reshape(-1, xtr.shape[-1]), xte.reshape(-1, xte.shape[-1])
        ytr, yte = data["train"][1], data["test"][1]
        scores = []
        for sel_tr, sel_te in ((ytr < BACKGROUND, yte < BACKGROUND), (slice(None), slice(None))):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.1))
            scores.append(clf.fit(xtr[sel_tr], ytr[sel_tr]).score(xte[sel_te], yte[sel_te]))
        print(f"| {name} | {xtr.shape[1]} | {scores[0]:.3f} | {scores[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
