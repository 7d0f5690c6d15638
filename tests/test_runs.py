"""``current_run()``: what a job knows about the run it executes in."""

from __future__ import annotations

import contextvars
import threading
from datetime import datetime, timedelta, timezone

import pytest
from opentelemetry.sdk.trace import TracerProvider

import django_apscheduler_obs
from django_apscheduler_obs.executors import observed_run_job
from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.runs import CurrentRun, TriggerSource, current_run
from tests import jobs

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _seen() -> None:
    jobs.seen_runs.clear()


def _job(rt, job_id: str):
    rt.scheduler.add_job(
        "tests.jobs:remembers_run",
        "date",
        run_date=datetime.now(timezone.utc) + timedelta(days=1),
        id=job_id,
    )
    return rt.scheduler.get_job(job_id)


def test_a_job_sees_its_fire_time_row_and_trace(make_runtime):
    rt = make_runtime(tracer_provider=TracerProvider())
    job = _job(rt, "mine")
    fire_time = datetime(2031, 1, 2, 3, 0, tzinfo=timezone.utc)
    observed_run_job(rt.observer, job, "default", [fire_time], "apscheduler.executors")

    ((run, execution_id),) = jobs.seen_runs
    assert isinstance(run, CurrentRun)
    assert (run.job_id, run.run_time) == ("mine", fire_time)  # the fire time, not the clock
    assert run.trigger_source is TriggerSource.SCHEDULE
    assert run.epoch == rt.lease.fence()[1]
    row = DjangoJobExecution.objects.get(job_id="mine")
    assert execution_id == row.id
    assert run.trace_id == row.trace_id and len(run.trace_id) == 32
    assert current_run() is None  # only while the function runs


def test_run_now_says_so(make_runtime):
    rt = make_runtime()
    job = _job(rt, "asked")
    observed_run_job(
        rt.observer,
        job,
        "default",
        [datetime.now(timezone.utc)],
        "apscheduler.executors",
        trigger_source=TriggerSource.RUN_NOW,
    )
    ((run, execution_id),) = jobs.seen_runs
    assert run.trigger_source is TriggerSource.RUN_NOW
    row = DjangoJobExecution.objects.get(job_id="asked")
    assert execution_id == row.id
    assert row.trigger_source == "run_now"
    assert run.trace_id == row.trace_id


def test_outside_a_run_and_in_threads_the_job_starts():
    assert current_run() is None
    assert django_apscheduler_obs.current_run is current_run  # the documented import
    run = CurrentRun("t", datetime(2031, 1, 1, tzinfo=timezone.utc), TriggerSource.SCHEDULE)
    from django_apscheduler_obs.runs import enter_run, exit_run

    token = enter_run(run)
    try:
        seen: list[object] = []
        plain = threading.Thread(target=lambda: seen.append(current_run()))
        ctx = contextvars.copy_context()
        carried = threading.Thread(target=lambda: ctx.run(lambda: seen.append(current_run())))
        for t in (plain, carried):
            t.start()
            t.join()
        assert seen == [None, run]
        assert run.execution_id is None  # no row for this fire time
    finally:
        exit_run(token)
    assert current_run() is None
