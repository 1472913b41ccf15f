"""The interactive docs work without internet: headless Chromium, refused every request off the loopback,
shows every operation at /docs (Swagger UI) and at /redoc (ReDoc)."""

from __future__ import annotations

import httpx
import pytest

from tests.harness import ServerProcess


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("docs"), extra_args=["--model", "none"]) as proc:
        yield proc


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
