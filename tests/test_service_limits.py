"""Readiness, overload and life cycle: a server that cannot load or is still waiting answers 503; a full queue
answers 429; `srcid serve` finishes requests in flight on SIGTERM and keeps its catalog across restarts; with no
arguments it serves the embedded bundle and its demo catalog."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_service_support import ProcessServer, ThreadServer, free_port, post_concurrently, random_features

from srcid.training.avdigits import WORDS

EMBEDDED = Path(__file__).resolve().parent.parent / "srcid" / "assets"
ENCODE = {"modality": "text", "inputs": [{"text": "one"}]}


def _all_503(url: str) -> None:
    for r in (
        httpx.get(url + "/readyz"),
        httpx.post(url + "/encode", json=ENCODE),
        httpx.post(url + "/retrieve", json={"query": {"item_id": "x"}, "target": "audio"}),
        httpx.post(url + "/items", json={"items": [{"id": "x", "modality": "text", "text": "one"}]}),
        httpx.get(url + "/items/x"),
        httpx.delete(url + "/items/x"),
    ):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "not_ready"
    assert httpx.get(url + "/healthz").status_code == 200
    assert "srcid_ready 0.0" in httpx.get(url + "/metrics").text


def test_invalid_bundle_is_not_ready(tmp_path):
    (tmp_path / "bundle").mkdir()
    server = ThreadServer(bundle=tmp_path / "bundle", data_dir=tmp_path / "data").start(ready=False)
    try:
        server.wait_for_status(lambda status: status == "failed", 30)
        _all_503(server.url)
        assert "manifest.json" in httpx.get(server.url + "/readyz").json()["error"]["message"]
    finally:
        server.stop()


def test_still_waiting_for_its_catalog_is_not_ready(service_bundle, tmp_path):
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    server = ThreadServer(bundle=service_bundle, data_dir=tmp_path, catalog_url=nobody).start(ready=False)
    try:
        server.wait_for_status(lambda status: "waiting for catalog" in status, 60)
        _all_503(server.url)
        assert "waiting for catalog" in httpx.get(server.url + "/readyz").json()["error"]["message"]
    finally:
        server.stop()


def test_a_full_queue_answers_429(service_bundle, tmp_path):
    server = ThreadServer(bundle=service_bundle, data_dir=tmp_path, max_batch=1, queue_size=1, batch_wait_ms=0).start()
    body = {"modality": "text", "inputs": [{"features": random_features("text", i).tolist()} for i in range(64)]}
    try:
        answers = post_concurrently(server.url, "/encode", [body] * 24)
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        refused = next(a for a in answers if a.status_code == 429).json()["error"]
        assert refused["code"] == "overloaded"
    finally:
        server.stop()


def test_srcid_serve_drains_on_sigterm_and_keeps_its_catalog(service_bundle, tmp_path):
    env = {"bundle": service_bundle, "data_dir": tmp_path / "data", "batch_wait_ms": 400}
    server = ProcessServer(tmp_path / "serve.log", **env)
    server.wait_ready()
    item = {"id": "kept", "modality": "audio", "features": random_features("audio", 7).tolist()}
    assert httpx.post(server.url + "/items", json={"items": [item]}).status_code == 201

    async def in_flight():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            requests = [asyncio.ensure_future(client.post("/encode", json=ENCODE)) for _ in range(8)]
            await asyncio.sleep(0.2)  # connected and waiting in the batcher (400 ms)
            server.process.send_signal(15)
            return await asyncio.gather(*requests)

    answers = asyncio.run(in_flight())
    assert [a.status_code for a in answers] == [200] * 8
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is -SIGTERM.
    assert server.terminate() in (0, -15)
    log = server.log_path.read_text()
    assert "Application shutdown complete" in log and "index saved" in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    # The access log: a line per request, the 8 drained ones included.
    encodes = [x for x in lines if x["message"] == "request" and x["route"] == "/encode"]
    assert len(encodes) == 8 and all(x["status"] == 200 and x["ms"] > 0 for x in encodes)

    again = ProcessServer(tmp_path / "serve2.log", ["--no-access-log"], **env)
    try:
        again.wait_ready()
        assert httpx.get(again.url + "/items/kept").status_code == 200
        assert httpx.get(again.url + "/readyz").json()["index"]["counts"]["audio"] == 1
    finally:
        again.terminate()
    # --no-access-log (SRCID_ACCESS_LOG=false): the other lines, but none per request.
    messages = [json.loads(line)["message"] for line in again.log_path.read_text().splitlines() if line.startswith("{")]
    assert "ready" in messages and "request" not in messages


@pytest.mark.skipif(not (EMBEDDED / "bundle" / "manifest.json").is_file(), reason="no embedded bundle in srcid/assets/bundle")
def test_srcid_serve_with_no_arguments_serves_the_embedded_demo(tmp_path):
    demo = json.loads((EMBEDDED / "demo" / "demo.json").read_text())["items"]
    server = ProcessServer(tmp_path / "serve.log", data_dir=tmp_path / "data")
    try:
        ready = server.wait_ready().json()
        counts = {m: sum(e["modality"] == m for e in demo) for m in ("audio", "video", "text")}
        assert ready["index"]["counts"] == counts and ready["bundle"]["path"].endswith("assets/bundle")
        # Text->audio on the demo: better than chance (0.1) over the ten digits, as docs/SERVICE.md measured.
        precision = []
        for digit, word in enumerate(WORDS[:10]):
            text = " ".join([word] * 5 + ["nothing"] * 5)
            r = httpx.post(server.url + "/retrieve", json={"query": {"modality": "text", "text": text},
                                                           "target": "audio", "top_k": 3}).json()["results"]
            assert len(r) == 3 and all(x["modality"] == "audio" for x in r)
            precision.append(np.mean([x["metadata"]["digit"] == digit for x in r]))
        assert np.mean(precision) >= 0.2, precision
    finally:
        server.terminate()


def test_index_kind_ivf_serves_an_approximate_index_tuned_to_its_recall(service_bundle, tmp_path):
    from srcid.index.catalog import open_catalog
    from srcid.index.items import Item
    from srcid.runtime import load_bundle
    from srcid.service.media import bundle_id

    bundle = load_bundle(service_bundle, backend="onnx-cpu")
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = open_catalog(url, bundle.manifest.embedding_dim, bundle_id(bundle))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, bundle.manifest.embedding_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    catalog.add([Item(id=f"a{i}", modality="audio", embedding=v, metadata={}) for i, v in enumerate(x)])
    catalog.close()

    server = ThreadServer(bundle=service_bundle, data_dir=tmp_path, catalog_url=url, index_kind="ivf",
                          ivf_min_items=1000, demo_catalog=False).start()
    try:
        index = httpx.get(server.url + "/readyz").json()["index"]
        assert index["kind"] == "ivf" and set(index["ivf"]) == {"audio"}, index  # video/text: too few items
        assert index["ivf"]["audio"]["recall_at_10"] >= 0.95 and index["ivf"]["audio"]["nprobe"] < index["ivf"]["audio"]["nlist"]
        found = 0
        for q in range(20):
            r = httpx.post(server.url + "/retrieve", json={"query": {"item_id": f"a{q}"}, "target": "audio", "top_k": 10})
            assert r.status_code == 200, r.text
            exact = {f"a{i}" for i in np.argsort(-(x @ x[q]))[1:11]}
            found += len(exact & {hit["id"] for hit in r.json()["results"]})
        assert found / 200 >= 0.85, found
    finally:
        server.stop()


def test_a_front_end_without_its_weights_leaves_that_modality_features_only(service_bundle, tmp_path):
    import shutil

    from test_service_support import b64, wav_bytes

    bundle = shutil.copytree(service_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["modalities"]["audio"]["frontend"] = {"name": "vggish", "files": []}  # VGGish needs a weights file
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    server = ThreadServer(bundle=bundle, data_dir=tmp_path / "data").start()
    try:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["bundle"]["frontends"]["audio"].startswith("features only: VGGish")
        assert ready["bundle"]["frontends"]["text"] == manifest["modalities"]["text"]["frontend"]["name"]
        features = {"modality": "audio", "inputs": [{"features": random_features("audio", 0).tolist()}]}
        assert httpx.post(server.url + "/encode", json=features).status_code == 200
        r = httpx.post(server.url + "/encode", json={"modality": "audio", "inputs": [{"audio_b64": b64(wav_bytes())}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "frontend_unavailable", r.text
        assert "precomputed features only" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_srcid_serve_with_two_workers_is_ready_once_both_are_and_sums_their_metrics(tmp_path):
    """`srcid serve --workers 2`: one demo catalog (not one per worker), /readyz 200 only when every worker has
    loaded (requests go to either), /metrics the sum over both, and a clean stop that saves the index."""
    demo = json.loads((EMBEDDED / "demo" / "demo.json").read_text())["items"]
    server = ProcessServer(tmp_path / "serve.log", ["--workers", "2"], data_dir=tmp_path / "data", log_level="warning")
    try:
        ready = server.wait_ready().json()
        assert sum(ready["index"]["counts"].values()) == len(demo)
        answers = [httpx.post(server.url + "/encode", json=ENCODE, timeout=60) for _ in range(40)]
        assert [a.status_code for a in answers] == [200] * 40  # no worker still loading
        assert len({json.dumps(a.json()) for a in answers}) == 1  # same bundle, same codes, whichever answered
        metrics = httpx.get(server.url + "/metrics").text
        line = 'srcid_requests_total{method="POST",route="/encode",status="200"} '
        assert float(metrics.split(line, 1)[1].split("\n", 1)[0]) == 40.0, "metrics are one worker's, not the sum"

        # A worker that dies: the survivor stops counting it at once, uvicorn's replacement loads, ready again.
        victim, survivor = _worker_pids(server.process.pid)
        shared = Path(dict(kv.split("=", 1) for kv in _environ(survivor))["PROMETHEUS_MULTIPROC_DIR"])
        assert (shared / f"ready-{victim}").exists() and list(shared.glob(f"gauge_live*_{victim}.db"))
        os.kill(victim, signal.SIGKILL)
        deadline, seen = time.monotonic() + 10, []
        while time.monotonic() < deadline and "1 of 2 workers loaded" not in seen:
            r = httpx.get(server.url + "/readyz")
            seen.append(r.json()["status"])
        assert "1 of 2 workers loaded" in seen, f"/readyz still counted the dead worker: {seen[-3:]}"
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert not (shared / f"ready-{victim}").exists() and not list(shared.glob(f"gauge_live*_{victim}.db"))
        server.wait_ready()
        assert victim not in _worker_pids(server.process.pid)
        assert httpx.post(server.url + "/encode", json=ENCODE, timeout=60).status_code == 200
    finally:
        assert server.terminate() == 0
    assert (tmp_path / "data" / "index" / "manifest.json").exists()


def _worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes: the children multiprocessing spawned (its resource tracker is not one)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _environ(pid: int) -> list[str]:
    return [kv for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in kv]


def test_a_worker_that_exited_is_not_running_even_before_it_is_reaped():
    from srcid.service.state import _running

    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)  # exited but not waited for: a zombie, which signal 0 still reaches
    try:
        assert not _running(child.pid)
        assert _running(os.getpid())
    finally:
        child.wait()
    assert not _running(child.pid)


def test_srcid_serve_lets_openmp_threads_sleep_unless_told_otherwise(monkeypatch):
    """`srcid serve` sets OMP_WAIT_POLICY=PASSIVE, keeping a value given. OpenMP reads it when torch loads, which
    the CLI leaves to the serve command itself (tests/test_cli.py)."""
    from srcid.service.cli import sleeping_openmp_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    sleeping_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    sleeping_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_search_threads_default_to_two_for_the_int8_pass_and_one_otherwise(monkeypatch):
    """SRCID_INDEX_THREADS unset: 2 search threads where the index backend is int8 (explicit, or what `auto` picks
    on this CPU), 1 otherwise; a value given is kept. The thread count lands in the search thread itself; OpenBLAS
    (one count for the process) keeps one thread unless the count was given."""
    import threading

    import threadpoolctl
    import torch

    from srcid.index.backends import choose_backend_kind
    from srcid.service.settings import Settings
    from srcid.service.state import _search_threads, search_threads

    monkeypatch.delenv("SRCID_INDEX_THREADS", raising=False)
    assert Settings().index_threads is None
    assert search_threads(None, "int8") == 2
    assert search_threads(None, "blas") == search_threads(None, "bf16") == search_threads(None, "faiss-cpu") == 1
    assert search_threads(None, "auto") == (2 if choose_backend_kind("auto") == "int8" else 1)
    assert search_threads(3, "int8") == 3 and search_threads(0, "blas") == 0
    seen: list[tuple[int, int]] = []
    blas: list[int] = []  # OpenBLAS's count is the process's: asked for here, not set, so other tests keep theirs
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda limits, user_api: blas.append(limits))

    def search_thread(requested: int | None) -> None:
        _search_threads(requested, "int8")
        seen.append((torch.get_num_threads(), blas[-1]))

    for requested in (None, 2):
        thread = threading.Thread(target=search_thread, args=(requested,))  # torch's count is the thread's own
        thread.start()
        thread.join()
    # By default the second thread is the int8 pass's alone; OpenBLAS keeps one unless the count was given.
    assert seen == [(2, 1), (2, 2)]
