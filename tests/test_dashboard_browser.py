"""The dashboard in a real browser: headless Chromium (the system's ``chromium``
and ``chromedriver``) driven by selenium, against the app served on a loopback
port, with a process-mode executor so cancel stops a running process task.

``FLASK_EXECUTOR_SCREENSHOT=1`` saves the page to ``docs/_static/dashboard.png``.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from servers import free_port
from shop_tasks import import_customers, long_export, render_report, resize_images, send_email
from support import TIMEOUT, Gates, wait_until
from werkzeug.serving import make_server

from flask_executor import Executor

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "_static" / "dashboard.png"
#: Seconds the browser may take for one step on a loaded machine.
BROWSER_WAIT = 30.0


# -- fixtures --------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids_using(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if marker.encode() in cmdline.read() and _pid_alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with an empty profile; no process of it is left afterwards."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: install the chromium and chromium-driver packages")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,1000",
        "--force-device-scale-factor=1", "--lang=en-US",
    ):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(BROWSER_WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        wait_until(lambda: not _pids_using(str(profile)), timeout=TIMEOUT)
        assert service.process is None or service.process.poll() is not None


@pytest.fixture
def served(
    app: Flask, tmp_path: Path, shutdown_after: Callable[[Executor], Executor], gates: Gates
) -> Iterator[tuple[str, Executor]]:
    """The app with a process executor and its dashboard at /executor/, served by werkzeug
    on a free loopback port. The dashboard opens only with the cookie ``role=admin``."""
    app.config.update(
        EXECUTOR_TYPE="process",
        EXECUTOR_START_METHOD="forkserver",
        EXECUTOR_MAX_WORKERS=3,
        EXECUTOR_STORE=f"sqlite:///{tmp_path / 'tasks.db'}",
    )
    executor = shutdown_after(Executor(app))
    app.register_blueprint(
        executor.dashboard_blueprint(
            authorize=lambda: request.cookies.get("role") == "admin", stream_seconds=10
        ),
        url_prefix="/executor",
    )
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="dashboard-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", executor
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def _submit(app: Flask, executor: Executor, key: str, fn: Callable[..., Any], *args: Any) -> Any:
    with app.app_context():
        return executor.submit_stored(key, fn, *args)


def _row(driver: Any, key: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'tr.task[data-key="{key}"]')


def _field(driver: Any, key: str, field: str) -> str:
    try:
        element = _row(driver, key).find_element(By.CSS_SELECTOR, f'[data-field="{field}"]')
        # What the page says, not its CSS (the badge is capitalized): the DOM's text.
        text: str = (element.get_attribute("textContent") or "").strip()
    except WebDriverException:
        return ""
    return text


def _bar_width(driver: Any, key: str) -> float:
    width = driver.execute_script(
        "var f = document.querySelector('tr.task[data-key=\"' + arguments[0] + '\"] .bar .fill');"
        " return f ? parseFloat(f.style.width) : -1;",
        key,
    )
    return float(width)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dashboard_in_a_browser(
    app: Flask, served: tuple[str, Executor], browser: Any, tmp_path: Path, gates: Gates
) -> None:
    base, executor = served
    gate, export_gate = gates.new(), gates.new()
    pid_file = str(tmp_path / "export-pid")
    # The page re-renders rows as events arrive: a row read mid-update is read again.
    wait = WebDriverWait(
        browser, BROWSER_WAIT, poll_frequency=0.1,
        ignored_exceptions=(StaleElementReferenceException,),
    )

    # Unauthorized: 403, for the page and for the browser alike.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/executor/", timeout=TIMEOUT)
    assert refused.value.code == 403
    refused.value.close()
    browser.get(f"{base}/executor/")
    assert "403" in browser.title or "Forbidden" in browser.page_source

    _submit(app, executor, "send-welcome-email", send_email, "ada@example.com").result(TIMEOUT)
    _submit(app, executor, "resize-images", resize_images, 48).result(TIMEOUT)
    _submit(app, executor, "render-report", render_report, gate)
    _submit(app, executor, "export-orders", long_export, pid_file, export_gate)
    _submit(app, executor, "nightly-digest", send_email, "team@example.com")

    browser.add_cookie({"name": "role", "value": "admin", "path": "/"})
    browser.get(f"{base}/executor/")
    wait.until(lambda d: "live" in d.find_element(By.ID, "live").get_attribute("class").split()
               and "on" in d.find_element(By.ID, "live").get_attribute("class").split())
    browser.execute_script("window.__notReloaded = true;")

    # The progress bar of a running task advances without a reload.
    first = wait.until(lambda d: max(_bar_width(d, "render-report"), 0) or None)
    wait.until(lambda d: _bar_width(d, "render-report") >= first + 10)
    wait.until(lambda d: _field(d, "render-report", "state") == "running")

    # A task that fails after the page loaded shows up with its error.
    _submit(app, executor, "import-customers", import_customers)
    wait.until(lambda d: "missing email address" in _field(d, "import-customers", "error"))
    wait.until(lambda d: _field(d, "import-customers", "state") == "failed")
    wait.until(lambda d: "ValueError" in _field(d, "import-customers", "error_type"))

    # Clicking cancel stops the running process task: its worker is gone.
    wait_until(lambda: os.path.exists(pid_file), timeout=BROWSER_WAIT)
    worker_pid = int(Path(pid_file).read_text())
    wait.until(lambda d: _field(d, "export-orders", "state") == "running")
    wait.until(lambda d: _row(d, "export-orders").find_element(
        By.CSS_SELECTOR, "button.btn-cancel").click() or True)
    wait.until(lambda d: _field(d, "export-orders", "state") == "cancelled")
    assert executor.futures.state("export-orders") == "cancelled"
    wait_until(lambda: not _pid_alive(worker_pid), timeout=TIMEOUT)
    wait.until(lambda d: not _row(d, "export-orders").find_element(
        By.CSS_SELECTOR, 'form[data-field="cancel"]').is_displayed())
    wait.until(lambda d: _field(d, "nightly-digest", "state") == "finished")
    assert browser.execute_script("return window.__notReloaded === true;")

    if os.environ.get("FLASK_EXECUTOR_SCREENSHOT"):
        wait.until(lambda d: _bar_width(d, "render-report") >= 60)
        wait.until(lambda d: not d.find_element(By.ID, "toast").is_displayed())
        time.sleep(1)  # let the bar's transition settle
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))

    # The detail page of the failed task, and the phone-width layout.
    browser.get(f"{base}/executor/task/import-customers")
    assert "row 17: missing email address" in browser.find_element(By.CSS_SELECTOR, ".error").text
    browser.set_window_size(390, 844)
    browser.get(f"{base}/executor/")
    wait.until(lambda d: _row(d, "render-report").is_displayed())
    if os.environ.get("FLASK_EXECUTOR_SCREENSHOT"):
        browser.save_screenshot(str(SCREENSHOT.with_name("dashboard-phone.png")))
    wide = browser.execute_script(
        "var w = window.innerWidth; return Array.prototype.filter.call("
        " document.querySelectorAll('body *'), function (e) {"
        " return e.getBoundingClientRect().right > w + 1; }).map(function (e) {"
        " return e.tagName + '.' + e.className; });"
    )
    assert not wide, f"at phone width these stick out sideways: {wide}"

    # Purge finished: the ended tasks leave the page, the running one stays.
    browser.find_element(By.CSS_SELECTOR, "form.purge button").click()
    wait.until(lambda d: [row.get_attribute("data-key") for row in
                          d.find_elements(By.CSS_SELECTOR, "tr.task")] == ["render-report"])
    assert executor.futures.keys() == ["render-report"]
    Path(gate).touch()
    assert executor.futures.result("render-report", timeout=TIMEOUT) == "report.pdf"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_without_event_source_the_page_polls(
    app: Flask, served: tuple[str, Executor], browser: Any, gates: Gates
) -> None:
    """Where no event stream can be had, the script falls back to polling the JSON API."""
    base, executor = served
    gate = gates.new()
    browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.EventSource;"}
    )
    browser.get(f"{base}/executor/")
    browser.add_cookie({"name": "role", "value": "admin", "path": "/"})
    _submit(app, executor, "render-report", render_report, gate)
    browser.get(f"{base}/executor/")
    # The page re-renders rows as events arrive: a row read mid-update is read again.
    wait = WebDriverWait(
        browser, BROWSER_WAIT, poll_frequency=0.1,
        ignored_exceptions=(StaleElementReferenceException,),
    )
    assert browser.execute_script("return typeof window.EventSource;") == "undefined"
    wait.until(lambda d: "polling" in d.find_element(By.ID, "live").get_attribute("class"))
    browser.execute_script("window.__notReloaded = true;")
    wait.until(lambda d: _bar_width(d, "render-report") > 0)
    first = _bar_width(browser, "render-report")
    wait.until(lambda d: _bar_width(d, "render-report") >= first + 10)
    _submit(app, executor, "import-customers", import_customers)
    wait.until(lambda d: "missing email address" in _field(d, "import-customers", "error"))
    assert browser.execute_script("return window.__notReloaded === true;")
    Path(gate).touch()
    wait.until(lambda d: _field(d, "render-report", "state") == "finished")
