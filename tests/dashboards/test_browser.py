"""End to end: ``workbench dashboard`` served headless, every page driven in headless Chromium.

Checks that no page shows an exception box, that the overlays render, and each page's views in the
browser: Explore's original image, map, per-layer plot, clickable patch map (a click picks the
patch) and logit lens; the uploader's stated limit and the model error; Methods with every method
(progress shown, names on one line, images full size); Compare opened on a report folder (cost
chart with its Pareto front, every method labelled in the overlap matrix and the legends);
Failures with the restore. Saves a screenshot of each page into a temporary folder, or the folder
``WORKBENCH_SCREENSHOTS`` names. ``WORKBENCH_SCREENSHOT_RESULTS`` serves another results folder
holding a report in ``report/`` (the README's screenshots: ``runs`` after ``workbench report``),
instead of the test's small one. Prints the time from launch to the first rendered overlay.
Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them) and ``selenium``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
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
def server(results_folder, tmp_path_factory):
    from workbench.commands.dashboard import streamlit_command

    port = free_port()
    served = Path(os.environ.get("WORKBENCH_SCREENSHOT_RESULTS") or results_folder).resolve()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WORKBENCH_DASHBOARD_RESULTS": str(served)}
    log_path = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    log = open(log_path, "w")
    started = time.monotonic()
    process = subprocess.Popen(streamlit_command(str(served), port, "127.0.0.1"), cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if process.poll() is not None:
            raise AssertionError(f"streamlit exited with {process.returncode}: {log_path.read_text()[-2000:]}")
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
    try:
        wait_until(lambda: ready(driver) and settled(driver), timeout, f"the {page} page to render")
    except AssertionError:
        # A browser session can lose its connection to the server mid-run and never repaint; a page
        # that fails again after one reload is a real failure.
        driver.get(f"{url}/?page={page}")
        wait_until(lambda: ready(driver) and settled(driver), timeout, f"the {page} page to render after a reload")
    time.sleep(1.0)  # let the last elements paint
    wait_until(lambda: ready(driver) and settled(driver), 30, f"the {page} page to settle")
    no_exception(driver, page)
    if folder is not None:
        driver.save_screenshot(str(folder / f"{page}.png"))


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def count(driver, selector: str) -> int:
    return js(driver, "return document.querySelectorAll(arguments[0]).length", selector)


def main_text(driver) -> str:
    return js(driver, "return (document.querySelector('[data-testid=\"stMain\"]') || document.body).innerText")


def type_into(driver, label: str, text: str) -> None:
    """Replace the text of the input whose label starts with ``label`` and submit it."""
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("css selector", f"input[aria-label^='{label}']")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text, Keys.ENTER)


def chart_in(driver, key: str):
    return driver.find_element("css selector", f".st-key-{key} .js-plotly-plot")


def test_every_page_renders_in_chromium(server, browser, screenshots):
    url, started = server
    driver = browser
    driver.get(f"{url}/?page=explore")
    wait_until(lambda: rendered_images(driver, 2), 180, "the first overlay image on Explore")
    first_overlay = time.monotonic() - started
    print(f"\nlaunch to first rendered overlay: {first_overlay:.1f} s")
    charts = "[data-testid=\"stPlotlyChart\"] .main-svg"
    visit(driver, url, "explore", lambda d: rendered_images(d, 2) and count(d, charts) >= 5, None)
    text = main_text(driver)
    assert "original image" in text and "rank of" in text and "probability of" in text  # the logit lens
    assert "text token -> patch" in text and "attention per llm layer" in text

    # a click on the map picks the patch: the number box and the per-layer plot follow it
    from selenium.webdriver.common.action_chains import ActionChains

    figure = chart_in(driver, "explore_map")
    plot = figure.find_element("css selector", ".nsewdrag")
    js(driver, "arguments[0].scrollIntoView({block: 'center'})", plot)
    time.sleep(0.5)
    ActionChains(driver).move_to_element_with_offset(plot, -plot.size["width"] // 2 + 60, -plot.size["height"] // 2 + 60)\
        .pause(0.5).move_by_offset(2, 2).pause(0.5).perform()
    hovered = wait_until(lambda: js(driver, "return arguments[0].querySelector('.hoverlayer').textContent", figure), 30,
                         "the hover label of a patch")
    assert hovered.startswith("patch "), hovered
    patch = hovered.split()[1]
    ActionChains(driver).click().perform()
    box = "input[aria-label='patch (visual token number)']"
    wait_until(lambda: driver.find_element("css selector", box).get_attribute("value") == patch and settled(driver),
               60, f"the clicked {hovered}")
    wait_until(lambda: f"text token -> patch {patch} " in main_text(driver) and settled(driver), 60,
               f"the plots of {hovered}")
    assert f"patch {patch}" in chart_in(driver, "explore_by_layer").text  # the per-layer plot follows it
    js(driver, "window.scrollTo(0, 0)")
    no_exception(driver, "explore")
    driver.save_screenshot(str(screenshots / "explore.png"))

    # the uploader states the app's own limit
    driver.find_element("xpath", "//label[.//p[text()='upload an image']]").click()
    wait_until(lambda: "per file" in js(driver, "return document.body.innerText"), 60, "the uploader")
    sidebar = js(driver, "return document.querySelector('[data-testid=\"stSidebar\"]').innerText")
    squeezed = sidebar.replace(" ", "")
    assert "20MBperfile" in squeezed and "200MB" not in squeezed, sidebar
    # a missing model: the error suggests nothing the dashboard lacks
    type_into(driver, "model (shipped name, hub name or local folder)", "someone/not-here-vlm")
    wait_until(lambda: "cannot load model" in main_text(driver), 60, "the model error")
    error = main_text(driver)
    assert "model box" in error and "--allow-download" not in error and "--model" not in error

    # Methods: every method, with progress, names on one line, images at full size
    driver.get(f"{url}/?page=methods")
    wait_until(lambda: rendered_images(driver, 3) and settled(driver), 120, "the Methods page")
    driver.find_element("xpath", "//label[.//p[text()='every method']]").click()
    wait_until(lambda: count(driver, "[data-testid='stProgress']"), 60, "the progress bar")
    wait_until(lambda: rendered_images(driver, 40) and settled(driver), 240, "every method's images")
    headers = js(driver, "return Array.from(document.querySelectorAll('[data-testid=\"stMarkdownContainer\"] div[title]'))"
                         ".map(e => [e.innerText, e.scrollHeight, e.scrollWidth <= e.clientWidth + 1])")
    assert len(headers) > 19 and all(h < 40 and whole for _, h, whole in headers), headers  # one line, not cut
    image_widths = ("return Array.from(document.querySelectorAll('[data-testid=\"stMain\"] [data-testid=\"stImage\"] img'))"
                    ".filter(i => !i.closest('[data-testid=\"stExpander\"]'))"  # the collapsed stage lists
                    ".map(i => i.getBoundingClientRect().width)")
    # not shrunk to a thumbnail (40 px when every method shared one row); polled while the columns settle
    wait_until(lambda: min(js(driver, image_widths)) >= 150, 30, "every method's images at full size")
    no_exception(driver, "methods")
    js(driver, "const e = document.querySelector('[data-testid=\"stMarkdownContainer\"] div[title]'); e.scrollIntoView();"
               "let s = e.parentElement; while (s && !s.scrollTop) s = s.parentElement; if (s) s.scrollTop -= 90;")
    time.sleep(0.5)
    driver.save_screenshot(str(screenshots / "methods.png"))

    # Compare: the report folder itself
    driver.get(f"{url}/?page=compare")
    wait_until(lambda: count(driver, charts) >= 4 and settled(driver), 120, "the Compare charts")
    type_into(driver, "sweep or report folder", "report")
    wait_until(lambda: "report: " in main_text(driver) and count(driver, charts) >= 4 and settled(driver), 120,
               "the report's charts")
    time.sleep(1.0)  # let the last charts paint
    no_exception(driver, "compare")
    cost = chart_in(driver, "compare_cost_chart")
    assert "Pareto front" in cost.text
    names = js(driver, "return arguments[0].data.map(t => t.name)", cost)
    shown = js(driver, "return Array.from(arguments[0].querySelectorAll('.legend .legendtext')).map(e => e.textContent)",
               cost)
    assert set(names) <= set(shown) and "Pareto front" in names, (names, shown)  # every method in the legend
    overlap = chart_in(driver, "compare_overlap")
    rows = js(driver, "return arguments[0].data[0].y", overlap)
    labels = js(driver, "return Array.from(arguments[0].querySelectorAll('.yaxislayer-above .ytick text'))"
                        ".map(e => e.textContent)", overlap)
    assert set(labels) == set(rows), (labels, rows)  # every row labelled
    driver.save_screenshot(str(screenshots / "compare.png"))

    # Failures: the report folder, the diagnosis, the restore
    driver.get(f"{url}/?page=failures")
    wait_until(lambda: settled(driver) and count(driver, "input[aria-label^='sweep or report folder']"), 120,
               "the Failures page")
    type_into(driver, "sweep or report folder", "report")
    wait_until(lambda: "category:" in main_text(driver) and rendered_images(driver, 2) and settled(driver), 240,
               "the Failures diagnosis")
    assert "what the categories mean" in main_text(driver)
    buttons = [b for b in driver.find_elements("css selector", "[data-testid='stButton'] button") if "restored" in b.text]
    if buttons:
        buttons[0].click()
        alert = "return document.querySelectorAll('[data-testid=\"stAlert\"]').length"
        wait_until(lambda: driver.execute_script(alert) and rendered_images(driver, 3) and settled(driver), 120,
                   "the restored answer")
    no_exception(driver, "failures")
    driver.save_screenshot(str(screenshots / "failures.png"))
    for page in ("explore", "methods", "compare", "failures"):
        assert (screenshots / f"{page}.png").stat().st_size > 10_000, page
    assert first_overlay < 180
