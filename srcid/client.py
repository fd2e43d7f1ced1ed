"""Python clients of the srcid HTTP API (docs/SERVICE.md): `Client` (sync) and `AsyncClient`, both on httpx.

    from srcid.client import Client, audio_input, text_input
    with Client("http://127.0.0.1:8000") as c:
        codes = c.encode("text", [text_input("seven")])
        hits = c.retrieve({"modality": "text", "text": "seven"}, target="audio", top_k=3)

Every non-2xx answer raises `SrcidError` with the HTTP `status`, the service's error `code` and `message`.
"""

from __future__ import annotations

import base64
from urllib.parse import quote
from pathlib import Path
from typing import Any, Sequence

import httpx

Input = dict[str, Any]


class SrcidError(Exception):
    """An error answer of the service: `status` (HTTP), `code` (e.g. "bad_base64", "not_found"), `message`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _b64(source: str | Path | bytes) -> str:
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    return base64.b64encode(data).decode()


def text_input(text: str) -> Input:
    return {"text": text}


def audio_input(source: str | Path | bytes) -> Input:
    """A WAV/FLAC/OGG file (path or bytes)."""
    return {"audio_b64": _b64(source)}


def video_input(source: str | Path | bytes) -> Input:
    """An MP4/WebM file (path or bytes)."""
    return {"video_b64": _b64(source)}


def frames_input(sources: Sequence[str | Path | bytes]) -> Input:
    """PNG/JPEG frames, one per second."""
    return {"frames_b64": [_b64(s) for s in sources]}


def features_input(features: Any, mask: Sequence[bool] | None = None) -> Input:
    """Precomputed features [T][D...], with a mask [T] for masked modalities. A numpy array travels as float32
    bytes (`features_b64`: 5.3 characters a number against 8-20 in JSON, and no numbers for the server to parse);
    a nested list as is."""
    if hasattr(features, "astype"):
        out: Input = {"features_b64": base64.b64encode(features.astype("<f4", order="C").tobytes()).decode()}
    else:
        out = {"features": features}
    if mask is not None:
        out["mask"] = [bool(m) for m in mask]
    return out


def _answer(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise SrcidError(response.status_code, code, message)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _Requests:
    """The request bodies of each call, shared by both clients."""

    @staticmethod
    def encode(modality: str, inputs: Sequence[Input], return_embedding: bool) -> dict:
        return {"modality": modality, "inputs": list(inputs), "return_embedding": return_embedding}

    @staticmethod
    def retrieve(query: Input | str, target: str, top_k: int) -> dict:
        q = {"item_id": query} if isinstance(query, str) else query
        return {"query": q, "target": target, "top_k": top_k}

    @staticmethod
    def add_item(item_id: str, modality: str, item_input: Input, metadata: dict | None) -> dict:
        return {"items": [{"id": item_id, "modality": modality, "metadata": metadata or {}, **item_input}]}


class Client:
    """Synchronous client. `query` of `retrieve` is an item id (str) or {"modality": ..., INPUT}."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0, **httpx_options: Any):
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_options)

    def encode(self, modality: str, inputs: Sequence[Input], return_embedding: bool = False) -> dict:
        return _answer(self._http.post("/encode", json=_Requests.encode(modality, inputs, return_embedding)))

    def retrieve(self, query: Input | str, target: str, top_k: int = 10) -> list[dict]:
        return _answer(self._http.post("/retrieve", json=_Requests.retrieve(query, target, top_k)))["results"]

    def add_item(self, item_id: str, modality: str, item_input: Input, metadata: dict | None = None) -> dict:
        return _answer(self._http.post("/items", json=_Requests.add_item(item_id, modality, item_input, metadata)))

    def get_item(self, item_id: str, embedding: bool = False) -> dict:
        return _answer(self._http.get(f"/items/{quote(item_id, safe='')}", params={"embedding": embedding}))

    def delete_item(self, item_id: str) -> dict:
        return _answer(self._http.delete(f"/items/{quote(item_id, safe='')}"))

    def health(self) -> dict:
        return _answer(self._http.get("/healthz"))

    def ready(self) -> dict:
        return _answer(self._http.get("/readyz"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same calls as `Client`, awaitable."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0, **httpx_options: Any):
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_options)

    async def encode(self, modality: str, inputs: Sequence[Input], return_embedding: bool = False) -> dict:
        return _answer(await self._http.post("/encode", json=_Requests.encode(modality, inputs, return_embedding)))

    async def retrieve(self, query: Input | str, target: str, top_k: int = 10) -> list[dict]:
        return _answer(await self._http.post("/retrieve", json=_Requests.retrieve(query, target, top_k)))["results"]

    async def add_item(self, item_id: str, modality: str, item_input: Input, metadata: dict | None = None) -> dict:
        body = _Requests.add_item(item_id, modality, item_input, metadata)
        return _answer(await self._http.post("/items", json=body))

    async def get_item(self, item_id: str, embedding: bool = False) -> dict:
        return _answer(await self._http.get(f"/items/{quote(item_id, safe='')}", params={"embedding": embedding}))

    async def delete_item(self, item_id: str) -> dict:
        return _answer(await self._http.delete(f"/items/{quote(item_id, safe='')}"))

    async def health(self) -> dict:
        return _answer(await self._http.get("/healthz"))

    async def ready(self) -> dict:
        return _answer(await self._http.get("/readyz"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
