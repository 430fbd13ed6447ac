"""The demo page at `/`: served right (content types, cache headers, a strict CSP, off with
MOBILEVIT_DEMO=false), and used in a real headless Chromium against a real `python -m app`:
a photo gets its label, a PDF its error in words, a wrong API key its message, the keyboard
alone reaches the file input, and a 360-px-wide screen needs no sideways scrolling."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.demo import ASSETS, DEMO_DIR
from app.main import create_app
from tests.serving_helpers import REPO, free_port, make_settings, server_command, server_env

EXAMPLES = REPO / "examples"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHIPPED = REPO / "models" / "flowers-mobilevit-xxs"


async def get(app, path: str, **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


@pytest.mark.anyio
@pytest.mark.parametrize("path", list(ASSETS))
async def test_assets_have_types_cache_headers_and_a_strict_csp(tiny_model_dir, path):
    app = create_app(make_settings(tiny_model_dir))
    response = await get(app, path)
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[path][1]
    assert response.headers["cache-control"] == "no-cache"
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    again = await get(app, path, **{"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and not again.content


@pytest.mark.anyio
async def test_the_demo_can_be_turned_off(tiny_model_dir):
    app = create_app(make_settings(tiny_model_dir, demo=False))
    for path in ASSETS:
        assert (await get(app, path)).status_code == 404


def test_the_page_has_no_inline_script_and_nothing_from_elsewhere():
    page = (DEMO_DIR / "index.html").read_text()
    assert all('src="/' in tag for tag in re.findall(r"<script[^>]*>", page))
    assert not re.search(r"<script[^>]*>\s*[^<\s]", page)  # no inline body
    assert not re.search(r"\son\w+=", page) and "style=" not in page
    for file in DEMO_DIR.iterdir():
        text = file.read_text()
        assert not re.search(r"https?://(?!localhost)", text), file.name
    assert 'accept="image/*"' in page and "multiple" in page  # a phone offers its camera


# ---- in a real browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver; make test does this when it runs as root)")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Without the background-networking flags Chromium keeps dialling Google, refused offline.
    flags = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1000,900")  # fmt: skip
    for flag in flags:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def start(tmp_path: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp_path / f"server-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(server_command(port), cwd=REPO, env=server_env(SHIPPED, **settings),
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError((tmp_path / f"server-{port}.log").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    proc, base = start(tmp_path_factory.mktemp("demo"))
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def wait_text(driver, css: str, needle: str, seconds: float = 20) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]
        found = [t for t in texts if needle in t]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {css} with {needle!r}: {texts}")


def test_a_photo_gets_its_label(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    wait_text(browser, "#model", "flowers-mobilevit-xxs")
    assert "top-1" in browser.find_element(By.ID, "model").text
    assert not browser.find_element(By.ID, "api-key").is_displayed()  # no key needed
    browser.find_element(By.ID, "files").send_keys(str(EXAMPLES / "rose.jpg"))
    verdict = wait_text(browser, ".verdict", "roses")
    assert "ms on the server" in verdict
    bars = browser.find_elements(By.CSS_SELECTOR, ".scores li")
    assert len(bars) == 5 and "%" in bars[0].text
    assert "1 classified" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "photo.png"))


def test_a_pdf_gets_its_error_in_words(browser, server, tmp_path):
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n")
    browser.get(server + "/")
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "files").send_keys(str(pdf))
    wait_text(browser, ".error", "Not an image")
    assert "1 failed" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "pdf.png"))


def test_keyboard_alone_reaches_the_file_input(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server + "/")
    wait_text(browser, "#model", "flowers-mobilevit-xxs")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("id") == "files"
    focused.send_keys(str(EXAMPLES / "sunflower.jpg"))  # what the file picker returns
    wait_text(browser, ".verdict", "sunflowers")
    live = browser.find_element(By.ID, "results").get_attribute("aria-live")
    assert live == "polite"
    browser.save_screenshot(str(tmp_path / "keyboard.png"))


def test_a_360_px_screen_needs_no_sideways_scrolling(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.set_window_size(360, 800)
    try:
        browser.get(server + "/")
        browser.find_element(By.ID, "files").send_keys(str(EXAMPLES / "daisy.jpg"))
        wait_text(browser, ".verdict", "daisy")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        viewport = browser.execute_script("return window.innerWidth")
        assert width <= viewport, (width, viewport)
        browser.save_screenshot(str(tmp_path / "narrow.png"))
    finally:
        browser.set_window_size(1000, 900)


def test_with_an_api_key_the_page_asks_for_it(browser, tmp_path):
    from selenium.webdriver.common.by import By

    proc, base = start(tmp_path, api_key="open sesame")
    try:
        browser.get(base + "/")
        wait_text(browser, "#model", "flowers-mobilevit-xxs")
        key = browser.find_element(By.ID, "api-key")
        assert key.is_displayed()
        key.send_keys("wrong")
        browser.find_element(By.ID, "files").send_keys(str(EXAMPLES / "tulip.jpg"))
        wait_text(browser, ".error", "API key is missing or wrong")
        browser.save_screenshot(str(tmp_path / "wrong-key.png"))
        key.clear()
        key.send_keys("open sesame")
        browser.find_element(By.ID, "files").send_keys(str(EXAMPLES / "tulip.jpg"))
        wait_text(browser, ".verdict", "tulips")
        stored = browser.execute_script(
            "return JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie"
        )
        assert "sesame" not in stored  # kept in memory only
    finally:
        proc.terminate()
        proc.wait(30)
