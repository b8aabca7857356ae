"""The operators' dashboard in a real browser: Debian's headless Chromium, driven by
Playwright. Sign in, read the chart's figures against /api/ai/usage, create a key, call
with it, revoke it, see the next call refused."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from support import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    UPSTREAM_KEY,
    Server,
    auth,
    chat_body,
    eventually,
    gateway_env,
    make_config,
)
from tollway.app import create_app
from tollway.events.broker import EmbeddedNats
from tollway.testing.upstream import FakeUpstream

# Where the README's screenshot comes from: TOLLWAY_DASHBOARD_SHOT=docs/dashboard.png.
SHOT = os.environ.get("TOLLWAY_DASHBOARD_SHOT")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed (apt-get install chromium; .ci/run does)"
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def live(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[tuple[str, httpx.Client]]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = make_config(up.base_url, nats={"url": nats_server.url,
                                             "data_dir": str(tmp_path / "data")})
        with Server(create_app(cfg, env=gateway_env())) as server, \
                httpx.Client(base_url=server.url, timeout=30) as client:
            yield server.url, client


def _chat(client: httpx.Client, key: str) -> int:
    return client.post("/api/ai/v1/chat/completions", headers=auth(key),
                       json=chat_body(model="fast")).status_code


def _signed_in(page: Page, url: str) -> None:
    page.goto(f"{url}/api/ai/dashboard")
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("body[data-loaded]")


def test_sign_in_read_the_figures_make_use_and_revoke_a_key(
        browser: Browser, live: tuple[str, httpx.Client]) -> None:
    url, client = live
    assert [_chat(client, ACME_KEY) for _ in range(3)] == [200] * 3
    assert _chat(client, GLOBEX_KEY) == 200
    usage: dict[str, Any] = eventually(lambda: (u := client.get(
        "/api/ai/usage", headers=auth(ADMIN_KEY)).json())["total"]["requests"] == 4 and u)
    assert usage
    want: dict[tuple[str, str], int] = {}
    for row in usage["rows"]:
        k = (row["tenant"], row["day"])
        want[k] = want.get(k, 0) + row["cost_nanousd"]

    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # A wrong key is refused and nothing is shown.
    page.goto(f"{url}/api/ai/dashboard")
    page.fill("#admin-key", "tw-wrong")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('refused')")
    assert page.is_hidden("#board")
    _signed_in(page, url)
    # The key stays in this tab's sessionStorage, never in the URL.
    assert ADMIN_KEY not in page.url
    assert page.evaluate("sessionStorage.getItem('tollway.admin')") == ADMIN_KEY

    # The chart's bars and the table under it carry the same figures as /api/ai/usage.
    bars = page.eval_on_selector_all(
        "#spend-chart rect", "els => els.map(e => [e.dataset.tenant, e.dataset.day, "
        "Number(e.dataset.nanousd)])")
    assert {(t, d): v for t, d, v in bars if v} == want
    cells = page.eval_on_selector_all(
        "#spend-table tbody tr", "rows => rows.map(r => [r.dataset.tenant, r.dataset.day, "
        "Number(r.cells[3].dataset.nanousd), Number(r.cells[2].textContent)])")
    assert {(t, d): v for t, d, v, _ in cells} == want
    assert sum(n for *_, n in cells) == 4
    # Budgets and providers come from their endpoints.
    budget = client.get("/api/ai/budget", params={"tenant": "acme"},
                        headers=auth(ADMIN_KEY)).json()
    row = page.locator("#budgets tbody tr[data-tenant=acme] td")
    assert float(row.nth(3).inner_text()) == pytest.approx(budget["spent_usd"])
    assert page.locator("#providers tbody tr td").first.inner_text() == "fake"
    assert page.locator("#tail li").count() >= 4  # the live tail shows the calls' events

    # Create a key through the page, call with it, revoke it, see the next call refused.
    page.fill("#key-tenant", "acme")
    page.fill("#key-name", "from-the-page")
    page.fill("#key-daily", "5")  # a daily budget of its own
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-key:not([hidden])")
    key = page.get_attribute("#new-key", "data-key")
    assert key and key.startswith("tw-")
    assert _chat(client, key) == 200
    row_of_key = page.locator("#keys tbody tr", has_text="from-the-page")
    assert row_of_key.locator("td").nth(4).inner_text() == "5"
    listed = client.get("/api/ai/admin/keys", params={"tenant": "acme"},
                        headers=auth(ADMIN_KEY)).json()["data"]
    assert [k["daily_usd"] for k in listed if k["name"] == "from-the-page"] == [5.0]
    row_of_key.locator("button.revoke").click()
    page.wait_for_function("() => [...document.querySelectorAll('#keys tbody tr')].some("
                           "r => r.textContent.includes('from-the-page') && "
                           "r.textContent.includes('revoked'))")
    assert eventually(lambda: _chat(client, key) == 401)
    if SHOT:
        page.screenshot(path=SHOT, full_page=True)
    assert errors == []
    page.close()


def test_the_page_keeps_to_its_own_origin(live: tuple[str, httpx.Client]) -> None:
    _, client = live
    page = client.get("/api/ai/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "http" not in page.text.replace("http-equiv", "")  # no outside assets
    for asset in ("app.js", "app.css"):
        r = client.get(f"/api/ai/dashboard/{asset}")
        assert r.status_code == 200 and r.headers["content-security-policy"] == csp
        # Only the SVG namespace's name looks like a URL (it is never fetched).
        assert r.text.replace("http://www.w3.org/2000/svg", "").count("http") == 0
        assert "url(" not in r.text and "import " not in r.text
    # The data behind it is not public.
    assert client.get("/api/ai/admin/events").status_code == 401
    assert client.get("/api/ai/admin/events", headers=auth(ACME_KEY)).status_code == 403
    tail = client.get("/api/ai/admin/events", params={"limit": 0}, headers=auth(ADMIN_KEY))
    assert tail.status_code == 400
