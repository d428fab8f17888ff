"""The example chat page (examples/chat.py, served by `scale0 asgi` at /chat) in
two headless Chromium sessions: a message typed in one appears in the other."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from .conftest import Stack, wait_for
from .test_status_page import CHROMIUM_FLAGS

pytestmark = pytest.mark.e2e


def _driver() -> webdriver.Chrome:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("chromium or chromedriver is missing: run `make test` (installs Debian's "
                    "chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(20)
    return driver


@pytest.fixture
def two_browsers() -> Iterator[tuple[webdriver.Chrome, webdriver.Chrome]]:
    first = _driver()
    try:
        second = _driver()
        try:
            yield first, second
        finally:
            second.quit()
    finally:
        first.quit()


def _lines(driver: webdriver.Chrome) -> list[str]:
    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#log li")]


def _state(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.ID, "state").get_attribute("data-state") or "")


def test_a_message_typed_in_one_browser_appears_in_the_other(
        fresh_stack: Stack, two_browsers: tuple[webdriver.Chrome, webdriver.Chrome]) -> None:
    stack = fresh_stack
    stack.start_mongrel2()
    stack.start_broker()
    stack.start_asgi("examples.chat:app", service="chat", routes=("/chat",))
    page = stack.wait_ok("/chat")
    assert "Scale0 chat" in page.text and page.headers["content-type"].startswith("text/html")
    alice, bob = two_browsers
    for driver in (alice, bob):
        driver.get(stack.url("/chat"))
        wait_for(lambda d=driver: _state(d) == "open", 20, "the page's WebSocket to open")
    alice.find_element(By.ID, "name").send_keys("alice")
    alice.find_element(By.ID, "text").send_keys("hello from alice\n")
    wait_for(lambda: "alice: hello from alice" in _lines(bob), 20,
             "bob's page to show alice's message")
    bob.find_element(By.ID, "name").send_keys("bob")
    bob.find_element(By.ID, "text").send_keys("hi alice\n")
    wait_for(lambda: "bob: hi alice" in _lines(alice), 20, "alice's page to show bob's reply")
    assert requests.get(stack.url("/chat/nope"), timeout=10).status_code == 404
