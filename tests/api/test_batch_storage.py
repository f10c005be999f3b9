"""Batch answers are kept once: after a batch ends its images live in the output file,
and the database gives their pages back to the disk (old databases are converted)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import openai

from server.app import create_app
from server.config import Settings
from tests.api.test_batches import gen_line, submit, wait
from tests.conftest import serve
from tests.unit.store.test_migrations import FIXTURE, old_database


def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))


def test_the_database_shrinks_back_after_a_batch(tiny_weights: Path, tmp_path: Path) -> None:
    url = old_database(tmp_path)  # made before auto_vacuum was set: converted once
    db = Path(url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    settings = Settings(weights_dir=tiny_weights, ledger_url=url)
    with serve(create_app(settings, chat_loader=None)) as base:
        key = json.loads((FIXTURE / "keys.json").read_text())["team-a"]
        c = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
        for n in (40, 8):  # the first frees enough to convert; the second is incremental
            done = wait(c, submit(c, [gen_line(f"r{i}", f"p{i}") for i in range(n)]).id,
                        timeout=120)
            assert done.status == "completed" and done.output_file_id is not None
            output = c.files.retrieve(done.output_file_id).bytes
            # Space comes back just after the batch is marked completed: give it a moment.
            deadline = time.monotonic() + 30
            while db_bytes(db) >= output / 4:
                assert time.monotonic() < deadline, (db_bytes(db), output)
                time.sleep(0.1)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
