"""What a running service holds: the bundle and front-ends, the catalog and its index, the batchers and the cache.

Loading (bundle verification, front-ends, catalog, index rebuild, demo items) happens in a background thread, so
the server answers /healthz at once and /readyz (503 until ready) tells orchestrators when to send traffic.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from srcid.index.backends import choose_backend_kind
from srcid.index.catalog import Catalog, open_catalog
from srcid.index.catalog_index import MAX_TOP_K, CatalogIndex, open_index_for_catalog
from srcid.index.errors import BadEmbeddingError, CatalogUnavailableError
from srcid.index.items import MIN_NORM, MODALITIES, Item, make_item
from srcid.model.frontends import FrontEnd
from srcid.runtime import Bundle, load_bundle

from .batcher import MicroBatcher
from .cache import EncodeCache, Encoded
from .errors import BadInput, NotReady
from .media import Prepared, build_frontends, bundle_id, cache_key, cheap_to_prepare, featurize, prepare, stack
from .metrics import Metrics
from .models import FEATURE_FIELDS, InputFields, Query
from .settings import Settings

log = logging.getLogger(__name__)

R = TypeVar("R")
CATALOG_RETRY_S = 2.0
WORKER_DIR_ENV = "SRCID_WORKER_DIR"  # set by `srcid serve --workers N`: a folder the workers share (readiness, metrics)
GC_YOUNG_THRESHOLD = 20_000


@dataclass
class Search:
    """One /retrieve query for its target's batch: a catalog item's embedding (`item_id`, left out of its own
    results), inputs still to encode (`job`), or an embedding already known (`vector`, a cache hit)."""

    k: int
    item_id: str | None = None
    job: Prepared | None = None
    vector: np.ndarray | None = None


ItemHit = tuple[str, float, str, dict[str, Any]]  # (id, score, modality, metadata); the index's own Hit is (id, score)


@dataclass
class Found:
    """A query's answer: up to k (id, score, modality, metadata) best first, and what encoding the query gave (None
    if it did not encode), for the cache."""

    hits: list[ItemHit]
    encoded: Encoded | None


def search_threads(requested: int | None, backend: str) -> int:
    """SRCID_INDEX_THREADS, or by default 2 where the search is the int8 pass and 1 otherwise. With OpenMP's idle
    threads asleep (`srcid serve`), two int8 threads gave /retrieve 1.14-1.27x the throughput at 64 in flight in
    four runs on three 2-vCPU VMs, with a lower p99 there in three; with the bf16 or blas pass, 0.99-1.10x in
    three runs, the p99 no lower (docs/PERFORMANCE.md, Serve, twentieth session). With onnxruntime's int8 product
    (an AVX2 CPU without VNNI), 1.20x against one thread's 1.04x, both against the blas backend (twenty-second
    session)."""
    if requested is not None:
        return requested
    return 2 if choose_backend_kind(backend) == "int8" else 1


def _search_threads(requested: int | None, backend: str) -> None:
    """OpenMP's thread count is per calling thread, so each search thread sets faiss's own and torch's (the bf16
    and int8 backends' products; onnxruntime's int8 product takes torch's); OpenBLAS's (the blas backend's) is one
    per process, set by the first: one unless SRCID_INDEX_THREADS gives it."""
    n = search_threads(requested, backend)
    if n:
        import faiss
        import torch
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(n)
        torch.set_num_threads(n)
        # The int8 kind's second thread by default is its first pass's. OpenBLAS searches that kind's small stores,
        # where two threads served 0.81x the /retrieve requests of one at 64 in flight over 20k items (the other
        # vCPU is the event loop's), so it keeps one unless the count was given (docs/PERFORMANCE.md, Serve).
        threadpool_limits(n if requested is not None else 1, user_api="blas")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process under that number: not ours to judge, so not dead
        return True
    try:  # a killed worker stays a zombie, which signal 0 still reaches, until uvicorn reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class ServiceState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bundle: Bundle | None = None
        self.bundle_id = ""
        self.frontends: dict[str, FrontEnd] = {}
        self.features_only: dict[str, str] = {}  # modality -> why its front-end could not be built
        self.catalog: Catalog | None = None
        self.index: CatalogIndex | None = None
        self.ready = False
        self.status = "starting"
        self.error: str | None = None
        self.metrics = Metrics(self.live_figures)
        # Media decoding and front-ends; the catalog. Each batcher (/encode's runtime calls, /retrieve's encode,
        # search and fetch) runs in a thread of its own.
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.io_pool = ThreadPoolExecutor(8, thread_name_prefix="catalog")
        # Both kinds of batcher encode; a front-end is not safe to call from two threads at once (a fast tokenizer's
        # padding state, for one), so each modality's front-end and runtime call hold its lock.
        self._encoding = {m: threading.Lock() for m in MODALITIES}
        self.cache = EncodeCache(settings.cache_url, self.metrics.cache_result) if settings.cache_url else None
        self.encoders = {m: self._batcher(f"encode-{m}", lambda p, m=m: self._encode_batch(m, p)) for m in MODALITIES}
        self.retrievers = {m: self._batcher(f"retrieve-{m}", lambda p, m=m: self._retrieve_batch(m, p),
                                            functools.partial(_search_threads, settings.index_threads,
                                                              settings.index_backend))
                           for m in MODALITIES}
        self._stop = threading.Event()
        self._loader: asyncio.Future | None = None
        worker_dir = os.environ.get(WORKER_DIR_ENV)
        self._ready_marker = Path(worker_dir) / f"ready-{os.getpid()}" if worker_dir and settings.workers > 1 else None

    def _batcher(self, name: str, run: Callable, initializer: Callable[[], None] = lambda: None) -> MicroBatcher:
        s = self.settings
        return MicroBatcher(
            name, run, s.max_batch, s.batch_wait_ms, s.queue_size, initializer,
            on_batch=self.metrics.batch_size.labels(name).observe, on_depth=self.metrics.queue_depth.labels(name).set,
            on_wait=self.metrics.queue_wait.labels(name).observe, on_run=self.metrics.batch_run.labels(name).observe,
        )

    # -- life cycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        for b in (*self.encoders.values(), *self.retrievers.values()):
            b.start()
        self._loader = asyncio.get_running_loop().run_in_executor(self.io_pool, self.load)

    def load(self) -> None:
        """Bundle, front-ends, catalog, index, demo items; sets `ready`, or `error` saying what failed."""
        s = self.settings
        try:
            self.status = f"loading bundle {s.bundle}"
            bundle = load_bundle(s.bundle, s.runtime_backend, s.runtime_threads)
            self.bundle_id = bundle_id(bundle)
            self.status = "building front-ends"
            self.frontends = build_frontends(bundle, self.features_only)
            for modality, reason in self.features_only.items():
                log.warning("%s takes precomputed features only: %s", modality, reason)
            self.bundle = bundle
            self.catalog = self._open_catalog(bundle)
            if self.catalog is None:
                return
            self.status = "building the index"
            self.index = open_index_for_catalog(self.catalog, s.index_dir, self.bundle_id,
                                                bundle.manifest.embedding_dim, s.index_config())
            if s.demo_catalog and s.uses_embedded_bundle and self.catalog.count() == 0:
                self.status = "adding the demo catalog"
                from .demo import load_demo

                load_demo(self)
                self.index.sync()
            # Half a million long-lived objects (torch, onnx, pydantic schemas) made every full collection stall
            # the event loop ~240 ms, the p99 of a loaded server; frozen objects are never scanned again. A
            # request's objects die by reference counting; collecting every 700 net allocations still took 8-10 %
            # of the event loop under load (py-spy), none with this threshold (docs/PERFORMANCE.md, Serve).
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
            self.ready, self.status = True, "ready"
            if self._ready_marker is not None:
                self._ready_marker.touch()
            log.info("ready", extra={"figures": self.live_figures()})
        except Exception as exc:  # noqa: BLE001 - a failed load leaves a server that says why on /readyz
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            log.error("service not ready: %s", self.error)

    def _open_catalog(self, bundle: Bundle) -> Catalog | None:
        s = self.settings
        while not self._stop.is_set():
            self.status = f"opening catalog {s.catalog_url}"
            try:
                return open_catalog(s.catalog_url, bundle.manifest.embedding_dim, self.bundle_id)
            except CatalogUnavailableError as exc:
                self.status = f"waiting for catalog: {exc}"
                log.warning("%s; retrying in %.0fs", exc, CATALOG_RETRY_S)
                self._stop.wait(CATALOG_RETRY_S)
        return None

    async def stop(self) -> None:
        """Answer what is queued, persist the index, release everything."""
        self._stop.set()
        for b in (*self.encoders.values(), *self.retrievers.values()):
            await b.drain()
        if self._loader is not None:
            await asyncio.wait([self._loader], timeout=30)
        if self.index is not None and self.ready:
            try:
                await self.run_in(self.io_pool, self._save_index)
            except Exception as exc:  # noqa: BLE001 - the catalog is the truth; the next start rebuilds
                log.warning("index not saved at shutdown: %s", exc)
        if self.cache is not None:
            await self.cache.close()
        if self.catalog is not None:
            self.catalog.close()
        for pool in (self.decode_pool, self.io_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        if self._ready_marker is not None:
            self._ready_marker.unlink(missing_ok=True)

    def _save_index(self) -> None:
        assert self.index is not None
        self.index.sync()
        self.index.save(self.settings.index_dir)

    def workers_waiting(self) -> str | None:
        """With several workers, what /readyz waits for until every one has loaded (requests go to any of them)."""
        if self._ready_marker is None:
            return None
        ready, n = self.forget_dead_workers(), self.settings.workers
        return None if ready >= n else f"{ready} of {n} workers loaded"

    def forget_dead_workers(self) -> int:
        """Loaded workers still running. A worker that died (killed, out of memory) leaves its ready marker and its
        live gauges behind; uvicorn starts a replacement, which marks itself once loaded, so until then /readyz
        must not count the dead one, nor /metrics its queue depth."""
        if self._ready_marker is None:
            return 0
        ready = 0
        for marker in self._ready_marker.parent.glob("ready-*"):
            pid = int(marker.name.removeprefix("ready-"))
            if _running(pid):
                ready += 1
            else:
                marker.unlink(missing_ok=True)
                self.metrics.forget_process(pid)
        return ready

    def require_ready(self) -> Bundle:
        if not self.ready or self.bundle is None:
            raise NotReady(f"not ready: {self.error or self.status}")
        return self.bundle

    def live_figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"ready": self.ready, "status": self.status}
        if self.ready and self.bundle is not None and self.index is not None:
            figures.update(runtime_backend=self.bundle.backend, index_backend=self.index.backend_name,
                           bundle=self.bundle_id, index_counts=self.index.counts(),
                           index_fallbacks=self.index.fallbacks())
        return figures

    async def run_in(self, pool: ThreadPoolExecutor, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- encoding -----------------------------------------------------------------------------------------
    def _encode_batch(self, modality: str, jobs: Sequence[Prepared]) -> list[dict | BadInput]:
        """Several requests in one front-end call and one runtime call: [sum B_i, T, *shape] -> each request's
        rows, or the BadInput of a request whose media the front-end could not use."""
        bundle = self.require_ready()
        with self._encoding[modality]:
            feats = featurize(jobs, bundle, self.frontends)
            good = [row for f in feats if not isinstance(f, BadInput) for row in f]
            if not good:
                return feats  # type: ignore[return-value]
            out = bundle.run_checked(modality, *stack(good))
        results: list[dict | BadInput] = []
        start = 0
        for f in feats:
            if isinstance(f, BadInput):
                results.append(f)
                continue
            results.append({k: v[start : start + len(f)] for k, v in out.items()})
            start += len(f)
        return results

    def _usable(self, modality: str, inputs: Sequence[InputFields], where: str) -> Bundle:
        bundle = self.require_ready()
        if modality in self.features_only and any(item.kind not in FEATURE_FIELDS for item in inputs):
            raise BadInput(f"{where}: this service encodes {modality} from precomputed features only; its front-end "
                           f"is unavailable ({self.features_only[modality]})", code="frontend_unavailable")
        return bundle

    async def _prepare_and_enqueue(
        self, batcher: MicroBatcher, items: Sequence[InputFields], modality: str, bundle: Bundle, where: str,
        payload: Callable[[Prepared], tuple[Any, int]],
    ) -> asyncio.Future:
        """Prepare `items` and queue the job on `batcher`; `payload(job)` gives what the batch function gets and
        its rows.

        Only a prepare in the decode pool is announced as coming, so that a batch being gathered waits for it. A
        prepare on the event loop ends before the loop does anything else, so nothing is gained by waiting for it.
        When it was announced, the batcher thread saw it whenever numpy gave up the interpreter lock inside the
        features check. The thread then waited for it, and again for the busy loop to hand the lock back: ~3 ms a
        batch at 64 in flight (docs/PERFORMANCE.md, Serve)."""
        if cheap_to_prepare(items):
            return batcher.enqueue(*payload(prepare(items, modality, bundle, where)))
        with batcher.coming():
            job = await self.run_in(self.decode_pool, prepare, items, modality, bundle, where)
            return batcher.enqueue(*payload(job))

    async def encode(self, modality: str, inputs: Sequence[InputFields], where: str = "inputs") -> list[Encoded]:
        """INPUTs of one modality -> per input {"layer1" [T], "layer2" [T], "embedding" [E]} (cache, then batcher)."""
        bundle = self._usable(modality, inputs, where)
        keys = [cache_key(self.bundle_id, modality, item) for item in inputs] if self.cache else []
        found: list[Encoded | None] = await self.cache.get_many(keys) if self.cache else [None] * len(inputs)
        todo = [i for i, hit in enumerate(found) if hit is None]
        if todo:
            waiting = await self._prepare_and_enqueue(self.encoders[modality], [inputs[i] for i in todo], modality,
                                                      bundle, where, lambda job: (job, len(job)))
            out = await waiting
            fresh = {}
            for row, i in enumerate(todo):
                found[i] = {k: out[k][row] for k in ("layer1", "layer2", "embedding")}
                if self.cache:
                    fresh[keys[i]] = found[i]
            if self.cache:
                await self.cache.put_many(fresh)
        return found  # type: ignore[return-value]

    # -- retrieval ----------------------------------------------------------------------------------------
    def _retrieve_batch(self, target: str, queries: Sequence[Search]) -> list[Found | Exception]:
        """Several /retrieve queries for one target in one thread call: the catalog items queried by id fetched,
        the content queries encoded (one runtime call per query modality), the index caught up with the catalog,
        every query searched in one call, and the hits' items fetched at once. Each thread hop a request saves
        is event-loop time, the service's scarcest (docs/PERFORMANCE.md, Serve)."""
        assert self.index is not None and self.catalog is not None
        results: list[Found | Exception | None] = [None] * len(queries)
        vectors: list[np.ndarray | None] = [q.vector for q in queries]
        encoded: list[Encoded | None] = [None] * len(queries)
        by_id = [i for i, q in enumerate(queries) if q.item_id is not None]
        own: set[int] = set()  # queries by an item of the target modality, which must leave it out of its results
        for i, item in zip(by_id, self.catalog.get_many([queries[i].item_id for i in by_id])):
            if item is None:
                results[i] = self.catalog.not_found(queries[i].item_id)
            else:
                vectors[i] = item.embedding
                if item.modality == target:
                    own.add(i)
        for modality in dict.fromkeys(q.job.modality for q in queries if q.job is not None):
            todo = [i for i, q in enumerate(queries) if q.job is not None and q.job.modality == modality]
            for i, out in zip(todo, self._encode_batch(modality, [queries[i].job for i in todo])):
                if isinstance(out, BadInput):
                    results[i] = out
                else:
                    encoded[i] = {k: v[0] for k, v in out.items()}
                    vectors[i] = encoded[i]["embedding"]
        live = [i for i, r in enumerate(results) if r is None]
        # A query without a direction (a zero or NaN embedding, from a degenerate encoding or a corrupt cache entry)
        # fails alone; the index would refuse the whole batch for it.
        for i, norm in zip(live, np.linalg.norm(np.stack([vectors[i] for i in live]), axis=1) if live else []):
            if not (np.isfinite(norm) and norm >= MIN_NORM):
                results[i] = BadEmbeddingError(f"query: its embedding has norm {norm:.3g}, no direction to search")
        live = [i for i in live if results[i] is None]
        if live:
            self.index.sync()
            # Such a query asks one more, within the index's limit (so top_k = MAX_TOP_K gets one fewer at most).
            ask = {i: min(queries[i].k + (i in own), MAX_TOP_K) for i in live}
            hits = self.index.search(target, np.stack([vectors[i] for i in live]), max(ask.values()))
            hits = [[(h, s) for h, s in found[: ask[i]] if h != queries[i].item_id][: queries[i].k]
                    for i, found in zip(live, hits)]
            ids = list(dict.fromkeys(h for found in hits for h, _ in found))
            shown = dict(zip(ids, self.catalog.metadata_many(ids)))
            for i, found in zip(live, hits):
                # An item deleted since the index last caught up is left out.
                results[i] = Found([(h, s, *shown[h]) for h, s in found if shown[h] is not None], encoded[i])
        return results  # type: ignore[return-value]

    async def retrieve(self, target: str, query: Query, k: int) -> list[ItemHit]:
        """The k catalog items of modality `target` nearest the query, best first: (id, score, modality, metadata)."""
        batcher = self.retrievers[target]
        key = None
        if query.item_id is not None:
            self.require_ready()
            waiting = batcher.enqueue(Search(k, item_id=query.item_id))
        else:
            bundle = self._usable(query.modality, [query], "query")
            hit = None
            if self.cache:
                key = cache_key(self.bundle_id, query.modality, query)
                hit = (await self.cache.get_many([key]))[0]
            if hit is not None:
                waiting = batcher.enqueue(Search(k, vector=hit["embedding"]))
            else:
                waiting = await self._prepare_and_enqueue(batcher, [query], query.modality, bundle, "query",
                                                          lambda job: (Search(k, job=job), 1))
        found: Found = await waiting
        if key is not None and found.encoded is not None:
            await self.cache.put_many({key: found.encoded})  # type: ignore[union-attr]
        return found.hits

    # -- catalog ------------------------------------------------------------------------------------------
    def new_item(self, item_id: str, modality: str, enc: Encoded, metadata: dict) -> Item:
        assert self.catalog is not None and self.bundle is not None
        codes = {"layer1": enc["layer1"].tolist()}
        if self.bundle.manifest.layers > 1:
            codes["layer2"] = enc["layer2"].tolist()
        return make_item(item_id, modality, enc["embedding"], self.catalog.dim, metadata, codes)
