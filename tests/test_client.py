"""srcid.client against a real server: every call, sync and async, and errors raised with status and code."""

from __future__ import annotations

import asyncio

import pytest
from conftest import SERVICE_API_KEY
from test_service_support import image_bytes, random_features, wav_bytes

from srcid.client import AsyncClient, Client, SrcidError, audio_input, features_input, frames_input, text_input


def test_sync_client_every_call(sqlite_service):
    with Client(sqlite_service.url, api_key=SERVICE_API_KEY) as c:
        assert c.health() == {"status": "alive"} and c.ready()["status"] == "ready"
        out = c.encode("audio", [audio_input(wav_bytes()), features_input(random_features("audio", 3))],
                       return_embedding=True)
        assert len(out["items"]) == 2 and len(out["items"][0]["embedding"]) == 64
        assert len(c.encode("video", [frames_input([image_bytes(1), image_bytes(2)])])["items"][0]["layer1"]) == 10
        c.add_item("client/a", "text", text_input("seven seven"), {"digit": 7})
        c.add_item("client-b", "audio", features_input(random_features("audio", 4)))
        got = c.get_item("client/a", embedding=True)
        assert got["metadata"] == {"digit": 7} and len(got["embedding"]) == 64
        hits = c.retrieve({"modality": "text", "text": "seven seven"}, target="text", top_k=50)
        assert {h["id"]: h["score"] for h in hits}["client/a"] > 0.999 and hits[0]["score"] > 0.999
        assert [h["id"] for h in c.retrieve("client/a", target="audio", top_k=50)].count("client-b") == 1
        assert c.delete_item("client/a") == {"deleted": "client/a"}
        with pytest.raises(SrcidError) as err:
            c.get_item("client/a")
        assert err.value.status == 404 and err.value.code == "not_found"
        with pytest.raises(SrcidError) as err:
            c.encode("audio", [{"audio_b64": "***"}])
        assert err.value.status == 400 and err.value.code == "bad_base64"
        c.delete_item("client-b")
    with Client(sqlite_service.url) as anonymous, pytest.raises(SrcidError) as err:
        anonymous.add_item("x", "text", text_input("one"))
    assert err.value.status == 401 and err.value.code == "unauthorized"


def test_async_client_every_call(sqlite_service):
    async def run():
        async with AsyncClient(sqlite_service.url, api_key=SERVICE_API_KEY) as c:
            assert (await c.health())["status"] == "alive" and (await c.ready())["status"] == "ready"
            many = await asyncio.gather(*[c.encode("text", [text_input(w)]) for w in ("one", "two", "three")])
            assert all(len(m["items"]) == 1 for m in many)
            await c.add_item("async-a", "audio", features_input(random_features("audio", 8)), {"k": 1})
            assert (await c.get_item("async-a"))["metadata"] == {"k": 1}
            hits = await c.retrieve({"modality": "audio", "features": random_features("audio", 8).tolist()}, "audio", 50)
            assert {h["id"]: h["score"] for h in hits}["async-a"] > 0.999
            await c.delete_item("async-a")
            with pytest.raises(SrcidError) as err:
                await c.delete_item("async-a")
            assert err.value.status == 404

    asyncio.run(run())
