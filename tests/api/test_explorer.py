"""The explorer page at /explorer/ in headless Chromium, refused every request off the loopback: its three
views drive the live API (Text: /v1/explain and /v1/completions; Memory: retrieve with explain and the
DrDAM fidelity; Image: /v1/complete with explain), with no script or console error; with API keys the
page sends the key it is given, and it works under a proxy's path prefix.

With AMSERVE_SCREENSHOTS=docs/explorer the view tests also write text.png, memory.png and image.png there.
"""

from __future__ import annotations

import itertools
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

import httpx
import pytest

from service.api.auth import create_key
from tests.harness import ROOT, ServerProcess

WAIT_MS = 30_000
PREFIX = "/amserve"
LAST_STEP = "(label) => { const {step, last} = document.querySelector(label).dataset; return last && step === last; }"


@pytest.fixture()
def page(offline_page):
    offline_page.set_default_timeout(WAIT_MS)
    return offline_page


def assert_clean(page) -> None:
    assert page.refused == [] and page.script_errors == [] and page.console_errors == []


def screenshot(page, name: str) -> None:
    """docs/explorer/<name>.png when AMSERVE_SCREENSHOTS names that folder."""
    if folder := os.environ.get("AMSERVE_SCREENSHOTS"):
        path = ROOT / folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(path))


def record_steps(page, label: str) -> None:
    """From now on, `window.shownSteps` lists every step the counter `label` shows, in order."""
    page.evaluate("""(label) => {
        const counter = document.querySelector(label);
        window.shownSteps = [];
        new MutationObserver(() => window.shownSteps.push(Number(counter.dataset.step)))
            .observe(counter, {attributes: true, attributeFilter: ["data-step"]});
    }""", label)


def wait_for_last_step(page, label: str) -> int:
    """Waits until the counter `label` shows its last step; asserts it showed every step before, in order."""
    page.wait_for_function(LAST_STEP, arg=label, timeout=WAIT_MS)
    last = int(page.locator(label).get_attribute("data-last"))
    assert page.evaluate("window.shownSteps") == list(range(last + 1))
    return last


# ----- the views, on an open server with the default text model ---------------------------------


@pytest.fixture(scope="module")
def explorer_server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("explorer")) as proc:
        yield proc


@pytest.fixture(scope="module")
def api(explorer_server):
    with httpx.Client(base_url=explorer_server.url, timeout=60.0) as client:
        yield client


def visible(token: str) -> str:
    """A token as the page shows it."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def bar_values(page, container: str = "#candidates") -> list[str]:
    return page.locator(f"{container} .bar-value").all_inner_texts()


def bar_widths(page) -> list[str]:
    return page.locator("#candidates .bar-fill").evaluate_all("(bars) => bars.map((b) => b.style.width)")


def test_text_view_shows_tokens_attention_and_the_next_token(explorer_server, api, page):
    page.goto(f"{explorer_server.url}/explorer/")
    prompt = page.locator("#prompt").input_value()
    tokens = api.post("/v1/explain", json={"prompt": prompt, "layers": [0], "heads": [0]}).json()["tokens"]
    page.click("#explain")
    page.wait_for_function("(n) => document.querySelectorAll('#tokens .chip').length === n", arg=len(tokens))
    assert page.locator("#heatmap").get_attribute("data-tokens") == str(len(tokens))
    assert page.locator("#heatmap").evaluate("(c) => c.width") > 0
    assert page.locator("#layer option").count() > 1 and page.locator("#head option").count() > 1
    assert page.locator("#candidates .bar-row").count() == 10
    screenshot(page, "text")

    values, widths = bar_values(page), bar_widths(page)
    for _ in range(10):  # temperature 1.00 → 0.50: the probabilities sharpen
        page.locator("#temperature").press("ArrowLeft")
    assert page.locator("#temperature-value").inner_text() == "0.50"
    page.wait_for_function("(before) => document.querySelector('#candidates .bar-value').textContent !== before",
                           arg=values[0])
    assert bar_values(page) != values and bar_widths(page) != widths

    for _ in range(3):  # top-k 3: three candidates kept, the others marked as cut by it
        page.locator("#top-k").press("ArrowRight")
    page.wait_for_function("() => document.querySelectorAll('#candidates .bar-row.kept').length === 3")
    assert page.locator("#candidates .bar-row.cut .bar-note").first.inner_text() == "cut by top-k"

    kept = page.locator("#candidates .bar-row.kept .bar-label").all_inner_texts()
    page.click("#sample")
    page.wait_for_function("(before) => document.querySelector('#prompt').value !== before", arg=prompt)
    sampled = page.locator("#prompt").input_value()[len(prompt):]
    assert page.locator("#prompt").input_value().startswith(prompt) and visible(sampled) in kept
    longer = api.post("/v1/explain", json={"prompt": prompt + sampled, "layers": [0], "heads": [0]}).json()["tokens"]
    page.wait_for_function("(n) => document.querySelectorAll('#tokens .chip').length === n", arg=len(longer))
    assert_clean(page)


def test_text_view_compares_prompt_variants(explorer_server, api, page):
    page.goto(f"{explorer_server.url}/explorer/")
    page.click("#add-variant")
    variants = page.locator("#variants textarea")
    assert variants.count() == 3
    variants.nth(2).fill("Once upon a time")
    completions = []
    page.on("response", lambda r: r.url.endswith("/v1/completions") and completions.append(r))
    page.click("#compare")
    page.wait_for_function("() => document.querySelectorAll('#comparison .compare-column').length === 3")
    model = api.get("/v1/models").json()["data"][0]["id"]  # the text model comes first
    continuations = {}
    for r in completions:  # answered in any order
        request = r.request.post_data_json
        assert request["model"] == model and request["max_tokens"] == 16 and request["temperature"] == 0
        continuations[request["prompt"]] = r.json()["choices"][0]["text"]
    prompts = ["The cat sat on the", "The dog sat on the", "Once upon a time"]
    assert sorted(continuations) == sorted(prompts)
    for column, prompt in zip(page.locator("#comparison .compare-column").all(), prompts, strict=True):
        assert column.locator("h3").inner_text() == prompt
        assert column.locator(".bar-row").count() == 5
        assert column.locator(".continuation strong").text_content() == continuations[prompt] != ""
    assert_clean(page)


def test_memory_view_animates_the_descent_of_a_demo_bank(explorer_server, page):
    page.goto(f"{explorer_server.url}/explorer/#memory")
    page.wait_for_selector("#bank option", state="attached")
    page.click("#create-demo")
    page.wait_for_function("() => document.querySelectorAll('#patterns .thumb').length === 6")
    assert page.locator("#bank").input_value().startswith("demo-modern-")
    page.locator("#patterns .thumb").nth(2).click()
    assert page.locator("#cue-note").inner_text().startswith("pattern p2")

    record_steps(page, "#memory-step")
    with page.expect_response(lambda r: r.url.endswith("/retrieve")) as answer:
        page.click("#run-memory")
    [result] = answer.value.json()["results"]
    last = wait_for_last_step(page, "#memory-step")
    assert last == len(result["explanation"]) - 1 == result["steps"]
    points = page.locator("#memory-energy circle[data-series=energy]")
    assert points.count() == len(result["explanation"])
    energies = [float(v) for v in points.evaluate_all("(ps) => ps.map((p) => p.dataset.value)")]
    assert energies == [step["energy"] for step in result["explanation"]]
    assert all(b <= a + 1e-6 * abs(a) for a, b in itertools.pairwise(energies))
    assert page.locator("#top-memories .bar-row").count() == len(result["explanation"][-1]["top_memories"])
    assert page.locator("#fidelity-card").is_hidden()
    screenshot(page, "memory")

    page.select_option("#demo-kind", "drdam")
    page.click("#create-demo")
    page.wait_for_selector("#fidelity table")
    assert page.locator("#fidelity tr").count() == 3  # the header, the stored patterns, their noisy copies
    assert "same nearest memory" in page.locator("#fidelity .readout").inner_text()
    assert_clean(page)


def test_image_view_compares_two_masks_frame_by_frame(explorer_server, page):
    page.goto(f"{explorer_server.url}/explorer/#image")
    page.locator("#digits .thumb").nth(3).click()
    mask_a = page.locator(".et-panel").nth(0).locator("canvas.mask")
    box = mask_a.bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)  # drag a rectangle over the top-left 4×4 cells
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45, steps=5)
    page.mouse.up()

    answers = []
    page.on("response", lambda r: r.url.endswith("/v1/complete") and answers.append(r))
    record_steps(page, "#image-step")
    page.click("#run-image")
    last = wait_for_last_step(page, "#image-step")
    frames = {str(r.request.post_data_json["mask"]): len(r.json()["frames"]) for r in answers}  # in either order
    drawn = [[r < 4 and c < 4 for c in range(8)] for r in range(8)]  # A: the rectangle dragged
    right_half = [[c >= 4 for c in range(8)] for _ in range(8)]  # B: its preset
    assert frames == {str(drawn): 13, str(right_half): 13} and last == 12  # 12 steps, the start included
    assert page.locator(".et-panel .preset").first.input_value() == "drawn"
    for panel, mask in zip(page.locator(".et-panel").all(), (drawn, right_half), strict=True):
        for series in ("energy", "attention", "Hopfield"):
            assert panel.locator(f"circle[data-series={series}]").count() == frames[str(mask)]
        assert panel.locator(".panel-note").inner_text().startswith("E ")
        assert "masked-pixel error" in panel.locator(".panel-note").inner_text()
    screenshot(page, "image")
    assert_clean(page)


# ----- with API keys, and behind a proxy's path prefix ------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer-keys")
    keys_file = root / "keys.json"
    key = create_key(keys_file, "acme")
    with ServerProcess(root / "data", extra_args=["--api-keys-file", str(keys_file), "--model", "none"]) as proc:
        yield proc, key


class PrefixProxy:
    """A reverse proxy on loopback serving `upstream` under PREFIX, which it strips (an ingress's rewrite)."""

    def __init__(self, upstream: str):
        self.upstream = upstream

    def __enter__(self) -> Self:
        upstream = self.upstream

        class Forward(BaseHTTPRequestHandler):
            def forward(self):
                if not self.path.startswith(PREFIX + "/"):
                    return self.send_error(404)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "content-length"}}
                answer = httpx.request(self.command, upstream + self.path[len(PREFIX):], headers=headers,
                                       content=body, timeout=30)
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in {"content-length", "content-encoding", "transfer-encoding", "connection",
                                            "date", "server"}:
                        self.send_header(name, value)
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}{PREFIX}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_page_is_served_open_with_its_own_policy(secured):
    server, _ = secured
    redirect = httpx.get(f"{server.url}/explorer")
    assert redirect.status_code == 308 and redirect.headers["location"] == "explorer/"
    for name in ("", "explorer.js", "explorer.css"):
        r = httpx.get(f"{server.url}/explorer/{name}")  # no key: the page is public, what it calls is not
        assert r.status_code == 200
        assert "script-src 'self';" in r.headers["content-security-policy"]
        assert "unsafe-inline" not in r.headers["content-security-policy"]
    assert not any(path.startswith("/explorer") for path in httpx.get(f"{server.url}/openapi.json").json()["paths"])


def sent_keys(page) -> list[str | None]:
    """The Authorization header of every API request the page makes, in order."""
    headers: list[str | None] = []
    page.on("request", lambda r: "/v1/" in r.url and headers.append(r.headers.get("authorization")))
    return headers


def test_the_page_sends_the_api_key_it_is_given(secured, page):
    server, key = secured
    page.goto(f"{server.url}/explorer/")
    sent = sent_keys(page)
    page.fill("#api-key", key)
    page.click("a[data-view=memory]")
    page.wait_for_selector("#bank option", state="attached")
    page.click("#create-demo")
    page.wait_for_function("() => document.querySelectorAll('#patterns .thumb').length === 6")
    record_steps(page, "#memory-step")
    page.click("#run-memory")
    wait_for_last_step(page, "#memory-step")
    assert len(sent) >= 4 and set(sent) == {f"Bearer {key}"}  # banks, create, store, banks, retrieve
    assert page.evaluate("sessionStorage.getItem('amserve-api-key')") == key
    page.reload()  # the key stays for the session
    assert page.locator("#api-key").input_value() == key
    assert_clean(page)


def test_the_page_works_under_a_path_prefix(secured, page):
    server, key = secured
    with PrefixProxy(server.url) as proxy:
        page.goto(f"{proxy.url}/explorer")  # redirected to …/explorer/, still under the prefix
        assert urlsplit(page.url).path == f"{PREFIX}/explorer/"
        sent = sent_keys(page)
        page.fill("#api-key", key)
        page.click("a[data-view=image]")
        record_steps(page, "#image-step")
        with page.expect_response(lambda r: r.url.endswith("/v1/complete")) as answer:
            page.click("#run-image")
        assert urlsplit(answer.value.url).path == f"{PREFIX}/v1/complete" and answer.value.ok
        wait_for_last_step(page, "#image-step")
        assert set(sent) == {f"Bearer {key}"}
    assert_clean(page)
