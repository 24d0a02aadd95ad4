"""The Space in a real browser: headless Debian Chromium driven by Playwright, against the app on 127.0.0.1.

Set `LORA_OPS_SCREENSHOT=assets/screenshot.png` to also write the README's screenshot there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, expect, sync_playwright
from safetensors import safe_open

from tests.fixtures_app import EXAMPLE_LORA

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000  # generous: this 2-core machine runs other jobs too
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def test_upload_resize_see_table_and_plot_download(browser, app_url, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)

    page.locator("#lora-file input[type=file]").set_input_files(str(EXAMPLE_LORA))
    expect(page.locator("#inspect-summary")).to_contain_text("20 LoRA modules, rank 8 (20 layers)")
    figure = page.locator("#spectra-plot [data-testid=matplotlib] img")
    expect(figure).to_be_visible()
    inspected_figure = figure.get_attribute("src")

    page.get_by_role("button", name="Per-layer ranks and output dtype").click()  # blank energy: off
    expect(page.get_by_role("spinbutton", name="energy")).to_be_visible()
    rank_box = page.get_by_label("number input for rank")
    rank_box.fill("4")
    rank_box.press("Enter")
    page.locator("#resize-button").click()

    expect(page.locator("#result-summary")).to_contain_text("rank 8 → 4")
    expect(page.locator("#result-summary")).to_contain_text("worst layer error")
    table = page.locator("#layers-table")
    expect(table).to_contain_text("transformer.single_transformer_blocks.0.proj_out")
    expect(table.get_by_role("row")).to_have_count(21)  # header + 20 layers
    expect(figure).to_be_visible()
    expect(figure).not_to_have_attribute("src", inspected_figure)  # redrawn with the result's errors

    link = page.locator("#resized-file a[download]")
    expect(link).to_have_attribute("download", "example-flux-lora-svd-rank4.safetensors")
    with page.expect_download() as download_info:
        link.click()
    downloaded = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(downloaded)
    with safe_open(str(downloaded), "pt") as handle:
        keys = list(handle.keys())
        assert len(keys) == 40
        assert {handle.get_slice(k).get_shape()[0] for k in keys if k.endswith("lora_A.weight")} == {4}
        assert {handle.get_slice(k).get_shape()[1] for k in keys if k.endswith("lora_B.weight")} == {4}

    page.get_by_role("button", name="Per-layer ranks and output dtype").click()  # closed again for the picture
    expect(page.get_by_role("spinbutton", name="energy")).to_be_hidden()
    screenshot = tmp_path / "screenshot.png"
    table_box = table.bounding_box()  # relative to the viewport: add the scroll offset
    height = round(table_box["y"] + table_box["height"] + page.evaluate("window.scrollY")) + 16
    page.screenshot(path=str(screenshot), full_page=True, clip={"x": 0, "y": 0, "width": 1400, "height": height})
    with Image.open(screenshot) as image:
        assert image.size == (1400, height)
    if target := os.environ.get("LORA_OPS_SCREENSHOT"):
        shutil.copyfile(screenshot, Path(target))
    page.close()
