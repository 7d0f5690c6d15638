"""Fenced job-state writes: the leader's ``update_job`` (after submitting a job) is one
``UPDATE … WHERE version = v AND EXISTS(our unexpired lease)``. A deposed leader's write is
rejected by the database, a write based on a stale read loses to a concurrent admin edit, and
no database error on the scheduler's own path escapes into APScheduler's loop: the fire time
is replayed instead, and its claim makes the replay a no-op.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import connection

from django_apscheduler_obs import lease as lease_mod
from django_apscheduler_obs.jobstores import DjangoJobStore, scheduler_loop
from django_apscheduler_obs.lease import Lease
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, SchedulerLease
from tests.conftest import RUN_EVENTS, wait_for
from tests.dbfail import JOB_UPDATE
from tests.test_claims import failing

db = pytest.mark.django_db(transaction=True)

UTC = timezone.utc
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
FAR = T0 + timedelta(days=1)


def _job(scheduler: BackgroundScheduler, job_id: str, next_run: datetime | None) -> Job:
    return Job(
        scheduler,
        id=job_id,
        func="tests.jobs:noop",
        args=(),
        kwargs={},
        trigger=scheduler._create_trigger("interval", {"seconds": 60, "start_date": T0}),
        executor="default",
        name=job_id,
        misfire_grace_time=60,
        coalesce=False,
        max_instances=1,
        next_run_time=next_run,
    )


class Store:
    """A job store as the leader's scheduler uses it, with its own lease."""

    def __init__(self, lease: Lease | None) -> None:
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.store = DjangoJobStore(lease=lease)
        self.store.start(self.scheduler, "default")
        self.stale = 0

        def count() -> None:
            self.stale += 1

        self.store.on_stale_write = count


def _stored(job_id: str = "j") -> tuple[datetime | None, int]:
    row = DjangoJob.objects.get(id=job_id)
    return row.next_run_time, row.version


def _advance(store: DjangoJobStore, job: Job, to: datetime) -> None:
    """What APScheduler's ``_process_jobs`` does after submitting ``job``."""
    job._modify(next_run_time=to)
    with scheduler_loop():
        store.update_job(job)


@pytest.fixture
def leader() -> tuple[Lease, Store]:
    lease = Lease(ttl=3)
    assert lease.acquire()
    s = Store(lease)
    s.store.add_job(_job(s.scheduler, "j", T0))
    return lease, s


@db
def test_the_leader_advances_its_job_and_the_version(leader):
    _, s = leader
    (job,) = s.store.get_due_jobs(FAR)
    _advance(s.store, job, T0 + timedelta(minutes=1))
    assert _stored() == (T0 + timedelta(minutes=1), 2) and s.stale == 0
    (job,) = s.store.get_due_jobs(FAR)
    _advance(s.store, job, T0 + timedelta(minutes=2))
    assert _stored() == (T0 + timedelta(minutes=2), 3) and s.stale == 0


@db
def test_on_postgresql_the_loop_write_commits_asynchronously_for_itself_only(leader):
    """The advance does not wait for a WAL flush (its claim did); the setting must not leak
    into the connection's next statements (the claims, which must stay durable)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("asynchronous commit is PostgreSQL's")
    _, s = leader
    (job,) = s.store.get_due_jobs(FAR)
    seen = []

    def spy(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(spy):
        _advance(s.store, job, T0 + timedelta(minutes=1))
    assert _stored() == (T0 + timedelta(minutes=1), 2) and s.stale == 0
    assert any("set_config('synchronous_commit', 'off', true)" in q for q in seen)
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


@db
def test_a_stale_epoch_is_rejected_by_the_database(leader):
    lease, s = leader
    (job,) = s.store.get_due_jobs(FAR)
    # Meanwhile the lease expired in the database and B took over; A's monotonic deadline
    # has not passed (A read its fence before a pause), so only the database can say no.
    SchedulerLease.objects.filter(name="default").update(
        expires_at=datetime(2000, 1, 1, tzinfo=UTC)
    )
    b = Lease(ttl=3)
    assert b.acquire() and b.epoch == lease.epoch + 1
    assert lease.fence() is not None
    _advance(s.store, job, T0 + timedelta(minutes=1))
    assert _stored() == (T0, 1), "not written"
    assert s.stale == 1
    # The new leader's write of the same job goes through.
    new = Store(b)
    (job,) = new.store.get_due_jobs(FAR)
    _advance(new.store, job, T0 + timedelta(minutes=1))
    assert _stored() == (T0 + timedelta(minutes=1), 2) and new.stale == 0


@db
def test_an_expired_lease_is_rejected_even_before_anyone_takes_over(leader):
    lease, s = leader
    (job,) = s.store.get_due_jobs(FAR)
    SchedulerLease.objects.filter(name="default").update(
        expires_at=datetime(2000, 1, 1, tzinfo=UTC)
    )
    _advance(s.store, job, T0 + timedelta(minutes=1))
    assert _stored() == (T0, 1) and s.stale == 1


@db
def test_a_leader_that_knows_it_lost_writes_nothing(leader):
    lease, s = leader
    (job,) = s.store.get_due_jobs(FAR)
    lease._deadline = time.monotonic() - 1  # e.g. resumed after SIGSTOP
    _advance(s.store, job, T0 + timedelta(minutes=1))
    assert _stored() == (T0, 1) and s.stale == 1


@db
def test_a_concurrent_admin_edit_survives_the_leaders_write(leader):
    _, s = leader
    (job,) = s.store.get_due_jobs(FAR)  # the leader read version 1
    # An admin (another process, no lease) pauses the job meanwhile: version 2.
    admin = Store(None)
    edited = admin.store.lookup_job("j")
    edited._modify(next_run_time=None)
    admin.store.update_job(edited)
    assert _stored() == (None, 2)
    # The leader's write, computed from version 1, would resume the job: rejected.
    _advance(s.store, job, T0 + timedelta(minutes=1))
    assert _stored() == (None, 2), "the admin's edit survives"
    assert s.stale == 1
    assert admin.store.lookup_job("j").next_run_time is None
    assert s.store.get_due_jobs(FAR) == [], "and the leader now sees the paused job"


@db
def test_a_one_off_job_is_removed_only_by_the_leader(leader):
    lease, s = leader
    lease._deadline = time.monotonic() - 1
    with scheduler_loop():
        s.store.remove_job("j")  # the deposed leader finished the job's last fire time
    assert DjangoJob.objects.filter(id="j").exists()
    lease._deadline = time.monotonic() + 3
    with scheduler_loop():
        s.store.remove_job("j")
    assert not DjangoJob.objects.filter(id="j").exists()


# -- database errors never escape into APScheduler's loop -------------------------------------


@db
def test_database_errors_in_the_leaders_writes_and_reads_do_not_raise(leader, caplog):
    _, s = leader
    (job,) = s.store.get_due_jobs(FAR)
    with failing(JOB_UPDATE, times=1):
        _advance(s.store, job, T0 + timedelta(minutes=1))  # no exception
    assert _stored() == (T0, 1)
    with failing(r"^DELETE .*djangojob\b", times=1), scheduler_loop():
        s.store.remove_job("j")
    before = datetime.now(UTC)
    with failing(r"^SELECT .*next_run_time", times=1):
        retry = s.store.get_next_run_time()
    assert before + timedelta(seconds=0.5) <= retry <= datetime.now(UTC) + timedelta(seconds=1.5)
    assert "Could not save job 'j'" in caplog.text
    assert "Could not read the next run time" in caplog.text
    # Nothing was lost: the job is still due at its old fire time.
    assert [j.id for j in s.store.get_due_jobs(FAR)] == ["j"]


def _ledger_rows(job_id: str) -> list[datetime]:
    from tests.testapp.models import Ledger

    return list(Ledger.objects.filter(job_id=job_id).values_list("run_time", flat=True))


@db
def test_a_failed_job_state_write_is_replayed_and_the_fire_time_runs_once(make_runtime):
    """Where a pass commits its claims with its job writes (``passes``), the failed write takes
    the claim with it: the fire time is replayed, claimed and run once. One fire time at a time
    (older SQLite), the claim stays and the replay is a conflict."""
    from django_apscheduler_obs import passes

    batched = passes.supported(connection)
    rt = make_runtime()
    fire = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    with failing(JOB_UPDATE + r".* EXISTS", times=1) as outage:
        rt.scheduler.add_job(
            "tests.jobs:ledger",
            "interval",
            seconds=3600,
            id="hourly",
            next_run_time=fire,
            coalesce=False,
            # 1 would also dedupe the immediate replay (the first run may still be going);
            # 2 lets the replay reach its claim, which is what this test is about.
            max_instances=2,
        )
        rt.events.wait(RUN_EVENTS, "hourly", timeout=10)
        replay = "conflict" if not batched else "claimed"
        wait_for(
            lambda: rt.registry.get_sample_value(
                "apscheduler_claims_total", {"group": "default", "result": replay}
            ),
            timeout=5,
            message=f"the replayed fire time to be {replay}",
        )
    assert outage.failures == 1
    if batched:
        claims = {
            result: rt.registry.get_sample_value(
                "apscheduler_claims_total", {"group": "default", "result": result}
            )
            for result in ("error", "claimed", "conflict")
        }
        assert claims == {"error": 1.0, "claimed": 1.0, "conflict": 0.0}, claims
    assert rt.scheduler.state == 1, "the scheduler loop is still running"
    assert _ledger_rows("hourly") == [fire], "run once"
    assert DjangoJobExecution.objects.filter(job_id="hourly").count() == 1
    wait_for(
        lambda: DjangoJob.objects.get(id="hourly").next_run_time == fire + timedelta(hours=1),
        message="the replay's write",
    )


@db
def test_the_scheduler_loop_survives_read_errors(make_runtime):
    rt = make_runtime()
    fire = (datetime.now(UTC) + timedelta(seconds=1.5)).replace(microsecond=0)
    with failing(r"^SELECT .*djangojob\b", times=4):
        rt.scheduler.add_job(
            "tests.jobs:ledger", "date", run_date=fire, id="once", misfire_grace_time=60
        )
        rt.scheduler.wakeup()
        rt.events.wait(RUN_EVENTS, "once", timeout=10)
    assert _ledger_rows("once") == [fire]


# -- the test hooks of the chaos suite ----------------------------------------------------------


@db
def test_the_test_hooks_need_the_setting(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("DAO_UNSAFE_NO_CLAIM", "1")
    freeze = tmp_path / "freeze"
    freeze.write_text("claim")
    monkeypatch.setenv("DAO_TEST_FREEZE_FILE", str(freeze))
    settings.APSCHEDULER_TEST_HOOKS = False
    assert not lease_mod.unsafe_no_claim()
    lease_mod.freeze_point("claim")  # returns at once
    settings.APSCHEDULER_TEST_HOOKS = True
    assert lease_mod.unsafe_no_claim()

    done = threading.Event()

    def frozen(point: str) -> None:
        lease_mod.freeze_point(point)
        done.set()

    lease_mod.freeze_point("update")  # another point: not frozen
    thread = threading.Thread(target=frozen, args=("claim",))
    thread.start()
    wait_for(lambda: os.path.exists(f"{freeze}.frozen"), timeout=5, message="the frozen marker")
    assert not done.is_set()
    freeze.unlink()
    assert done.wait(5)
    thread.join()


@db
def test_unsafe_mode_runs_without_claims_on_every_process(make_runtime, settings, monkeypatch):
    settings.APSCHEDULER_TEST_HOOKS = True
    monkeypatch.setenv("DAO_UNSAFE_NO_CLAIM", "1")
    a = make_runtime()
    b = make_runtime(wait_leader=False)
    assert not b.lease.is_leader()
    for rt in (a, b):  # the loops stay out of the way; their stores and executors are used
        rt.scheduler.pause()
        with rt.scheduler._jobstores_lock:  # a pass that was under way has ended
            pass
    fire = (datetime.now(UTC) - timedelta(seconds=1)).replace(microsecond=0)
    a.scheduler.add_job(
        "tests.jobs:ledger", "interval", seconds=3600, id="hourly", next_run_time=fire
    )
    # Both processes see the due job, lease or not...
    (job_a,) = a.jobstore.get_due_jobs(datetime.now(UTC))
    (job_b,) = b.jobstore.get_due_jobs(datetime.now(UTC))
    # ...and both run it, without claims: the duplicate the chaos harness must detect.
    a.scheduler._lookup_executor("default").submit_job(job_a, [fire])
    b.scheduler._lookup_executor("default").submit_job(job_b, [fire])
    wait_for(lambda: len(_ledger_rows("hourly")) == 2, timeout=10, message="two runs")
    assert _ledger_rows("hourly") == [fire, fire]
