"""End to end: ``workbench dashboard`` served headless, every page driven in headless Chromium.

Checks that no page shows an exception box and that the overlay images render, saves a screenshot
of each page (into a temporary folder, or the folder ``WORKBENCH_SCREENSHOTS`` names: set it to
docs/screenshots to refresh the README's), and prints the time from launch to the first rendered
overlay.
Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them) and ``selenium``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1500")


def require_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"headless Chromium is needed for the dashboard's browser test but {', '.join(missing)} "
                    "is missing: install it with `apt-get install -y chromium chromium-driver` (.ci/run does)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is needed for the dashboard's browser test: pip install -e '.[test]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the page is still being rebuilt
            last = e
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else ""))


@pytest.fixture(scope="module")
def server(results_folder):
    from workbench.commands.dashboard import streamlit_command

    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WORKBENCH_DASHBOARD_RESULTS": str(results_folder)}
    log = open(results_folder / "streamlit.log", "w")
    started = time.monotonic()
    process = subprocess.Popen(streamlit_command(str(results_folder), port, "127.0.0.1"), cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if process.poll() is not None:
            raise AssertionError(f"streamlit exited with {process.returncode}: "
                                 f"{(results_folder / 'streamlit.log').read_text()[-2000:]}")
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200

    try:
        wait_until(healthy, 90, "/_stcore/health")
        yield url, started
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def rendered_images(driver, at_least: int) -> int:
    """How many overlay <img> in the main area have loaded (natural width > 0), if at least ``at_least``."""
    count = driver.execute_script(
        "return Array.from(document.querySelectorAll('section.main [data-testid=\"stImage\"] img, "
        "[data-testid=\"stMain\"] [data-testid=\"stImage\"] img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length")
    return count if count >= at_least else 0


def settled(driver) -> bool:
    """The script run has finished: no spinner and no 'running' status."""
    return not driver.execute_script(
        "return document.querySelectorAll('[data-testid=\"stSpinner\"], [data-testid=\"stStatusWidgetRunningIcon\"]')"
        ".length")


def no_exception(driver, page: str) -> None:
    boxes = driver.execute_script("return Array.from(document.querySelectorAll('[data-testid=\"stException\"]'))"
                                  ".map(e => e.innerText)")
    assert not boxes, f"{page} shows an exception: {boxes[0][:2000]}"


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("WORKBENCH_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def visit(driver, url: str, page: str, ready, folder: Path | None, timeout: float = 120) -> None:
    driver.get(f"{url}/?page={page}")
    wait_until(lambda: ready(driver) and settled(driver), timeout, f"the {page} page to render")
    time.sleep(1.0)  # let the last elements paint
    wait_until(lambda: ready(driver) and settled(driver), 30, f"the {page} page to settle")
    no_exception(driver, page)
    if folder is not None:
        driver.save_screenshot(str(folder / f"{page}.png"))


def test_every_page_renders_in_chromium(server, browser, screenshots):
    url, started = server
    driver = browser
    driver.get(f"{url}/?page=explore")
    wait_until(lambda: rendered_images(driver, 1), 180, "the first overlay image on Explore")
    first_overlay = time.monotonic() - started
    print(f"\nlaunch to first rendered overlay: {first_overlay:.1f} s")
    visit(driver, url, "explore", lambda d: rendered_images(d, 1), screenshots)
    visit(driver, url, "methods", lambda d: rendered_images(d, 3), screenshots)
    charts = "return document.querySelectorAll('[data-testid=\"stPlotlyChart\"] .main-svg').length"
    visit(driver, url, "compare", lambda d: d.execute_script(charts) >= 3, screenshots)
    visit(driver, url, "failures", lambda d: rendered_images(d, 1), None)  # its screenshot comes after the restore
    button = next(b for b in driver.find_elements("css selector", "[data-testid='stButton'] button")
                  if "restored" in b.text)
    button.click()
    alert = "return document.querySelectorAll('[data-testid=\"stAlert\"]').length"
    wait_until(lambda: driver.execute_script(alert) and rendered_images(driver, 2) and settled(driver), 120,
               "the restored answer")
    no_exception(driver, "failures")
    driver.save_screenshot(str(screenshots / "failures.png"))
    for page in ("explore", "methods", "compare", "failures"):
        assert (screenshots / f"{page}.png").stat().st_size > 10_000, page
    assert first_overlay < 180
