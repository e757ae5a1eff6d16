"""The dashboard in a real browser (headless Chromium driven by selenium) against the real service:
sign in, watch a request appear without a reload, open one, cancel another, sign out, be refused.

Needs Debian's ``chromium`` and ``chromium-driver``; without them the test is skipped, unless
REQUIRE_BROWSER=1 (as ``.ci/run`` sets), which makes it fail. Screenshots of every page are saved
under the folder the test prints.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import API_KEY, Service, body, missing
from support.harness import wait_until

REQUIRE_ENV = "REQUIRE_BROWSER"
WAIT = 20.0


def _browser_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser() -> Iterator[Any]:
    paths = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        paths = None
    if paths is None:
        missing(
            "no headless Chromium (apt-get install chromium chromium-driver; pip install selenium)",
            REQUIRE_ENV,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=DriverService(executable_path=paths[1]), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_dashboard_in_a_real_browser(
    make_service: Callable[..., Service], browser: Any, tmp_path: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / f"{name}.png"))

    def until(condition: Callable[[Any], Any]) -> Any:
        # The page replaces its rows every few seconds: an element found just before that is stale.
        return WebDriverWait(
            browser, WAIT, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
        ).until(condition)

    service = make_service(MAX_CONCURRENT="1", RETRY_BASE_DELAY="0.05", MAX_RETRIES="1")
    # Some history for the overview: completed and failed requests.
    done = [service.submit(body(f"warm-up {n}")).json()["request_id"] for n in range(4)]
    failed = service.submit(body("refused upstream", x_fake={"status": 400})).json()["request_id"]

    def ended(request_id: str) -> bool:
        return service.status(request_id).json()["status"] in ("completed", "error")

    for request_id in [*done, failed]:
        wait_until(functools.partial(ended, request_id), timeout=WAIT)

    # Signed out, every page leads to the sign-in form.
    browser.get(service.url + "/dashboard")
    until(lambda b: b.current_url.endswith("/dashboard/sign-in"))
    browser.find_element(By.ID, "api_key").send_keys("not-the-key")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    until(lambda b: "Sign-in failed." in b.page_source)
    shot("1-sign-in-failed")
    field = browser.find_element(By.ID, "api_key")
    field.clear()
    field.send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    until(lambda b: b.current_url.endswith("/dashboard"))
    assert "Overview" in browser.title
    assert browser.find_element(By.CSS_SELECTOR, "[data-field=completed]").text == "4"
    assert browser.find_element(By.CSS_SELECTOR, "[data-field=failed]").text == "1"

    # A request submitted now appears without a reload (the marker survives: same page).
    browser.execute_script("window.stillTheSamePage = true;")
    fresh = service.submit(body("appears live")).json()["request_id"]
    until(lambda b: fresh in b.find_element(By.CSS_SELECTOR, "[data-rows]").text)
    assert browser.execute_script("return window.stillTheSamePage === true;")
    until(lambda b: b.find_element(By.CSS_SELECTOR, "[data-field=completed]").text == "5")
    shot("2-overview")

    # Open it.
    browser.find_element(By.LINK_TEXT, fresh).click()
    until(lambda b: b.current_url.endswith(f"/dashboard/requests/{fresh}"))
    until(lambda b: "echo: appears live" in b.page_source)
    assert "ok" in browser.find_element(By.ID, "attempts-h").find_element(By.XPATH, "..").text
    shot("3-request-completed")

    # Cancel another: one slow request holds the only slot, so the next one waits.
    slow = service.submit(body("slow", x_fake={"delay": 30})).json()["request_id"]
    waiting = service.submit(body("waits in line")).json()["request_id"]
    browser.get(f"{service.url}/dashboard/requests/{waiting}")
    assert "pending" in browser.find_element(By.CSS_SELECTOR, ".facts .badge").text
    shot("4-request-pending")
    cancel = browser.find_element(By.CSS_SELECTOR, "button.danger")
    cancel.send_keys("\n")  # by keyboard
    until(lambda b: "notice=cancelled" in b.current_url)
    assert service.status(waiting).json()["status"] == "cancelled"
    assert not browser.find_elements(By.CSS_SELECTOR, "button.danger")
    shot("5-request-cancelled")
    browser.get(f"{service.url}/dashboard/requests/{slow}")
    browser.find_element(By.CSS_SELECTOR, "button.danger").click()
    until(lambda b: "/dashboard/requests/" in b.current_url and "notice=" in b.current_url)
    wait_until(lambda: service.status(slow).json()["status"] == "cancelled", timeout=WAIT)

    # The list, filtered, at desktop and phone width.
    browser.get(service.url + "/dashboard/requests")
    assert failed in browser.page_source and waiting in browser.page_source
    shot("6-requests")
    browser.find_element(By.CSS_SELECTOR, "#status option[value=error]").click()
    browser.find_element(By.CSS_SELECTOR, "form.inline button[type=submit]").click()
    until(lambda b: "status=error" in b.current_url)
    assert failed in browser.page_source and fresh not in browser.page_source
    browser.set_window_size(390, 844)
    browser.get(service.url + "/dashboard")
    shot("7-overview-phone")
    browser.set_window_size(1280, 1000)

    # Sign out; then pages and the JSON behind them are refused.
    browser.get(service.url + "/dashboard")
    browser.find_element(By.CSS_SELECTOR, ".signout button").click()
    until(lambda b: b.current_url.endswith("/dashboard/sign-in"))
    shot("8-signed-out")
    browser.get(f"{service.url}/dashboard/requests/{fresh}")
    until(lambda b: b.current_url.endswith("/dashboard/sign-in"))
    assert fresh not in browser.page_source
    status = browser.execute_script(
        "return fetch('/dashboard/api/overview').then(function (r) { return r.status; });"
    )
    assert status == 401
