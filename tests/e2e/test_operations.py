"""Operator commands and lifecycle, as separate processes: keys, usage, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_ready

SPILLWAY = str(Path(sys.executable).with_name("spillway"))
pytestmark = pytest.mark.e2e


def _env(tmp_path: Path, weights: Path) -> dict[str, str]:
    return {**os.environ, "SPILLWAY_WEIGHTS_DIR": str(weights), "PYTHONUNBUFFERED": "1",
            "SPILLWAY_LEDGER_URL": f"sqlite:///{tmp_path}/ledger.db"}


def test_keys_and_usage_commands(tmp_path: Path, tiny_weights: Path) -> None:
    env = _env(tmp_path, tiny_weights)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SPILLWAY, *args], env=env, capture_output=True, text=True,
                              timeout=120)

    assert "no team keys: the server is open" in run("keys", "list").stdout
    reserved = run("keys", "create", "--name", "admin")
    assert reserved.returncode != 0 and "reserved" in reserved.stderr
    made = run("keys", "create", "--name", "team-a", "--daily-images", "100")
    assert made.returncode == 0
    key = made.stdout.strip()
    assert key.startswith("sk-spw-")
    listed = run("keys", "list").stdout
    assert "team-a" in listed and "0/100" in listed and key not in listed
    assert run("keys", "create", "--name", "team-a").returncode == 1  # names are unique
    assert run("keys", "revoke", "team-a").returncode == 0
    assert "revoked" in run("keys", "list").stdout
    assert run("keys", "revoke", "team-a").returncode == 1
    table = run("usage", "--group-by", "key")
    assert table.returncode == 0 and "all-cloud $" in table.stdout


def test_sigterm_finishes_in_flight_work_then_exits(tmp_path: Path, tiny_weights: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([SPILLWAY, "serve", "--port", str(port)],
                            env={**_env(tmp_path, tiny_weights), "SPILLWAY_VLM__ENABLED": "false",
                                 # generous: a loaded CI machine must not turn this into a
                                 # test of the grace period running out
                                 "SPILLWAY_SHUTDOWN_GRACE_S": "180"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_ready(base, proc, 120)
        result: dict[str, httpx.Response] = {}
        slow = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{base}/v1/images/generations", timeout=240,
            json={"prompt": "slow", "size": "1024x1024", "n": 4, "steps": 2})))
        slow.start()
        time.sleep(1.0)  # the request is on the device now
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections once terminating
            httpx.get(f"{base}/healthz", timeout=2)
        slow.join(240)
        assert result["r"].status_code == 200  # in-flight work finished
        assert len(result["r"].json()["data"]) == 4
        # uvicorn re-raises the signal once shut down: exit by SIGTERM, after the work
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
