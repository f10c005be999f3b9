"""What a client is told when it should not (or need not) retry, and where it went wrong
(issue 15, item 7): a wrong path names the prefixes served; a deterministic failure says
``x-should-retry: false``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pipelines.base import NotFinite
from server.app import create_app
from server.config import BatchSettings, Settings
from server.providers.local.batcher import from_batch_failure
from tests.conftest import serve


@pytest.mark.parametrize("path", ["/images/generations", "/v2/chat/completions",
                                  "/v1beta1/models/x:generateContent"])
def test_a_wrong_path_names_the_prefixes_served(tiny_weights: Path, tmp_path: Path,
                                                path: str) -> None:
    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db",
                        batch=BatchSettings(warmup=False))
    with serve(create_app(settings, chat_loader=None)) as base:
        r = httpx.post(base + path, json={"prompt": "x"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "not_found"
    assert "/v1 " in error["message"] and "/v1beta" in error["message"]
    assert path in error["message"]


def test_a_non_finite_image_is_not_worth_a_retry() -> None:
    err = from_batch_failure(NotFinite("NaN"), 30.0, "image pipeline")
    assert (err.status, err.code, err.headers["x-should-retry"]) == (500, "pipeline_error",
                                                                     "false")
    assert "seed" in err.message
    transient = from_batch_failure(RuntimeError("CUDA out of memory"), 30.0, "image pipeline")
    assert "x-should-retry" not in transient.headers


def test_the_api_docs_load_nothing_from_elsewhere(tiny_weights: Path, tmp_path: Path) -> None:
    """/docs and /redoc on an air-gapped box: every script and style they name is served
    here (issue 15, item 9)."""
    import re

    settings = Settings(weights_dir=tiny_weights, ledger_url=f"sqlite:///{tmp_path}/l.db",
                        batch=BatchSettings(warmup=False))
    with serve(create_app(settings, chat_loader=None), wait_ready=False) as base:
        for page in ("/docs", "/redoc"):
            html = httpx.get(base + page).text
            assets = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert assets, page
            for asset in assets:
                assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
                got = httpx.get(base + asset)
                assert got.status_code == 200 and len(got.content) > 1000, asset
        assert httpx.get(base + "/openapi.json").json()["info"]["title"] == "Spillway"
