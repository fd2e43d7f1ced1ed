"""Schemathesis against /openapi.json of a real server: generated requests to every operation (with the API key,
so writes are exercised too) never get a 5xx, and every error answer has the error JSON shape; and arbitrary
bytes as a body to the JSON routes, which the schema does not describe."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_service_support import ThreadServer

KEY = "fuzz-key"
EXAMPLES = 25  # per operation; about 40 s in all on the 2-core dev machine


@pytest.fixture(scope="module")
def fuzz_service(service_bundle, tmp_path_factory):
    """Its own server, so that generated deletes cannot touch other tests' items."""
    server = ThreadServer(bundle=service_bundle, data_dir=tmp_path_factory.mktemp("fuzz"), api_key=KEY,
                          max_body_bytes=1 << 20).start()
    yield server
    server.stop()


def _operations(url: str) -> dict:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_schema_lists_every_endpoint(fuzz_service):
    assert set(_operations(fuzz_service.url)) == {
        "POST /encode", "POST /retrieve", "POST /items", "GET /items/{item_id}", "DELETE /items/{item_id}",
        "GET /healthz", "GET /readyz", "GET /metrics",
    }


@pytest.mark.parametrize("operation", ["POST /encode", "POST /retrieve", "POST /items", "GET /items/{item_id}",
                                       "DELETE /items/{item_id}", "GET /readyz"])
def test_no_server_errors(fuzz_service, operation):
    op = _operations(fuzz_service.url)[operation]

    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call(base_url=fuzz_service.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)

    check()


@pytest.mark.parametrize("path", ["/encode", "/retrieve", "/items"])
def test_arbitrary_bytes_as_a_body_get_a_json_4xx(fuzz_service, path):
    """Bodies schemathesis does not make (not JSON, not UTF-8, JSON of any shape): never a 5xx, always the error
    shape; /encode and /retrieve are answered in front of FastAPI, /items through it."""
    json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=12)
    bodies = st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode())

    @given(body=bodies)
    @settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(body: bytes):
        r = httpx.post(fuzz_service.url + path, content=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
        assert 400 <= r.status_code < 500, f"{body!r} -> {r.status_code}: {r.text[:300]}"
        error = r.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)

    check()
