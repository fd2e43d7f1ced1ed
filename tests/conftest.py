"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """A real redis-server on a free loopback port with AOF fsynced on every write, data under `data_dir`.
    `kill()` sends SIGKILL (a crash); `start()` brings it back on the same port and data."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        log = (self.data_dir / "redis.log").read_text() if (self.data_dir / "redis.log").exists() else ""
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log[-2000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis_server(tmp_path: Path):
    """A fresh redis-server (AOF, appendfsync always) for one test; skips if redis-server is not installed."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server not installed (CI installs it with apt-get install redis-server)")
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    server = RedisServer(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- service tests (tests/test_service*.py, tests/test_client.py) ---------------------------------------------
SERVICE_API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory) -> Path:
    """A tiny trained bundle with the AV-Digits feature dims and front-ends (logmel-pooled, pixels, minilm)."""
    from test_service_support import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("service-bundle"))


@pytest.fixture(scope="session")
def sqlite_service(service_bundle, tmp_path_factory):
    """A real uvicorn server on a free port (thread of the test process): SQLite catalog, API key, 1 MB bodies."""
    from test_service_support import ThreadServer

    data = tmp_path_factory.mktemp("service-data")
    server = ThreadServer(bundle=service_bundle, data_dir=data, api_key=SERVICE_API_KEY, max_body_bytes=1 << 20,
                          batch_wait_ms=20).start()
    yield server
    server.stop()
