"""The service's own CPU per request, without HTTP or a load generator: the ASGI app driven in this process.

    python bench/serve_inprocess.py                      # /encode of [10, 128] features at 64 in flight
    python bench/serve_inprocess.py --concurrency 16 --requests 2000
    python bench/serve_inprocess.py --endpoint /retrieve --items 100000 --concurrency 16 --rounds 2
    python bench/serve_inprocess.py --compare features   # features_b64 against a nested JSON list

Two ways take turns (--rounds, each a fresh measurement on the same app). `--compare checks` (the default): a
request's small feature inputs checked on the event loop (the service's way since `cheap_to_prepare`), or handed
to a decode thread and back, as every input was before. `--compare features`: features sent as float32 bytes
(`features_b64`) or as a nested JSON list (`features`). Each measurement prints req/s and CPU ms per request
(process time over all threads, so the thread hop's wake-ups and interpreter-lock hand-offs count) and that CPU
per thread pool (from /proc); the last line gives the ratio of the medians. The bench is the only client: nothing else shares the cores. For
`/retrieve`, the catalog first gets `--items` random unit vectors per modality (bench/serve.py's fill_catalog).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from serve import bodies_for, fill_catalog  # the same request bodies and catalog as bench/serve.py

import srcid.service.state as state_module
from srcid.service.app import create_app
from srcid.service.settings import EMBEDDED_BUNDLE, Settings

ON_LOOP = state_module.cheap_to_prepare


def always_a_thread(items) -> bool:
    return False


def scope_for(path: str, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "state": {},
            "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


async def call(app, path: str, body: bytes) -> int:
    """One POST through the whole ASGI app (middleware, routing, validation, batcher); its status."""
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        return {}

    status = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope_for(path, body), receive, send)
    return status[0]


def thread_cpu() -> Counter:
    """CPU seconds so far per thread pool of this process ("search_0" and "search_1" count as "search")."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    per: Counter = Counter()
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        per[names.get(int(tid), "other").rsplit("_", 1)[0]] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return per


async def measure(app, path: str, bodies: list[bytes], n: int, concurrency: int) -> dict:
    todo = list(range(n))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while todo:
            failures += await call(app, path, bodies[todo.pop() % len(bodies)]) != 200

    threads, cpu, wall = thread_cpu(), time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    per_thread = {name: 1000 * (seconds - threads[name]) / n for name, seconds in thread_cpu().items()}
    return {"qps": n / wall, "cpu_ms": 1000 * cpu / n, "failures": failures,
            "threads": {name: ms for name, ms in sorted(per_thread.items()) if ms >= 0.005}}


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="srcid-bench-") as tmp:
        catalog_url = f"sqlite:///{Path(tmp) / 'catalog.db'}"
        if args.endpoint == "/retrieve":
            fill_catalog(catalog_url, EMBEDDED_BUNDLE, args.items)
        settings = Settings(catalog_url=catalog_url, data_dir=Path(tmp), demo_catalog=False, log_level="warning")
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            state = app.state.service
            while not state.ready:
                if state.error:
                    raise SystemExit(f"service failed to load: {state.error}")
                await asyncio.sleep(0.05)
            manifest = state.bundle.manifest

            def bodies(features_as: str) -> list[bytes]:
                return [json.dumps(body).encode() for body in bodies_for(
                    args.endpoint, 64, args.modality, manifest.T, list(manifest.modalities[args.modality].shape),
                    seed=0, features_as=features_as)]

            # name -> (how small inputs are checked, the request bodies)
            if args.compare == "checks":
                sent = bodies(args.features_as)
                ways = {"checks on the event loop": (ON_LOOP, sent), "checks in a decode thread": (always_a_thread, sent)}
            else:
                ways = {"features as float32 b64": (ON_LOOP, bodies("b64")),
                        "features as a JSON list": (ON_LOOP, bodies("list"))}
            figures: dict[str, list[dict]] = {name: [] for name in ways}
            for check, sent in ways.values():  # warm-up: the runtime sees this load's batch sizes
                state_module.cheap_to_prepare = check
                await measure(app, args.endpoint, sent, args.requests // 4, args.concurrency)
            for r in range(args.rounds):
                for name, (check, sent) in ways.items():
                    state_module.cheap_to_prepare = check
                    f = await measure(app, args.endpoint, sent, args.requests, args.concurrency)
                    figures[name].append(f)
                    threads = "  ".join(f"{k} {v:.3f}" for k, v in f["threads"].items())
                    print(f"round {r + 1}  {name:25s} {f['qps']:7.0f} req/s  {f['cpu_ms']:.3f} ms CPU/request"
                          f"  failures {f['failures']}  by thread (ms/request): {threads}", flush=True)
            state_module.cheap_to_prepare = ON_LOOP
    med = {name: {k: statistics.median(f[k] for f in fs) for k in ("qps", "cpu_ms")} for name, fs in figures.items()}
    (first, a), (second, b) = med.items()
    print(f"{args.endpoint} at {args.concurrency} in flight, medians of {args.rounds}: {first} {a['qps']:.0f} req/s, "
          f"{a['cpu_ms']:.3f} ms CPU/request; {second} {b['qps']:.0f} req/s, {b['cpu_ms']:.3f} ms: "
          f"the first {a['qps'] / b['qps']:.2f}x the throughput, {b['cpu_ms'] - a['cpu_ms']:.3f} ms less CPU a request")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="/encode", choices=["/encode", "/retrieve"])
    parser.add_argument("--items", type=int, default=100_000, help="with /retrieve: catalog items per modality")
    parser.add_argument("--modality", default="audio", help="modality of the request features (default audio)")
    parser.add_argument("--compare", default="checks", choices=["checks", "features"],
                        help="checks: small inputs checked on the event loop vs in a decode thread; features: features "
                        "sent as float32 bytes (features_b64) vs as a nested JSON list")
    parser.add_argument("--features-as", default="list", choices=["list", "b64"],
                        help="with --compare checks: features as a nested JSON list or float32 bytes")
    parser.add_argument("--requests", type=int, default=4000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="alternating measurements per way")
    args = parser.parse_args()
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
