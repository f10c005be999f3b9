"""Shared fixtures: the tiny weights (built once per run) and a live server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from pipelines.registry import build_tiny, build_tiny_vae, build_tiny_vlm
from server.config import Settings


@pytest.fixture(autouse=True, scope="session")
def _ledger_in_memory() -> None:
    """Servers the tests start keep their ledger in memory unless a test says otherwise."""
    os.environ.setdefault("SPILLWAY_LEDGER_URL", "sqlite://")


@pytest.fixture(autouse=True, scope="session")
def _engine_in_process() -> None:
    """The image pipeline runs in the server's process unless a test asks for engine
    workers (tests/e2e/test_engine_workers.py does, and the README's `make run` runs the
    real default): a worker process per server would cost the suite minutes of loading,
    and what the API tests check does not depend on where the pixels are made."""
    os.environ.setdefault("SPILLWAY_ENGINE__DEVICES", "inprocess")
    # Nor a warm-up per server (a second or so each); tests of the estimates turn it on.
    os.environ.setdefault("SPILLWAY_BATCH__WARMUP", "false")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    build_tiny(root)
    build_tiny_vae(root)
    build_tiny_vlm(root)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: FastAPI, wait_ready: bool = True) -> Iterator[str]:
    """Run the app with uvicorn on a free loopback port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    while wait_ready and httpx.get(f"{base}/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not become ready")
        time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 240,
               what: str = "") -> None:
    """Poll ``{base}/readyz`` of a server process until it answers 200; fail fast if the
    process dies (``what`` is shown then: a log tail, say)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, what or f"server exited with {proc.returncode}"
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not ready in time"
        time.sleep(0.2)


@pytest.fixture
def settings_for(tiny_weights: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        return Settings(weights_dir=tiny_weights, **overrides)  # type: ignore[arg-type]

    return make
