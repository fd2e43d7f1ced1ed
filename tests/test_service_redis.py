"""The service on a real Redis (catalog and encode cache): every endpoint, then Redis killed mid-test and restarted.
While Redis is away /encode keeps answering (no cache), catalog calls answer 503; afterwards everything recovers."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from test_service_support import ThreadServer, random_features

from srcid.service.cache import pack, unpack

AUTH = {"Authorization": "Bearer redis-key"}


def _cache_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {result: float(line.split(" ")[1]) for line in text.splitlines() for result in ("hit", "miss", "error")
            if line.startswith(f'srcid_encode_cache_total{{result="{result}"}}')}


def _encode(url: str, seed: int, modality: str = "audio") -> httpx.Response:
    body = {"modality": modality, "inputs": [{"features": random_features(modality, seed).tolist()}],
            "return_embedding": True}
    return httpx.post(url + "/encode", json=body, timeout=60)


def test_cache_entries_round_trip():
    enc = {"layer1": np.arange(10), "layer2": np.arange(10)[::-1].copy(), "embedding": np.linspace(0, 1, 64, dtype=np.float32)}
    back = unpack(pack(enc))
    assert all(np.array_equal(back[k], enc[k]) for k in enc)


def test_redis_catalog_and_cache_survive_a_redis_restart(service_bundle, redis_server, tmp_path):
    server = ThreadServer(bundle=service_bundle, data_dir=tmp_path / "data", catalog_url=redis_server.url(0),
                          cache_url=redis_server.url(1), api_key="redis-key").start()
    url = server.url
    try:
        ready = httpx.get(url + "/readyz").json()
        assert ready["index"]["catalog"].startswith("redis://") and ready["cache"]["reachable"] is True

        # Every endpoint on the Redis catalog.
        items = [{"id": f"r{i}", "modality": "audio", "features": random_features("audio", i).tolist(),
                  "metadata": {"i": i}} for i in range(4)]
        assert httpx.post(url + "/items", json={"items": items}, headers=AUTH).status_code == 201
        assert httpx.get(url + "/items/r2").json()["metadata"] == {"i": 2}
        hits = httpx.post(url + "/retrieve", json={"query": {"modality": "audio", "features": items[1]["features"]},
                                                   "target": "audio", "top_k": 2}).json()["results"]
        assert hits[0]["id"] == "r1" and hits[0]["score"] > 0.999
        # A query's encoding is cached too: a new query is a miss, the same query again a hit with the same answer.
        fresh = {"query": {"modality": "audio", "features": random_features("audio", 77).tolist()}, "target": "audio"}
        before = _cache_counts(url)
        first_hits = httpx.post(url + "/retrieve", json=fresh).json()["results"]
        middle = _cache_counts(url)
        assert httpx.post(url + "/retrieve", json=fresh).json()["results"] == first_hits
        after = _cache_counts(url)
        assert (middle["hit"] - before["hit"], middle["miss"] - before["miss"]) == (0, 1)
        assert (after["hit"] - middle["hit"], after["miss"] - middle["miss"]) == (1, 0)
        assert httpx.delete(url + "/items/r3", headers=AUTH).status_code == 200
        assert httpx.get(url + "/items/r3").status_code == 404

        # The encode cache: the second identical request is a hit with the same answer.
        before = _cache_counts(url)
        first, second = _encode(url, 50).json(), _encode(url, 50).json()
        after = _cache_counts(url)
        assert first == second
        assert after["hit"] - before["hit"] == 1 and after["miss"] - before["miss"] >= 1
        # Cached entries are keyed by content: the cache holds this input under this bundle.
        assert server.state.cache is not None

        redis_server.kill()
        assert _encode(url, 50).json() == first  # no cache now: recomputed, same answer
        assert _encode(url, 51).status_code == 200
        assert _cache_counts(url)["error"] >= 1
        for r in (
            httpx.post(url + "/retrieve", json={"query": {"item_id": "r1"}, "target": "audio"}),
            httpx.post(url + "/retrieve", json={"query": {"modality": "audio", "features": items[1]["features"]},
                                                "target": "audio"}),
            httpx.get(url + "/items/r1"),
            httpx.post(url + "/items", json={"items": [{**items[3], "id": "r9"}]}, headers=AUTH),
            httpx.delete(url + "/items/r0", headers=AUTH),
            httpx.get(url + "/readyz"),
        ):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] in ("catalog_unavailable", "not_ready")
        assert httpx.get(url + "/healthz").status_code == 200

        redis_server.start()
        time.sleep(1.2)  # the cache retries after 1 s
        hits = httpx.post(url + "/retrieve", json={"query": {"item_id": "r0"}, "target": "audio", "top_k": 5}).json()
        assert sorted(h["id"] for h in hits["results"]) == ["r1", "r2"]  # acknowledged writes survived (AOF)
        assert httpx.post(url + "/items", json={"items": [{**items[3], "id": "r9"}]}, headers=AUTH).status_code == 201
        assert httpx.get(url + "/items/r9").status_code == 200
        assert httpx.get(url + "/readyz").json()["index"]["counts"]["audio"] == 4
        before = _cache_counts(url)
        assert _encode(url, 60).json() == _encode(url, 60).json()
        assert _cache_counts(url)["hit"] - before["hit"] == 1
    finally:
        server.stop()
