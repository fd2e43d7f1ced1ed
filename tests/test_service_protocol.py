"""The HTTP protocol `srcid serve` gives uvicorn (srcid.service.protocol): POSTs to /encode and /retrieve answered
without uvicorn's ASGI cycle give the answers uvicorn's own protocol gives, and HTTP/1.1 around them (pipelining,
keep-alive, HTTP/1.0, bodies in pieces, Expect: 100-continue, chunked bodies, disconnects) still works. Real
uvicorn servers on free ports, one with each protocol, over real sockets."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from test_service_support import ThreadServer, random_features

LIMIT = 200_000  # bytes of body: room for a body past uvicorn's 64 KiB read pause, and one over the limit


def features(modality: str, seed: int) -> list:
    return random_features(modality, seed).tolist()


ENCODE = {"modality": "audio", "inputs": [{"features": features("audio", 1)}, {"features": features("audio", 2)}]}
ENCODE_RAW = json.dumps(ENCODE).encode()


@pytest.fixture(scope="module")
def servers(service_bundle, tmp_path_factory):
    """{"stock": uvicorn's httptools protocol, "direct": srcid's}, each with the same two catalog items."""
    started = {}
    for name, http in (("stock", "httptools"), ("direct", None)):
        started[name] = ThreadServer(http=http, bundle=service_bundle, data_dir=tmp_path_factory.mktemp(name),
                                     max_body_bytes=LIMIT, batch_wait_ms=2).start()
    items = [{"id": f"clip-{i}", "modality": "audio", "features": features("audio", 10 + i), "metadata": {"i": i}}
             for i in range(2)]
    try:
        for server in started.values():
            assert httpx.post(server.url + "/items", json={"items": items}, timeout=60).status_code == 201
        yield started
    finally:
        for server in started.values():
            server.stop()


def _nan_body() -> bytes:
    x = random_features("audio", 3)
    x[4, 7] = float("nan")
    return json.dumps({"modality": "audio", "inputs": [{"features": x.tolist()}]}).encode()  # NaN literal


CASES = {
    "encode": ("/encode", ENCODE_RAW),
    "encode with embedding": ("/encode", json.dumps({**ENCODE, "return_embedding": True}).encode()),
    "not JSON": ("/encode", b'{"modality": "audio", "inputs": ['),
    "no body": ("/encode", b""),
    "no inputs": ("/encode", b'{"modality": "audio", "inputs": []}'),
    "NaN": ("/encode", _nan_body()),
    "wrong shape": ("/encode", json.dumps({"modality": "audio", "inputs": [
        {"features": random_features("audio", 4)[:, :100].tolist()}]}).encode()),
    "unknown modality": ("/encode", b'{"modality": "smell", "inputs": [{"text": "one"}]}'),
    "padded past 64 KiB": ("/encode", ENCODE_RAW + b" " * 100_000),
    "over the limit": ("/encode", ENCODE_RAW + b" " * LIMIT),
    "a query string": ("/encode?pretty=1", ENCODE_RAW),
    "retrieve": ("/retrieve", json.dumps({"query": {"modality": "audio", "features": features("audio", 5)},
                                          "target": "audio", "top_k": 2}).encode()),
    "retrieve by id": ("/retrieve", b'{"query": {"item_id": "clip-1"}, "target": "audio", "top_k": 1}'),
    "retrieve an unknown id": ("/retrieve", b'{"query": {"item_id": "nope"}, "target": "audio"}'),
    "retrieve top_k 0": ("/retrieve", b'{"query": {"modality": "text", "text": "one"}, "target": "audio", "top_k": 0}'),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_answers_equal_uvicorns_own(servers, case):
    path, body = CASES[case]
    answers = {name: httpx.post(s.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
               for name, s in servers.items()}
    stock, direct = answers["stock"], answers["direct"]
    # A catalog error names the server's own catalog file.
    content = {name: a.content.replace(str(servers[name].settings.data_dir).encode(), b"DATA")
               for name, a in answers.items()}
    assert (direct.status_code, content["direct"]) == (stock.status_code, content["stock"])
    for header in ("content-type", "server"):
        assert direct.headers.get(header) == stock.headers.get(header), header
    assert int(direct.headers["content-length"]) == len(direct.content) and "date" in direct.headers
    assert stock.status_code == {"encode": 200, "encode with embedding": 200, "not JSON": 400, "no body": 422,
                                 "no inputs": 422, "NaN": 400, "wrong shape": 400, "unknown modality": 422,
                                 "padded past 64 KiB": 200, "over the limit": 413, "a query string": 200,
                                 "retrieve": 200, "retrieve by id": 200, "retrieve an unknown id": 404,
                                 "retrieve top_k 0": 422}[case]


def _connect(server: ThreadServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _request(path: str, body: bytes | None = None, version: str = "1.1", extra: str = "") -> bytes:
    if body is None:
        return f"GET {path} HTTP/{version}\r\nHost: t\r\n{extra}\r\n".encode()
    return (f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def _read(reader) -> tuple[int, dict[str, str], bytes]:
    """One response from a socket's reader: status, headers (lower-case names), body (by Content-Length)."""
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers.get("content-length", 0)))


def _encode_answer(server: ThreadServer) -> bytes:
    r = httpx.post(server.url + "/encode", content=ENCODE_RAW, timeout=60)
    assert r.status_code == 200
    return r.content


def test_pipelined_requests_are_answered_in_order(servers):
    server = servers["direct"]
    expected = _encode_answer(server)
    burst = [_request("/encode", ENCODE_RAW), _request("/healthz"), _request("/encode", b"{"),
             _request("/encode", ENCODE_RAW), _request("/retrieve", b'{"query": {"item_id": "clip-0"}, "target": '
                                                                     b'"audio", "top_k": 1}')]
    with _connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(b"".join(burst))  # one write: the server parses them all before answering the first
        got = [_read(reader) for _ in burst]
    assert [status for status, _, _ in got] == [200, 200, 400, 200, 200]
    assert got[0][2] == got[3][2] == expected
    assert json.loads(got[1][2])["status"] == "alive"
    assert json.loads(got[4][2])["results"][0]["id"] == "clip-1"


def test_keep_alive_and_http_1_0(servers):
    server = servers["direct"]
    expected = _encode_answer(server)
    with _connect(server) as sock, sock.makefile("rb") as reader:
        for _ in range(3):  # one connection, several requests
            sock.sendall(_request("/encode", ENCODE_RAW))
            status, headers, body = _read(reader)
            assert (status, body) == (200, expected) and headers.get("connection") != "close"
        sock.sendall(_request("/encode", ENCODE_RAW, extra="Connection: close\r\n"))
        status, headers, body = _read(reader)
        assert (status, headers.get("connection"), body) == (200, "close", expected)
        assert reader.read() == b""  # and the server closed it
    with _connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(_request("/encode", ENCODE_RAW, version="1.0"))
        status, headers, body = _read(reader)
        assert (status, headers.get("connection"), body) == (200, "close", expected)
        assert reader.read() == b""


def test_a_body_in_pieces_and_after_100_continue(servers):
    server = servers["direct"]
    padded = ENCODE_RAW + b" " * 100_000  # past uvicorn's 64 KiB, where it stops reading until the body is taken
    expected = _encode_answer(server)
    with _connect(server) as sock, sock.makefile("rb") as reader:
        raw = _request("/encode", padded)
        head = raw.index(b"\r\n\r\n") + 4
        sock.sendall(raw[:head])  # the head alone, then the body in pieces
        for start in range(head, len(raw), 30_000):
            time.sleep(0.05)
            sock.sendall(raw[start : start + 30_000])
        status, _, body = _read(reader)
        assert (status, body) == (200, expected)
    with _connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(_request("/encode", b"", extra="Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(ENCODE_RAW)))
        assert reader.readline().startswith(b"HTTP/1.1 100")
        assert reader.readline() == b"\r\n"
        sock.sendall(ENCODE_RAW)
        status, _, body = _read(reader)
        assert (status, body) == (200, expected)


def test_a_chunked_body(servers):
    server = servers["direct"]

    def chunks():
        for start in range(0, len(ENCODE_RAW), 4096):
            yield ENCODE_RAW[start : start + 4096]

    # httpx sends a generator's body as Transfer-Encoding: chunked
    r = httpx.post(server.url + "/encode", content=chunks(), timeout=60)
    assert r.status_code == 200 and r.content == _encode_answer(server)


def _encodes_counted(server: ThreadServer, status: int) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    wanted = ("srcid_requests_total{", 'route="/encode"', f'status="{status}"')
    line = next((x for x in text.splitlines() if all(part in x for part in wanted)), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_a_client_gone_mid_body_and_the_metrics(servers):
    server = servers["direct"]
    ok, bad = _encodes_counted(server, 200), _encodes_counted(server, 400)
    with _connect(server) as sock:  # leaves after half its body: nobody to answer, nothing counted
        sock.sendall(_request("/encode", ENCODE_RAW)[: len(ENCODE_RAW) // 2])
    for _ in range(3):
        assert httpx.post(server.url + "/encode", content=ENCODE_RAW, timeout=60).status_code == 200
    assert httpx.post(server.url + "/encode", content=b"{", timeout=60).status_code == 400
    assert _encodes_counted(server, 200) - ok == 3 and _encodes_counted(server, 400) - bad == 1


def test_which_requests_take_the_direct_way(servers, monkeypatch):
    from srcid.service import protocol

    taken = []
    init = protocol.DirectCycle.__init__

    def spying(self, *args, **kwargs):
        init(self, *args, **kwargs)
        taken.append(self.route.path)

    monkeypatch.setattr(protocol.DirectCycle, "__init__", spying)
    server = servers["direct"]
    for path, body in [CASES["encode"], CASES["retrieve"], CASES["a query string"], CASES["over the limit"],
                       ("/items", b'{"items": []}')]:
        httpx.post(server.url + path, content=body, timeout=60)
    httpx.get(server.url + "/healthz")
    with _connect(server) as sock, sock.makefile("rb") as reader:  # HTTP/1.0 too
        sock.sendall(_request("/retrieve", CASES["retrieve"][1], version="1.0"))
        assert _read(reader)[0] == 200
    assert taken == ["/encode", "/retrieve", "/retrieve"]


def test_worker_processes_find_the_guard():
    """`srcid serve --workers N` has each worker load the app from its factory; the protocol finds its Guard there."""
    import uvicorn

    from srcid.service.app import ServiceApp
    from srcid.service.protocol import _guard_of

    config = uvicorn.Config("srcid.service.app:create_app", factory=True)
    config.load()
    app = config.loaded_app
    while not isinstance(app, ServiceApp):
        app = app.app
    assert app is not config.loaded_app and _guard_of(config.loaded_app) is app.guard
    assert _guard_of(lambda scope, receive, send: None) is None


def test_a_request_left_unanswered_closes_its_connection(servers, monkeypatch):
    """An error while answering (here a Guard that raises) must not leave the client waiting, nor let the next answer on
    the connection be taken for this request's: the server closes the connection, and serves the next one."""
    server = servers["direct"]

    async def broken(route, body):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(server.app.guard, "direct_answer", broken)
    with _connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(_request("/encode", ENCODE_RAW) + _request("/healthz"))
        assert reader.read() == b""  # closed, with no answer to either
    monkeypatch.undo()
    assert httpx.post(server.url + "/encode", content=ENCODE_RAW, timeout=60).status_code == 200
