"""The playground in a real browser (headless Chromium via Playwright): generate, translate,
look at the positional encodings, by mouse and by keyboard, on a wide and a narrow screen.
Screenshots go to the test's tmp_path."""

from __future__ import annotations

import os
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

CHROMIUM = os.environ.get("SCRIVEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="no Chromium (apt-get install -y chromium); Playwright's own browser download is "
           "not used")
ARGS = ["--no-sandbox", "--disable-gpu", "--headless", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_serve import ServerThread, one_thread, trained_models

    from scriven.serve import ServeLimits, create_app
    with one_thread():
        lm, tr = trained_models(tmp_path_factory)
        app = create_app([lm, tr], limits=ServeLimits(max_new_tokens=64))
        with ServerThread(app) as running:
            yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    # An HTTP error answer is logged by the browser; the page shows it (tested below).
    page.on("console", lambda m: problems.append(m.text) if m.type == "error"
            and "the server responded with a status of 422" not in m.text else None)
    page.on("request", lambda r: problems.append(f"external request {r.url}")
            if not r.url.startswith((server.url, "data:")) else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#gen-model option", state="attached")
    yield page
    context.close()
    assert not problems, problems


def test_generate_streams_tokens_with_probabilities_and_alternatives(page, tmp_path):
    page.fill("#gen-prompt", "anna said")
    page.fill("#gen-max-tokens", "12")
    page.fill("#gen-temperature", "0")
    page.click("#gen-submit")
    page.wait_for_function("document.getElementById('gen-stats').textContent.includes('tokens in')")
    tokens = page.locator("#gen-output .tok")
    assert tokens.count() == 12
    assert page.inner_text("#gen-output .prompt") == "Anna said"
    tokens.first.hover()
    tip = page.locator("#tooltip")
    assert tip.is_visible() and "p = " in tip.inner_text()
    assert tip.locator("tr").count() == 5  # the five most likely tokens
    assert tip.locator("tr.chosen").count() == 1  # greedy: the chosen one is among them
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)


def test_keyboard_only(page, tmp_path):
    page.focus("#gen-prompt")
    page.keyboard.press("Control+A")
    page.keyboard.type("the prince")
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["gen-temperature", "gen-top-k", "gen-top-p", "gen-max-tokens", "gen-seed",
                     "gen-submit"]
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('gen-stats').textContent.includes('tokens in')")
    page.focus("#gen-output .tok")
    assert page.locator("#tooltip").is_visible()
    assert page.get_attribute("#gen-output .tok", "aria-describedby") == "tooltip"
    page.keyboard.press("Escape")
    assert not page.locator("#tooltip").is_visible()
    # Ctrl+Enter in the source box translates.
    page.focus("#tr-source")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.getElementById('tr-stats').textContent.includes('Translated')")


def test_translate_shows_the_cross_attention(page, tmp_path):
    page.fill("#tr-source", "the old cat eats.")
    page.fill("#tr-beam", "2")
    page.click("#tr-submit")
    page.wait_for_selector("#attention-box:not([hidden])")
    rows = page.locator("#attention tbody tr")
    cols = page.locator("#attention thead th")
    assert rows.count() >= 1 and cols.count() >= 2
    assert page.locator("#attention tbody tr").first.locator("td").count() == cols.count()
    page.select_option("#att-head", "0")
    assert page.locator("#attention tbody tr").count() == rows.count()
    page.wait_for_function("document.getElementById('tr-stats').textContent.includes('beam 2')")
    page.locator("#translate").screenshot(path=str(tmp_path / "translate.png"))


def test_positional_encodings_are_drawn(page):
    page.fill("#pos-length", "20")
    page.fill("#pos-dims", "16")
    page.click("#pos-submit")
    page.wait_for_function("document.getElementById('pos-encoding').width === 16")
    assert page.evaluate("document.getElementById('pos-encoding').height") == 20
    assert page.evaluate("document.getElementById('pos-similarity').width") == 20
    assert "sin" in page.inner_text("#pos-formula")


def test_errors_are_shown_not_thrown(page):
    page.fill("#gen-top-p", "")
    page.fill("#gen-top-k", "100000")  # more than the vocabulary: the server says so
    page.click("#gen-submit")
    page.wait_for_function("document.getElementById('gen-error').textContent.length > 0")
    assert "top_k" in page.inner_text("#gen-error")


def test_narrow_screen_has_no_sideways_scrolling(browser, server, tmp_path):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#tr-model option", state="attached")
    page.click("#tr-submit")
    page.wait_for_selector("#attention-box:not([hidden])")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)
    context.close()


@pytest.fixture(scope="module")
def export_server(tmp_path_factory):
    """The same two models, exported: served through ONNX Runtime and CTranslate2."""
    for package in ("onnx", "onnxruntime", "ctranslate2"):
        pytest.importorskip(package, reason="serving exports needs pip install 'scriven[export]'")
    from test_serve import ServerThread, one_thread, trained_models

    from scriven.export import export
    from scriven.serve import create_app
    root = tmp_path_factory.mktemp("browser-exports")
    with one_thread():
        lm, tr = trained_models(tmp_path_factory)
        app = create_app([export(lm, "onnx", root / "lm"), export(tr, "ctranslate2", root / "fr")])
        with ServerThread(app) as running:
            yield running


def test_an_export_is_served_and_its_missing_attention_explained(browser, export_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(export_server.url + "/")
    page.wait_for_selector("#tr-model option", state="attached")
    assert "onnxruntime export" in page.inner_text("#gen-model")
    assert "ctranslate2 export" in page.inner_text("#tr-model")
    # Its position table is inside CTranslate2's files: only the formula is offered.
    assert page.locator("#pos-model option").count() == 1
    page.fill("#gen-prompt", "anna said")
    page.fill("#gen-max-tokens", "5")
    page.click("#gen-submit")
    page.wait_for_function("document.getElementById('gen-stats').textContent.includes('tokens in')")
    assert page.locator("#gen-output .tok").count() == 5
    page.click("#tr-submit")  # "Show cross-attention" is ticked by default
    page.wait_for_function("document.getElementById('tr-stats').textContent.includes('Translated')")
    assert page.inner_text("#tr-output")
    assert "does not give attention weights" in page.inner_text("#tr-error")
    assert page.locator("#attention-box").is_hidden()
    context.close()
    assert not problems, problems
