"""A full disk loses nothing: finished images are delivered (their ledger rows held and
written later), batch items wait for room instead of failing, a request that must store
something gets 507, deleting a file frees space, and /readyz says what is wrong.

The disk is a small tmpfs the test mounts (root or CAP_SYS_ADMIN needed; skipped, with
the reason, where mounting is not allowed)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from tests.api.test_batches import gen_line, jsonl, lines_of, wait
from tests.conftest import serve
from tests.ledger_rows import ledger_rows

GEN = "/v1/images/generations"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{mounted.stderr.strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take all the free space but about ``leave`` bytes."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    todo = max(0, st.f_bavail * st.f_frsize - leave)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        chunk = b"\0" * 65536
        while todo > 0 or not leave:
            try:
                todo -= os.write(fd, chunk[:todo] if leave else chunk)
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_full_disk_loses_nothing(tiny_weights: Path, small_disk: Path) -> None:
    url = f"sqlite:///{small_disk / 'ledger.db'}"
    settings = Settings(weights_dir=tiny_weights, ledger_url=url, storage_min_free_mb=0)
    with serve(create_app(settings, chat_loader=None)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        big = c.files.create(file=("big.jsonl", b'{"pad": "' + b"x" * 2_000_000 + b'"}\n'),
                             purpose="batch")
        assert len(c.images.generate(prompt="before", size="256x256").data) == 1

        # 1. Full: a finished image is delivered; its ledger row waits; /readyz says so.
        filler = fill(small_disk)
        image = c.images.generate(prompt="while full", size="256x256",
                                  response_format="b64_json")
        assert image.data[0].b64_json
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "storage"
        # 2. What must be stored is refused in shape, with no traceback.
        r = httpx.post(f"{base}/v1/files", files={"file": ("in.jsonl", jsonl(
            [gen_line("a", "x")]))}, data={"purpose": "batch"})
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
        assert r.headers["x-should-retry"] == "false"  # no SDK retries into a full disk
        # 3. Deleting a file works, and gives the space back.
        free = os.statvfs(small_disk).f_bavail
        assert c.files.delete(big.id).deleted
        assert os.statvfs(small_disk).f_bavail > free
        filler.unlink()
        # 4. Room again: the held row is written, /readyz is ready.
        until(lambda: httpx.get(f"{base}/readyz").status_code == 200)

        # 5. Batch results that find no room wait for it, and none is failed.
        lines = [gen_line(f"r{i}", f"picture {i}") for i in range(6)]
        f = c.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        filler = fill(small_disk, leave=96 * 1024)  # rows fit; images (~260 KB) do not
        batch = c.batches.create(input_file_id=f.id, endpoint=GEN, completion_window="24h")
        time.sleep(3)
        assert c.batches.retrieve(batch.id).request_counts.failed == 0  # type: ignore[union-attr]
        filler.unlink()
        done = wait(c, batch.id, timeout=90)
        assert done.status == "completed"
        assert [r["custom_id"] for r in lines_of(c, done.output_file_id)] == \
            [f"r{i}" for i in range(6)]
        assert done.error_file_id is None
    rows = [r for r in ledger_rows(url, 1000) if r.endpoint == GEN]
    assert len([r for r in rows if r.request_id and not r.request_id.startswith("batch_")]) \
        == 2  # both direct requests, the one made while full included
