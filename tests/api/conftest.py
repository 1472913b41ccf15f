from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from service.config import Settings
from tests.harness import ROOT

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; `make test` installs it
LOOPBACK = {"127.0.0.1", "localhost"}


@pytest.fixture(scope="session", autouse=True)
def exported_llm() -> None:
    """The gateways under test serve the default LM from the model repository (Triton loads it from
    there; the embedded backend prefers it to the GGUF): convert it once if `amserve export` has not."""
    from service.triton.export import export_llm, llm_exported

    repository = ROOT / Settings.from_env().model_repository
    if not llm_exported(repository):
        export_llm(repository, progress=False)


# ----- headless Chromium, for the pages the gateway serves (/docs, /redoc, /explorer/) ----------


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
    """A 1280×800 page whose requests off the loopback are refused (and recorded in `page.refused`),
    with its script errors in `page.script_errors` and its console errors in `page.console_errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.refused, page.script_errors, page.console_errors = [], [], []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))

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
