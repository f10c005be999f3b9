"""Small leaks between keys and into logs, over real HTTP: a forged request id in the
access log, one key's burst evicting another key's `url` images, and the weights' paths
on disk in /v1/models."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr

from server.app import create_app
from server.config import Settings
from server.ops import access_log
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from tests.conftest import serve

ADMIN = "admin-secret-for-leak-tests-0123456789"


@pytest.fixture(scope="module")
def server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, str, str]]:
    """A closed server with two team keys and a `url` store of 1 MiB (about five of the
    tiny engine's 256x256 PNGs): base URL, key A, key B."""
    url = f"sqlite:///{tmp_path_factory.mktemp('leaks')}/ledger.db"
    ledger = Ledger(url)
    keys = KeyStore(ledger)
    team_a, team_b = keys.create("team-a"), keys.create("team-b")
    ledger.close()
    settings = Settings(weights_dir=tiny_weights, ledger_url=url, admin_key=SecretStr(ADMIN))
    settings.images.url_store_mb = 1
    with serve(create_app(settings, chat_loader=None)) as base:
        yield base, team_a, team_b


def sdk(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_request_id_cannot_forge_access_log_fields(server: tuple[str, str, str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    base, team_a, _ = server
    forged = "x key_name=admin status=200 route=cloud"
    headers = {"authorization": f"Bearer {team_a}"}
    with caplog.at_level(logging.INFO, logger=access_log.LOGGER):
        for given in (forged, 'a"b', "a\tb", "x" * 129, "ok-1:2/3+4_5.6"):
            r = httpx.get(f"{base}/v1/models", headers={**headers, "x-request-id": given})
            assert r.status_code == 200
            echoed = r.headers["x-request-id"]
            if given == "ok-1:2/3+4_5.6":
                assert echoed == given  # a safe id is the client's to choose
            else:
                assert echoed.startswith("req_") and given not in echoed
    lines = [access_log.TextFormatter().format(r) for r in caplog.records
             if r.name == access_log.LOGGER]
    assert len(lines) == 5
    for line in lines:
        keys = [pair.split("=", 1)[0] for pair in line.split(" ")]
        assert len(keys) == len(set(keys)), line  # no field twice: nothing was forged
        assert "key_name=team-a" in line.split(" ") and "route=cloud" not in line


def test_a_path_or_model_cannot_forge_access_log_fields(server: tuple[str, str, str],
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    base, team_a, _ = server
    forged = "x key_name=admin status=200"
    with caplog.at_level(logging.INFO, logger=access_log.LOGGER):
        httpx.post(f"{base}/v1beta/models/{forged}:generateContent", json={},
                   headers={"x-goog-api-key": team_a})
        httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "model": forged},
                   headers={"authorization": f"Bearer {team_a}"})
    lines = [access_log.TextFormatter().format(r) for r in caplog.records
             if r.name == access_log.LOGGER]
    assert len(lines) == 2
    for line in lines:
        pairs = [pair.split("=", 1) for pair in shlex.split(line)]  # logfmt, quotes honoured
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), line
        assert dict(pairs)["key_name"] == "team-a"


def test_one_keys_burst_does_not_evict_another_keys_url_images(
        server: tuple[str, str, str]) -> None:
    base, team_a, team_b = server
    mine = sdk(base, team_a).images.generate(prompt="a lighthouse", size="256x256", n=2,
                                             response_format="url")
    kept = [d.url for d in mine.data or []]
    assert len(kept) == 2 and all(kept)
    burst: list[str | None] = []
    for _ in range(3):  # 30 images, several times the store: B's own oldest go
        made = sdk(base, team_b).images.generate(prompt="noise", size="256x256", n=10,
                                                 response_format="url")
        burst += [d.url for d in made.data or []]
    for link in kept:
        assert link is not None and httpx.get(link).status_code == 200
    assert httpx.get(str(burst[0])).status_code == 404  # B paid for its burst itself
    assert httpx.get(str(burst[-1])).status_code == 200


def test_weights_paths_only_for_the_admin(server: tuple[str, str, str],
                                          tiny_weights: Path) -> None:
    base, team_a, _ = server
    for model in sdk(base, team_a).models.list().data:
        info = model.model_extra["spillway"] if model.model_extra else {}
        assert "path" not in info and info["source"] == "tiny"
    one = httpx.get(f"{base}/v1/models/sdxl-turbo",
                    headers={"authorization": f"Bearer {team_a}"}).json()
    assert "path" not in one["spillway"]
    assert str(tiny_weights) not in httpx.get(
        f"{base}/v1/models", headers={"authorization": f"Bearer {team_a}"}).text
    for model in sdk(base, ADMIN).models.list().data:
        info = model.model_extra["spillway"] if model.model_extra else {}
        assert str(info["path"]).startswith(str(tiny_weights))
