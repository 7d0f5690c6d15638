"""The admin in a real browser: headless Chromium against a live server and a running scheduler.

Screenshots go to ``.artifacts/screenshots/``; with ``DAO_UPDATE_SCREENSHOTS=1`` they also
replace the ones in ``docs/screenshots/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, RunRequest
from tests.conftest import IN_CI, RUN_EVENTS
from tests.test_admin import VIEW_ALL, add_runs, make_user

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / ".artifacts" / "screenshots"
DOCS_SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
    "--lang=en-US",
)
EX = DjangoJobExecution


@pytest.fixture(scope="session")
def admin_server(request: pytest.FixtureRequest) -> Any:
    """pytest-django's ``live_server``, started while static files can be served.

    The live server picks its static handler (and caches ``STATIC_URL``) when it starts; the
    test settings define no ``STATIC_URL``, with which the live server answers 500.
    """
    with override_settings(
        STATIC_URL="/static/",
        INSTALLED_APPS=[*django_settings.INSTALLED_APPS, "django.contrib.staticfiles"],
    ):
        return request.getfixturevalue("live_server")


@pytest.fixture
def browser(tmp_path: Path, settings: Any) -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if IN_CI:
            pytest.fail("chromium and chromium-driver must be installed (.ci/system-deps.sh)")
        pytest.skip("chromium / chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    settings.STATIC_URL = "/static/"
    options = Options()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ------------------------------------------------------------------------------


def wait(
    driver: Any,
    predicate: Callable[[Any], Any],
    *,
    refresh: bool = False,
    timeout: float = 20,
    message: str = "",
) -> Any:
    """WebDriverWait on ``predicate``; with ``refresh`` the page is reloaded between polls."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d: Any) -> Any:
        if refresh:
            d.refresh()
        return predicate(d)

    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.5,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(check, message)


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def job_row(driver: Any, job_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(
        By.XPATH,
        f"//table[@id='result_list']//tr[.//input[@name='_selected_action' and @value='{job_id}']]",
    )


def login(driver: Any, base: str, username: str) -> None:
    driver.get(base + "/admin/login/?next=/admin/")
    # the admin's own "collapse the sidebar" preference: more room for the columns
    driver.execute_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
    css(driver, "#id_username")[0].send_keys(username)
    css(driver, "#id_password")[0].send_keys("pw")
    css(driver, "#login-form input[type=submit], #login-form button[type=submit]")[0].click()
    wait(driver, lambda d: css(d, "#user-tools"), message="the admin after login")


def logout(driver: Any) -> None:
    css(driver, "#logout-form button")[0].click()
    wait(driver, lambda d: not css(d, "#user-tools") or "Log in again" in d.page_source)


def screenshot(driver: Any, name: str, *, full_page: bool = True, width: int = 1600) -> Path:
    """Save a PNG of the page (the whole page, not just the window)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(width, 1000)
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(max(int(height) + 140, 700), 2600))
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1600, 1000)
    if os.environ.get("DAO_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SHOTS / path.name)
    return path


def messages(driver: Any) -> str:
    return " ".join(e.text for e in css(driver, "ul.messagelist li"))


def forge_post(driver: Any, url: str) -> None:
    """What a crafted page could do: POST with the user's own CSRF token."""
    driver.execute_script(
        """
        const token = document.cookie.split('; ')
            .find(c => c.startsWith('csrftoken=')).split('=')[1];
        const form = document.createElement('form');
        form.method = 'post'; form.action = arguments[0];
        const input = document.createElement('input');
        input.type = 'hidden'; input.name = 'csrfmiddlewaretoken'; input.value = token;
        form.appendChild(input); document.body.appendChild(form); form.submit();
        """,
        url,
    )


def history(job_id: str, count: int, errors_every: int, *, slow_every: int = 0) -> None:
    """Past runs so the health columns have something to show."""
    add_runs(
        job_id,
        count,
        errors_every=errors_every,
        end=datetime.now(timezone.utc) - timedelta(minutes=2),
    )
    if slow_every:
        for i, run in enumerate(EX.objects.filter(job_id=job_id).order_by("run_time")):
            if i % slow_every == 0:
                EX.objects.filter(pk=run.pk).update(duration=run.duration * 4)


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_monitoring_console(admin_server, browser, make_runtime, settings):
    settings.APSCHEDULER_GRAFANA_URL_TEMPLATE = (
        "https://grafana.example.com/d/apscheduler-job?var-job_id={job_id}"
    )
    settings.APSCHEDULER_TRACE_URL_TEMPLATE = (
        "https://grafana.example.com/explore?traceId={trace_id}"
    )
    base = admin_server.url
    from opentelemetry.sdk.trace import TracerProvider

    rt = make_runtime(tracer_provider=TracerProvider())  # live runs carry real trace ids
    standby = make_runtime(wait_leader=False)
    now = datetime.now(timezone.utc)
    add = rt.scheduler.add_job
    add("tests.jobs:noop", "cron", hour=3, id="reports.nightly", name="nightly report")
    add("tests.jobs:noop", "interval", seconds=2, id="sync.inventory", next_run_time=now)
    add("tests.jobs:fail", "interval", minutes=15, id="billing.invoices", next_run_time=now)
    add("tests.jobs:noop", "interval", minutes=5, id="cache.warm", next_run_time=None)
    history("reports.nightly", 60, errors_every=0, slow_every=7)
    history("billing.invoices", 40, errors_every=3)
    history("cache.warm", 12, errors_every=0)
    rt.events.wait(RUN_EVENTS, "billing.invoices")
    make_user("admin", superuser=True)
    make_user("viewer", *VIEW_ALL)

    # -- job list with live data from the running scheduler
    login(browser, base, "admin")
    browser.get(base + "/admin/django_apscheduler_obs/djangojob/")
    wait(
        browser,
        lambda d: "Executed" in job_row(d, "sync.inventory").text,
        refresh=True,
        message="the scheduler's runs of sync.inventory in the job list",
    )
    banner = css(browser, "#dao-scheduler")[0].text
    assert rt.lease.identity in banner and "1 standby" in banner
    assert standby.lease.identity in banner
    invoices = job_row(browser, "billing.invoices")
    assert "Error!" in invoices.text and "every 15 min" in invoices.text
    assert "paused" in job_row(browser, "cache.warm").text
    assert "every day at 03:00" in job_row(browser, "reports.nightly").text
    assert len(invoices.find_elements("css selector", "svg.dao-spark rect")) == 30
    # styles are served (the admin's and ours)
    color = css(browser, ".dao-badge.dao-error")[0].value_of_css_property("background-color")
    assert color in ("rgba(198, 40, 40, 1)", "rgb(198, 40, 40)")
    screenshot(browser, "job-list", full_page=False, width=1700)

    # -- job detail
    browser.find_element("link text", "billing.invoices").click()
    wait(browser, lambda d: css(d, "#dao-health"))
    assert "https://grafana.example.com/d/apscheduler-job?var-job_id=billing.invoices" in (
        css(browser, "#dao-grafana")[0].get_attribute("href")
    )
    assert "Error!" in css(browser, "#recent-executions")[0].text
    screenshot(browser, "job-detail")

    # -- run now: queued, then linked to its execution row (the page follows it by itself)
    browser.get(base + "/admin/django_apscheduler_obs/djangojob/reports.nightly/change/")
    css(browser, "#dao-run-now")[0].click()
    wait(browser, lambda d: "Run-now queued for reports.nightly" in messages(d))
    request = RunRequest.objects.get(job_id="reports.nightly")
    assert request.requested_by == "admin"
    link = wait(
        browser,
        lambda d: css(d, 'tr.dao-request[data-status="done"] a.dao-execution-link'),
        timeout=30,
        message="the run-now request to link its execution",
    )[0]
    request.refresh_from_db()
    assert link.text == f"#{request.execution_id}"
    screenshot(browser, "run-now")
    link.click()
    wait(browser, lambda d: "run_now" in d.find_element("css selector", "#content").text)
    detail = css(browser, "#content")[0].text
    assert "Executed" in detail and rt.lease.identity in detail
    execution = EX.objects.get(pk=request.execution_id)
    assert execution.trigger_source == "run_now" and execution.run_time == request.requested_at
    trace = css(browser, ".field-trace a")[0]
    assert trace.get_attribute("href").endswith(f"traceId={execution.trace_id}")

    # -- execution list, and a failure's escaped traceback
    browser.get(base + "/admin/django_apscheduler_obs/djangojobexecution/")
    wait(browser, lambda d: css(d, "#result_list"))
    assert "run_now" in css(browser, "#result_list")[0].text
    screenshot(browser, "execution-list", full_page=False)
    failed = (
        EX.objects.filter(job_id="billing.invoices", status=EX.ERROR)
        .exclude(traceback=None)
        .first()
    )
    browser.get(base + f"/admin/django_apscheduler_obs/djangojobexecution/{failed.pk}/change/")
    traceback = wait(browser, lambda d: css(d, "pre.dao-traceback"))[0]
    assert 'raise ValueError("boom <b>html</b>")' in traceback.text  # shown as text
    assert not css(browser, "pre.dao-traceback b")  # not as markup
    screenshot(browser, "execution-error")

    # -- pause and resume; the running leader follows
    browser.get(base + "/admin/django_apscheduler_obs/djangojob/sync.inventory/change/")
    css(browser, "#dao-pause")[0].click()
    wait(browser, lambda d: css(d, "#dao-resume") and "Paused: sync.inventory." in messages(d))
    assert DjangoJob.objects.get(id="sync.inventory").next_run_time is None
    assert rt.jobstore.lookup_job("sync.inventory").next_run_time is None
    browser.get(base + "/admin/django_apscheduler_obs/djangojob/?state=paused")
    assert "sync.inventory" in css(browser, "#result_list")[0].text
    runs = len(rt.events.of(RUN_EVENTS, "sync.inventory"))
    browser.get(base + "/admin/django_apscheduler_obs/djangojob/sync.inventory/change/")
    css(browser, "#dao-resume")[0].click()
    wait(browser, lambda d: css(d, "#dao-pause") and "Resumed: sync.inventory." in messages(d))
    assert DjangoJob.objects.get(id="sync.inventory").next_run_time is not None
    rt.events.wait(RUN_EVENTS, "sync.inventory", count=runs + 1)  # it runs again

    # -- without change permission: no buttons, and a forged POST is refused
    logout(browser)
    login(browser, base, "viewer")
    browser.get(base + "/admin/django_apscheduler_obs/djangojob/reports.nightly/change/")
    wait(browser, lambda d: css(d, "#dao-health"))
    assert not css(browser, "#dao-run-now") and not css(browser, "#dao-pause")
    forge_post(browser, "/admin/django_apscheduler_obs/djangojob/reports.nightly/run-now/")
    wait(browser, lambda d: "403" in d.page_source or "Forbidden" in d.page_source)
    assert RunRequest.objects.filter(job_id="reports.nightly").count() == 1
    assert not RunRequest.objects.filter(requested_by="viewer").exists()


@pytest.mark.django_db(transaction=True)
def test_run_now_without_a_scheduler_says_so(admin_server, browser):
    from tests.test_admin import store_job

    store_job("lonely")
    make_user("admin", superuser=True)
    login(browser, admin_server.url, "admin")
    browser.get(admin_server.url + "/admin/django_apscheduler_obs/djangojob/lonely/change/")
    assert "No scheduler is running" in css(browser, "#dao-scheduler")[0].text
    css(browser, "#dao-run-now")[0].click()
    wait(browser, lambda d: "No scheduler is running" in messages(d))
    assert RunRequest.objects.get().status == RunRequest.REFUSED
    assert not EX.objects.exists()
