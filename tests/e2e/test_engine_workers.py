"""Engine workers: the image pipeline in child processes (SPILLWAY_ENGINE__DEVICES=cpu,cpu),
as a user and an operator see them: the same pixels as in the server's process, a worker
killed mid-batch losing nothing and coming back, and no worker outliving its server
(SIGTERM, and kill -9)."""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from server.app import create_app
from server.config import EngineSettings, Settings
from server.providers.local.engine import EngineProcess
from server.providers.local.engine_child import EngineSpec
from server.providers.local.images import LocalImages
from tests.api.gated import wait_for
from tests.conftest import free_port, serve, wait_ready

SPILLWAY = str(Path(sys.executable).with_name("spillway"))
ADMIN = "sk-admin-for-the-test"
pytestmark = pytest.mark.e2e


def settings(tiny_weights: Path, devices: str) -> Settings:
    return Settings(weights_dir=tiny_weights, ledger_url="sqlite://",
                    engine=EngineSettings(devices=devices))


def gen(base: str, prompt: str, seed: int, n: int = 1, size: str = "256x256",
        timeout: float = 120, **extra: object) -> httpx.Response:
    return httpx.post(f"{base}/v1/images/generations", timeout=timeout,
                      json={"prompt": prompt, "seed": seed, "n": n, "size": size, **extra})


def pixels(resp: httpx.Response, i: int = 0) -> np.ndarray:
    raw = base64.b64decode(resp.json()["data"][i]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(raw))).astype(int)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (nobody here may reap an orphan)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


@pytest.fixture
def two_workers(tiny_weights: Path) -> Iterator[tuple[str, LocalImages]]:
    app = create_app(settings(tiny_weights, "cpu,cpu"), chat_loader=None)
    with serve(app) as base:
        local = app.state.spillway.images
        assert local is not None
        yield base, local
    assert all(w.pid is None for w in local.workers)  # stopped with the server


def test_two_worker_processes_serve_the_same_pixels_as_the_server_process(
        two_workers: tuple[str, LocalImages], tiny_weights: Path) -> None:
    base, local = two_workers
    assert [w.state for w in local.workers] == ["ready", "ready"]
    pids = {w.pid for w in local.workers}
    assert len(pids) == 2 and os.getpid() not in pids
    with_workers = [gen(base, "a lighthouse", seed) for seed in (3, 4)]
    assert all(r.status_code == 200 for r in with_workers)
    assert np.abs(pixels(with_workers[0]) - pixels(with_workers[1])).max() > 0  # seeds differ
    tiny = gen(base, "a lighthouse", 3, vae="tiny")  # the worker loaded the tiny VAE too
    assert tiny.status_code == 200
    assert np.abs(pixels(tiny) - pixels(with_workers[0])).mean() > 5
    with serve(create_app(settings(tiny_weights, "inprocess"), chat_loader=None)) as alone:
        for seed, r in zip((3, 4), with_workers, strict=True):
            assert np.abs(pixels(gen(alone, "a lighthouse", seed)) - pixels(r)).max() <= 1
        assert np.abs(pixels(gen(alone, "a lighthouse", 3, vae="tiny")) - pixels(tiny)).max() <= 1
    models = httpx.get(f"{base}/v1/models").json()["data"][0]["spillway"]
    assert [w["state"] for w in models["workers"]] == ["ready", "ready"]
    assert sum(w["items"] for w in models["workers"]) >= 2
    assert "pid" not in models["workers"][0]  # an open server's callers are not the operator
    shown = httpx.get(f"{base}/v1/dashboard").json()["workers"]  # the dashboard's table
    assert [(w["model"], w["device"], w["state"]) for w in shown] == [
        ("sdxl-turbo", "cpu", "ready")] * 2
    assert sum(w["batches"] for w in shown) >= 1 and "pid" not in shown[0]


def test_a_worker_killed_mid_batch_loses_nothing_and_comes_back(
        two_workers: tuple[str, LocalImages]) -> None:
    """Its batch runs again on the other worker (once: a batch that kills a second worker
    fails, tests/unit/providers/test_devices.py), so the client sees its images."""
    base, local = two_workers
    results: dict[str, httpx.Response] = {}

    def post(name: str, **kw: Any) -> threading.Thread:
        t = threading.Thread(target=lambda: results.update({name: gen(base, name, **kw)}))
        t.start()
        return t

    big = post("big", seed=1, n=8, size="512x512")
    wait_for(lambda: any(w.busy for w in local.workers))
    victim = next(w for w in local.workers if w.busy)
    pid = victim.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    big.join(120)
    assert results["big"].status_code == 200, results["big"].text
    assert len(results["big"].json()["data"]) == 8
    # the killed one is started again and takes work again
    wait_for(lambda: victim.ready and victim.restarts == 1, timeout=120)
    assert victim.pid != pid
    for t in [post(f"after {i}", seed=10 + i, n=2) for i in range(4)]:
        t.join(120)
    assert all(results[f"after {i}"].status_code == 200 for i in range(4))
    metrics = httpx.get(f"{base}/metrics").text
    assert f'spillway_worker_restarts{{model="sdxl-turbo",worker="{victim.name}"}} 1.0' \
        in metrics


def test_a_worker_that_dies_while_idle_is_noticed_and_started_again(
        two_workers: tuple[str, LocalImages]) -> None:
    """No request has to fail on it first: its batcher thread sees it gone."""
    base, local = two_workers
    victim = local.workers[0]
    pid = victim.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: victim.restarts == 1 and victim.ready, timeout=120)
    assert victim.pid != pid
    assert local.batcher.live_devices() == 2
    assert gen(base, "after", seed=3, n=4).status_code == 200


def test_a_hung_worker_is_stopped_and_its_batch_runs_elsewhere(tiny_weights: Path) -> None:
    s = settings(tiny_weights, "cpu,cpu").model_copy(update={
        "engine": EngineSettings(devices="cpu,cpu", batch_timeout_s=20.0)})
    app = create_app(s, chat_loader=None)
    with serve(app) as base:
        local = app.state.spillway.images
        results: dict[str, httpx.Response] = {}
        big = threading.Thread(target=lambda: results.update(r=gen(base, "hung", 1, n=8,
                                                                   size="512x512")))
        big.start()
        wait_for(lambda: any(w.busy for w in local.workers))
        victim = next(w for w in local.workers if w.busy)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGSTOP)  # alive, and never answering
        big.join(120)
        assert results["r"].status_code == 200, results["r"].text
        assert len(results["r"].json()["data"]) == 8
        wait_for(lambda: victim.ready and victim.restarts == 1, timeout=120)


def test_a_worker_that_cannot_load_says_why_the_others_serve_and_it_comes_back_later(
        tiny_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It is tried again after 0.5, 1, 2 ... s (a doubling backoff, never a loop of doomed
    starts): once its folder is there (renamed into place), it loads and takes work."""
    s = settings(tiny_weights, "cpu")
    later = tmp_path / "sdxl-later"
    good = EngineProcess(EngineSpec(str(tiny_weights / "sdxl-turbo-tiny"), None, "cpu"), "good")
    bad = EngineProcess(EngineSpec(str(later), None, "cpu"), "bad", retry_base_s=0.5)
    with pytest.raises(RuntimeError) as exc:
        bad.start()
    assert "bad could not load" in str(exc.value) and "sdxl-later" in str(exc.value)
    assert bad.state == "failed" and bad.pid is None and bad.load_error
    assert "\n" not in bad.load_error
    good.start()
    local = LocalImages("sdxl-turbo", _weights(tiny_weights), None,
                        _policy(s), 60.0, workers=[good, bad])
    caplog.set_level(logging.ERROR, logger="server.providers.local.engine")
    with serve(create_app(s, loader=lambda _: local, chat_loader=None)) as base:
        assert gen(base, "still served", seed=1, n=3).status_code == 200
        wait_for(lambda: bad.restarts >= 2 and bad.state == "failed", timeout=120)
        said = [r.getMessage() for r in caplog.records if "bad could not load" in r.getMessage()]
        assert [m.rpartition("tried again in ")[2] for m in said[:2]] == ["1 s)", "2 s)"]
        shutil.copytree(tiny_weights / "sdxl-turbo-tiny", tmp_path / "staging")
        (tmp_path / "staging").rename(later)
        wait_for(lambda: bad.ready, timeout=120)
        models = httpx.get(f"{base}/v1/models").json()["data"][0]["spillway"]
        assert [w["state"] for w in models["workers"]] == ["ready", "ready"]
        for round_ in range(10):  # it takes work: some batch goes to it
            asks = [threading.Thread(target=gen, args=(base, "both", round_ * 4 + i, 4))
                    for i in range(4)]
            for t in asks:
                t.start()
            for t in asks:
                t.join(120)
            if bad.items:
                break
        assert bad.items > 0
    assert good.pid is None and bad.pid is None


def _weights(tiny_weights: Path) -> Any:
    from pipelines.registry import describe

    return describe(tiny_weights / "sdxl-turbo-tiny")


def _policy(s: Settings) -> Any:
    from server.providers.local.loading import batch_policy

    return batch_policy(s)


def _serve_process(tmp_path: Path, tiny_weights: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "SPILLWAY_WEIGHTS_DIR": str(tiny_weights),
           "SPILLWAY_LEDGER_URL": f"sqlite:///{tmp_path}/ledger.db",
           "SPILLWAY_VLM__ENABLED": "false", "SPILLWAY_ENGINE__DEVICES": "cpu,cpu",
           "SPILLWAY_ADMIN_KEY": ADMIN, "SPILLWAY_SHUTDOWN_GRACE_S": "60"}
    proc = subprocess.Popen([SPILLWAY, "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc, 180)
    return proc, base


def _worker_pids(base: str) -> list[int]:
    models = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {ADMIN}"})
    pids = [w["pid"] for w in models.json()["data"][0]["spillway"]["workers"]]
    assert len(pids) == 2 and all(isinstance(p, int) for p in pids)
    return pids


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_no_worker_outlives_its_server(tmp_path: Path, tiny_weights: Path,
                                       how: signal.Signals) -> None:
    proc, base = _serve_process(tmp_path, tiny_weights)
    try:
        pids = _worker_pids(base)
        os.kill(proc.pid, how)
        proc.wait(90)
        deadline = time.monotonic() + 30
        while not all(gone(p) for p in pids):
            assert time.monotonic() < deadline, f"workers left running: {pids}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
