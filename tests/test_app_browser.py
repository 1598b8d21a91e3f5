"""`dpseg app` in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser). Upload a drawn picture, type classes, Run, wait for both pass images, check they are
the picture's size and coloured, then a bad input's one-line error; the screenshot is kept.

The test fails, never skips, where the browser or Playwright is missing: `bash
scripts/quickstart.sh test` installs both on a fresh machine."""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM = Path(os.environ.get("DPSEG_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_image(page, selector: str) -> np.ndarray:
    src = page.locator(f"{selector} img").first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, (src, response.status)
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def test_the_page_segments_an_upload_in_chromium(app_world, tmp_path):
    from pipeline.app.page import dataset_examples, serve
    from pipeline.app.runner import AppRunner
    from pipeline.evaluate.session import SegmentSession

    assert CHROMIUM.is_file(), f"no browser at {CHROMIUM}: apt-get install -y chromium (or set DPSEG_CHROMIUM)"
    session = SegmentSession(app_world / "ckpt", device="cpu")
    examples = dataset_examples(session, tmp_path)
    assert [Path(e.image).name for e in examples] == ["example-0.png", "example-1.png"]
    page_app, url = serve(AppRunner(session), port=free_port(), examples=examples, block=False)
    try:
        assert url.startswith("http://127.0.0.1:")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(url)
                page.locator("#upload input[type=file]").set_input_files(str(app_world / "picture.png"))
                page.locator("#classes textarea").fill("red solid circle, blue solid square, sky")
                page.locator("#run").click()
                page.wait_for_selector("#pass1 img", timeout=120_000)
                page.wait_for_selector("#pass2 img", timeout=120_000)
                status = page.locator("#status").inner_text()
                assert "pass I and pass II" in status and "text prompts only: sky" in status, status
                picture = np.asarray(Image.open(app_world / "picture.png").convert("RGB"))
                for selector in ("#pass1", "#pass2"):
                    shown = fetch_image(page, selector)
                    assert shown.shape == picture.shape, selector  # at the picture's own size
                    assert shown.std() > 10 and not np.array_equal(shown, picture), selector  # not blank, coloured
                assert page.locator("#legend td", has_text="sky").count() == 1
                assert page.locator("#prompts img").count() >= 1  # bank prompts -> crops, per refined class
                page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
                # a bad input: one line in the page, the last pictures cleared
                page.locator("#classes textarea").fill(" , ")
                page.locator("#run").click()
                page.wait_for_function(
                    "document.querySelector('#status').innerText.startsWith('Error:')", timeout=60_000
                )
                assert "no classes" in page.locator("#status").inner_text()
                assert page.locator("#pass1 img").count() == 0
            finally:
                browser.close()
    finally:
        page_app.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
    if os.environ.get("DPSEG_APP_SCREENSHOT"):  # how docs/app.png is made
        shutil.copy(tmp_path / "app.png", os.environ["DPSEG_APP_SCREENSHOT"])
    print(f"screenshot: {tmp_path / 'app.png'}")
