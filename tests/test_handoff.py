"""Runs handed to a worker engine: claim, enqueue, pick-up, record, fold into metrics.

The engine here is Django's Tasks framework with its immediate backend: a real engine that
runs the task inside ``enqueue``, in the scheduler's enqueue thread, so the whole path
(claim -> message -> worker pick-up -> job loaded from the store -> final row -> leader's
metrics) runs in-process and in seconds. Engines in their own processes: test_workers_e2e.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from apscheduler import events

from django_apscheduler_obs.handoff import MessageError, RunMessage, mark_lost
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from django_apscheduler_obs.worker import DONE, DUPLICATE, REJECTED, run_message
from tests.conftest import metric_value, wait_for
from tests.testapp.models import Ledger

pytestmark = pytest.mark.django_db(transaction=True)
EX = DjangoJobExecution


@pytest.fixture
def remote(settings):
    settings.APSCHEDULER_EXECUTORS = {"workers": {"ENGINE": "tasks", "BACKEND": "default"}}
    settings.APSCHEDULER_INFLIGHT_POLL_INTERVAL = 0.05
    return settings


def _add(rt, job_id: str, func: str = "tests.jobs:ledger", **kwargs):
    rt.scheduler.add_job(
        func,
        "date",
        run_date=kwargs.pop("run_date", datetime.now(timezone.utc)),
        id=job_id,
        executor=kwargs.pop("executor", "workers"),
        **kwargs,
    )


def _final(job_id: str, count: int = 1) -> list[DjangoJobExecution]:
    def rows():
        found = list(EX.objects.filter(job_id=job_id, status__in=EX.FINAL_STATUSES))
        return found if len(found) >= count else None

    return wait_for(rows, message=f"{count} final row(s) of {job_id}")


def _queued_row(job_id: str, *, age: float = 0.0, status: str = EX.QUEUED, **extra) -> EX:
    now = datetime.now(timezone.utc)
    return EX.objects.create(
        job_id=job_id,
        run_time=now - timedelta(seconds=age),
        status=status,
        started=now - timedelta(seconds=age),
        **extra,
    )


def test_message_names_the_run_and_nothing_else():
    msg = RunMessage(7, "job", datetime(2031, 1, 1, tzinfo=timezone.utc), "00-" + "a" * 32)
    data = msg.to_dict()
    assert set(data) == {"v", "execution_id", "job_id", "run_time", "traceparent"}
    assert RunMessage.from_dict(data) == msg
    for bad in ({}, {**data, "v": 2}, {**data, "run_time": "2031-01-01T00:00:00"}, "x"):
        with pytest.raises(MessageError):
            RunMessage.from_dict(bad)


def test_a_remote_run_has_one_row_with_its_worker_and_the_leaders_metrics(make_runtime, remote):
    rt = make_runtime()
    _add(rt, "remote")
    (row,) = _final("remote")
    assert row.status == EX.SUCCESS
    assert row.worker and row.picked_up_at is not None and row.enqueued_at is not None
    assert row.queue_wait is not None and row.queue_wait >= 0
    assert row.started >= row.picked_up_at >= row.enqueued_at
    assert row.owner == rt.lease.identity and row.epoch == rt.lease.fence()[1]
    assert list(Ledger.objects.values_list("job_id", flat=True)) == ["remote"]

    # The leader folds the finished row into the same series a local run feeds.
    wait_for(lambda: EX.objects.get(id=row.id).report_pending is None, message="fold")
    labels = {"job_id": "remote", "outcome": "success", "error_type": ""}
    assert metric_value(rt.registry, "apscheduler_job_runs_total", labels) == 1
    wait = metric_value(
        rt.registry, "apscheduler_job_queue_wait_seconds_count", {"job_id": "remote"}
    )
    assert wait == 1
    # Listeners see the outcome, and the job's max_instances slot came back.
    rt.events.wait(events.EVENT_JOB_EXECUTED, "remote")
    assert rt.scheduler._executors["workers"]._instances.get("remote", 0) == 0


def test_a_redelivered_message_never_runs_a_fire_time_twice(make_runtime, remote):
    rt = make_runtime()
    _add(rt, "once")
    (row,) = _final("once")
    again = RunMessage(row.id, "once", row.run_time).to_dict()
    assert run_message(again, worker="w2:1") == DUPLICATE
    assert Ledger.objects.count() == 1
    assert EX.objects.get(id=row.id).worker != "w2:1"


def test_a_message_naming_another_jobs_row_picks_nothing_up(remote):
    row = _queued_row("victim")
    msg = RunMessage(row.id, "other", row.run_time).to_dict()
    assert run_message(msg, worker="w:1") == DUPLICATE
    assert EX.objects.get(id=row.id).status == EX.QUEUED
    assert run_message({"v": 1, "junk": True}, worker="w:1") == REJECTED


def test_lost_and_a_late_pick_up_race_on_the_row(remote):
    row = _queued_row("late")
    assert mark_lost([row.id], "gone") == 1
    msg = RunMessage(row.id, "late", row.run_time).to_dict()
    assert run_message(msg, worker="w:1") == DUPLICATE  # the lost mark won: nothing runs
    assert Ledger.objects.count() == 0
    assert mark_lost([row.id], "twice") == 0  # and a mark never overwrites a pick-up or a final


def test_the_worker_refuses_a_tampered_job_and_records_why(make_runtime, remote):
    rt = make_runtime()
    _add(rt, "tampered", run_date=datetime.now(timezone.utc) + timedelta(days=1))
    stored = bytes(DjangoJob.objects.get(id="tampered").job_state)
    DjangoJob.objects.filter(id="tampered").update(job_state=stored[:-1] + b"x")
    row = _queued_row("tampered")
    assert run_message(RunMessage(row.id, "tampered", row.run_time).to_dict(), worker="w:1") == DONE
    row.refresh_from_db()
    assert row.status == EX.ERROR and "signature" in row.exception
    assert Ledger.objects.count() == 0
    # The job store row is the scheduler's business: the worker does not flag it.
    assert DjangoJob.objects.get(id="tampered").restore_error == ""


def test_a_job_that_raises_on_a_worker_is_recorded_with_its_error_type(make_runtime, remote):
    rt = make_runtime()
    _add(rt, "fails", func="tests.jobs:fail")
    (row,) = _final("fails")
    assert row.status == EX.ERROR and row.error_type == "ValueError"
    assert "Traceback" not in (row.exception or "") and row.traceback
    wait_for(lambda: EX.objects.get(id=row.id).report_pending is None, message="fold")
    labels = {"job_id": "fails", "outcome": "error", "error_type": "ValueError"}
    assert metric_value(rt.registry, "apscheduler_job_runs_total", labels) == 1


def test_the_leader_marks_runs_no_worker_picked_up_lost(make_runtime, remote, settings):
    settings.APSCHEDULER_DISPATCH_TIMEOUT = 30
    rt = make_runtime()
    old, young = _queued_row("nobody", age=31), _queued_row("soon", age=1)
    wait_for(lambda: EX.objects.get(id=old.id).status == EX.LOST, message="lost mark")
    assert EX.objects.get(id=young.id).status == EX.QUEUED
    assert "dispatch timeout" in EX.objects.get(id=old.id).exception
    wait_for(
        lambda: (
            metric_value(rt.registry, "apscheduler_job_lost_runs_total", {"job_id": "nobody"}) == 1
        ),
        message="lost counted",
    )
    queued = metric_value(rt.registry, "apscheduler_remote_runs", {"state": "queued"})
    assert queued == 1


def test_a_run_whose_worker_went_silent_is_abandoned_until_it_reports(
    make_runtime, remote, settings
):
    settings.APSCHEDULER_WORKER_LIVENESS = 10
    rt = make_runtime()
    stale = datetime.now(timezone.utc) - timedelta(seconds=11)
    row = _queued_row("silent", status=EX.PICKED_UP, worker="w:1", worker_seen=stale)
    alive = _queued_row(
        "alive", status=EX.PICKED_UP, worker="w:2", worker_seen=datetime.now(timezone.utc)
    )
    wait_for(lambda: EX.objects.get(id=row.id).status == EX.ABANDONED, message="abandoned")
    assert EX.objects.get(id=alive.id).status == EX.PICKED_UP
    assert metric_value(rt.registry, "apscheduler_abandoned_runs_total", {"group": "default"}) == 1
    oldest = metric_value(
        rt.registry, "apscheduler_job_oldest_running_start_timestamp_seconds", {"job_id": "alive"}
    )
    assert oldest == pytest.approx(alive.started.timestamp())


def test_run_now_from_the_admin_runs_a_remote_job_on_the_worker(make_runtime, remote):
    from django_apscheduler_obs import runnow
    from django_apscheduler_obs.models import RunRequest
    from django_apscheduler_obs.runs import TriggerSource

    rt = make_runtime()
    _add(rt, "asked", run_date=datetime.now(timezone.utc) + timedelta(days=1))
    request = runnow.request_run("asked", "alice")
    done = wait_for(
        lambda: RunRequest.objects.filter(id=request.id, status=RunRequest.DONE).first(),
        message="the request done",
    )
    (row,) = _final("asked")
    assert done.execution_id == row.id
    assert row.status == EX.SUCCESS and row.worker
    assert row.trigger_source == TriggerSource.RUN_NOW.value
    assert rt.scheduler.get_job("asked") is not None  # run-now does not consume the job


def test_local_and_remote_jobs_side_by_side(make_runtime, remote):
    rt = make_runtime()
    _add(rt, "here", executor="default")
    _add(rt, "there")
    (local,) = _final("here")
    (far,) = _final("there")
    assert local.status == far.status == EX.SUCCESS
    assert local.worker is None and far.worker
    assert sorted(Ledger.objects.values_list("job_id", flat=True)) == ["here", "there"]


def test_the_admin_shows_remote_runs_and_their_worker(admin_client):
    from django.urls import reverse

    _queued_row("report", age=3)
    picked = _queued_row("report", age=2, status=EX.PICKED_UP, worker="celery@w1:42")
    EX.objects.filter(id=picked.id).update(queue_wait=0.25, picked_up_at=picked.started)
    _queued_row("report", age=1, status=EX.LOST, exception="Not run: no worker")
    _queued_row("local", age=1, status=EX.SUCCESS)
    page = admin_client.get(
        reverse("admin:django_apscheduler_obs_djangojobexecution_changelist")
    ).content.decode()
    for text in ("Queued", "Running on worker", "Lost", "celery@w1:42", "scheduler"):
        assert text in page, text
    detail = admin_client.get(
        reverse("admin:django_apscheduler_obs_djangojobexecution_change", args=[picked.id])
    ).content.decode()
    assert "celery@w1:42" in detail and "250 ms" in detail


def test_max_instances_holds_until_the_remote_run_is_final(make_runtime, settings):
    """The slot of a remote run comes back when the leader sees the run final, not when the
    message is sent: fire times meanwhile are skipped as max_instances. The "held" backend
    keeps what is enqueued and runs nothing; the test plays the worker."""
    settings.APSCHEDULER_EXECUTORS = {"held": {"ENGINE": "tasks", "BACKEND": "held"}}
    settings.APSCHEDULER_INFLIGHT_POLL_INTERVAL = 0.05
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:ledger", "interval", seconds=1, id="slow_worker", executor="held",
        next_run_time=datetime.now(timezone.utc), max_instances=1,
    )  # fmt: skip
    queued = wait_for(
        lambda: EX.objects.filter(job_id="slow_worker", status=EX.QUEUED).first(),
        message="the first run queued",
    )
    rt.events.wait(events.EVENT_JOB_MAX_INSTANCES, "slow_worker")
    rows = EX.objects.filter(job_id="slow_worker")
    assert rows.filter(status=EX.QUEUED).count() == 1  # nothing else went out
    assert rows.filter(status=EX.MAX_INSTANCES).exists()  # and the skip is on record
    assert rt.scheduler._executors["held"]._instances["slow_worker"] == 1
    # The worker runs it now; the leader folds it and the next fire time goes out.
    message = RunMessage(queued.id, "slow_worker", queued.run_time).to_dict()
    assert run_message(message, worker="late:1") == DONE
    wait_for(
        lambda: EX.objects.filter(job_id="slow_worker", status=EX.QUEUED).exists(),
        message="the next fire time queued",
    )
    assert EX.objects.filter(job_id="slow_worker", status=EX.SUCCESS).count() == 1


def test_a_new_leader_counts_the_remote_runs_the_old_one_handed_out(make_runtime, settings):
    """Across a failover: the run enqueued by leader A finishes while B leads; B counts it
    (the row's flag, not A's memory, says what is counted) and A never does."""
    settings.APSCHEDULER_EXECUTORS = {"held": {"ENGINE": "tasks", "BACKEND": "held"}}
    settings.APSCHEDULER_INFLIGHT_POLL_INTERVAL = 0.05
    a = make_runtime()
    a.scheduler.add_job(
        "tests.jobs:ledger", "date", run_date=datetime.now(timezone.utc), id="handed",
        executor="held",
    )  # fmt: skip
    queued = wait_for(
        lambda: EX.objects.filter(job_id="handed", status=EX.QUEUED).first(),
        message="the run queued by A",
    )
    b = make_runtime(wait_leader=False)
    a.stop(timeout=1)  # releases the lease: B takes over
    wait_for(b.lease.is_leader, message="B leading")
    message = RunMessage(queued.id, "handed", queued.run_time).to_dict()
    assert run_message(message, worker="w:1") == DONE
    labels = {"job_id": "handed", "outcome": "success", "error_type": ""}
    wait_for(
        lambda: metric_value(b.registry, "apscheduler_job_runs_total", labels) == 1,
        message="B counting the run",
    )
    assert not metric_value(a.registry, "apscheduler_job_runs_total", labels)
    assert EX.objects.get(id=queued.id).report_pending is None
