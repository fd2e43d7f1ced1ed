"""onnxruntime with denormals flushed to zero (what the onnx backends do) against IEEE's gradual underflow (what
they did before), per modality and batch, side by side in one run.

    python bench/denormals.py                           # the embedded bundle, one onnxruntime thread (as the service)
    python bench/denormals.py --threads 2 --batches 1 64 256
    python bench/denormals.py --bundle BUNDLE

The attention window of the embedded bundle (±1 step) and the padding of masked modalities give every Softmax
scores of -inf, whose exps underflow into denormals, and arithmetic on those is several times slower on x86. The
flushed figure is `Bundle.run_checked`, the backend's own path; the plain one runs the same graph in a session made
without `session.set_denormal_as_zero`, called with the thread's default floating-point mode. Both get the same
inputs; the run checks that their codes agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode import clips_per_second  # noqa: E402

from srcid.runtime import load_bundle  # noqa: E402
from srcid.service.settings import EMBEDDED_BUNDLE  # noqa: E402


def plain_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=EMBEDDED_BUNDLE)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (service default 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (best kept)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if min(args.batches) < 1 or args.rounds < 1 or args.threads < 0 or args.seconds <= 0:
        parser.error("--batches and --rounds take numbers >= 1, --threads >= 0, --seconds > 0")

    bundle = load_bundle(args.bundle, backend="onnx-cpu", threads=args.threads)
    manifest = bundle.manifest
    rng = np.random.default_rng(0)
    rows = []
    print(f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, {args.threads} thread(s), "
          f"best of {args.rounds} alternating rounds (clips/s)")
    for modality, entry in manifest.modalities.items():
        session = plain_session(args.bundle / entry.onnx, args.threads)
        for batch in args.batches:
            x = rng.standard_normal((batch, manifest.T, *entry.shape), dtype=np.float32)
            mask = (np.arange(manifest.T)[None] < rng.integers(1, manifest.T + 1, (batch, 1))) if entry.masked else None
            feeds = {"features": x} if mask is None else {"features": x, "mask": mask}
            flushed_out = bundle.run_checked(modality, x, mask)
            plain_out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            agree = all(np.array_equal(flushed_out[k], plain_out[k]) for k in ("layer1", "layer2"))
            flushed = plain = 0.0
            for _ in range(args.rounds):
                flushed = max(flushed, clips_per_second(lambda: bundle.run_checked(modality, x, mask), batch,
                                                        args.seconds, lambda: None))
                plain = max(plain, clips_per_second(lambda: session.run(None, feeds), batch, args.seconds,
                                                    lambda: None))
            row = {"modality": modality, "batch": batch, "flushed_clips_s": flushed, "plain_clips_s": plain,
                   "ratio": flushed / plain, "codes_agree": agree}
            rows.append(row)
            print(f"{modality:6s} batch {batch:4d}: flushed {flushed:9.0f}  plain {plain:9.0f} {flushed / plain:5.2f}x "
                  f"({1e6 * batch / flushed:7.0f} vs {1e6 * batch / plain:7.0f} us a call)  codes agree: {agree}",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps({"bundle": str(args.bundle), "threads": args.threads, "rows": rows}, indent=1))
    return 0 if all(r["codes_agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
