"""GET /v1/dashboard after real requests, and the web page's files, over loopback."""

from __future__ import annotations

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

ADMIN = "admin-secret-for-dashboard-tests-01"


def get(base: str, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{base}{path}", headers=headers, timeout=30)


def test_dashboard_counts_what_was_done(tiny_weights: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    store = KeyStore(Ledger(url))
    team_a = store.create("team-a", daily_images=3)
    team_b = store.create("team-b")
    settings = Settings(weights_dir=tiny_weights, ledger_url=url, admin_key=SecretStr(ADMIN))
    with serve(create_app(settings, chat_loader=None)) as base:
        # keys exist: the numbers need one, in the usual error shape
        denied = get(base, "/v1/dashboard")
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"

        a = openai.OpenAI(base_url=f"{base}/v1", api_key=team_a, max_retries=0, timeout=60)
        b = openai.OpenAI(base_url=f"{base}/v1", api_key=team_b, max_retries=0, timeout=60)
        r = a.images.with_raw_response.generate(prompt="x", size="256x256", n=2)
        assert r.headers["x-spillway-route"] == "local"
        a.images.generate(prompt="y", size="256x256", n=1)
        with pytest.raises(openai.RateLimitError):  # over team-a's quota: refused, recorded
            a.images.generate(prompt="z", size="256x256", n=1)
        b.images.generate(prompt="w", size="256x256", n=1)

        d = get(base, "/v1/dashboard", team_a).json()
        assert d["object"] == "dashboard" and d["key"] == "team-a" and d["status"] == "ready"
        t = d["today"]
        assert (t["images"], t["local_images"], t["cloud_images"]) == (3, 3, 0)
        assert (t["requests"], t["local_requests"], t["unrouted_requests"]) == (3, 2, 1)
        assert t["local_image_share"] == 1.0 and t["local_request_share"] == 1.0
        assert t["cloud_equivalent_usd"] > t["cost_usd"] >= 0  # local beats gpt-image
        assert t["savings_usd"] == pytest.approx(t["cloud_equivalent_usd"] - t["cost_usd"])
        hour = d["last_hour"]
        assert (hour["local_images"], hour["cloud_images"], hour["errors"]) == (3, 0, 1)
        assert hour["requests"] == 3 and len(hour["minutes"]) == 60
        assert sum(m["local_images"] for m in hour["minutes"]) == 3
        assert hour["mean_latency_ms"] > 0
        assert d["images_per_s"] > 0
        (model,) = d["local"]
        assert model["model"] == "sdxl-turbo" and model["kind"] == "images"
        assert model["queued"] == 0 and model["running"] == 0 and d["queued"] == 0
        assert model["items_done"] == 4 and model["items_per_s"] > 0
        assert {c["name"]: c["configured"] for c in d["clouds"]} == {"openai": False,
                                                                     "gemini": False}
        assert "256x256" in d["playground"]["sizes"]

        # the admin sees every key's rows, and the same totals as /v1/usage
        admin = get(base, "/v1/dashboard", ADMIN).json()
        assert admin["key"] is None
        assert (admin["today"]["images"], admin["today"]["requests"]) == (4, 4)
        usage = get(base, "/v1/usage", ADMIN).json()["total"]
        assert admin["today"]["cost_usd"] == pytest.approx(usage["cost_usd"])
        assert admin["today"]["savings_usd"] == pytest.approx(usage["savings_usd"])


def test_the_page_needs_no_key_and_loads_nothing_from_elsewhere(tiny_weights: Path,
                                                               tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    KeyStore(Ledger(url)).create("team-a")
    settings = Settings(weights_dir=tiny_weights, ledger_url=url)
    with serve(create_app(settings, loader=None, chat_loader=None), wait_ready=False) as base:
        page = get(base, "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "<title>Spillway</title>" in page.text
        names = ["app.js", "api.js", "playground.js", "dashboard.js", "charts.js", "style.css"]
        for name in ["index.html", *names]:  # no CDN, no web font, no external script
            text = page.text if name == "index.html" else get(base, f"/web/{name}").text
            assert "http://" not in text and "https://" not in text, name
        for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css"),
                           ("icon.svg", "image/svg+xml")]:
            asset = get(base, f"/web/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        for bad in ["nope.js", "..%2Fapp.py", "index.py", "%2Fetc%2Fpasswd"]:
            missing = get(base, f"/web/{bad}")
            assert missing.status_code == 404 and "error" in missing.json()
