"""Every run leaves exactly one execution row with its final status and true timings."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from apscheduler import events
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import connection

from django_apscheduler_obs.executors import ObservedThreadPoolExecutor, observed_run_job
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import DjangoJobExecution
from tests import jobs
from tests.conftest import RUN_EVENTS, EventLog, wait_for
from tests.dbfail import EXECUTION_UPDATE, outage

pytestmark = pytest.mark.django_db(transaction=True)


def now() -> datetime:
    return datetime.now(timezone.utc)


def final_row(job_id: str, timeout: float = 10) -> DjangoJobExecution:
    return wait_for(
        lambda: DjangoJobExecution.objects.filter(
            job_id=job_id, status__in=DjangoJobExecution.FINAL_STATUSES
        ).first(),
        timeout=timeout,
        message=f"final row of {job_id}",
    )


def test_late_start_is_delay_not_duration(make_runtime):
    """Fired 3 s late, runs 0.3 s: start_delay ~3 s, duration ~0.3 s (0.7 would store 3.3 s)."""
    rt = make_runtime()
    run_time = now() - timedelta(seconds=3)
    rt.scheduler.add_job(
        "tests.jobs:sleep", "date", run_date=run_time, args=[0.3], id="late", misfire_grace_time=30
    )
    rt.events.wait(RUN_EVENTS, "late")
    row = final_row("late")
    assert row.status == DjangoJobExecution.SUCCESS
    assert row.run_time == run_time
    assert row.started >= run_time + timedelta(seconds=3)
    assert row.start_delay == pytest.approx((row.started - run_time).total_seconds(), abs=1e-3)
    assert 3 <= row.start_delay < 10
    assert Decimal("0.3") <= row.duration < Decimal("1.5")
    finished = datetime.fromtimestamp(float(row.finished), timezone.utc)
    assert finished - row.started == pytest.approx(
        timedelta(seconds=float(row.duration)), abs=timedelta(milliseconds=50)
    )
    assert DjangoJobExecution.objects.filter(job_id="late").count() == 1


def test_error_keeps_exception_traceback_and_type(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job("tests.jobs:fail", "date", run_date=now(), id="fails")
    rt.events.wait(events.EVENT_JOB_ERROR, "fails")
    row = final_row("fails")
    assert row.status == DjangoJobExecution.ERROR
    assert row.exception == "boom <b>html</b>"
    assert "raise ValueError" in row.traceback
    assert row.error_type == "ValueError"
    assert row.duration is not None and row.started is not None


def long_multibyte_failure() -> None:
    raise RuntimeError("😀é€" * 2000)


def test_long_multibyte_error_is_truncated_safely(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(long_multibyte_failure, "date", run_date=now(), id="mb")
    rt.events.wait(events.EVENT_JOB_ERROR, "mb")
    row = final_row("mb")
    assert len(row.exception) == 1000 and row.exception.endswith("…")
    assert row.exception.startswith("😀é€😀")
    assert rt.history.pending == 0


def test_missed_run_is_recorded_once(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "date",
        run_date=now() - timedelta(minutes=2),
        id="missed",
        misfire_grace_time=1,
    )
    rt.events.wait(events.EVENT_JOB_MISSED, "missed")
    row = final_row("missed")
    assert row.status == DjangoJobExecution.MISSED
    assert "missed by" in row.exception
    assert DjangoJobExecution.objects.filter(job_id="missed").count() == 1


def test_max_instances_skip_is_recorded(make_runtime):
    rt = make_runtime()
    jobs.release.clear()
    try:
        rt.scheduler.add_job(
            "tests.jobs:block",
            "interval",
            seconds=0.3,
            id="overlap",
            max_instances=1,
            next_run_time=now(),
        )
        rt.events.wait(events.EVENT_JOB_MAX_INSTANCES, "overlap")
        wait_for(
            lambda: DjangoJobExecution.objects.filter(
                job_id="overlap", status=DjangoJobExecution.MAX_INSTANCES
            ).exists(),
            message="max instances row",
        )
    finally:
        jobs.release.set()
    rt.scheduler.remove_job("overlap")
    wait_for(
        lambda: (
            not DjangoJobExecution.objects.filter(
                job_id="overlap", status=DjangoJobExecution.SENT
            ).exists()
        ),
        message="the blocked run to finish",
    )
    rows = DjangoJobExecution.objects.filter(job_id="overlap")
    run_times = list(rows.values_list("run_time", flat=True))
    assert len(run_times) == len(set(run_times))
    assert rows.filter(status=DjangoJobExecution.SUCCESS).count() >= 1


def test_interval_job_one_row_per_fire_time(make_runtime):
    rt = make_runtime()
    start = now() + timedelta(seconds=0.5)
    rt.scheduler.add_job(
        "tests.jobs:ledger", "interval", seconds=0.25, start_date=start,
        end_date=start + timedelta(seconds=2), id="every", coalesce=False,
    )  # fmt: skip
    wait_for(
        lambda: (
            DjangoJobExecution.objects.filter(
                job_id="every", status=DjangoJobExecution.SUCCESS
            ).count()
            == 9
        ),
        timeout=15,
        message="9 runs",
    )
    from tests.testapp.models import Ledger

    expected = {start + timedelta(seconds=0.25 * i) for i in range(9)}
    assert set(DjangoJobExecution.objects.values_list("run_time", flat=True)) == expected
    assert sorted(Ledger.objects.values_list("run_time", flat=True)) == sorted(expected)


def test_replayed_fire_time_runs_once(make_runtime):
    """A fire time submitted twice (the job store could not advance the job) runs once."""
    rt = make_runtime(start=True)
    rt.scheduler.add_job("tests.jobs:ledger", "date", run_date=now() + timedelta(days=1), id="r")
    job = rt.scheduler.get_job("r")
    run_time = now()
    first = observed_run_job(rt.observer, job, "default", [run_time], "apscheduler.executors")
    second = observed_run_job(rt.observer, job, "default", [run_time], "apscheduler.executors")
    assert [e.code for e in first] == [events.EVENT_JOB_EXECUTED]
    assert second == []
    from tests.testapp.models import Ledger

    assert Ledger.objects.filter(job_id="r").count() == 1
    assert DjangoJobExecution.objects.filter(job_id="r").count() == 1


def test_claim_error_does_not_run_and_leaves_a_missed_row(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job("tests.jobs:ledger", "date", run_date=now() + timedelta(days=1), id="c")
    job = rt.scheduler.get_job("c")
    run_time = now()
    with outage(r"INSERT INTO .*djangojobexecution") as o:
        o.down, o.remaining = True, 2
        assert observed_run_job(rt.observer, job, "default", [run_time], "apscheduler") == []
    wait_for(lambda: rt.history.pending == 0, timeout=15, message="skip flushed")
    row = DjangoJobExecution.objects.get(job_id="c")
    assert row.status == DjangoJobExecution.MISSED
    assert "database was unreachable" in row.exception
    from tests.testapp.models import Ledger

    assert not Ledger.objects.exists()


def test_final_write_outage_is_buffered_and_the_scheduler_keeps_running(make_runtime):
    rt = make_runtime()
    with outage(EXECUTION_UPDATE) as o:
        o.down = True
        rt.scheduler.add_job(
            "tests.jobs:noop", "interval", seconds=0.3, id="buf", next_run_time=now()
        )
        rt.events.wait(RUN_EVENTS, "buf", count=3)
        assert rt.history.pending >= 1
        o.down = False
        rt.events.wait(RUN_EVENTS, "buf", count=6)
    wait_for(lambda: rt.history.pending == 0, timeout=15, message="buffer flushed")
    assert rt.scheduler._thread.is_alive()
    rt.scheduler.pause()
    wait_for(
        lambda: not DjangoJobExecution.objects.filter(status=DjangoJobExecution.SENT).exists(),
        message="no row left started",
    )
    assert DjangoJobExecution.objects.filter(job_id="buf").count() >= 6


def test_observed_executor_by_plugin_alias_with_a_plain_scheduler():
    """``executors={"default": {"type": "observed_threadpool"}}``: true timings, no 0.7
    listeners (they would overwrite the pure duration)."""
    scheduler = BackgroundScheduler(
        timezone="UTC",
        jobstores={"default": DjangoJobStore()},
        executors={"default": {"type": "observed_threadpool", "max_workers": 2}},
    )
    log = EventLog()
    scheduler.add_listener(log, events.EVENT_ALL)
    scheduler.start()
    try:
        assert isinstance(scheduler._lookup_executor("default"), ObservedThreadPoolExecutor)
        run_time = now() - timedelta(seconds=2)
        scheduler.add_job(
            "tests.jobs:fail", "date", run_date=run_time, id="plug", misfire_grace_time=30
        )
        log.wait(events.EVENT_JOB_ERROR, "plug")
        row = final_row("plug")
    finally:
        scheduler.shutdown(wait=True)
        connection.close()
    assert row.status == DjangoJobExecution.ERROR
    assert row.start_delay >= 2
    assert row.duration < Decimal("1")
    assert not getattr(scheduler, "_django_apscheduler_obs_listeners", False)


@pytest.mark.parametrize(("max_age", "reused"), [(None, True), (0, False)])
@pytest.mark.django_db(transaction=True)
def test_workers_keep_their_connection_between_runs(make_runtime, settings, max_age, reused):
    """A new connection per run would cost more than the run (a PostgreSQL backend fork)."""
    settings.APSCHEDULER_WORKER_CONN_MAX_AGE = max_age
    jobs.connections_seen.clear()
    rt = make_runtime(max_workers=1)
    for n in range(2):
        rt.scheduler.add_job(
            "tests.jobs:note_connection", "date", run_date=datetime.now(timezone.utc),
            id=f"conn{n}",
        )  # fmt: skip
        rt.events.wait(RUN_EVENTS, f"conn{n}")
    assert len(jobs.connections_seen) == 2
    assert (jobs.connections_seen[0] is jobs.connections_seen[1]) is reused
