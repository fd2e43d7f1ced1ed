"""`srcid serve`: run the HTTP API with uvicorn. With no arguments it serves the embedded AV-Digits bundle and
its demo catalog from ./srcid-data (no network, no Redis, no GPU needed)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

# flag -> Settings field; every flag defaults to None so the environment (SRCID_*) and the defaults apply.
FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "bind address (SRCID_HOST, default 127.0.0.1)"),
    ("--port", "port", int, "port (SRCID_PORT, default 8000)"),
    ("--bundle", "bundle", Path, "model bundle folder (SRCID_BUNDLE, default: the embedded AV-Digits bundle)"),
    ("--data-dir", "data_dir", Path, "state folder for the default catalog and index (SRCID_DATA_DIR, ./srcid-data)"),
    ("--catalog-url", "catalog_url", str, "sqlite:///path or redis://host:port/db (SRCID_CATALOG_URL)"),
    ("--index-dir", "index_dir", Path, "persisted index folder (SRCID_INDEX_DIR, default DATA_DIR/index)"),
    ("--cache-url", "cache_url", str, "redis://host:port/db for the encode cache (SRCID_CACHE_URL, default none)"),
    ("--api-key", "api_key", str, "Bearer key for POST/DELETE /items (SRCID_API_KEY; prefer the variable)"),
    ("--runtime-backend", "runtime_backend", str, "onnx-cpu, onnx-cuda, torch-cuda, torch-cpu, auto"),
    ("--runtime-threads", "runtime_threads", int, "onnxruntime intra-op threads (SRCID_RUNTIME_THREADS, 1; 0: all cores)"),
    ("--index-threads", "index_threads", int, "CPU search threads, faiss OpenMP, torch and BLAS (SRCID_INDEX_THREADS; 2 with the int8 backend, else 1, and BLAS 1; 0: all cores)"),
    ("--index-backend", "index_backend", str, "blas, bf16, int8, faiss-cpu, faiss-gpu, torch, auto"),
    ("--index-kind", "index_kind", str, "flat (exact, default) or ivf (approximate; SRCID_INDEX_KIND)"),
    ("--ivf-min-items", "ivf_min_items", int, "index-kind ivf: items per modality before IVF (SRCID_IVF_MIN_ITEMS, 50000)"),
    ("--max-batch", "max_batch", int, "rows per runtime call (SRCID_MAX_BATCH, 64; 1 turns batching off)"),
    ("--batch-wait-ms", "batch_wait_ms", float, "how long a batch waits for more requests (SRCID_BATCH_WAIT_MS, 5)"),
    ("--queue-size", "queue_size", int, "waiting requests per modality before 429 (SRCID_QUEUE_SIZE, 1024)"),
    ("--max-body-bytes", "max_body_bytes", int, "larger bodies get 413 (SRCID_MAX_BODY_BYTES, 16777216)"),
    ("--log-level", "log_level", str, "debug, info, warning, error (SRCID_LOG_LEVEL, info)"),
    ("--workers", "workers", int, "server processes, each with its own model and index (SRCID_WORKERS, 1)"),
]
# switch -> the boolean Settings field it turns off (left unset without the switch, so the environment applies).
OFF_SWITCHES: list[tuple[str, str, str]] = [
    ("--no-demo", "demo_catalog", "do not load the demo catalog (SRCID_DEMO_CATALOG=false)"),
    ("--no-access-log", "access_log", "no line per request; other logs stay (SRCID_ACCESS_LOG=false)"),
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP API (/encode, /retrieve, /items, /healthz, /readyz, /metrics)",
        description="Serve a model bundle over HTTP. With no arguments: the embedded AV-Digits bundle, a SQLite "
        "catalog under ./srcid-data filled with the shipped demo clips, on http://127.0.0.1:8000. Every flag "
        "has an SRCID_* environment variable (flags win); see docs/SERVICE.md.",
    )
    for flag, field, kind, text in FLAGS:
        p.add_argument(flag, dest=field, type=kind, default=None, help=text)
    for switch, field, text in OFF_SWITCHES:
        p.add_argument(switch, dest=field, action="store_const", const=False, default=None, help=text)
    p.set_defaults(func=run)


def sleeping_openmp_threads() -> None:
    """Let OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the environment says otherwise. With
    SRCID_INDEX_THREADS above 1, torch's and faiss's OpenMP threads otherwise spin after each parallel region, and a
    search has ~30 of them: the spinning takes the core the event loop needs (two threads served 1266 against 1647
    req/s for one spinning, 1733 against 1732 sleeping; docs/PERFORMANCE.md, Serve). OpenMP reads the variable when
    it loads, so this runs before anything imports torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(args: argparse.Namespace) -> int:
    sleeping_openmp_threads()
    import logging.config

    import uvicorn

    from .app import create_app
    from .logs import configure
    from .protocol import DirectHttpProtocol
    from .settings import Settings
    from .state import WORKER_DIR_ENV

    fields = [field for _, field, _, _ in FLAGS] + [field for _, field, _ in OFF_SWITCHES]
    overrides = {field: getattr(args, field) for field in fields if getattr(args, field) is not None}
    settings = Settings(**overrides)
    if not settings.bundle.is_dir():
        what = "the embedded default bundle" if settings.uses_embedded_bundle else "bundle folder"
        raise FileNotFoundError(f"{what} {settings.bundle} not found (--bundle / SRCID_BUNDLE name another)")
    log_config = configure(settings.log_level, settings.access_log)
    logging.config.dictConfig(log_config)
    # uvicorn finishes requests in flight on SIGTERM/SIGINT (up to the graceful timeout), then the lifespan's
    # shutdown drains the batchers and saves the index.
    # POSTs to /encode and /retrieve are answered without uvicorn's ASGI cycle (srcid/service/protocol.py).
    common = dict(host=settings.host, port=settings.port, log_config=log_config, access_log=False,
                  timeout_graceful_shutdown=30, http=DirectHttpProtocol)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return 0
    # Each worker process builds its app from the environment, so the flags travel there. The workers share a
    # folder: the metrics of all are summed from files there (prometheus_client's multiprocess mode, read at its
    # import), and each marks itself loaded there, so /readyz says ready only once every worker is.
    for field, value in overrides.items():
        os.environ[f"SRCID_{field.upper()}"] = str(value)
    shared = tempfile.mkdtemp(prefix="srcid-workers-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[WORKER_DIR_ENV] = shared
    try:
        uvicorn.run("srcid.service.app:create_app", factory=True, workers=settings.workers, **common)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return 0
