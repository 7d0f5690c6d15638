"""Sample jobs, autodiscovered by ``runapscheduler``: one succeeds, one fails, one is slow,
one overlaps itself (max_instances skips), one is starved so that it misses runs, and one runs
on a worker engine (settings: ``APSCHEDULER_EXECUTORS["workers"]``)."""

from __future__ import annotations

import logging
import random
import time

from django.conf import settings

from django_apscheduler_obs import current_run, scheduled_job

logger = logging.getLogger(__name__)
FAST = settings.FAST


def _every(normal: int, fast: int) -> int:
    return fast if FAST else normal


@scheduled_job("interval", seconds=_every(10, 1), id="demo_succeed", max_runtime=30)
def succeed() -> None:
    logger.info("demo_succeed did its work")


@scheduled_job("interval", seconds=_every(30, 2), id="demo_fail")
def fail() -> None:
    raise RuntimeError("demo_fail always fails (on purpose)")


@scheduled_job("interval", seconds=_every(60, 3), id="demo_slow", max_runtime=10)
def slow() -> None:
    time.sleep(random.uniform(1.0, 2.5))


@scheduled_job("interval", seconds=_every(5, 1), id="demo_overlap", max_instances=1)
def overlap() -> None:
    """Runs longer than its interval: APScheduler skips the overlapping fire times."""
    time.sleep(_every(12, 3))


@scheduled_job("interval", seconds=_every(20, 2), id="demo_hog", executor="default")
def hog() -> None:
    time.sleep(_every(3, 1))


@scheduled_job(
    "interval", seconds=1, id="demo_missed", misfire_grace_time=1, coalesce=False, max_instances=10
)
def missed() -> None:
    """Sleeps past the next fire times of its own; the pool is small in the demo, so some of
    its fire times start more than its 1 s grace late and are recorded as missed."""
    time.sleep(2.5)


@scheduled_job("interval", seconds=_every(15, 2), id="demo_on_worker", executor="workers")
def on_worker() -> None:
    """Handed to a worker: the scheduler enqueues the run, a worker picks it up and records it,
    and the scheduler's /metrics counts it like the others."""
    run = current_run()
    assert run is not None
    logger.info("demo_on_worker: run %s for %s", run.execution_id, run.run_time.isoformat())
