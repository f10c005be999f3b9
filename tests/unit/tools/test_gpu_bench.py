"""scripts/gpu_bench.py on the tiny model on the CPU: every row of every configuration has
real times for the whole call and for each part, in the table and in the JSON (--json and
$OUT), and it runs where only pipelines.* and its libraries exist (a bare GPU box has no
fastapi, pydantic-settings, uvicorn... and the server package needs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import gpu_bench

ROOT = Path(__file__).resolve().parents[3]
# Run in a child where the server's own stack cannot be imported, as on the GPU box.
BLOCKED = ("server", "fastapi", "pydantic_settings", "uvicorn", "sqlalchemy", "alembic")
CHILD = f"""
import sys
from importlib.abc import MetaPathFinder

class Blocked(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not on the GPU box")
        return None

sys.meta_path.insert(0, Blocked())
from scripts import gpu_bench
gpu_bench.main(sys.argv[1:])
"""
ARGS = ["--model", "tiny", "--device", "cpu", "--batches", "1,2", "--configs",
        "fp32,fp32-tiny", "--repeats", "1", "--warmup", "1", "--size", "64x64"]


def test_tiny_bench_on_cpu_times_every_row_and_part(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, "-c", CHILD, *ARGS, "--json",
                          str(tmp_path / "bench.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # 1. The JSON, in both places, one row per config x batch, every figure positive.
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "out" / "gpu_bench.json").read_text() == json.dumps(data, indent=2)
    assert [(r["config"], r["batch"]) for r in data["rows"]] == [
        ("fp32", 1), ("fp32", 2), ("fp32-tiny", 1), ("fp32-tiny", 2)]
    for row in data["rows"]:
        assert row["images_per_s"] > 0 and row["call_ms"] > 0
        assert set(row["parts_ms"]) == {"text", "unet", "vae", "post"}
        assert all(ms > 0 for ms in row["parts_ms"].values()), row
        assert row["not_finite"] == 0 and row["peak_gib"] is None  # peak: CUDA only
    assert data["builds"][0]["loaded"]["unet"] == "float32"
    assert data["builds"][0]["loaded"]["vae_tiny"] == "float32"
    assert data["meta"]["diffusers"] and data["skipped"] == []

    # 2. The Markdown table last, with the same rows and a number in every cell.
    lines = [line for line in run.stdout.splitlines() if line.startswith("| fp32")]
    assert len(lines) == 4
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) > 0 and all(float(c) > 0 for c in cells[3:8]), line
    assert "| config | batch | images/s |" in run.stdout


def test_budget_stops_new_configurations(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    results = gpu_bench.main([*ARGS, "--batches", "1", "--configs", "fp32,bf16",
                              "--budget-s", "0"])
    assert results.rows == [] and results.skipped == ["fp32", "bf16"]


def test_config_names() -> None:
    cfg = gpu_bench.parse_config("fp16-upcast-compile-tiny")
    assert (cfg.upcast, cfg.compile, cfg.vae) == (True, True, "tiny")
    assert gpu_bench.parse_config("bf16").engine_key == (torch.bfloat16, False)
    for bad in ("bf16-upcast", "fp8", "bf16-fast", "bf16-tiny-tiny"):
        with pytest.raises(ValueError):
            gpu_bench.parse_config(bad)
