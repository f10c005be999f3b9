"""Hostile batch input fails itself, never the worker: other keys' batches go on, bad
strings are refused before they are stored, and a bad stored row breaks no listing."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr

from server.app import create_app
from server.config import Settings
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from tests.api.test_batches import gen_line, jsonl, lines_of, wait
from tests.conftest import serve

ADMIN = "admin-secret-for-hostile-batches"
GEN = "/v1/images/generations"


@pytest.fixture
def box(tiny_weights: Path, tmp_path: Path) -> Iterator[tuple[str, str, str, Path]]:
    db = tmp_path / "l.db"
    store = KeyStore(Ledger(f"sqlite:///{db}"))
    key_a, key_b = store.create("team-a"), store.create("team-b")
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{db}",
                        admin_key=SecretStr(ADMIN))
    with serve(create_app(settings, chat_loader=None)) as base:
        yield base, key_a, key_b, db


def sdk(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def test_poison_lines_fail_only_themselves(box: tuple[str, str, str, Path]) -> None:
    base, key_a, key_b, _ = box
    a, b = sdk(base, key_a), sdk(base, key_b)
    deep = 100_000
    good = json.dumps(gen_line("good", "a calm sea"))
    poison = [
        # valid JSON for Python's parser, but no database or encoder takes the string
        good.replace('"good"', '"surrogate\\ud800"'),
        # nested far past any parser's recursion limit, inside a body and as a whole line
        good.replace('"good"', '"deep"').replace('"prompt"', '"nest": ' + "[" * deep
                                                  + "]" * deep + ', "prompt"'),
        "[" * deep + "]" * deep,
        good.replace('"a calm sea"', '"\\udfff"'),
    ]
    f = a.files.create(file=("poison.jsonl", jsonl([*poison, good])), purpose="batch")
    mine = a.batches.create(input_file_id=f.id, endpoint=GEN, completion_window="24h")
    theirs = b.batches.create(
        input_file_id=b.files.create(file=("ok.jsonl", jsonl([gen_line("b1", "a hill")])),
                                     purpose="batch").id,
        endpoint=GEN, completion_window="24h")
    done = wait(a, mine.id)
    assert done.status == "completed"
    assert [r["custom_id"] for r in lines_of(a, done.output_file_id)] == ["good"]
    errors = lines_of(a, done.error_file_id)
    assert len(errors) == len(poison)
    assert {e["error"]["code"] for e in errors} == {"invalid_json_line"}
    assert any("nested" in e["error"]["message"] for e in errors)
    assert any("surrogate" in e["error"]["message"] for e in errors)
    assert wait(b, theirs.id).status == "completed"  # another key's work went on
    assert a.files.delete(f.id).deleted  # and the poisoned input file can be deleted


def test_bad_strings_are_refused_before_they_are_stored(
        box: tuple[str, str, str, Path]) -> None:
    base, key_a, _, db = box
    a = sdk(base, key_a)
    f = a.files.create(file=("in.jsonl", jsonl([gen_line("x", "a tree")])), purpose="batch")
    headers = {"Authorization": f"Bearer {key_a}", "Content-Type": "application/json"}
    # Written by hand: json.dumps would refuse to write these, and clients need not.
    for body in ('{"input_file_id": "FILE", "endpoint": "GEN", "completion_window": "24h", '
                 '"metadata": {"k": "v\\ud800"}}',
                 '{"input_file_id": "file-\\ud800", "endpoint": "GEN", '
                 '"completion_window": "24h"}'):
        body = body.replace("FILE", f.id).replace("GEN", GEN)
        r = httpx.post(f"{base}/v1/batches", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert a.batches.list().data == []  # nothing was stored


def test_a_bad_row_already_stored_breaks_no_listing(box: tuple[str, str, str, Path]) -> None:
    base, key_a, _, db = box
    a = sdk(base, key_a)
    f = a.files.create(file=("in.jsonl", jsonl([gen_line("x", "a tree")])), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint=GEN, completion_window="24h",
                             metadata={"k": "fine"})
    wait(a, batch.id)
    with sqlite3.connect(db) as conn:  # as an older server could have stored it
        conn.execute("UPDATE batches SET metadata = ? WHERE id = ?",
                     ('{"k": "bad\\ud800"}', batch.id))
    for key in (key_a, ADMIN):
        listed = sdk(base, key).batches.list()
        assert [x.id for x in listed.data] == [batch.id]
        shown = listed.data[0].metadata
        assert shown is not None and shown["k"].startswith("bad")
    assert a.batches.retrieve(batch.id).status == "completed"
