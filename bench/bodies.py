"""Request bodies on the event loop: µs per /encode body from its bytes to the rows the batcher gets (parse,
validation against the request model, the features check), for the ways a client can send features, measured side
by side in one process.

    python bench/bodies.py                          # the embedded bundle's audio features, [10, 128]
    python bench/bodies.py --modality text --rows 3
    git worktree add /tmp/before HEAD~1 && python bench/bodies.py --against /tmp/before  # this parser vs another

Ways: `features` as a nested list read by `parse_body` (this project's C parser, srcid/service/_bodyjson.c), the same
body read by `parse_json` (orjson's Python floats, made an array at validation: what every body cost before a
parser of its own), and `features_b64` (float32 bytes, no numbers to parse). With `--against CHECKOUT`, that
checkout's `srcid/service/bodies.py` reads the list body too (loaded from its files, with whatever it imports
installed here). Numbers are rounded to 4 decimals, as bench/serve.py sends them.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import timeit
from pathlib import Path
from typing import Any, Callable

import orjson

from srcid.runtime import load_bundle
from srcid.service.bodies import parse_body, parse_json
from srcid.service.media import prepare
from srcid.service.models import EncodeRequest
from srcid.service.settings import EMBEDDED_BUNDLE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import bodies_for  # noqa: E402


def bodies_of(checkout: Path) -> Callable[[bytes], Any]:
    """`parse_body` of another checkout's srcid/service/bodies.py, as package `against_service` so that its relative
    imports (a compiled parser beside it) resolve in that checkout."""
    service = checkout / "srcid" / "service"
    if not (service / "bodies.py").is_file():
        raise SystemExit(f"--against {checkout}: no srcid/service/bodies.py there")
    package = importlib.util.spec_from_file_location("against_service", service / "__init__.py",
                                                     submodule_search_locations=[str(service)])
    sys.modules["against_service"] = importlib.util.module_from_spec(package)
    package.loader.exec_module(sys.modules["against_service"])
    spec = importlib.util.spec_from_file_location("against_service.bodies", service / "bodies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_body


def per_call_us(fn: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=EMBEDDED_BUNDLE)
    parser.add_argument("--modality", default="audio")
    parser.add_argument("--rows", type=int, default=None, help="time steps T of the features (default: the bundle's)")
    parser.add_argument("--number", type=int, default=2000, help="calls per timing (the best of --repeat is kept)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--against", type=Path, default=None, metavar="CHECKOUT",
                        help="also time the list body with another checkout's srcid/service/bodies.py")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle, backend="onnx-cpu", threads=1)
    T = args.rows or bundle.manifest.T
    shape = list(bundle.manifest.modalities[args.modality].shape)
    listed, b64 = (orjson.dumps(bodies_for("/encode", 1, args.modality, T, shape, seed=0, features_as=kind)[0])
                   for kind in ("list", "b64"))
    ways = {"lists, parse_body": (parse_body, listed), "lists, parse_json": (parse_json, listed),
            "features_b64": (parse_body, b64)}
    if args.against is not None:
        ways[f"lists, {args.against.name}'s parse_body"] = (bodies_of(args.against), listed)

    print(f"{platform.machine()}, /encode bodies of {args.modality} features [{T}, {', '.join(map(str, shape))}]: "
          f"{len(listed)} bytes listed, {len(b64)} as features_b64; µs a body, best of {args.repeat} x {args.number}")
    print(f"{'way':34s} {'parse':>8s} {'+ validate':>11s} {'+ check':>9s}")
    totals = {}
    for name, (read, raw) in ways.items():
        steps = (lambda: read(raw),
                 lambda: EncodeRequest.model_validate(read(raw)),
                 lambda: prepare(EncodeRequest.model_validate(read(raw)).inputs, args.modality, bundle))
        figures = [per_call_us(step, args.number, args.repeat) for step in steps]
        totals[name] = figures[-1]
        print(f"{name:34s} {figures[0]:8.1f} {figures[1]:11.1f} {figures[2]:9.1f}")
    base = totals["lists, parse_body"]
    for name, total in totals.items():
        if name != "lists, parse_body":
            print(f"{name} / lists, parse_body (parse, validate and check): {total / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
