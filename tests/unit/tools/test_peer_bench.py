"""scripts/peer_bench.py: its arguments, its CPU accounting, the bare-pipeline ceiling, and
(where LitServe is installed) one short run of the whole bench."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from scripts.peer_bench import (
    INSTALL_HINT,
    BarePipeline,
    CpuSample,
    check_response,
    cpu_between,
    parse_args,
    request_bodies,
    sample_cpu,
)

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "peer_bench.py"
HAS_LITSERVE = importlib.util.find_spec("litserve") is not None


def test_arguments_default_to_the_issue_load_and_refuse_bad_values() -> None:
    args = parse_args([])
    assert (args.size, args.steps, args.clients, args.rounds, args.torch_threads,
            args.workers, args.max_batch) == ((64, 64), 1, 16, 3, 1, 1, 16)
    args = parse_args(["--size", "256x128", "--torch-threads", "2", "--requests", "40"])
    assert (args.size, args.torch_threads, args.requests) == ((256, 128), 2, 40)
    for bad in (["--size", "65x64"], ["--size", "big"], ["--clients", "0"], ["--steps", "5"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2


def test_both_servers_get_the_same_bodies_with_distinct_seeds() -> None:
    bodies = request_bodies(20, 64, 32, 2)
    assert bodies == request_bodies(20, 64, 32, 2)
    assert len({b["seed"] for b in bodies}) == 20
    assert all(b["size"] == "64x32" and b["n"] == 1 and b["steps"] == 2 for b in bodies)


def test_an_answer_is_checked_for_a_png_of_the_asked_size() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buf, format="PNG")
    body = {"data": [{"b64_json": base64.b64encode(buf.getvalue()).decode()}]}
    check_response(body, 64, 32)
    with pytest.raises(RuntimeError, match="not"):
        check_response(body, 64, 64)
    with pytest.raises(RuntimeError, match="PNG"):
        check_response({"data": [{"b64_json": base64.b64encode(b"GIF89a").decode()}]}, 1, 1)


def test_cpu_between_splits_host_from_workers_and_counts_newborns_from_zero() -> None:
    before = CpuSample({10: 1.0, 11: 5.0}, frozenset({11}))
    after = CpuSample({10: 1.5, 11: 7.0, 12: 0.25}, frozenset({11, 12}))
    host, total = cpu_between(before, after)
    assert host == pytest.approx(0.5)
    assert total == pytest.approx(2.75)


BURNER = textwrap.dedent("""
    import multiprocessing, sys, time

    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    def worker(go, done):
        go.wait()
        burn(0.4)
        done.set()
        time.sleep(60)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        go, done = ctx.Event(), ctx.Event()
        ctx.Process(target=worker, args=(go, done), daemon=True).start()
        time.sleep(1.0)  # the worker's interpreter has started
        print("ready", flush=True)
        sys.stdin.readline()
        go.set()
        burn(0.3)
        done.wait()
        print("done", flush=True)
        sys.stdin.readline()
""")


def test_a_process_trees_cpu_is_measured_host_and_spawned_workers_apart(
        tmp_path: Path) -> None:
    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = sample_cpu(proc.pid)
        assert len(before.cpu) >= 2 and len(before.workers) == 1
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        host, total = cpu_between(before, sample_cpu(proc.pid))
    finally:
        proc.kill()
        proc.wait()
    assert 0.25 <= host <= 0.8
    assert 0.35 <= total - host <= 0.9


def test_the_bare_ceiling_times_whole_batches(tiny_weights: Path) -> None:
    bare = BarePipeline(tiny_weights / "sdxl-turbo-tiny", None, 1, (64, 64))
    c = bare.measure(64, 64, 1, batch=4, images=8)
    assert c.images == 8
    assert c.images_per_s > 0 and 0 < c.with_png_per_s < c.images_per_s
    assert c.cpu_ms > 0


@pytest.mark.skipif(HAS_LITSERVE, reason="LitServe is installed: the bench runs instead")
def test_without_litserve_the_script_says_how_to_install_it() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout.strip() == INSTALL_HINT


@pytest.mark.skipif(not HAS_LITSERVE, reason="LitServe is not installed: pip install "
                    "'litserve>=0.2.19' (the bench extra) to run the peer bench smoke test")
def test_one_short_round_prints_both_servers_and_the_ceiling(tiny_weights: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "64x64", "--clients", "2", "--requests", "8",
         "--rounds", "1", "--max-batch", "4", "--per-process", "--weights-dir",
         str(tiny_weights)],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    number = r"\s+([\d.]+)"
    for server in ("spillway", "litserve"):
        m = re.search(rf"^median\s+{server}" + number * 6 + "$", out.stdout, re.M)
        assert m, out.stdout
        rate, p50, p95, host_ms, total_ms, share = (float(v) for v in m.groups())
        assert rate > 0 and p95 >= p50 > 0 and share > 0
        assert total_ms > 0 and total_ms >= host_ms >= 0
    assert re.search(r"^median\s+bare b4\s+[\d.]+", out.stdout, re.M), out.stdout
    assert "spillway / litserve (medians):" in out.stdout
    breakdowns = re.findall(r"CPU ms/image by process: (.*)$", out.stdout, re.M)
    assert len(breakdowns) == 2 and all("main" in b and "worker" in b for b in breakdowns)
