"""The web page at / in a real browser (Debian's Chromium, driven by Playwright).

A server with an API key: the page first says it needs a key, then, with the key,
generates images, answers a question about a dropped picture, and its dashboard shows
what was done. Screenshots land in test-artifacts/; the admin's view of the dashboard
(over an hour of seeded history) is the picture in the README (docs/dashboard.png).
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright
from pydantic import SecretStr

from server.app import create_app
from server.config import BatchSettings, ImageSettings, OpenAISettings, Settings
from server.store.keys import KeyStore
from server.store.ledger import Ledger, UsageRow
from tests.conftest import serve

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DOCS_SHOT = ROOT / "docs" / "dashboard.png"
ADMIN = "admin-secret-for-browser-tests-0123"
# As the machine notes say: no network for Chromium's own background traffic here.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium (`make browser` installs it)")



def seed_history(ledger: Ledger, now: datetime, key: str) -> dict[str, float]:
    """An hour of traffic from another key, with a burst that spilled to the cloud;
    returns its totals for today (UTC) as the dashboard should count them."""
    today = {"images": 0, "local_images": 0, "cost_usd": 0.0, "cloud_equivalent_usd": 0.0}
    for ago in range(59, 0, -1):
        at = now - timedelta(minutes=ago, seconds=30)
        local = int(24 + 14 * math.sin(ago / 6) + (ago * 7) % 9)
        cloud = max(0, int(18 - abs(ago - 30) * 3)) if 24 <= ago <= 36 else 0
        rows = [UsageRow("/v1/images/generations", "auto", "local", None, "ok", 200,
                         images=local, cost_usd=local * 0.0011,
                         cloud_equivalent_usd=local * 0.011, latency_ms=420, key_name=key,
                         reason="default", at=at)]
        if cloud:
            rows.append(UsageRow("/v1/images/generations", "auto", "openai", "gpt-image-1",
                                 "ok", 200, images=cloud, cost_usd=cloud * 0.011,
                                 cloud_equivalent_usd=cloud * 0.011, latency_ms=2600,
                                 key_name=key, reason="deadline", at=at))
        for row in rows:
            ledger.record(row)
            if at.date() == now.date():
                today["images"] += row.images
                today["local_images"] += row.images if row.route == "local" else 0
                today["cost_usd"] += row.cost_usd
                today["cloud_equivalent_usd"] += row.cloud_equivalent_usd
    return today


def picture(path: Path) -> Path:
    image = Image.new("RGB", (96, 64), (30, 144, 255))
    for x in range(40, 70):
        for y in range(20, 50):
            image.putpixel((x, y), (255, 200, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def server(tiny_weights: Path, tmp_path: Path) -> Iterator[tuple[str, str, Ledger]]:
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = Ledger(url)
    key = KeyStore(ledger).create("team-a")  # before start: the server needs keys at once
    settings = Settings(weights_dir=tiny_weights, ledger_url=url, admin_key=SecretStr(ADMIN),
                        images=ImageSettings(min_side=64),
                        batch=BatchSettings(max_wait_ms=5, warmup=False),
                        # configured, as on a real box; nothing here spills to it (a closed
                        # loopback port answers at once if anything ever did)
                        openai=OpenAISettings(api_key=SecretStr("sk-unused"),
                                              base_url="http://127.0.0.1:9/v1"))
    with serve(create_app(settings)) as base:
        yield base, key, ledger
    ledger.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1360, "height": 900})
        page = context.pages[0] if context.pages else context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: problems.append(msg.text)
                if msg.type == "error" and "401" not in msg.text else None)
        page.set_default_timeout(60_000)
        yield page
        context.close()
    assert not problems, problems  # no script errors, nothing blocked by the page's CSP


def shot(page: Page, name: str, **kwargs: object) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"web-{name}.png"
    page.screenshot(path=str(path), **kwargs)
    return path


def test_playground_and_dashboard_in_a_browser(server: tuple[str, str, Ledger], page: Page,
                                               tmp_path: Path) -> None:
    base, key, ledger = server
    p = page
    p.goto(f"{base}/")

    # Without a key: the page says so, and so does a generation attempt.
    banner = p.locator("#auth-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("This server needs an API key")
    p.fill("#prompt", "a lighthouse at dusk")
    p.click("#generate")
    expect(p.locator("#gen-error")).to_contain_text("needs an API key")
    shot(p, "needs-key")

    # A wrong key is refused without being echoed; the right one clears the banner.
    p.fill("#api-key", "sk-spw-not-a-real-key")
    p.click("#key-save")
    expect(banner).to_contain_text("refused")
    expect(banner).not_to_contain_text("not-a-real-key")
    p.fill("#api-key", key)
    p.click("#key-save")
    expect(banner).to_be_hidden()
    assert p.evaluate("localStorage.getItem('spillway.key')") == key

    # Generate: the size list comes from the server, down to its smallest side.
    expect(p.locator("#size option[value='64x64']")).to_have_count(1)
    p.select_option("#size", "64x64")
    p.fill("#n", "2")
    p.fill("#seed", "42")
    p.click("#generate")
    images = p.locator("#gallery img.generated")
    expect(images).to_have_count(2)
    p.wait_for_function(
        "[...document.querySelectorAll('#gallery img.generated')]"
        ".every(i => i.complete && i.naturalWidth > 0)")
    sizes = images.evaluate_all("els => els.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[64, 64], [64, 64]]
    assert images.evaluate_all("els => els.map(i => i.dataset.seed)") == ["42", "43"]
    meta = p.locator("#gallery .result .meta").first
    expect(meta).to_contain_text("local")
    expect(meta).to_contain_text("queue")
    expect(p.locator("#gen-error")).to_be_hidden()

    # Ask about a dropped picture: the streamed answer shows up.
    p.set_input_files("#vlm-file", str(picture(tmp_path / "blue.png")))
    expect(p.locator("#vlm-preview")).to_be_visible()
    p.fill("#question", "What colour is the square?")
    p.click("#ask")
    answer = p.locator("#answer")
    expect(answer).to_have_attribute("data-done", "true")
    assert p.inner_text("#answer-text").strip()
    expect(p.locator("#answer-meta")).to_contain_text("local")
    expect(p.locator("#ask-error")).to_be_hidden()
    shot(p, "playground", full_page=True)

    # The dashboard, as team-a sees it: its own two images, all local, nothing queued.
    p.click("#tab-dashboard")
    expect(p.locator("#kpi-images")).to_have_text("2")
    expect(p.locator("#kpi-share")).to_have_text("100%")
    expect(p.locator("#kpi-queue")).to_have_text("0")
    expect(p.locator("#kpi-cost-sub")).to_have_text("2 requests today")
    expect(p.locator("#kpi-images-sub")).to_have_text("2 local · 0 cloud")
    expect(p.locator("#kpi-savings")).not_to_have_text("$0.00")
    expect(p.locator("#dash-foot")).to_contain_text("team-a")
    assert p.locator("#models tr").count() == 2
    expect(p.locator("#workers")).to_contain_text("the models run in the server's process")
    expect(p.locator("#clouds tr:first-child td:nth-child(2)")).to_have_text("configured")
    shot(p, "dashboard-team", full_page=True)

    # The admin sees every key: an hour of another team's traffic (some of it spilled
    # to the cloud) on top of team-a's.
    now = datetime.now(UTC)
    seeded = seed_history(ledger, now, "batch-nightly")
    p.fill("#api-key", ADMIN)
    p.click("#key-save")
    total = int(seeded["images"]) + 2
    expect(p.locator("#kpi-images")).to_have_text(str(total))
    local_share = (seeded["local_images"] + 2) / total
    expect(p.locator("#kpi-share")).to_have_text(f"{round(local_share * 100)}%")
    expect(p.locator("#dash-foot")).to_contain_text("every key")
    p.set_viewport_size({"width": 1360, "height": 780})  # the README's picture: no blank
    p.wait_for_timeout(300)  # let the charts redraw at the new size
    path = shot(p, "dashboard", full_page=True)
    if os.environ.get("SPILLWAY_DOCS_SCREENSHOT") or not DOCS_SHOT.exists():
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS_SHOT)
