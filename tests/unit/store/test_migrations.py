"""Schema migrations: an old database is upgraded in place and keeps working, several
processes may start on one database at once, and the models agree with the migrations."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import MetaData, create_engine, inspect

from server.app import create_app
from server.config import Settings
from server.store import db
from tests.conftest import serve

FIXTURE = Path(__file__).parents[2] / "fixtures" / "ledger_v0"
ADMIN = "admin-secret-for-migration-tests"


def old_database(tmp_path: Path, extra_sql: str = "") -> str:
    """The database and batch files exactly as the code before migrations left them
    (tests/fixtures/ledger_v0: keys, usage rows, a finished batch with its files)."""
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "ledger.db") as conn:
        conn.executescript((FIXTURE / "ledger.sql").read_text() + extra_sql)
    shutil.copytree(FIXTURE / "ledger-files", data / "ledger-files")
    return f"sqlite:///{data / 'ledger.db'}"


def test_an_old_database_is_upgraded_in_place_and_served(tiny_weights: Path,
                                                         tmp_path: Path) -> None:
    keys = json.loads((FIXTURE / "keys.json").read_text())
    batch = json.loads((FIXTURE / "batch.json").read_text())
    # The old code let a team key be named "admin": such a key must come out harmless.
    named_admin = "sk-spw-a-team-key-that-was-named-admin"
    digest = hashlib.sha256(named_admin.encode()).hexdigest()
    url = old_database(tmp_path, "INSERT INTO api_keys (name, digest, shown, priority, "
                       f"created_at) VALUES ('admin', '{digest}', 'sk-spw-a-te…', "
                       "'interactive', '2026-12-01 00:00:00');")
    settings = Settings(weights_dir=tiny_weights, ledger_url=url, admin_key=SecretStr(ADMIN))
    with serve(create_app(settings, chat_loader=None)) as base:
        a = openai.OpenAI(base_url=f"{base}/v1", api_key=keys["team-a"], max_retries=0)
        b = openai.OpenAI(base_url=f"{base}/v1", api_key=keys["team-b"], max_retries=0)
        # old keys authenticate; the old batch and its files are still team-a's
        old = a.batches.retrieve(batch["batch"])
        assert old.status == "completed" and old.metadata == {"run": "v0"}
        assert old.output_file_id == batch["output"]
        out = a.files.content(batch["output"]).content
        assert out == (FIXTURE / "ledger-files" / batch["output"]).read_bytes()
        errors = [json.loads(x) for x in a.files.content(batch["error"]).text.splitlines()]
        assert [e["custom_id"] for e in errors] == ["bad"]
        assert [x.id for x in a.batches.list()] == [batch["batch"]]
        with pytest.raises(openai.NotFoundError):
            b.batches.retrieve(batch["batch"])
        # old usage still counts, under the key that used it
        usage = httpx.get(f"{base}/v1/usage", params={"group_by": "key", "start": "0"},
                          headers={"Authorization": f"Bearer {keys['team-a']}"}).json()
        assert [(r["group"], r["images"]) for r in usage["data"]] == [("team-a", 4)]
        # the key once named "admin" works under a new name and reads nothing of anyone's
        renamed = httpx.get(f"{base}/v1/usage", params={"group_by": "key", "start": "0"},
                            headers={"Authorization": f"Bearer {named_admin}"}).json()
        assert renamed["key"].startswith("admin-key-") and renamed["data"] == []
        # a new batch of the old key still runs: the upgraded tables take new rows
        f = a.files.create(file=("in.jsonl", json.dumps({
            "custom_id": "new", "method": "POST", "url": "/v1/images/generations",
            "body": {"prompt": "after the upgrade", "size": "256x256"}}).encode()),
            purpose="batch")
        new = a.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",
                               completion_window="24h")
        from tests.api.test_batches import wait
        assert wait(a, new.id).status == "completed"
    engine = create_engine(url)
    assert db.current(engine) == db.head()
    engine.dispose()


def test_several_processes_upgrade_one_database_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = ("import sys; from server.store import db; e = db.open_engine(sys.argv[1]); "
            "db.upgrade(e); print(db.current(e))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    assert {out.strip() for out, _ in results} == {db.head()}
    engine = create_engine(url)
    assert {"usage", "api_keys", "batches", "quota_days"} <= set(inspect(engine)
                                                                 .get_table_names())
    engine.dispose()


def test_the_models_agree_with_the_migrations(tmp_path: Path) -> None:
    from server.batches.store import JobsBase
    from server.store import keys, ledger, quotas

    target = MetaData()
    for base in (ledger.Base, keys.KeyRecord, JobsBase, quotas.QuotaDay):
        for table in base.metadata.tables.values():
            table.to_metadata(target)
    engine = db.open_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), target)
    engine.dispose()
    assert diff == []
