"""Prometheus metrics of one app (its own registry, so several apps can live in one process, as in tests), or, when
PROMETHEUS_MULTIPROC_DIR is set (`srcid serve --workers N`), of every worker process, summed from that folder."""

from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Live:
    """Figures read when /metrics is scraped: index sizes, bf16 fallbacks, backends in use, readiness."""

    def __init__(self, read: Callable[[], dict]):
        self._read = read

    def collect(self):
        figures = self._read()
        ready = GaugeMetricFamily("srcid_ready", "1 when the bundle and index are loaded")
        ready.add_metric([], 1.0 if figures.get("ready") else 0.0)
        yield ready
        items = GaugeMetricFamily("srcid_index_items", "items in the retrieval index", labels=["modality"])
        for modality, n in figures.get("index_counts", {}).items():
            items.add_metric([modality], float(n))
        yield items
        fallbacks = CounterMetricFamily("srcid_index_fallback_queries", "queries the bf16 or int8 index backend "
                                        "searched again in float32 (its first pass could not prove their answer)",
                                        labels=["modality"])
        for modality, n in figures.get("index_fallbacks", {}).items():
            fallbacks.add_metric([modality], float(n))
        yield fallbacks
        info = GaugeMetricFamily("srcid_backend_info", "backends in use (value 1)", labels=["runtime", "index", "bundle"])
        if figures.get("ready"):
            info.add_metric([figures["runtime_backend"], figures["index_backend"], figures["bundle"]], 1.0)
        yield info


class Metrics:
    def __init__(self, live: Callable[[], dict]):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode the values live in the folder's files; registering them here too would report this
        # worker's share beside the sum.
        self.registry = CollectorRegistry()
        r = None if self.multiprocess else self.registry
        self.requests = Counter("srcid_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("srcid_request_seconds", "HTTP request latency", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("srcid_batch_rows", "rows per runtime/index call", ["batcher"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("srcid_queue_depth", "requests waiting in a batcher", ["batcher"], registry=r,
                                 multiprocess_mode="livesum")
        # Where a request's time goes between arrival and answer: waiting for its batch, then the batch's call.
        self.queue_wait = Histogram("srcid_queue_wait_seconds", "from enqueue to the start of the request's batch",
                                    ["batcher"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_run = Histogram("srcid_batch_run_seconds", "one runtime/index call of a batch, in its thread",
                                   ["batcher"], buckets=LATENCY_BUCKETS, registry=r)
        self._request_series: dict[tuple[str, str, int], tuple] = {}
        self.cache = Counter("srcid_encode_cache", "encode cache lookups by result", ["result"], registry=r)
        for result in ("hit", "miss", "error"):
            self.cache.labels(result)
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)
        self.registry.register(_Live(live))

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request and its latency. prometheus_client's labels() checks and locks on every call, several
        µs a request twice over, so each label set's series are looked up once."""
        key = (route, method, status)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (self.requests.labels(route, method, str(status)),
                                                  self.latency.labels(route, method))
        series[0].inc()
        series[1].observe(seconds)

    def cache_result(self, result: str, count: int) -> None:
        if count:
            self.cache.labels(result).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        """At a worker's exit: drop its live gauges from the sums."""
        self.forget_process(os.getpid())

    def forget_process(self, pid: int) -> None:
        """Drop a worker's live gauges from the sums (its counters and histograms still count)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(pid)
