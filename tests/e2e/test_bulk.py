"""`server.tools.bulk.run_bulk`: batch files in-process and through a live server, with resume."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from server.app import create_app
from server.config import Settings
from server.tools.bulk import BulkError, run_bulk
from server.tools.bulk.folder import MANIFEST
from server.tools.bulk.rows import BulkInputError
from tests.conftest import free_port, serve

ROOT = Path(__file__).resolve().parents[2]


def _settings(weights: Path) -> Settings:
    return Settings(weights_dir=weights, ledger_url="sqlite://")


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _manifest(out: Path) -> list[dict[str, Any]]:
    path = out / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _complete_lines(out: Path) -> int:
    """Lines another process has finished writing (a line may be half-written)."""
    path = out / MANIFEST
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _listing(root: Path, skip: Path | None = None) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if skip is None or (p != skip and skip not in p.parents))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


# -- 1: 200 rows, a real Ctrl-C, resume ---------------------------------------------
CHILD = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores it
from server.tools.bulk import run_bulk
from server.config import Settings
run_bulk(Path(sys.argv[1]), Path(sys.argv[2]), Settings(), batch_size=4)
"""


def _big_csv(path: Path) -> dict[tuple[int, int], tuple[int, int]]:
    """200 rows; returns (line, index) -> (width, height) for every output."""
    rows: list[list[object]] = []
    expect: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(200):
        line = i + 2  # the header is line 1
        w, h = (256, 512) if i % 10 == 0 else (256, 256)
        seed = i * 7 if i % 3 == 0 else ""
        n = 2 if i % 40 == 5 else 1
        filename = {3: f"named/{i}.jpg", 7: f"w{i}.webp"}.get(i % 10, "")
        rows.append([f"prompt {i}, with a comma", f"{w}x{h}", seed, n, filename])
        for k in range(1, n + 1):
            expect[(line, k)] = (w, h)
    _write_csv(path, ["prompt", "size", "seed", "n", "filename"], rows)
    return expect


def _check_complete(out: Path, expect: dict[tuple[int, int], tuple[int, int]]) -> None:
    records = _manifest(out)
    keys = [(r["line"], r["index"]) for r in records]
    assert len(keys) == len(set(keys)), "a (line, index) is in the manifest twice"
    assert set(keys) == set(expect)
    files = {r["file"] for r in records}
    assert len(files) == len(records)
    for r in records:
        path = out / r["file"]
        with Image.open(path) as im:
            im.load()
            assert im.size == expect[(r["line"], r["index"])], r
        assert r["route"] == "local" and r["cost_usd"] >= 0 and r["latency_ms"] > 0
    assert not list(out.rglob("*.partial"))
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == files | {MANIFEST}


def test_interrupted_run_resumes_to_exactly_one_of_each(tiny_weights: Path,
                                                        tmp_path: Path) -> None:
    src, out = tmp_path / "prompts.csv", tmp_path / "out"
    expect = _big_csv(src)
    total = len(expect)
    env = {**os.environ, "SPILLWAY_WEIGHTS_DIR": str(tiny_weights),
           "SPILLWAY_LEDGER_URL": "sqlite://", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "child.out").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while _complete_lines(out) < total // 3:
                assert proc.poll() is None, (tmp_path / "child.out").read_text()[-3000:]
                assert time.monotonic() < deadline, "the first run made too little progress"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    child = (tmp_path / "child.out").read_text()
    assert rc == 0, child[-3000:]
    assert "interrupted:" in child and "re-run the same command to resume" in child
    first = _manifest(out)
    assert total // 3 <= len(first) < total
    assert not list(out.rglob("*.partial"))
    assert all((out / r["file"]).is_file() for r in first)

    echo = _Lines()
    second = run_bulk(src, out, _settings(tiny_weights), echo=echo, progress=False)
    assert not second.interrupted and second.bad_rows == 0 and second.failed == 0
    assert second.skipped == len(first)
    assert second.written == total - len(first)
    assert second.cost_usd > 0 and second.cloud_cost_usd > second.cost_usd
    assert "skipped" in echo.lines[-1]
    _check_complete(out, expect)

    before = (out / MANIFEST).read_bytes()
    third = run_bulk(src, out, _settings(tiny_weights), echo=_Lines(), progress=False)
    assert (third.written, third.skipped, third.failed) == (0, total, 0)
    assert (out / MANIFEST).read_bytes() == before


# -- 2: bad rows -----------------------------------------------------------------------
def test_bad_rows_are_reported_by_line_and_skipped(tiny_weights: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    lines = [
        {"prompt": "good one", "size": "256x256", "seed": 1},  # 1
        {"prompt": "   ", "size": "256x256"},  # 2: empty prompt
        {"prompt": "x", "size": "abc"},  # 3
        {"prompt": "x", "size": "256x256", "n": 11},  # 4
        {"prompt": "x", "size": "256x256", "filename": "../escape.png"},  # 5
        {"prompt": "x", "size": "256x256", "filename": "/abs/x.png"},  # 6
        '{"prompt": "broken", "size": ',  # 7: broken JSON
        {"prompt": "good two", "size": "256x256", "filename": "sub/two.jpg"},  # 8
        {"prompt": "x", "size": "8192x8192"},  # 9
        {"prompt": "x", "size": "256x256", "seed": "s"},  # 10
        {"prompt": "x", "size": "256x256", "filename": "C:\\x.png"},  # 11
        {"prompt": "x", "size": "256x256", "filename": "x.gif"},  # 12
        {"prompt": "x", "size": "256x256", "filename": "a/../../x.png"},  # 13
        ["not", "an", "object"],  # 14
        {"prompt": "x", "size": "256x256", "steps": 9},  # 15
        {"prompt": "good three", "size": "256x256", "n": 2},  # 16
    ]
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    (out / "link").mkdir(parents=True)
    (out / "link").rmdir()
    os.symlink(tmp_path, out / "link")  # a folder inside out_dir that leads outside it
    with src.open("a") as f:
        f.write(json.dumps({"prompt": "x", "size": "256x256",
                            "filename": "link/through.png"}) + "\n")  # 17
    before = _listing(tmp_path, skip=out)
    echo = _Lines()
    summary = run_bulk(src, out, _settings(tiny_weights), echo=echo, progress=False)
    bad = {2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 17}
    assert summary.bad_rows == len(bad)
    reported = {int(e.split(":")[0].removeprefix("line ")) for e in summary.errors}
    assert reported == bad
    for number in bad:
        assert any(line.startswith(f"line {number}: ") for line in echo.lines), number
    assert any("escapes the output folder" in e for e in summary.errors)
    assert any("absolute path" in e for e in summary.errors)
    assert any("broken JSON" in e for e in summary.errors)
    assert summary.written == 4 and summary.failed == 0
    assert sorted(r["file"] for r in _manifest(out)) == [
        "000001-1.png", "000016-1.png", "000016-2.png", "sub/two.jpg"]
    with Image.open(out / "sub" / "two.jpg") as im:
        assert im.format == "JPEG" and im.size == (256, 256)
    assert _listing(tmp_path, skip=out) == before
    assert not Path("/abs").exists()


def test_csv_bad_rows_count_the_header_as_line_one(tiny_weights: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "p.csv", tmp_path / "out"
    src.write_text('prompt,size,n,filename\n'
                   'ok,256x256,,a.png\n'              # 2
                   '"two\nline prompt",256x256,,\n'   # 3-4
                   ',256x256,,\n'                     # 5: empty prompt
                   'x,256x256,11,\n'                  # 6
                   '\n'                               # 7: blank
                   'x,256x256,,a.png\n'               # 8: a.png taken by line 2
                   'x,256x256,1,b.png,extra\n'        # 9: too many fields
                   'x,256x256,1,..\\\\up.png\n'      # 10: backslash escape
                   'x,256x256,1,d.png\n'             # 11
                   'x,256x256,1,d.png/x.png\n')      # 12: d.png is a file by then
    summary = run_bulk(src, out, _settings(tiny_weights), echo=_Lines(), progress=False)
    reported = sorted(int(e.split(":")[0].removeprefix("line ")) for e in summary.errors)
    assert reported == [5, 6, 8, 9, 10, 12]
    assert summary.bad_rows == 5 and summary.failed == 1
    assert "cannot write d.png/x.png" in summary.errors[-1]
    assert sorted(r["file"] for r in _manifest(out)) == ["000003-1.png", "a.png", "d.png"]
    assert [r["input"]["prompt"] for r in _manifest(out) if r["line"] == 3] == [
        "two\nline prompt"]


# -- 3: an unusable file ------------------------------------------------------------------
def test_csv_without_prompt_column_fails_before_any_work(tiny_weights: Path,
                                                         tmp_path: Path) -> None:
    src, out = tmp_path / "p.csv", tmp_path / "out"
    _write_csv(src, ["text", "size"], [["a cat", "256x256"]])
    with pytest.raises(BulkInputError, match="has no 'prompt' column"):
        run_bulk(src, out, _settings(tiny_weights), echo=_Lines(), progress=False)
    assert not out.exists()
    with pytest.raises(BulkInputError, match="format"):
        run_bulk(tmp_path / "p.txt", out, _settings(tiny_weights), echo=_Lines(),
                 progress=False)
    assert not out.exists()


# -- 4: through a live server ------------------------------------------------------------
def test_server_mode_against_a_live_server(tiny_weights: Path, tmp_path: Path) -> None:
    src, out, local_out = tmp_path / "p.csv", tmp_path / "out", tmp_path / "local"
    rows: list[list[object]] = [[f"row {i}", "256x256", 100 + i, 1, "", ""] for i in range(18)]
    rows.append(["cloud-only model", "256x256", 5, 1, "", "no-such-model"])  # line 20: 404
    rows.append(["too big", "8192x8192", 6, 2, "", ""])  # line 21: the server says 400
    rows.append(["pair", "256x256", 7, 2, "pair.webp", ""])  # line 22
    _write_csv(src, ["prompt", "size", "seed", "n", "filename", "model"], rows)
    app = create_app(_settings(tiny_weights), chat_loader=None)
    echo = _Lines()
    with serve(app) as base:
        summary = run_bulk(src, out, _settings(tiny_weights), server=base, concurrency=6,
                           echo=echo, progress=False)
        again = run_bulk(src, out, _settings(tiny_weights), server=base + "/v1/",
                         echo=_Lines(), progress=False)
    assert summary.written == 20 and summary.bad_rows == 0
    assert summary.failed == 3  # the 404 row's image and the 400 row's two
    assert any(e.startswith("line 20: server answered 404") for e in summary.errors)
    assert any(e.startswith("line 21: server answered 400") for e in summary.errors)
    records = _manifest(out)
    assert len(records) == 20
    assert {r["route"] for r in records} == {"local"}
    assert all(isinstance(r["cost_usd"], float) and r["cost_usd"] > 0 for r in records)
    assert summary.cost_usd == pytest.approx(sum(r["cost_usd"] for r in records), rel=1e-3)
    assert sorted(r["file"] for r in records if r["line"] == 22) == ["pair-1.webp", "pair-2.webp"]
    assert [r["seed"] for r in records if r["line"] == 22] in ([7, 8], [8, 7])
    for r in records:
        with Image.open(out / r["file"]) as im:
            assert im.size == (256, 256)
    assert again.written == 0 and again.skipped == 20 and again.failed == 3

    # The same seed and size in-process: a valid image of the same shape.
    one = tmp_path / "one.csv"
    _write_csv(one, ["prompt", "size", "seed"], [["row 0", "256x256", 100]])
    run_bulk(one, local_out, _settings(tiny_weights), echo=_Lines(), progress=False)
    served = _pixels(out / "000002-1.png")
    made_here = _pixels(local_out / "000002-1.png")
    assert served.shape == made_here.shape == (256, 256, 3)


class _Flaky:
    """A stand-in server: each prompt is refused (429 or 503) before it is served."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        buf = io.BytesIO()
        Image.new("RGB", (256, 256), "red").save(buf, format="PNG")
        self.png = base64.b64encode(buf.getvalue()).decode()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/readyz")
        async def ready() -> dict[str, str]:
            return {"status": "ok"}

        @app.post("/v1/images/generations")
        async def generate(request: Request) -> JSONResponse:
            body = await request.json()
            if request.headers.get("authorization") != "Bearer sk-test":
                return JSONResponse({"error": {"message": "Incorrect API key"}},
                                    status_code=401)
            with self.lock:
                count = self.calls[body["prompt"]] = self.calls.get(body["prompt"], 0) + 1
            if count <= self.refusals:
                status = 429 if count % 2 else 503
                return JSONResponse({"error": {"message": "busy"}}, status_code=status,
                                    headers={"Retry-After": "0"})
            data = [{"b64_json": self.png, "seed": body["seed"] + i} for i in range(body["n"])]
            return JSONResponse({"data": data, "size": "256x256"},
                                headers={"x-spillway-route": "openai",
                                         "x-spillway-cost-usd": "0.042000"})

        return app


@pytest.mark.parametrize(("refusals", "written"), [(2, 3), (99, 0)])
def test_server_mode_retries_429_and_5xx(tmp_path: Path, refusals: int, written: int) -> None:
    src, out = tmp_path / "p.jsonl", tmp_path / "out"
    src.write_text("".join(json.dumps({"prompt": f"p{i}", "size": "256x256"}) + "\n"
                           for i in range(3)))
    flaky = _Flaky(refusals)
    with serve(flaky.app()) as base:
        summary = run_bulk(src, out, Settings(weights_dir=tmp_path / "none"), server=base,
                           api_key="sk-test", echo=_Lines(), progress=False)
    assert summary.written == written
    if written:
        assert all(count == refusals + 1 for count in flaky.calls.values())
        assert {r["route"] for r in _manifest(out)} == {"openai"}
        assert summary.cost_usd == pytest.approx(3 * 0.042)
    else:
        assert summary.failed == 3
        assert all("gave up after" in e and "busy" in e for e in summary.errors)


def test_server_mode_stops_on_a_bad_key_or_no_server(tmp_path: Path) -> None:
    src, out = tmp_path / "p.jsonl", tmp_path / "out"
    src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(20)))
    settings = Settings(weights_dir=tmp_path / "none")
    with serve(_Flaky(0).app()) as base, pytest.raises(BulkError, match="401.*API key"):
        run_bulk(src, out, settings, server=base, api_key="sk-wrong", echo=_Lines(),
                 progress=False)
    assert _manifest(out) == []
    with pytest.raises(BulkError, match="cannot reach"):
        run_bulk(src, out, settings, server=f"http://127.0.0.1:{free_port()}",
                 echo=_Lines(), progress=False)


# -- 5: determinism across a resume -----------------------------------------------------
def test_resumed_outputs_repeat_the_same_pixels(tiny_weights: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "p.csv", tmp_path / "out"
    rows: list[list[object]] = [[f"a picture {i}", "256x256", i * 11 if i % 2 else ""]
                                for i in range(8)]
    _write_csv(src, ["prompt", "size", "seed"], rows)
    first = run_bulk(src, out, _settings(tiny_weights), batch_size=8, echo=_Lines(),
                     progress=False)
    assert first.written == 8
    records = _manifest(out)
    originals = {r["file"]: _pixels(out / r["file"]) for r in records}
    original_bytes = {r["file"]: (out / r["file"]).read_bytes() for r in records}

    # A seedless row and a seeded one lose their file and manifest line; a leftover
    # .partial and a torn manifest line (a run killed mid-write) are lying around.
    gone = [r for r in records if r["line"] in (2, 5)]
    kept = [r for r in records if r["line"] not in (2, 5)]
    for r in gone:
        (out / r["file"]).unlink()
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"line": 9, "ind')
    (out / "000003-1.png.partial").write_bytes(b"half an image")
    second = run_bulk(src, out, _settings(tiny_weights), batch_size=8, echo=_Lines(),
                      progress=False)
    assert (second.written, second.skipped) == (2, 6)
    assert not list(out.rglob("*.partial"))
    after = _manifest(out)
    assert sorted((r["line"], r["index"]) for r in after) == [(n, 1) for n in range(2, 10)]
    for r in gone:
        again = [a for a in after if a["line"] == r["line"]][0]
        assert again["seed"] == r["seed"]
        diff = np.abs(_pixels(out / r["file"]) - originals[r["file"]])
        assert diff.max() <= 1, f"line {r['line']} differs by up to {diff.max()}"

    # A whole batch again, in the same shape: the same bytes.
    for r in after:
        (out / r["file"]).unlink()
    third = run_bulk(src, out, _settings(tiny_weights), batch_size=8, echo=_Lines(),
                     progress=False)
    assert third.written == 8
    assert {r["file"]: (out / r["file"]).read_bytes() for r in _manifest(out)} == original_bytes
