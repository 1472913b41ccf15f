"""The interactive docs work without internet: headless Chromium, refused every request off the loopback,
shows every operation at /docs (Swagger UI) and at /redoc (ReDoc)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.harness import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; `make test` installs it
LOOPBACK = {"127.0.0.1", "localhost"}


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("docs"), extra_args=["--model", "none"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (Debian's chromium package; `make test` installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (dev extras)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def offline_page(browser):
    """A page whose requests off the loopback are refused, and recorded in `page.refused`; its script
    errors are in `page.script_errors`."""
    context = browser.new_context()
    page = context.new_page()
    page.refused, page.script_errors = [], []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))

    def loopback_only(route):
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            page.refused.append(route.request.url)
            route.abort()

    page.route("**/*", loopback_only)
    try:
        yield page
    finally:
        context.close()


def operation_count(server) -> int:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    return sum(len(methods) for methods in paths.values())


def test_swagger_ui_shows_every_operation_offline(docs_server, offline_page):
    offline_page.goto(f"{docs_server.url}/docs")
    offline_page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    assert offline_page.locator(".opblock").count() == operation_count(docs_server)
    assert offline_page.get_by_text("/v1/banks/{bank}/retrieve", exact=True).count() == 1
    assert offline_page.refused == [] and offline_page.script_errors == []  # nothing was asked of the internet


def test_redoc_shows_every_operation_offline(docs_server, offline_page):
    offline_page.goto(f"{docs_server.url}/redoc")
    operations = offline_page.locator('[data-section-id^="operation/"]')
    operations.first.wait_for(timeout=30_000)
    assert operations.count() == operation_count(docs_server)
    assert offline_page.refused == [] and offline_page.script_errors == []
