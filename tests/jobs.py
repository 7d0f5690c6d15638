"""Module-level job functions for tests (jobs must be importable by reference)."""

from __future__ import annotations

import threading
import time

from django_apscheduler_obs.executors import current_run

release = threading.Event()


def noop() -> None:
    pass


def fail() -> None:
    raise ValueError("boom <b>html</b>")


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def block() -> None:
    """Runs until the test sets ``release`` (bounded, so a failing test cannot hang CI)."""
    release.wait(30)


def ledger() -> None:
    from tests.testapp.models import Ledger

    run = current_run.get()
    assert run is not None
    Ledger.objects.create(job_id=run.job_id, run_time=run.run_time)


# Set by tracing tests: the provider a job uses for its own spans.
inner_tracer_provider = None


def traced_inner() -> None:
    """Makes a span of its own, as a job calling an instrumented library would."""
    assert inner_tracer_provider is not None
    with inner_tracer_provider.get_tracer("tests.jobs").start_as_current_span("inner work"):
        pass


def logs_a_line() -> None:
    import logging

    logging.getLogger("tests.jobs").warning("hello from the job")
