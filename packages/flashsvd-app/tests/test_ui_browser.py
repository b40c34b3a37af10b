"""The UI in a real headless Chromium (Debian's ``chromium`` driven by Playwright).

Compress the packaged MiniLM on tiny settings, see the result card, evaluate it, see the results table
and a plot; a screenshot of every tab lands in ``test-artifacts/ui/`` at the repository root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from flashsvd.app.ui import create_ui  # noqa: E402
from flashsvd.app.ui.handlers import DENSE_DEFAULT  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "ui"
# flags for a closed network: no background connections, no GPU, no sandbox (CI runs as root)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    demo = create_ui(tmp_path_factory.mktemp("browser-workspace"))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.get_by_text("FlashSVD").first.wait_for()
        yield page
        browser.close()
    demo.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_compress_tab_shows_the_result_card(page):
    _tab(page, "Compress")
    page.locator("#compress-run").click()
    card = page.locator("#compress-card")
    sync_api.expect(card).to_contain_text("kept fraction", timeout=240_000)
    sync_api.expect(page.locator("#compress-path textarea")).to_have_value(
        __import__("re").compile(r"compressed_models/default_svd_k0\.75$")
    )
    _shot(page, "compress")


def test_evaluate_tab_shows_the_results_table(page):
    _tab(page, "Evaluate")
    page.get_by_role("button", name="Refresh list").first.click()
    models = page.locator("#eval-models input")
    for name in (DENSE_DEFAULT, "default_svd_k0.75"):
        models.click()
        page.get_by_role("option", name=__import__("re").compile(__import__("re").escape(name))).first.click()
    page.get_by_label("Max eval samples (0 = all)").fill("30")
    page.locator("#eval-run").click()
    table = page.locator("#eval-table")
    sync_api.expect(table).to_contain_text("svd", timeout=240_000)
    sync_api.expect(table).to_contain_text("spearman", timeout=240_000)
    _shot(page, "evaluate")


def test_compare_tab_draws_plots(page):
    _tab(page, "Compare")
    page.locator("#compare-refresh").click()
    plot = page.locator("#compare-quality img, #compare-quality canvas, #compare-quality svg").first
    plot.wait_for(timeout=60_000)
    _shot(page, "compare")


def test_other_tabs_render(page):
    _tab(page, "Checkpoints")
    page.locator("#ckpt-refresh").click()
    sync_api.expect(page.locator("#ckpt-table")).to_contain_text("default_svd_k0.75", timeout=30_000)
    _shot(page, "checkpoints")
    _tab(page, "Fine-tune")
    page.get_by_role("button", name="Fine-tune").wait_for()
    _shot(page, "finetune")
