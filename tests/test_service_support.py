"""Shared helpers of the service tests (no tests here): a tiny AV-Digits-shaped bundle, real uvicorn servers
(in a thread, or `srcid serve` in a subprocess) on free ports, and real media payloads."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import numpy as np

AV_DIMS = {"audio": 128, "video": 64, "text": 384}
TINY_MODEL = {"hidden": 32, "heads": 4, "ff": 64, "codebook_size": 32, "club_hidden": 32}


def build_tiny_bundle(root: Path) -> Path:
    """Train a tiny SRCID on synthetic clips with the AV-Digits dims for a few steps and export it."""
    import torch

    from srcid.training.export import export_bundle
    from srcid.training.synthetic import make_synthetic
    from srcid.training.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = make_synthetic(32, dims=AV_DIMS)
        cfg = TrainConfig(model=TINY_MODEL, steps=3, batch_size=8, device="cpu", log_every=1, ckpt_every=100)
        train(cfg, dataset, root / "run")
        export_bundle(root / "run" / "last.safetensors", root / "bundle")
    finally:
        torch.set_num_threads(threads)
    return root / "bundle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(url: str, path: str, timeout: float, want: int = 200) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + path, timeout=5)
            if r.status_code == want:
                return r
            last = r.text
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url}{path} did not answer {want} within {timeout}s (last: {last})")


class ThreadServer:
    """A real uvicorn server for `create_app(Settings(**settings))` in a thread of the test process, with the HTTP
    protocol `srcid serve` gives uvicorn (srcid.service.protocol), or uvicorn's own with `http="httptools"`."""

    def __init__(self, http=None, **settings):
        import uvicorn

        from srcid.service.app import create_app
        from srcid.service.protocol import DirectHttpProtocol
        from srcid.service.settings import Settings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(host="127.0.0.1", port=self.port, **settings)
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=10,
                                                    http=http or DirectHttpProtocol))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):
        return self.app.state.service

    def start(self, ready: bool = True, timeout: float = 120) -> "ThreadServer":
        self.thread.start()
        wait_until(self.url, "/healthz", 30)
        if ready:
            r = wait_until(self.url, "/readyz", timeout)
            assert r.json()["status"] == "ready"
        return self

    def wait_for_status(self, done: Callable[[str], bool], timeout: float) -> str:
        """Poll the loader's status (not HTTP) until `done(status)` or the timeout; returns the last status."""
        deadline = time.monotonic() + timeout
        while not done(self.state.status) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.state.status

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ProcessServer:
    """`srcid serve` in a subprocess with SRCID_* variables `env`; `terminate()` sends SIGTERM."""

    def __init__(self, log: Path, args: list[str] = (), **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        outer = {k: v for k, v in os.environ.items() if not k.startswith("SRCID_")}  # only the settings given here
        full_env = {**outer, **{f"SRCID_{k.upper()}": str(v) for k, v in env.items()}, "SRCID_PORT": str(self.port)}
        self.log_path = log
        self._log = open(log, "wb")
        srcid = Path(sys.executable).with_name("srcid")
        self.process = subprocess.Popen([str(srcid), "serve", *args], env=full_env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> httpx.Response:
        try:
            return wait_until(self.url, "/readyz", timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\nserver log:\n{self.log_path.read_text()[-3000:]}") from None

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


# -- media ------------------------------------------------------------------------------------------------
def post_concurrently(url: str, path: str, bodies: list) -> list[httpx.Response]:
    """POST every JSON body to `url + path` at once (one client, all in flight together); the answers in order."""
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*[client.post(path, json=body) for body in bodies])

    return asyncio.run(fire())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wav_bytes(seconds: float = 2.0, rate: int = 16000, freq: float = 440.0, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t) * (1 + np.sin(2 * np.pi * 1.5 * t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt)
    return buf.getvalue()


def image_bytes(seed: int, fmt: str = "PNG", size: int = 32) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header) over a 32 x 32 image's data."""
    import struct
    import zlib

    data = bytearray(image_bytes(0))
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def mp4_bytes(seconds: int = 3, fps: int = 4, size: int = 32) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def random_features(modality: str, seed: int, T: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((T, AV_DIMS[modality])).astype(np.float32)
