"""Service load: QPS and p50/p99 latency of /encode and /retrieve at concurrency 1, 16 and 64, with micro-batching
on (SRCID_MAX_BATCH=64) and off (SRCID_MAX_BATCH=1), in one run; or, with --versus, batching on against batching
on with other settings.

    python bench/serve.py                                  # the embedded bundle, 100k catalog items
    python bench/serve.py --bundle BUNDLE --items 100000 --requests 640
    python bench/serve.py --paper-dims --modality text  # an untrained bundle at the paper's dims, text features
    python bench/serve.py --index-kind ivf              # approximate search (SRCID_INDEX_KIND=ivf)
    python bench/serve.py --versus INDEX_BACKEND=faiss-cpu  # the default settings vs faiss's flat index
    python bench/serve.py --features-as b64             # features sent as float32 bytes (features_b64)
    python bench/serve.py --workers 2                   # both servers with two worker processes
    python bench/serve.py --versus WORKERS=2            # one worker process vs two, batching on
    python bench/serve.py --set CACHE_URL=redis://127.0.0.1:6379/0  # both servers with the Redis encode cache
    python bench/serve.py --catalog-url 'redis://127.0.0.1:6379/7?durability=none'  # the catalog in Redis
    git worktree add /tmp/before HEAD~1 && python bench/serve.py --against /tmp/before  # this code vs other code

The run ends with two reference figures: the encoder alone in this process at batch 64 vs 1 (the most batching can
give when the encoder is all the work), and GET /healthz at the top concurrency (an endpoint with nothing behind it,
through FastAPI's middleware and routing, which POSTs to /encode and /retrieve skip).

This process is the load generator; each configuration runs `srcid serve` as a separate process on loopback,
both started before the first measurement; measurements alternate between them (--rounds, best kept), so one
server works at a time and both see the same machine conditions. The catalog (a temporary SQLite file, or the empty one
`--catalog-url` names) gets `--items` random unit vectors per modality through the catalog API (not HTTP) before the
servers start; every server indexes the same catalog.
Load is bounded: `--requests` requests per (endpoint, concurrency) (640, or 50 a worker where that is more), spread
over that many concurrent workers.
Requests carry precomputed features of `--modality` ([T, D...]; a nested JSON list, or float32 bytes with
`--features-as b64`), so the figures are of the service and runtime, not of media decoding; /retrieve searches
another modality's items. Ratios printed at the end compare the two configurations measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

try:  # the load generator's own CPU a request is lower on uvloop (uvicorn[standard] installs it)
    from uvloop import run as run_loop
except ImportError:
    from asyncio import run as run_loop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from srcid.index.catalog import open_catalog  # noqa: E402
from srcid.index.items import Item  # noqa: E402
from srcid.runtime import load_bundle  # noqa: E402
from srcid.service.media import bundle_id  # noqa: E402
from srcid.service.settings import EMBEDDED_BUNDLE  # noqa: E402

BATCHING_ON = {"MAX_BATCH": "64", "BATCH_WAIT_MS": "5"}
BATCHING_OFF = {"MAX_BATCH": "1", "BATCH_WAIT_MS": "0"}


def settings(items: list[str], flag: str) -> dict[str, str]:
    """KEY=VALUE items (SRCID_ left out) as a dict."""
    try:
        return dict(item.split("=", 1) for item in items)
    except ValueError:
        raise SystemExit(f"{flag} takes KEY=VALUE settings (SRCID_ left out), got {items}") from None


def configurations(versus: list[str]) -> dict[str, dict[str, str]]:
    """The two servers' SRCID_* settings by name: batching on and off, or batching on against `versus` (KEY=VALUE)."""
    if not versus:
        return {"batching on": BATCHING_ON, "batching off": BATCHING_OFF}
    return {"default": BATCHING_ON, " ".join(versus): {**BATCHING_ON, **settings(versus, "--versus")}}


def fill_catalog(url: str, bundle_dir: Path, n: int, seed: int = 0) -> None:
    """n random unit vectors per modality straight into the catalog (random codes are not needed for search)."""
    bundle = load_bundle(bundle_dir, backend="onnx-cpu")
    dim = bundle.manifest.embedding_dim
    catalog = open_catalog(url, dim, bundle_id(bundle))
    if catalog.count():
        raise SystemExit(f"catalog {url} holds {catalog.count()} items already; give an empty one")
    rng = np.random.default_rng(seed)
    chunk = 5000
    with tqdm(total=n * len(bundle.modalities), desc="catalog", unit="item") as bar:
        for modality in bundle.modalities:
            for start in range(0, n, chunk):
                x = rng.standard_normal((min(chunk, n - start), dim)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                catalog.add([Item(id=f"{modality}-{start + i}", modality=modality, embedding=v, metadata={"i": start + i})
                             for i, v in enumerate(x)])
                bar.update(len(x))
    catalog.close()


# `srcid serve` from another checkout's source, in this environment: the editable install's import finder would
# pick this checkout's srcid, so it is taken out before the other checkout goes first on the path.
SERVE_FROM = """import sys
root = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__name__", type(f).__name__).lower()]
sys.path.insert(0, root)
import srcid.cli
assert srcid.cli.__file__.startswith(root), f"imported {srcid.cli.__file__}, not {root}"
sys.exit(srcid.cli.main())
"""


def start_server(bundle: Path, data: Path, catalog_url: str, port: int, extra: dict[str, str], log: Path,
                 source: Path | None = None) -> subprocess.Popen:
    """`srcid serve` with these SRCID_* settings, of this checkout or of the checkout at `source`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRCID_")}
    env.update({"SRCID_BUNDLE": str(bundle), "SRCID_DATA_DIR": str(data), "SRCID_CATALOG_URL": catalog_url,
                "SRCID_PORT": str(port), "SRCID_LOG_LEVEL": "warning", "SRCID_DEMO_CATALOG": "false",
                **{f"SRCID_{k}": v for k, v in extra.items()}})
    command = ([str(Path(sys.executable).with_name("srcid")), "serve"] if source is None
               else [sys.executable, "-c", SERVE_FROM, str(source.resolve()), "serve"])
    proc = subprocess.Popen(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            if r.status_code == 200:
                return proc
            if r.json().get("status") == "failed":
                proc.terminate()
                raise RuntimeError(f"server failed to load: {r.json()['error']['message']}")
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError("server not ready in 600 s")


class Connection(asyncio.Protocol):
    """A minimal keep-alive HTTP/1.1 client on one socket, one request at a time. The load generator shares the
    2 cores with the server, so it must cost far less per request than the server does: httpx costs milliseconds,
    and asyncio's streams (readuntil, readexactly) cost 70-200 µs of CPU a request, up to ~0.4 of a core at
    5,000 req/s (docs/PERFORMANCE.md, Serve); this protocol parses the answer where it arrives."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.buffer = bytearray()
        self.expected = 0  # bytes of head and body of the answer awaited, once its head is in
        self.status = 0
        self.waiter: asyncio.Future | None = None

    async def open(self) -> "Connection":
        self.transport, _ = await asyncio.get_running_loop().create_connection(lambda: self, self.host, self.port)
        return self

    async def send(self, raw: bytes) -> int:
        """Send one request; its answer's status, once the whole answer is in."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.expected:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            start = head.find(b"\r\ncontent-length:")
            if start < 0:
                self._fail(ConnectionError(f"an answer without Content-Length: {head[:200]!r}"))
                return
            stop = head.find(b"\r\n", start + 2)
            self.status = int(head[9:12])
            self.expected = end + 4 + int(head[start + 17 : stop if stop >= 0 else None])
        if len(self.buffer) >= self.expected:
            if len(self.buffer) > self.expected:
                self._fail(ConnectionError("more bytes than the answer's Content-Length"))
                return
            self.buffer.clear()
            self.expected = 0
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.transport.close()


def requests_at(concurrency: int, requests: int | None) -> int:
    """Requests of one measurement: as given, or 640, or 50 a connection where that is more."""
    return requests if requests is not None else max(640, 50 * concurrency)


def raw_request(path: str, body: dict | None, port: int) -> bytes:
    """A POST of `body` as JSON, or a GET when it is None."""
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def load(port: int, path: str, bodies: list[dict | None], concurrency: int) -> dict[str, float]:
    """Send every body once with `concurrency` workers (one connection each); QPS over the whole run, latency
    percentiles in ms."""
    raws = [raw_request(path, b, port) for b in bodies]
    latencies: list[float] = []
    queue = list(reversed(raws))
    failures = 0

    async def worker(conn: Connection) -> None:
        nonlocal failures
        while queue:
            raw = queue.pop()
            t0 = time.perf_counter()
            status = await conn.send(raw)
            latencies.append(time.perf_counter() - t0)
            failures += status != 200

    conns = [await Connection("127.0.0.1", port).open() for _ in range(concurrency)]
    # Warm-up at the same concurrency, so the runtime has seen the batch sizes this load makes before timing.
    for _ in range(2):
        await asyncio.gather(*[c.send(raws[i % len(raws)]) for i, c in enumerate(conns)])
    t0 = time.perf_counter()
    await asyncio.gather(*[worker(c) for c in conns])
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    ms = np.array(latencies) * 1000
    return {"qps": len(bodies) / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "failures": failures}


STAGES = {"queue_wait_seconds": "wait", "batch_run_seconds": "call"}


def stage_sums(port: int) -> dict[str, float]:
    """The server's stage histograms (sum and count per batcher) from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if any(name.startswith(f"srcid_{stage}_") for stage in STAGES) and ("_sum{" in name or "_count{" in name):
            out[name] = float(value)
    return out


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per request of each batcher's queue wait and per call of its batch call, over one measurement:
    e.g. {"encode-audio wait_ms": 3.1, "encode-audio call_ms": 2.0} (batchers that did nothing left out)."""
    means = {}
    for stage, short in STAGES.items():
        for name, total in after.items():
            if not name.startswith(f"srcid_{stage}_sum{{"):
                continue
            batcher = name.split('batcher="', 1)[1].split('"', 1)[0]
            count_name = name.replace("_sum{", "_count{")
            count = after[count_name] - before.get(count_name, 0.0)
            if count:
                means[f"{batcher} {short}_ms"] = 1000 * (total - before.get(name, 0.0)) / count
    return means


def bodies_for(endpoint: str, n: int, modality: str, T: int, shape: list[int], seed: int,
               features_as: str = "list") -> list[dict]:
    """n request bodies, each with one input of random features [T, *shape]: a nested list of numbers rounded to 4
    decimals (`features`), or float32 bytes (`features_b64`) with `features_as="b64"`."""
    rng = np.random.default_rng(seed)
    target = "video" if modality != "video" else "audio"
    out = []
    for _ in range(n):
        x = np.round(rng.standard_normal((T, *shape)), 4)
        given = ({"features": x.tolist()} if features_as == "list"
                 else {"features_b64": base64.b64encode(x.astype("<f4").tobytes()).decode()})
        if endpoint == "/encode":
            out.append({"modality": modality, "inputs": [given]})
        else:
            out.append({"query": {"modality": modality, **given}, "target": target, "top_k": 10})
    return out


def encoder_batching_gain(bundle_dir: Path, modality: str, T: int, shape: list[int], batch: int) -> dict[str, float]:
    """clips/s of the bundle's encoder at batch 1 and at `batch`, in this process, one thread, no HTTP."""
    from encode import clips_per_second

    bundle = load_bundle(bundle_dir, backend="onnx-cpu", threads=1)
    rng = np.random.default_rng(0)

    def rate(b: int) -> float:
        x = rng.standard_normal((b, T, *shape), dtype=np.float32)
        return clips_per_second(lambda: bundle.encode(modality, x), b, 2.0, lambda: None)

    single, batched = rate(1), rate(batch)
    return {"single_clips_s": single, "batched_clips_s": batched, "gain": batched / single}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=EMBEDDED_BUNDLE)
    parser.add_argument("--paper-dims", action="store_true",
                        help="instead of --bundle: export an untrained bundle at the paper's dims (hidden 256, ...)")
    parser.add_argument("--modality", default="audio", help="modality of the request features (default audio)")
    parser.add_argument("--features-as", default="list", choices=["list", "b64"],
                        help="request features as a nested JSON list (`features`) or float32 bytes (`features_b64`)")
    parser.add_argument("--index-kind", default="flat", choices=["flat", "ivf"], help="SRCID_INDEX_KIND of the servers")
    parser.add_argument("--items", type=int, default=100_000, help="catalog items per modality")
    parser.add_argument("--catalog-url", default=None,
                        help="an empty catalog to fill and serve from (redis://127.0.0.1:6379/7?durability=none, say); "
                        "default: a SQLite file in a temporary folder")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per endpoint and concurrency (default: 640, or 50 a connection where that is "
                        "more, 3,200 at 64: a measurement starts and ends with fewer requests in flight, which must "
                        "be a small part of it)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--port", type=int, default=8931, help="first configuration: PORT, second: PORT + 1")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (best kept)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--workers", type=int, default=1, help="SRCID_WORKERS of both servers")
    parser.add_argument("--versus", nargs="+", default=[], metavar="KEY=VALUE",
                        help="compare batching on with the defaults against batching on with these SRCID_ settings")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="shared",
                        help="SRCID_ settings of both servers (CACHE_URL=redis://127.0.0.1:6379/0, say)")
    parser.add_argument("--against", type=Path, default=None, metavar="CHECKOUT",
                        help="compare this checkout's server against the one of another checkout of srcid (a git "
                        "worktree of an earlier commit, say), both batching on")
    args = parser.parse_args()
    for name in ("requests", "rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if min(args.concurrency) < 1:
        parser.error("--concurrency must be at least 1")
    configs = configurations(args.versus)
    shared = settings(args.shared, "--set")
    sources: dict[str, Path | None] = {name: None for name in configs}
    if args.against is not None:
        if args.versus:
            raise SystemExit("--against and --versus each name the second server; give one")
        if not (args.against / "srcid" / "cli.py").is_file():
            raise SystemExit(f"--against {args.against}: no srcid/cli.py there")
        configs = {"this checkout": BATCHING_ON, f"checkout {args.against.name}": BATCHING_ON}
        sources = {"this checkout": None, f"checkout {args.against.name}": args.against}

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="srcid-bench-") as tmp:
        tmp = Path(tmp)
        if args.paper_dims:
            from encode import build_bundle

            _, args.bundle = build_bundle(tmp)
        manifest = load_bundle(args.bundle, backend="onnx-cpu").manifest
        T, shape = manifest.T, list(manifest.modalities[args.modality].shape)
        catalog_url = args.catalog_url or f"sqlite:///{tmp / 'catalog.db'}"
        fill_catalog(catalog_url, args.bundle, args.items)
        # Both servers run at once (an idle one costs nothing) and the measurements alternate between them for
        # --rounds rounds, keeping each one's best: on a shared machine the load drifts within a run, and
        # alternating exposes both configurations to the same conditions.
        procs = {}
        try:
            for i, (name, extra) in enumerate(configs.items()):
                env = {"WORKERS": str(args.workers), "INDEX_KIND": args.index_kind, **shared, **extra}
                procs[name] = start_server(args.bundle, tmp / name.replace(" ", "-"), catalog_url, args.port + i, env,
                                           tmp / f"{name.replace(' ', '-')}.log", sources[name])
            for endpoint in ("/encode", "/retrieve"):
                for c in args.concurrency:
                    bodies = bodies_for(endpoint, requests_at(c, args.requests), args.modality, T, shape, seed=c,
                                        features_as=args.features_as)
                    for _ in range(args.rounds):
                        for i, name in enumerate(configs):
                            before = stage_sums(args.port + i)
                            figures = run_loop(load(args.port + i, endpoint, bodies, c))
                            figures.update(stage_means(before, stage_sums(args.port + i)))
                            key = f"{name} {endpoint} c={c}"
                            if key not in results or figures["qps"] > results[key]["qps"]:
                                results[key] = figures
                    for name in configs:
                        figures = results[f"{name} {endpoint} c={c}"]
                        stages = "  ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in figures.items() if "wait" in k or "call" in k)
                        print(f"{name:13s} {endpoint:9s} c={c:<3d} {figures['qps']:8.1f} req/s  p50 {figures['p50_ms']:7.1f} ms"
                              f"  p99 {figures['p99_ms']:7.1f} ms  failures {figures['failures']}  mean ms: {stages}", flush=True)
            # An endpoint that does nothing, through the same server and FastAPI's layers.
            top = max(args.concurrency)
            gets = [None] * requests_at(top, args.requests)
            floor = max((run_loop(load(args.port, "/healthz", gets, top)) for _ in range(args.rounds)),
                        key=lambda f: f["qps"])
            results[f"GET /healthz c={top}"] = floor
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(60)
        ceiling = encoder_batching_gain(args.bundle, args.modality, T, shape, max(args.concurrency))
    print(f"\nencoder alone ({args.modality}, one onnxruntime thread as the servers): batch {max(args.concurrency)} "
          f"{ceiling['batched_clips_s']:.0f} clips/s, batch 1 {ceiling['single_clips_s']:.0f} clips/s: "
          f"{ceiling['gain']:.2f}x, the most batching can give when the encoder is all the work")
    results["encoder alone"] = ceiling
    print(f"GET /healthz at c={top} (FastAPI's path, with nothing behind it): {floor['qps']:.0f} req/s "
          f"(p99 {floor['p99_ms']:.1f} ms)")
    for endpoint in ("/encode", "/retrieve"):
        for c in args.concurrency:
            first, second = (results[f"{name} {endpoint} c={c}"] for name in configs)
            print(f"{endpoint:9s} c={c:<3d} {' / '.join(configs)} throughput: {first['qps'] / second['qps']:.2f}x, "
                  f"p99 {first['p99_ms']:.1f} / {second['p99_ms']:.1f} ms")
    info = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "items_per_modality": args.items,
            "requests": {c: requests_at(c, args.requests) for c in args.concurrency},
            "bundle": "paper dims, untrained" if args.paper_dims else str(args.bundle),
            "modality": args.modality, "features_as": args.features_as, "index_kind": args.index_kind,
            "catalog": "sqlite (temporary)" if args.catalog_url is None else args.catalog_url,
            "workers": args.workers, "shared_settings": shared, "configurations": configs,
            "sources": {name: str(src) if src else "this checkout" for name, src in sources.items()}, "results": results}
    if args.out:
        args.out.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
