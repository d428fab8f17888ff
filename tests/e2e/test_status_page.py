"""The live status page in a real headless browser (Debian's chromium, driven
through chromedriver by Selenium): it loads, shows a worker that was just
started, and drops it once it stops.

SCALE0_SCREENSHOT=docs/status-page.png also saves the screenshot taken under
traffic there (the one in docs/ comes from such a run).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from .conftest import Load, Proc, Stack, wait_for

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-extensions",
                  "--disable-component-update", "--no-first-run", "--window-size=1400,1250")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("chromium or chromedriver is missing: run `make test` (installs Debian's "
                    "chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(20)
        driver.set_script_timeout(20)
        yield driver
    finally:
        driver.quit()


def page_url(broker: Proc) -> str:
    match = re.search(r" metrics=(\S+)/metrics", broker.ready_line)
    assert match, broker.ready_line
    return match.group(1) + "/"


# The page re-renders its tables every 2 s, so a row found by WebDriver can be
# replaced before it is read: read rows in one script instead.
_ROWS_JS = """return Array.from(document.querySelectorAll(arguments[0]),
                        row => [row.dataset[arguments[1]], row.innerText]);"""
_CELL_JS = """const row = document.querySelector(arguments[0]);
              return row ? row.cells[arguments[1]].innerText : null;"""


def worker_rows(driver: webdriver.Chrome) -> dict[str, str]:
    """Worker label -> the row's visible text, as the page shows them now."""
    rows = driver.execute_script(_ROWS_JS, "#workers tbody tr[data-label]", "label")
    return {label: text for label, text in rows}


def service_cell(driver: webdriver.Chrome, service: str, column: int) -> str:
    text = driver.execute_script(_CELL_JS, f'#services tr[data-service="{service}"]', column)
    return str(text or "")


def test_page_shows_a_new_worker_and_drops_it_when_it_stops(
        fresh_stack: Stack, browser: webdriver.Chrome) -> None:
    stack = fresh_stack
    stack.start_mongrel2()
    broker = stack.start_broker("--metrics", "127.0.0.1:0")
    # Two processes of one loop each: two workers (each loop is a worker).
    stack.start_pool("e2e_apps:app", service="app", routes=("/app",), processes=2, threads=1)
    browser.get(page_url(broker))
    assert browser.title == "Scale0 broker status"
    wait_for(lambda: len(worker_rows(browser)) == 2, 15, "the page to list the two workers")
    assert "live" in browser.find_element(By.ID, "live").text

    status_json = page_url(broker) + "status.json"
    late = stack.start_pool("e2e_apps:app", service="late", routes=("/late",), threads=1)

    def late_label() -> str | None:
        workers = requests.get(status_json, timeout=5).json()["workers"]
        return next((w["label"] for w in workers if w["services"] == ["late"]), None)

    label = wait_for(late_label, 15, "the broker to know the new worker")
    row = wait_for(lambda: worker_rows(browser).get(label), 15, "the page to show the new worker")
    assert "late" in row and "ready" in row
    assert service_cell(browser, "late", 1) == "/late"

    late.stop()
    wait_for(lambda: label not in worker_rows(browser), 15, "the page to drop the stopped worker")
    assert len(worker_rows(browser)) == 2


def test_page_shows_rates_and_errors_under_traffic(
        fresh_stack: Stack, browser: webdriver.Chrome, tmp_path: Path) -> None:
    stack = fresh_stack
    stack.start_mongrel2()
    broker = stack.start_broker("--metrics", "127.0.0.1:0", "--route", "/admin=admin")
    stack.start_pool("e2e_apps:app", service="app", routes=("/app",), processes=2, threads=2)
    stack.start_pool("examples.flask_app:app", service="flask", routes=("/flask",))
    stack.wait_ok("/app/")
    stack.wait_ok("/flask/")
    browser.get(page_url(broker))
    paths = ["/app/hello", "/app/hello", "/flask/", "/app/sleep?0.2", "/missing", "/admin/"]

    def number(service: str, column: int) -> float:
        text = service_cell(browser, service, column)
        return float(text) if text.replace(".", "", 1).isdigit() else 0.0

    with Load(lambda n: stack.url(paths[n]), clients=len(paths), max_s=60) as load:
        load.wait_more(20)
        # Columns: 7 Req/s, 10 5xx.
        wait_for(lambda: number("app", 7) > 0 and number("flask", 7) > 0, 20,
                 "the page to show request rates")
        wait_for(lambda: number("admin", 10) > 0, 10,
                 "the page to count the 503s of a service without workers")
        shot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(shot))
    assert load.outcomes["2xx"] > 0 and load.outcomes["404"] > 0 and load.outcomes["503"] > 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("SCALE0_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
