"""Shared fixtures: a real scheduler runtime with fast lease timings, and event waiting.

Tests wait for APScheduler events or database states with a deadline; they never sleep a
fixed time hoping something happened.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from apscheduler import events
from django.db import connection
from prometheus_client import CollectorRegistry

from django_apscheduler_obs.registry import registry as job_registry

IN_CI = os.environ.get("CI") == "true"
# The scheduler processes that end-to-end tests start fail on a deprecation too, as this
# process does (pyproject's filterwarnings): the package's code must raise none.
CHILD_WARNINGS = "error::DeprecationWarning,error::PendingDeprecationWarning"
os.environ.setdefault("PYTHONWARNINGS", CHILD_WARNINGS)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's promtool; required in CI, skipped elsewhere when it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        if IN_CI:
            pytest.fail("promtool is required in CI (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def pytest_report_header(config: Any) -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    return f"database: {db['ENGINE'].rsplit('.', 1)[-1]} {db.get('HOST') or db.get('NAME')}"


@pytest.fixture(autouse=True)
def _reset_job_registry() -> Iterator[None]:
    job_registry.reset()
    job_registry._discovered = True  # tests declare their jobs explicitly
    yield
    job_registry.reset()


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class EventLog:
    """Collects scheduler events; ``wait()`` blocks on a condition, not on a sleep."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._cond = threading.Condition()

    def __call__(self, event: Any) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, code: int, job_id: str | None = None) -> list[Any]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.code & code and (job_id is None or getattr(e, "job_id", None) == job_id)
            ]

    def wait(
        self, code: int, job_id: str | None = None, count: int = 1, timeout: float = 15.0
    ) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    e
                    for e in self.events
                    if e.code & code and (job_id is None or getattr(e, "job_id", None) == job_id)
                ]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for {count} event(s) {code} "
                        f"of {job_id!r}; got {len(found)}"
                    )
                self._cond.wait(remaining)


RUN_EVENTS = events.EVENT_JOB_EXECUTED | events.EVENT_JOB_ERROR | events.EVENT_JOB_MISSED


@pytest.fixture
def make_runtime(settings: Any) -> Iterator[Callable[..., Any]]:
    """Build and start real scheduler runtimes (lease TTL 3 s); stopped at teardown."""
    from django_apscheduler_obs.scheduler import build_scheduler

    settings.APSCHEDULER_LEASE_TTL = 3
    settings.APSCHEDULER_LEASE_RENEW_INTERVAL = 0.5
    settings.APSCHEDULER_STANDBY_POLL_INTERVAL = 0.2
    settings.APSCHEDULER_CHANGE_POLL_INTERVAL = 0.2
    settings.APSCHEDULER_EXECUTION_RETENTION = None
    runtimes: list[Any] = []

    def factory(*, start: bool = True, wait_leader: bool = True, **kwargs: Any) -> Any:
        kwargs.setdefault("registry", CollectorRegistry())
        kwargs.setdefault("process_metrics", False)
        kwargs.setdefault("heartbeat_interval", 1)
        runtime = build_scheduler(**kwargs)
        runtime.events = EventLog()
        runtime.scheduler.add_listener(runtime.events, events.EVENT_ALL)
        runtimes.append(runtime)
        if start:
            runtime.start()
            if wait_leader:
                wait_for(runtime.lease.is_leader, message="leadership")
        return runtime

    yield factory
    for runtime in runtimes:
        runtime.stop(timeout=5)
    connection.close()


def metric_value(
    registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None
) -> float | None:
    value = registry.get_sample_value(name, labels or {})
    return value
