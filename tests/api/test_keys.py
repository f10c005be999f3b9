"""API keys, quotas and the usage report, through the official openai SDK."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr

from server.app import create_app
from server.config import Settings
from server.store.keys import KeyStore
from server.store.ledger import Ledger
from tests.conftest import serve

ADMIN = "admin-secret-for-tests-0123456789"


def sdk(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def gen(c: openai.OpenAI, n: int = 1) -> int:
    return len(c.images.generate(prompt="x", size="256x256", n=n).data)


def test_keys_quotas_and_usage(tiny_weights: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    settings = Settings(weights_dir=tiny_weights, ledger_url=url,
                        admin_key=SecretStr(ADMIN))
    with serve(create_app(settings, chat_loader=None)) as base:
        # no team key yet, but an admin key is configured: every request needs a key
        with pytest.raises(openai.AuthenticationError):
            gen(sdk(base, "anything"))
        assert httpx.post(f"{base}/v1/images/generations",
                          json={"prompt": "x"}).status_code == 401
        assert gen(sdk(base, ADMIN)) == 1
        # keys made as `spillway keys create` makes them: straight into the database
        store = KeyStore(Ledger(url))
        team_a = store.create("team-a", daily_images=3)
        team_b = store.create("team-b", priority="bulk")
        assert team_a.startswith("sk-spw-") and team_a != team_b
        time.sleep(2.1)  # the server's key cache refreshes
        with pytest.raises(openai.AuthenticationError) as exc:
            gen(sdk(base, "wrong-key"))
        assert exc.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        assert "wrong-key" not in str(exc.value)
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type",
                                                                   "param", "code"}
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes need no key

        a, b = sdk(base, team_a), sdk(base, team_b)
        assert gen(a, 2) == 2
        with pytest.raises(openai.RateLimitError) as quota:
            gen(a, 2)  # 2 + 2 > 3 images today
        assert quota.value.body["code"] == "insufficient_quota"  # type: ignore[index]
        # a retry cannot help until the day turns: the openai SDK reads this and stops
        assert quota.value.response.headers["x-should-retry"] == "false"
        assert gen(a, 1) == 1  # exactly at the quota is fine
        with pytest.raises(openai.RateLimitError):
            gen(a, 1)
        assert gen(b, 3) == 3  # no quota on team-b

        # each team sees its own usage; the admin key sees everyone's
        own = httpx.get(f"{base}/v1/usage", params={"group_by": "key"},
                        headers={"Authorization": f"Bearer {team_a}"}).json()
        assert [(r["group"], r["images"]) for r in own["data"]] == [("team-a", 3)]
        everyone = httpx.get(f"{base}/v1/usage", params={"group_by": "key"},
                             headers={"Authorization": f"Bearer {ADMIN}"}).json()
        images = {r["group"]: r["images"] for r in everyone["data"]}
        assert images == {"admin": 1, "team-a": 3, "team-b": 3}
        assert everyone["total"]["savings_usd"] > 0  # local work vs the gpt-image price
        bad = httpx.get(f"{base}/v1/usage", params={"group_by": "colour"},
                        headers={"Authorization": f"Bearer {ADMIN}"})
        assert bad.status_code == 400

        assert store.revoke("team-b")
        time.sleep(2.1)
        with pytest.raises(openai.AuthenticationError):
            gen(b)
        assert [k.name for k in store.list() if k.active] == ["team-a"]
    # keys are stored hashed: the database holds no key
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))  # db, -wal, -shm
    assert b"team-a" in raw  # the names are there, so the search looks in the right place
    assert team_a.encode() not in raw and team_b.encode() not in raw
