"""The HTTP API on a real uvicorn server with the SQLite catalog: every endpoint, every error status of DESIGN §7,
batching that changes no answer, and metrics."""

from __future__ import annotations

import gc
import json

import httpx
import numpy as np
import orjson
import pytest
from fastapi import APIRouter
from conftest import SERVICE_API_KEY
from test_service_support import (
    b64, image_bytes, mp4_bytes, png_claiming, post_concurrently, random_features, wav_bytes,
)

from srcid.index.backends import choose_backend_kind, cpu_has_avx512_vnni
from srcid.runtime import load_bundle
from srcid.service.media import build_frontends, cache_key, to_features
from srcid.service.metrics import Metrics
from srcid.service.models import EncodeRequest, EncodeResponse, InputFields, RetrieveResponse
from srcid.service.routing import JSONBodyRoute
from srcid.service.state import GC_YOUNG_THRESHOLD

AUTH = {"Authorization": f"Bearer {SERVICE_API_KEY}"}


@pytest.fixture(scope="module")
def reference(service_bundle):
    """The runtime and front-ends in the test process: what the service must answer, computed without it."""
    bundle = load_bundle(service_bundle, backend="onnx-cpu", threads=1)
    return bundle, build_frontends(bundle)


def expected(reference, modality: str, inputs: list[dict]) -> dict[str, np.ndarray]:
    bundle, frontends = reference
    x, mask = to_features([InputFields(**i) for i in inputs], modality, bundle, frontends)
    return bundle.encode(modality, x, mask)


def conforms(model, body: dict) -> bool:
    """Whether an answer is what its response model (and so /openapi.json) says: /encode and /retrieve write theirs
    without building the model, so a missing, extra or mistyped field would otherwise go unseen."""
    return model.model_validate(body).model_dump(mode="json", exclude_none=True) == body


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def metric_values(server) -> dict[str, float]:
    """Every sample of the server's /metrics: 'name{labels}' -> value."""
    text = httpx.get(server.url + "/metrics").text
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if not ln.startswith("#")}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# -- health ---------------------------------------------------------------------------------------------------
def test_live_metrics_report_each_modalitys_bf16_fallbacks():
    text = Metrics(lambda: {"ready": False, "index_fallbacks": {"audio": 0, "video": 3}}).render().decode()
    assert 'srcid_index_fallback_queries_total{modality="video"} 3.0' in text
    assert 'srcid_index_fallback_queries_total{modality="audio"} 0.0' in text


def test_health_ready_and_metrics(sqlite_service):
    assert httpx.get(sqlite_service.url + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(sqlite_service.url + "/readyz").json()
    assert ready["status"] == "ready"
    assert ready["bundle"]["runtime_backend"] == "onnx-cpu" and ready["bundle"]["modalities"] == ["audio", "video", "text"]
    cpu_backend = {"bf16": "bf16-cpu-exact", "blas": "blas-cpu-fp32",  # `auto`, no GPU
                   "int8": "int8-cpu-exact" if cpu_has_avx512_vnni() else "int8-mlas-cpu-exact"}[choose_backend_kind()]
    assert ready["index"]["backend"] == cpu_backend and ready["index"]["catalog"].startswith("sqlite:///")
    assert set(ready["index"]["counts"]) == {"audio", "video", "text"}
    post(sqlite_service, "/encode", {"modality": "text", "inputs": [{"text": "one two"}]})
    metrics = httpx.get(sqlite_service.url + "/metrics").text
    assert 'srcid_requests_total{method="POST",route="/encode",status="200"}' in metrics
    assert 'srcid_request_seconds_bucket{le="0.5",method="POST",route="/encode"}' in metrics
    assert 'srcid_batch_rows_count{batcher="encode-text"}' in metrics
    assert 'srcid_queue_depth{batcher="encode-text"}' in metrics
    assert 'srcid_index_items{modality="audio"}' in metrics and "srcid_ready 1.0" in metrics
    assert 'srcid_index_fallback_queries_total{modality="video"} 0.0' in metrics
    assert 'srcid_backend_info{bundle="' in metrics and 'runtime="onnx-cpu"' in metrics
    # The server runs in this process: what it loaded is frozen out of the collector's full scans.
    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD


# -- /encode --------------------------------------------------------------------------------------------------
MEDIA_CASES = {
    "text": ("text", lambda: [{"text": "seven seven three"}, {"text": "nothing one"}]),
    "wav": ("audio", lambda: [{"audio_b64": b64(wav_bytes())}, {"audio_b64": b64(wav_bytes(1.0, 8000, 300.0))}]),
    "flac+ogg": ("audio", lambda: [{"audio_b64": b64(wav_bytes(fmt="FLAC"))}, {"audio_b64": b64(wav_bytes(fmt="OGG"))}]),
    "png+jpeg frames": ("video", lambda: [{"frames_b64": [b64(image_bytes(i)) for i in range(3)]},
                                          {"frames_b64": [b64(image_bytes(9, "JPEG"))]}]),
    "mp4": ("video", lambda: [{"video_b64": b64(mp4_bytes())}]),
    "features": ("audio", lambda: [{"features": random_features("audio", 0).tolist()}]),
    "masked features": ("text", lambda: [{"features": random_features("text", 1).tolist(), "mask": [True] * 4 + [False] * 6}]),
}


@pytest.mark.parametrize("case", list(MEDIA_CASES))
def test_encode_equals_the_runtime_on_every_input_kind(sqlite_service, reference, case):
    modality, make = MEDIA_CASES[case]
    inputs = make()
    r = post(sqlite_service, "/encode", {"modality": modality, "inputs": inputs, "return_embedding": True})
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected(reference, modality, inputs)
    assert conforms(EncodeResponse, body)
    assert body["bundle"] == sqlite_service.state.bundle_id and len(body["items"]) == len(inputs)
    for i, item in enumerate(body["items"]):
        assert item["layer1"] == want["layer1"][i].tolist() and item["layer2"] == want["layer2"][i].tolist()
        assert len(item["layer1"]) == 10
        np.testing.assert_allclose(item["embedding"], want["embedding"][i], atol=1e-5)
        assert abs(np.linalg.norm(item["embedding"]) - 1) < 1e-4


def test_features_as_float32_bytes_answer_as_the_nested_list_does(sqlite_service, reference):
    """`features_b64` (little-endian float32, row-major, base64) is the same input as `features`, mask included."""
    bundle, _ = reference
    for modality, x, mask in [("audio", random_features("audio", 11), None),
                              ("text", random_features("text", 12), [True] * 4 + [False] * 6)]:
        with_mask = {} if mask is None else {"mask": mask}
        inputs = [{"features": x.tolist(), **with_mask}, {"features_b64": b64(x.astype("<f4").tobytes()), **with_mask}]
        r = post(sqlite_service, "/encode", {"modality": modality, "inputs": inputs, "return_embedding": True})
        assert r.status_code == 200, r.text
        listed, packed = r.json()["items"]
        want = bundle.encode(modality, x[None], None if mask is None else np.array([mask]))
        assert packed["layer1"] == want["layer1"][0].tolist() and packed["layer2"] == want["layer2"][0].tolist()
        np.testing.assert_allclose(packed["embedding"], want["embedding"][0], atol=1e-5)
        assert packed == listed


def test_encode_cache_keys_tell_masks_and_kinds_of_features_apart():
    x = random_features("text", 1)
    listed, packed = {"features": x.tolist()}, {"features_b64": b64(x.tobytes())}
    masks = [None, [True] * 10, [True] * 4 + [False] * 6]
    inputs = [InputFields(**given, **({} if m is None else {"mask": m})) for given in (listed, packed) for m in masks]
    keys = [cache_key("v1-bundle", "text", item) for item in inputs]
    assert len(set(keys)) == len(inputs)
    assert keys == [cache_key("v1-bundle", "text", InputFields(**item.model_dump(exclude_none=True))) for item in inputs]


def test_listed_features_key_by_the_array_the_check_reads_whichever_parser_read_them():
    from srcid.service.bodies import parse_body

    x = random_features("audio", 2)
    key = lambda features: cache_key("v1-bundle", "audio", InputFields(features=features))  # noqa: E731
    as_json = orjson.dumps({"features": x.tolist()})
    array_read = parse_body(as_json)["features"]
    assert isinstance(array_read, np.ndarray) and key(array_read) == key(orjson.loads(as_json)["features"])
    integers = np.arange(x.size).reshape(x.shape) - 600
    assert key(integers.tolist()) == key(integers.astype(np.float64)) == key((integers * 1.0).tolist())
    assert key(x.tolist()) != key(x.reshape(x.shape[1], x.shape[0]).tolist())  # same numbers, another shape
    changed = x.copy()
    changed[3, 7] = np.nextafter(changed[3, 7], np.inf)
    assert key(changed.tolist()) != key(x.tolist())
    # Past 2^53 an integer and the float64 it rounds to can encode differently (float32 rounds the integer once).
    big = [[2**53 + 1] * x.shape[1]] * x.shape[0]
    assert key(big) != key(np.asarray(big, dtype=np.float64))
    # Features the check refuses (ragged, not numbers) still get keys, apart from each other and from arrays'.
    refused = {key(f) for f in ([[1.0, 2.0], [3.0]], [["a"] * 2], [[True, False]], [[1.0, "2"]])}
    assert len(refused) == 4 and not refused & {key([]), key([[1.0, 2.0]]), key([[1, 0]])}


def test_encode_leaves_out_the_embedding_unless_asked(sqlite_service):
    r = post(sqlite_service, "/encode", {"modality": "text", "inputs": [{"text": "four"}]})
    assert r.status_code == 200 and set(r.json()["items"][0]) == {"layer1", "layer2"} and conforms(EncodeResponse, r.json())


def test_64_concurrent_encodes_equal_their_unbatched_answers(sqlite_service, reference):
    inputs = [{"features": random_features("audio", 100 + i).tolist()} for i in range(64)]
    want = expected(reference, "audio", inputs)  # each row is independent of the others in the batch
    single = [expected(reference, "audio", [x]) for x in inputs[:4]]
    for i, s in enumerate(single):
        assert s["layer1"][0].tolist() == want["layer1"][i].tolist()

    def batches() -> dict[str, float]:
        """count and sum of the encode-audio batcher's histograms: rows per call, queue wait, call duration."""
        line = metric_values(sqlite_service)
        return {f"{name}_{part}": line[f'srcid_{name}_{part}{{batcher="encode-audio"}}']
                for name in ("batch_rows", "queue_wait_seconds", "batch_run_seconds") for part in ("count", "sum")}

    before = batches()

    answers = post_concurrently(sqlite_service.url, "/encode",
                                [{"modality": "audio", "inputs": [x], "return_embedding": True} for x in inputs])
    assert [a.status_code for a in answers] == [200] * 64
    for i, a in enumerate(answers):
        item = a.json()["items"][0]
        assert item["layer1"] == want["layer1"][i].tolist() and item["layer2"] == want["layer2"][i].tolist()
        np.testing.assert_allclose(item["embedding"], want["embedding"][i], atol=1e-5)
    after = {k: v - before[k] for k, v in batches().items()}
    calls = after["batch_rows_count"]
    assert after["batch_rows_sum"] == 64
    assert calls < 64, "no two concurrent requests shared a runtime call"
    # Every request waited once for its batch; every call was timed, and took time.
    assert after["queue_wait_seconds_count"] == 64 and after["queue_wait_seconds_sum"] > 0
    assert after["batch_run_seconds_count"] == calls and after["batch_run_seconds_sum"] > 0


def test_small_feature_and_text_inputs_skip_the_decode_threads(sqlite_service, reference, monkeypatch):
    """Checked on the event loop when cheaper than a thread hop; media and large feature inputs still go to a
    decode thread, and only those are announced to the batcher as coming (one checked on the loop, announced, made
    a batch being gathered wait for it). The answers are the runtime's either way."""
    pool = sqlite_service.state.decode_pool
    handed: list[str] = []
    submit = pool.submit
    monkeypatch.setattr(pool, "submit", lambda fn, *args: handed.append(fn.__name__) or submit(fn, *args))
    state = sqlite_service.state
    for batcher in [*state.encoders.values(), *state.retrievers.values()]:
        monkeypatch.setattr(batcher, "coming", lambda coming=batcher.coming: handed.append("coming") or coming())
    cases = [
        ("audio", [{"features": random_features("audio", 7).tolist()}], []),
        ("text", [{"text": "one two three"}], []),
        ("audio", [{"audio_b64": b64(wav_bytes())}], ["coming", "prepare"]),
        # 52 inputs of [10, 128] hold 66,560 numbers, past INLINE_PREPARE_SIZE (rounded: the body stays under 1 MB)
        ("audio", [{"features": np.round(random_features("audio", 200 + i).astype(np.float64), 2).tolist()} for i in range(52)],
         ["coming", "prepare"]),
    ]
    for modality, inputs, threads in cases:
        handed.clear()
        r = post(sqlite_service, "/encode", {"modality": modality, "inputs": inputs})
        assert r.status_code == 200, r.text
        assert handed == threads, (modality, len(inputs))
        want = expected(reference, modality, inputs)
        assert [item["layer1"] for item in r.json()["items"]] == want["layer1"].tolist()
    for query, threads in (({"features": random_features("audio", 7).tolist()}, []),
                           ({"audio_b64": b64(wav_bytes())}, ["coming", "prepare"])):  # a /retrieve query: the same split
        handed.clear()
        r = post(sqlite_service, "/retrieve", {"query": {"modality": "audio", **query}, "target": "video"})
        assert r.status_code == 200, r.text
        assert handed == threads, query.keys()


# -- errors ---------------------------------------------------------------------------------------------------
def _nan_features() -> str:
    x = random_features("audio", 3).tolist()
    x[2][5] = float("nan")
    return json.dumps({"modality": "audio", "inputs": [{"features": x}]})  # json.dumps writes NaN


BAD_REQUESTS = [
    ("wrong modality name", {"modality": "smell", "inputs": [{"text": "one"}]}, 422, "invalid_request"),
    ("input of another modality", {"modality": "audio", "inputs": [{"text": "one"}]}, 400, "wrong_modality"),
    ("frames for audio", {"modality": "audio", "inputs": [{"frames_b64": ["AAAA"]}]}, 400, "wrong_modality"),
    ("bad base64", {"modality": "audio", "inputs": [{"audio_b64": "not base64!!"}]}, 400, "bad_base64"),
    ("corrupt wav", {"modality": "audio", "inputs": [{"audio_b64": b64(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")}]},
     400, "bad_media"),
    ("corrupt png", {"modality": "video", "inputs": [{"frames_b64": [b64(b"\x89PNG\r\n\x1a\nbroken")]}]}, 400, "bad_media"),
    ("decompression bomb png", {"modality": "video", "inputs": [{"frames_b64": [b64(png_claiming(30000, 30000))]}]},
     400, "bad_media"),
    ("frame too large", {"modality": "video", "inputs": [{"frames_b64": [b64(png_claiming(5000, 5000))]}]},
     400, "bad_media"),
    ("audio at 1 Hz", {"modality": "audio", "inputs": [{"audio_b64": b64(wav_bytes(rate=1000, seconds=1.0)
                                                                         .replace(b"\xe8\x03\x00\x00", b"\x01\x00\x00\x00", 1))}]},
     400, "bad_media"),
    ("corrupt mp4", {"modality": "video", "inputs": [{"video_b64": b64(b"\x00\x00\x00\x18ftypmp42 broken")}]},
     400, "bad_media"),
    ("wrong feature shape", {"modality": "audio", "inputs": [{"features": [[0.0] * 64] * 10}]}, 400, "bad_features"),
    ("ragged features", {"modality": "audio", "inputs": [{"features": [[0.0] * 128, [0.0]]}]}, 400, "bad_features"),
    ("string features", {"modality": "audio", "inputs": [{"features": [["a"] * 128] * 10}]}, 400, "bad_features"),
    ("boolean features", {"modality": "audio", "inputs": [{"features": [[True] * 128] * 10}]}, 400, "bad_features"),
    ("a list for a number in features", {"modality": "audio", "inputs": [{"features": [[[0.0]] + [0.0] * 127] * 10}]},
     400, "bad_features"),
    ("features_b64 of the wrong length", {"modality": "audio", "inputs": [{"features_b64": b64(bytes(4 * 1279))}]},
     400, "bad_features"),
    ("features_b64 of float64", {"modality": "audio", "inputs": [{"features_b64": b64(bytes(8 * 1280))}]},
     400, "bad_features"),
    ("features_b64 not base64", {"modality": "audio", "inputs": [{"features_b64": "***"}]}, 400, "bad_base64"),
    ("empty features_b64", {"modality": "audio", "inputs": [{"features_b64": ""}]}, 400, "empty_input"),
    ("features and features_b64", {"modality": "audio", "inputs": [{"features": [[0.0] * 128] * 10,
                                                                     "features_b64": b64(bytes(4 * 1280))}]},
     422, "invalid_request"),
    ("mask without features", {"modality": "text", "inputs": [{"text": "one", "mask": [True]}]}, 422, "invalid_request"),
    ("empty inputs", {"modality": "text", "inputs": []}, 422, "invalid_request"),
    ("empty text", {"modality": "text", "inputs": [{"text": "   "}]}, 400, "empty_input"),
    ("empty base64", {"modality": "audio", "inputs": [{"audio_b64": ""}]}, 400, "empty_input"),
    ("no frames", {"modality": "video", "inputs": [{"frames_b64": []}]}, 400, "empty_input"),
    ("two input fields", {"modality": "text", "inputs": [{"text": "one", "audio_b64": "AAAA"}]}, 422, "invalid_request"),
    ("no input field", {"modality": "text", "inputs": [{}]}, 422, "invalid_request"),
    ("too many inputs", {"modality": "text", "inputs": [{"text": "one"}] * 65}, 400, "too_many_inputs"),
]


@pytest.mark.parametrize("name,body,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_encode_requests_get_json_errors(sqlite_service, name, body, status, code):
    assert_error(post(sqlite_service, "/encode", body), status, code)


def test_oversized_video_frames_get_400_before_decoding(sqlite_service, monkeypatch):
    monkeypatch.setattr("srcid.service.media.MAX_FRAME_PIXELS", 32 * 32 - 1)  # mp4_bytes() makes 32 x 32 frames
    r = post(sqlite_service, "/encode", {"modality": "video", "inputs": [{"video_b64": b64(mp4_bytes())}]})
    assert "32 x 32 pixels" in assert_error(r, 400, "bad_media")["message"]


def test_nan_features_get_400(sqlite_service):
    r = httpx.post(sqlite_service.url + "/encode", content=_nan_features(), headers={"content-type": "application/json"})
    assert "NaN" in assert_error(r, 400, "bad_features")["message"]


def test_nan_in_float32_bytes_gets_400(sqlite_service):
    x = random_features("audio", 3)
    x[4, 17] = np.inf
    r = post(sqlite_service, "/encode", {"modality": "audio", "inputs": [{"features_b64": b64(x.tobytes())}]})
    assert "NaN/inf" in assert_error(r, 400, "bad_features")["message"]


@pytest.mark.parametrize("path", ["/encode", "/retrieve", "/items"])
def test_not_json_an_empty_body_and_a_body_not_an_object(sqlite_service, path):
    """The same answers from the lean JSON routes (/encode, /retrieve) as from FastAPI's own path (/items)."""
    def send(content: bytes) -> httpx.Response:
        return httpx.post(sqlite_service.url + path, content=content, headers={"content-type": "application/json", **AUTH})

    assert_error(send(b"{not json"), 400, "invalid_json")
    assert_error(send(b'{"modality": "text", "inputs": [{"text": "\xc3("}]}'), 400, "invalid_json")  # not UTF-8
    deep = b'{"modality": "audio", "inputs": [{"features": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    assert_error(send(deep), 400, "invalid_json")  # deeper than orjson and Python's json parse
    assert assert_error(send(b""), 422, "invalid_request")["message"] == "body: Field required"
    for not_an_object in (b"[]", b"null", b'"text"', b"3"):
        assert assert_error(send(not_an_object), 422, "invalid_request")["message"].startswith(
            "body: Input should be a valid dictionary")


def test_a_json_body_route_refuses_an_endpoint_it_cannot_call():
    router = APIRouter(route_class=JSONBodyRoute)

    async def takes_a_dict(body: dict, state: object) -> None: ...

    async def no_state(body: EncodeRequest) -> None: ...

    async def fits(body: EncodeRequest, state: object) -> None: ...

    router.add_api_route("/fits", fits, methods=["POST"])
    for endpoint in (takes_a_dict, no_state):
        with pytest.raises(TypeError, match="JSONBodyRoute endpoint"):
            router.add_api_route("/x", endpoint, methods=["POST"])


def test_encode_and_retrieve_are_answered_in_front_of_the_framework(sqlite_service, monkeypatch):
    """POSTs to /encode and /retrieve, good or bad, never reach FastAPI's middleware and routing; others do."""
    guard, reached = sqlite_service.app.guard, []
    framework = guard.app

    async def recording(scope, receive, send):
        reached.append(scope["path"])
        await framework(scope, receive, send)

    monkeypatch.setattr(guard, "app", recording)
    text = {"modality": "text", "text": "one two"}
    assert post(sqlite_service, "/encode", {"modality": "text", "inputs": [{"text": "one two"}]}).status_code == 200
    assert post(sqlite_service, "/retrieve", {"query": text, "target": "audio"}).status_code == 200
    assert_error(post(sqlite_service, "/encode", {"modality": "smell", "inputs": [{"text": "one"}]}), 422)
    assert_error(post(sqlite_service, "/retrieve", {"query": {"item_id": "nobody"}, "target": "audio"}), 404)
    assert httpx.get(sqlite_service.url + "/healthz").status_code == 200
    assert_error(httpx.get(sqlite_service.url + "/encode"), 405)
    assert reached == ["/healthz", "/encode"]


def test_encode_and_retrieve_answer_the_same_through_the_framework(sqlite_service, monkeypatch):
    """Where Guard leaves a POST to FastAPI (an app under a root path, say), the route's own handler gives the same
    answers as Guard does."""
    encode = {"modality": "text", "inputs": [{"text": "one two"}], "return_embedding": True}
    retrieve = {"query": {"modality": "text", "text": "one two"}, "target": "audio"}
    direct = [post(sqlite_service, path, body) for path, body in (("/encode", encode), ("/retrieve", retrieve))]
    guard, reached = sqlite_service.app.guard, []
    app = guard.app

    async def recording(scope, receive, send):
        reached.append(scope["path"])
        await app(scope, receive, send)

    monkeypatch.setattr(guard, "direct", {})
    monkeypatch.setattr(guard, "app", recording)
    framework = [post(sqlite_service, path, body) for path, body in (("/encode", encode), ("/retrieve", retrieve))]
    assert reached == ["/encode", "/retrieve"]
    for a, b in zip(direct, framework):
        assert a.status_code == b.status_code == 200 and a.json() == b.json()
        assert b.headers["content-type"] == "application/json"
    assert conforms(EncodeResponse, framework[0].json()) and conforms(RetrieveResponse, framework[1].json())


def test_unknown_routes(sqlite_service):
    assert_error(httpx.get(sqlite_service.url + "/nowhere"), 404, "not_found")
    assert_error(httpx.get(sqlite_service.url + "/encode"), 405, "method_not_allowed")


def test_curl_style_form_content_type_is_read_as_json(sqlite_service):
    r = httpx.post(sqlite_service.url + "/encode", content=json.dumps({"modality": "text", "inputs": [{"text": "one"}]}),
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


def test_body_too_large_gets_413(sqlite_service):
    big = {"modality": "text", "inputs": [{"text": "one " * (300_000)}]}  # ~1.2 MB > the 1 MB limit
    assert_error(post(sqlite_service, "/encode", big), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(20):
            yield b" " * 100_000

    r = httpx.post(sqlite_service.url + "/encode", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    assert post(sqlite_service, "/encode", {"modality": "text", "inputs": [{"text": "still fine"}]}).status_code == 200


# -- /items and /retrieve -------------------------------------------------------------------------------------
def _item(item_id: str, modality: str, seed: int, **meta) -> dict:
    return {"id": item_id, "modality": modality, "features": random_features(modality, seed).tolist(), "metadata": meta}


def test_writes_need_the_api_key(sqlite_service):
    body = {"items": [_item("k1", "audio", 1)]}
    assert_error(post(sqlite_service, "/items", body), 401, "unauthorized")
    assert_error(post(sqlite_service, "/items", body, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_error(post(sqlite_service, "/items", body, headers={"Authorization": SERVICE_API_KEY}), 401)
    assert_error(httpx.delete(sqlite_service.url + "/items/k1"), 401, "unauthorized")
    assert post(sqlite_service, "/items", body, headers=AUTH).status_code == 201
    assert httpx.get(sqlite_service.url + "/items/k1").status_code == 200  # reads need no key
    assert httpx.delete(sqlite_service.url + "/items/k1", headers=AUTH).json() == {"deleted": "k1"}


def test_items_round_trip_and_retrieve(sqlite_service, reference):
    items = [_item(f"a{i}", "audio", 10 + i, n=i) for i in range(5)] + [_item(f"v{i}", "video", 20 + i) for i in range(3)]
    items.append({"id": "t/0", "modality": "text", "text": "seven three", "metadata": {"word": "seven"}})
    r = post(sqlite_service, "/items", {"items": items}, headers=AUTH)
    assert r.status_code == 201 and r.json() == {"added": [it["id"] for it in items]}

    got = httpx.get(sqlite_service.url + "/items/a3", params={"embedding": "true"}).json()
    want = expected(reference, "audio", [{"features": items[3]["features"]}])
    assert got["id"] == "a3" and got["modality"] == "audio" and got["metadata"] == {"n": 3}
    assert got["codes"] == {"layer1": want["layer1"][0].tolist(), "layer2": want["layer2"][0].tolist()}
    np.testing.assert_allclose(got["embedding"], want["embedding"][0], atol=1e-5)
    assert httpx.get(sqlite_service.url + "/items/t%2F0").json()["metadata"] == {"word": "seven"}

    # By content: the item's own features come back first with cosine ~1; scores are sorted.
    r = post(sqlite_service, "/retrieve", {"query": {"modality": "audio", "features": items[3]["features"]},
                                           "target": "audio", "top_k": 3})
    results = r.json()["results"]
    assert r.status_code == 200 and len(results) == 3 and conforms(RetrieveResponse, r.json())
    assert results[0]["id"] == "a3" and results[0]["score"] > 0.999 and results[0]["metadata"] == {"n": 3}
    assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)
    assert all(x["modality"] == "audio" for x in results)

    # By item id, across modalities: exactly the exact-search ranking of the stored embedding.
    r = post(sqlite_service, "/retrieve", {"query": {"item_id": "a3"}, "target": "video", "top_k": 10})
    assert conforms(RetrieveResponse, r.json())
    video = [x["id"] for x in r.json()["results"]]
    vecs = {f"v{i}": expected(reference, "video", [{"features": items[5 + i]["features"]}])["embedding"][0] for i in range(3)}
    assert video == sorted(vecs, key=lambda k: -float(vecs[k] @ want["embedding"][0]))
    # ... and never the query item itself.
    r = post(sqlite_service, "/retrieve", {"query": {"item_id": "a3"}, "target": "audio", "top_k": 10})
    assert "a3" not in [x["id"] for x in r.json()["results"]] and len(r.json()["results"]) == 4

    assert_error(post(sqlite_service, "/items", {"items": [_item("a1", "audio", 99)]}, headers=AUTH), 409, "duplicate_id")
    assert httpx.delete(sqlite_service.url + "/items/a3", headers=AUTH).status_code == 200
    assert_error(httpx.get(sqlite_service.url + "/items/a3"), 404, "not_found")
    assert_error(httpx.delete(sqlite_service.url + "/items/a3", headers=AUTH), 404, "not_found")
    r = post(sqlite_service, "/retrieve", {"query": {"modality": "audio", "features": items[3]["features"]},
                                           "target": "audio", "top_k": 10})
    assert "a3" not in [x["id"] for x in r.json()["results"]]


def _batcher_counts(server, name: str) -> tuple[float, float]:
    """(calls, rows) of a batcher so far, from /metrics."""
    line = metric_values(server)
    return tuple(line.get(f'srcid_batch_rows_{part}{{batcher="{name}"}}', 0.0) for part in ("count", "sum"))


def test_concurrent_retrieves_of_every_kind_share_a_batch_and_equal_their_single_answers(sqlite_service):
    """A /retrieve batch takes queries by features of two modalities, by text and by item id together, encodes
    them in the same thread call that searches, and answers each as if it had come alone; an unknown item in the
    batch fails alone (404)."""
    items = [_item(f"rb{i}", "audio", 300 + i, n=i) for i in range(12)] + [_item(f"rbv{i}", "video", 320 + i) for i in range(4)]
    assert post(sqlite_service, "/items", {"items": items}, headers=AUTH).status_code == 201
    queries = ([{"modality": "audio", "features": random_features("audio", 400 + i).tolist()} for i in range(6)]
               + [{"modality": "video", "features": random_features("video", 420 + i).tolist()} for i in range(4)]
               + [{"modality": "text", "text": word} for word in ("one", "seven two", "nine")]
               + [{"item_id": f"rbv{i}"} for i in range(4)] + [{"item_id": "rb3"}, {"item_id": "no-such-item"}])
    bodies = [{"query": q, "target": "audio", "top_k": 5} for q in queries]
    single = [post(sqlite_service, "/retrieve", body) for body in bodies]
    assert [r.status_code for r in single] == [200] * (len(bodies) - 1) + [404]
    assert "rb3" not in [x["id"] for x in single[-2].json()["results"]]  # a query by item leaves that item out
    # ... also at the largest top_k, where asking the index for one more would pass its limit.
    largest = post(sqlite_service, "/retrieve", {"query": {"item_id": "rb3"}, "target": "audio", "top_k": 1000})
    assert largest.status_code == 200, largest.text
    assert "rb3" not in [x["id"] for x in largest.json()["results"]] and len(largest.json()["results"]) >= 11
    calls, rows = _batcher_counts(sqlite_service, "retrieve-audio")
    encodes = [_batcher_counts(sqlite_service, f"encode-{m}") for m in ("audio", "video", "text")]

    together = post_concurrently(sqlite_service.url, "/retrieve", bodies)
    assert [r.status_code for r in together] == [r.status_code for r in single]
    for alone, batched in zip(single, together):
        if alone.status_code != 200:
            assert batched.json()["error"]["code"] == alone.json()["error"]["code"] == "not_found"
            continue
        a, b = alone.json()["results"], batched.json()["results"]
        assert len(a) == 5 and [x["id"] for x in b] == [x["id"] for x in a]
        assert [x["metadata"] for x in b] == [x["metadata"] for x in a]
        np.testing.assert_allclose([x["score"] for x in b], [x["score"] for x in a], atol=1e-5)
    now_calls, now_rows = _batcher_counts(sqlite_service, "retrieve-audio")
    assert now_rows - rows == len(bodies)
    assert now_calls - calls < len(bodies), "no two concurrent queries shared a batch"
    # The queries were encoded inside the retrieve batches, not handed to /encode's batchers.
    assert [_batcher_counts(sqlite_service, f"encode-{m}") for m in ("audio", "video", "text")] == encodes


def test_a_retrieve_query_without_direction_fails_alone(sqlite_service, monkeypatch):
    """A query whose embedding is zero or NaN (a degenerate encoding) gets 400 `bad_embedding`; the other queries
    of its batch get the answers they get alone."""
    items = [_item(f"dz{i}", "audio", 500 + i) for i in range(6)]
    assert post(sqlite_service, "/items", {"items": items}, headers=AUTH).status_code == 201
    good = [{"query": {"modality": "audio", "features": random_features("audio", 520 + i).tolist()}, "target": "audio",
             "top_k": 3} for i in range(6)]
    alone = [post(sqlite_service, "/retrieve", body).json()["results"] for body in good]
    degenerate = ([{"query": {"modality": "video", "features": random_features("video", 540 + i).tolist()},
                    "target": "audio"} for i in range(3)]
                  + [{"query": {"modality": "text", "text": word}, "target": "audio"} for word in ("one", "two", "six")])
    state = sqlite_service.state
    encode_batch, retrieve_batch = state._encode_batch, state._retrieve_batch
    mixed = []

    def broken_encoder(modality, jobs):  # video encodes to zero vectors, text to NaN
        out = encode_batch(modality, jobs)
        for o in out:
            if modality != "audio" and not isinstance(o, Exception):
                o["embedding"] = np.full_like(o["embedding"], 0.0 if modality == "video" else np.nan)
        return out

    def recording(target, queries):
        mixed.append(len({q.job.modality for q in queries if q.job is not None}) > 1)
        return retrieve_batch(target, queries)

    monkeypatch.setattr(state, "_encode_batch", broken_encoder)
    monkeypatch.setattr(state, "_retrieve_batch", recording)

    for _ in range(5):  # until one batch held queries of both kinds
        answers = post_concurrently(sqlite_service.url, "/retrieve", good + degenerate)
        for a, want in zip(answers[: len(good)], alone):
            assert a.status_code == 200, a.text
            assert [x["id"] for x in a.json()["results"]] == [x["id"] for x in want]
            np.testing.assert_allclose([x["score"] for x in a.json()["results"]], [x["score"] for x in want], atol=1e-5)
        for a in answers[len(good):]:
            assert "no direction" in assert_error(a, 400, "bad_embedding")["message"]
        if any(mixed):
            break
    assert any(mixed), "no batch held a degenerate query with good ones"


BAD_RETRIEVES = [
    ("unknown item", {"query": {"item_id": "no-such-item"}, "target": "audio"}, 404, "not_found"),
    ("unknown target", {"query": {"item_id": "x"}, "target": "smell"}, 422, "invalid_request"),
    ("top_k 0", {"query": {"item_id": "x"}, "target": "audio", "top_k": 0}, 422, "invalid_request"),
    ("no modality", {"query": {"text": "one"}, "target": "audio"}, 422, "invalid_request"),
    ("id and input", {"query": {"item_id": "x", "modality": "text", "text": "one"}, "target": "audio"}, 422, None),
    ("bad query media", {"query": {"modality": "audio", "audio_b64": "%%%"}, "target": "text"}, 400, "bad_base64"),
]


@pytest.mark.parametrize("name,body,status,code", BAD_RETRIEVES, ids=[b[0] for b in BAD_RETRIEVES])
def test_bad_retrieve_requests(sqlite_service, name, body, status, code):
    assert_error(post(sqlite_service, "/retrieve", body), status, code)


def test_bad_items(sqlite_service):
    bad_meta = _item("m1", "audio", 1)
    bad_meta["metadata"] = {"x": float("nan")}
    r = httpx.post(sqlite_service.url + "/items", content=json.dumps({"items": [bad_meta]}),
                   headers={**AUTH, "content-type": "application/json"})
    assert_error(r, 400, "bad_item")
    assert_error(post(sqlite_service, "/items", {"items": []}, headers=AUTH), 422)
    assert_error(post(sqlite_service, "/items", {"items": [{**_item("m2", "audio", 1), "modality": "text"}]},
                      headers=AUTH), 400, "bad_features")
    assert_error(httpx.get(sqlite_service.url + "/items/m1"), 404)  # nothing of a refused add was written
