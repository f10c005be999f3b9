"""The README's commands, run as a newcomer runs them (the venv already made by `make test`)."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
SPILLWAY = str(Path(sys.executable).with_name("spillway"))
pytestmark = pytest.mark.e2e


def _env(weights: Path) -> dict[str, str]:
    """A newcomer's environment: the defaults (engine workers included), the tiny weights."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPILLWAY_ENGINE__DEVICES", "SPILLWAY_BATCH__WARMUP")}
    return {**env, "SPILLWAY_WEIGHTS_DIR": str(weights), "PYTHONUNBUFFERED": "1"}


def test_make_run_serves_the_openai_sdk(tmp_path: Path) -> None:
    """`make run PORT=...` on a machine with no weights: builds the tiny model, serves it."""
    port = free_port()
    weights = tmp_path / "weights"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(["make", "--no-print-directory", "run", f"PORT={port}"], cwd=ROOT,
                            env=_env(weights), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, 240)
        except AssertionError:
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        r = client.images.generate(model="sdxl-turbo", prompt="a red bicycle", size="512x512",
                                   n=4, response_format="b64_json")
        assert len(r.data) == 4
        for d in r.data:
            image = Image.open(io.BytesIO(base64.b64decode(d.b64_json or "")))
            assert (image.format, image.size) == ("PNG", (512, 512))
        assert (weights / "sdxl-turbo-tiny" / "model_index.json").is_file()
        text = (tmp_path / "server.log").read_text()
        assert "serving sdxl-turbo" in text and "tiny" in text
        # the default on a machine without CUDA: one engine worker process
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        (images,) = [m for m in models if m["id"] == "sdxl-turbo"]
        assert [(w["device"], w["state"]) for w in images["spillway"]["workers"]] == [
            ("cpu", "ready")]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_generate_in_process(tiny_weights: Path, tmp_path: Path) -> None:
    def run(seed: int, name: str) -> bytes:
        out = tmp_path / name
        done = subprocess.run([SPILLWAY, "generate", "a red bicycle", "-o", str(out),
                               "--seed", str(seed)], env=_env(tiny_weights), cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"seed {seed}" in done.stdout
        return out.read_bytes()

    a, b, c = run(7, "bike.png"), run(7, "again.png"), run(8, "other.png")
    assert Image.open(io.BytesIO(a)).size == (512, 512)
    assert a == b
    assert a != c


def test_weights_commands(tmp_path: Path) -> None:
    env = _env(tmp_path / "w")

    def spillway(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SPILLWAY, *args], env=env, capture_output=True, text=True,
                              timeout=300)

    assert "no weights" in spillway("weights", "list").stdout
    # SDXL, the VLM and the tiny VAE
    assert spillway("weights", "ensure").stdout.count("built") == 3
    assert spillway("weights", "ensure").stdout.count("using") == 3
    listed = spillway("weights", "list").stdout
    assert "sdxl-turbo-tiny" in listed and "vlm-tiny" in listed and "taesdxl-tiny" in listed
    failed = spillway("weights", "fetch", "sdxl-turbo", "--endpoint",
                      f"http://127.0.0.1:{free_port()}")
    assert failed.returncode == 1
    lines = [ln for ln in failed.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not download"), failed.stderr
    bad = spillway("generate", "x", "-o", str(tmp_path / "x.gif"))
    assert bad.returncode == 1 and "format" in bad.stderr


def test_bench_prints_both_modes_and_the_sweep(tiny_weights: Path) -> None:
    env = _env(tiny_weights)
    done = subprocess.run([SPILLWAY, "bench", "--requests", "12", "--clients", "4"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batched" in done.stdout and "one-at-a-time" in done.stdout
    assert "batched / one-at-a-time:" in done.stdout
    done = subprocess.run([SPILLWAY, "bench", "--chat", "--requests", "8", "--clients", "4",
                           "--max-tokens", "4"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "requests/s" in done.stdout and "one-at-a-time" in done.stdout
    done = subprocess.run([SPILLWAY, "bench", "--sweep", "1,2", "--size", "64x64"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [ln.split() for ln in done.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(r[2]) > 0 for r in rows)
    done = subprocess.run([SPILLWAY, "bench", "--workers", "1", "--requests", "12",
                           "--clients", "4"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    modes = {ln.split()[0]: ln.split() for ln in done.stdout.splitlines()
             if ln.startswith(("in-process", "1 worker"))}
    assert set(modes) == {"in-process", "1"}  # both rows, each with its figures
    assert all(float(row[-1]) > 0 for row in modes.values())  # server CPU ms per image
    assert "vs in-process: 1 worker" in done.stdout
