"""Module-level job functions for tests (jobs must be importable by reference)."""

from __future__ import annotations

import threading
import time

from django_apscheduler_obs.runs import current_run

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

    run = current_run()
    assert run is not None
    Ledger.objects.create(job_id=run.job_id, run_time=run.run_time)


# What ``remembers_run`` saw: (current_run(), its execution_id) per call.
seen_runs: list[tuple[object, object]] = []


def remembers_run() -> None:
    run = current_run()
    seen_runs.append((run, run.execution_id if run is not None else None))


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


# -- fault injection (tests/test_faults.py, tests/test_fault_processes.py) --------------------


def hold(path: str, timeout: float = 90.0) -> None:
    """A long run that the test ends at will: returns once the file ``path`` exists (bounded,
    so a failing test cannot keep a worker forever)."""
    import os

    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


leaked = threading.Event()


def leak_thread(seconds: float = 120.0) -> None:
    """Returns at once but leaves a non-daemon thread behind, as a careless job does."""
    threading.Thread(target=leaked.wait, args=(seconds,), name="leaked-by-job").start()


def fail_with_secret_args(*args: object, **kwargs: object) -> None:
    """Fails on every run; its arguments may be secrets and its message does not quote them."""
    raise ConnectionRefusedError("the payment service refused the connection")


def accept_anything(*args: object, **kwargs: object) -> None:
    """Takes any arguments (property tests declare jobs with random ones)."""


connections_seen: list[object] = []


def note_connection() -> None:
    """Records which database connection the worker thread used for this run."""
    from django.db import connection

    connection.ensure_connection()
    connections_seen.append(connection.connection)  # kept alive: ids are not reused
