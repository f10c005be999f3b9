"""Who may do what: auth never fails open, identity is never a chosen name, quotas are
reserved (not checked) so concurrency cannot overshoot them. Through the openai SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr

from server.app import create_app
from server.config import Settings
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from tests.api.test_batches import gen_line, lines_of, submit, wait
from tests.conftest import serve
from tests.ledger_rows import ledger_rows

ADMIN = "admin-secret-for-trust-tests-0123"


def sdk(base: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=retries, timeout=90)


def status(base: str, key: str | None = None, path: str = "/v1/usage") -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{base}{path}", headers=headers, params={"group_by": "key"}).status_code


def test_the_admin_keys_batches_run(tiny_weights: Path, tmp_path: Path) -> None:
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db",
                        admin_key=SecretStr(ADMIN))
    with serve(create_app(settings, chat_loader=None)) as base:
        admin = sdk(base, ADMIN)
        done = wait(admin, submit(admin, [gen_line("a", "one"), gen_line("b", "two")]).id)
        assert done.status == "completed", lines_of(admin, done.error_file_id)
        assert [r["custom_id"] for r in lines_of(admin, done.output_file_id)] == ["a", "b"]
    rows = [r for r in ledger_rows(settings.ledger_url) if r.reason and "batch" in r.reason]
    assert {(r.key_name, r.images) for r in rows} == {("admin", 1)} and len(rows) == 2


def test_a_key_named_admin_is_refused_and_names_are_not_identity(
        tiny_weights: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    store = KeyStore(Ledger(url))
    for reserved in ("admin", "Admin", " admin"):
        with pytest.raises(ValueError):
            store.create(reserved)
    key_a = store.create("team-a")
    settings = Settings(weights_dir=tiny_weights, ledger_url=url, admin_key=SecretStr(ADMIN))
    with serve(create_app(settings, chat_loader=None)) as base:
        admin, team = sdk(base, ADMIN), sdk(base, key_a)
        theirs = admin.files.create(file=("in.jsonl", b'{"x": 1}\n'), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            team.files.retrieve(theirs.id)
        usage = httpx.get(f"{base}/v1/usage", params={"group_by": "key"},
                          headers={"Authorization": f"Bearer {key_a}"}).json()
        assert usage["key"] == "team-a" and usage["data"] == []


def test_auth_never_fails_open(tiny_weights: Path, tmp_path: Path) -> None:
    # 1. Nothing configured: open, and the server says so.
    url = f"sqlite:///{tmp_path}/open.db"
    with serve(create_app(Settings(weights_dir=tiny_weights, ledger_url=url),
                          chat_loader=None)) as base:
        assert status(base) == 200 and status(base, "anything") == 200
    # 2. Only an admin key, no team key ever made: closed.
    url = f"sqlite:///{tmp_path}/admin.db"
    settings = Settings(weights_dir=tiny_weights, ledger_url=url, admin_key=SecretStr(ADMIN))
    with serve(create_app(settings, chat_loader=None)) as base:
        assert status(base) == 401 and status(base, "wrong") == 401
        assert status(base, ADMIN) == 200
        # 3. A team key made and revoked while the admin key is set: still closed.
        store = KeyStore(Ledger(url))
        store.create("last")
        assert store.revoke("last")
        time.sleep(2.1)  # the key cache
        assert status(base) == 401 and status(base, "wrong") == 401
    # 4. No admin key, and the only team key revoked: still closed.
    url = f"sqlite:///{tmp_path}/revoked.db"
    store = KeyStore(Ledger(url))
    gone = store.create("only")
    store.revoke("only")
    with serve(create_app(Settings(weights_dir=tiny_weights, ledger_url=url),
                          chat_loader=None)) as base:
        for key in (None, "wrong", gone):
            assert status(base, key) == 401
            assert status(base, key, "/v1/models") == 401


@contextmanager
def five_image_key(tiny_weights: Path, tmp_path: Path) -> Iterator[tuple[openai.OpenAI, str]]:
    """A server, and a client whose key may make five images a day; the ledger's URL."""
    url = f"sqlite:///{tmp_path}/l.db"
    key = KeyStore(Ledger(url)).create("five", daily_images=5)
    settings = Settings(weights_dir=tiny_weights, ledger_url=url)
    with serve(create_app(settings, chat_loader=None)) as base:
        yield sdk(base, key), url


def test_concurrent_requests_cannot_pass_a_quota(tiny_weights: Path, tmp_path: Path) -> None:
    with five_image_key(tiny_weights, tmp_path) as (client, url):

        def one(_: int) -> int:
            try:
                return len(client.images.generate(prompt="x", size="256x256").data)
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "insufficient_quota"  # type: ignore[index]
                return 0

        with ThreadPoolExecutor(20) as pool:
            served = sum(pool.map(one, range(20)))
        assert served == 5
        with pytest.raises(openai.RateLimitError):  # spent for the day
            client.images.generate(prompt="x", size="256x256")
    images = sum(r.images for r in ledger_rows(url) if r.key_name == "five")
    assert images == 5


def test_a_batch_cannot_pass_its_keys_quota(tiny_weights: Path, tmp_path: Path) -> None:
    with five_image_key(tiny_weights, tmp_path) as (client, url):
        done = wait(client, submit(client, [gen_line(f"r{i}", f"p{i}")
                                            for i in range(20)]).id, timeout=120)
        out, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert len(out) == 5 and len(errors) == 15
    assert {e["response"]["body"]["error"]["code"] for e in errors} == {"insufficient_quota"}
    images = sum(r.images for r in ledger_rows(url) if r.key_name == "five")
    assert images == 5


def test_a_usd_quota_does_not_refuse_local_work_for_what_a_cloud_might_cost(
        tiny_weights: Path, tmp_path: Path) -> None:
    from server.config import OpenAISettings

    url = f"sqlite:///{tmp_path}/l.db"
    key = KeyStore(Ledger(url)).create("cents", daily_usd=0.005)
    # A cloud is configured (a closed port: nothing here is sent to it), so a request's
    # most possible cost is gpt-image-1's, above the whole quota; it runs locally.
    settings = Settings(weights_dir=tiny_weights, ledger_url=url,
                        openai=OpenAISettings(api_key=SecretStr("sk-unused-for-this-test"),
                                              base_url="http://127.0.0.1:9/v1"))
    with serve(create_app(settings, chat_loader=None)) as base:
        r = sdk(base, key).images.with_raw_response.generate(prompt="x", size="256x256")
        assert r.headers["x-spillway-route"] == "local" and len(r.parse().data) == 1
