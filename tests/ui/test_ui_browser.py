"""eri ui in a real headless browser (Debian's chromium + chromedriver, driven by Selenium): start a tiny
job from the page, watch the loss curve grow and a sample grid appear, stop it, resume it; the screenshot
the README shows (docs/ui.png) is taken here when ``ERI_UI_SCREENSHOT`` names it (``make screenshot``).

Skipped, with the reason printed, where chromium, chromedriver or selenium is missing; ``.ci/run``
installs them so CI always runs it (``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from eridiffusion.ui import UISettings, create_ui_app
from tests.conftest import tiny_job
from tests.ui.helpers import job_config, wait_for

SCREENSHOT_ENV = "ERI_UI_SCREENSHOT"
"""Where the finished page's screenshot is written; unset, the test's temporary folder, so a test run never
rewrites a tracked file."""
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> tuple[str, str]:
    """(browser, driver) executables, or skip saying what is missing."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None
    )
    missing = [what for what, found in (("chromium", browser), ("chromedriver", driver)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        reason = (
            f"browser test skipped: {', '.join(missing)} not found "
            "(apt-get install chromium chromium-driver; pip install -e '.[dev]')"
        )
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    assert browser and driver
    return browser, driver


@pytest.fixture
def ui_url(tmp_path: Path) -> Iterator[str]:
    """``eri ui`` over ``tmp_path`` on a free 127.0.0.1 port, in a thread; its jobs are stopped at the end
    (after the browser has quit: the server waits for open connections)."""
    _browser()  # skip before starting anything
    sample = {"prompts": ["a red circle", "a blue square"], "steps": 4, "images_per_prompt": 2, "every": 30}
    datasets = tiny_job(tmp_path)["datasets"]  # validation loss too: its curve shares the chart
    datasets[0]["validation_split"] = 0.125
    train = {"lr_warmup_steps": 20, "lr_scheduler": "cosine"}
    job_config(tmp_path, 300, train, sample=sample, datasets=datasets, validation={"every": 50})
    settings = UISettings(
        runs=tmp_path / "output",
        configs=tmp_path / "configs",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stop_jobs_on_exit=True,
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_ui_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the UI server to start")
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(90)


@pytest.fixture
def browser() -> Iterator[Any]:
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1250"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_start_watch_stop_and_resume_a_job_in_the_browser(ui_url: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def text(css: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, css).text

    def points() -> int:
        return int(browser.find_element(By.CSS_SELECTOR, "#loss-chart").get_attribute("data-points") or 0)

    browser.get(ui_url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#config-select option"), 20, "the config list")
    Select(browser.find_element(By.CSS_SELECTOR, "#config-select")).select_by_visible_text("job.yaml")
    browser.find_element(By.CSS_SELECTOR, "#start").click()
    wait_for(lambda: "queued run t" in text("#validate-output"), 60, "validation and the queued job")
    assert "job t: tiny" in text("#validate-output")  # the plan eri validate printed

    wait_for(lambda: text("#run-status") == "running", 60, "the run to show as running")
    first = wait_for(points, 60, "a first point on the loss curve")
    wait_for(lambda: points() > first + 5, 60, "the loss curve to grow")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#samples img.sample"), 60, "a sample grid")
    browser.find_element(By.CSS_SELECTOR, "#stop").click()  # at once: the tiny job trains ~20 steps/s
    wait_for(lambda: text("#run-status") == "interrupted", 60, "the stopped run")
    sample = browser.find_element(By.CSS_SELECTOR, "#samples img.sample")
    wait_for(lambda: browser.execute_script("return arguments[0].naturalWidth", sample), 20, "the grid image")
    sample.click()  # click to enlarge
    assert browser.find_element(By.CSS_SELECTOR, "#lightbox").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "#lightbox").click()
    stopped_at = points()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#resume").is_enabled(), 10, "the resume button")
    assert "stopped at step" in text("#log")
    browser.find_element(By.CSS_SELECTOR, "#resume").click()
    try:
        wait_for(lambda: text("#run-status") == "finished", 90, "the resumed run to finish")
    except AssertionError as exc:
        page = {css: text(css) for css in ("#run-status", "#validate-output", "#run-error", "#jobs", "#log")}
        raise AssertionError(f"{exc}; the page shows {page}") from None
    wait_for(lambda: points() >= 300 > stopped_at, 20, "the whole loss curve")
    legend = text("figure:has(#loss-chart) .legend")
    assert "loss" in legend and "val/loss" in legend  # training and validation curves, named
    assert "model" in text("#downloads")
    assert "finished" in text("#runs tbody")
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ui.png").resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000  # a page, not a blank
