"""The fenced claim: one ``INSERT … SELECT`` that inserts the execution row of a fire time only
while ``(owner, epoch)`` holds the unexpired lease in the database.

Every outcome (claimed, conflict, fenced, error) with the real statement on the configured
backend, the row lock that makes a claim wait for a takeover in progress (``FOR SHARE`` on
PostgreSQL, ``LOCK IN SHARE MODE`` on MariaDB), and how the executor uses it: claims are made
in the scheduler thread before the job store advances the job, and a claim that fails on a
database error keeps the fire time for a replay.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.db.backends import utils
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from django_apscheduler_obs.lease import Lease
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, SchedulerLease
from django_apscheduler_obs.sinks.history import Claim, HistorySink
from tests.conftest import RUN_EVENTS, wait_for

db = pytest.mark.django_db(transaction=True)

TTL = 3.0
SENT = DjangoJobExecution.SENT
RUN_TIME = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)


def _claim(sink: HistorySink, lease: Lease | None, run_time: datetime = RUN_TIME, **kw: Any):
    fence = None if lease is None else (lease.identity, lease.epoch)
    return sink.claim("job", run_time, fence, group="default", **kw)


def _expire_in_db() -> None:
    SchedulerLease.objects.filter(name="default").update(
        expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc)
    )


@db
def test_claimed_then_conflict_with_the_real_statement():
    sink, a = HistorySink(), Lease(ttl=TTL)
    assert a.acquire()
    with CaptureQueriesContext(connection) as queries:
        assert _claim(sink, a) is Claim.CLAIMED
    sql = queries.captured_queries[-1]["sql"]
    assert re.search(r"INSERT INTO \W?django_apscheduler_obs_djangojobexecution.* SELECT ", sql)
    lock = {"postgresql": "FOR SHARE", "mysql": "LOCK IN SHARE MODE"}.get(connection.vendor)
    if lock:
        assert sql.rstrip().endswith(lock), sql
    else:
        assert "FOR SHARE" not in sql and "LOCK IN" not in sql
    row = DjangoJobExecution.objects.get(job_id="job", run_time=RUN_TIME)
    assert (row.status, row.owner, row.epoch) == (SENT, a.identity, a.epoch)

    assert _claim(sink, a) is Claim.CONFLICT, "the same fire time again"
    # The same instant written in another zone is the same fire time.
    assert _claim(sink, a, RUN_TIME.astimezone(ZoneInfo("Asia/Tokyo"))) is Claim.CONFLICT
    assert DjangoJobExecution.objects.count() == 1
    # Another fire time of the same job is its own claim.
    assert _claim(sink, a, RUN_TIME + timedelta(seconds=1)) is Claim.CLAIMED


@db
def test_a_fire_time_recorded_by_the_orm_conflicts():
    sink, a = HistorySink(), Lease(ttl=TTL)
    assert a.acquire()
    berlin = RUN_TIME.astimezone(ZoneInfo("Europe/Berlin"))
    DjangoJobExecution.objects.create(job_id="job", run_time=berlin, status="Missed!")
    assert _claim(sink, a) is Claim.CONFLICT


@db
def test_a_deposed_leader_is_fenced_by_the_database():
    sink, a, b = HistorySink(), Lease(ttl=TTL), Lease(ttl=TTL)
    assert a.acquire()
    _expire_in_db()
    # Expired but nobody took over yet: still no claim.
    assert _claim(sink, a) is Claim.FENCED
    assert b.acquire() and b.epoch == a.epoch + 1
    # A's local view may still say "leader" (a paused process); the statement decides.
    assert _claim(sink, a) is Claim.FENCED
    assert _claim(sink, a, status=DjangoJobExecution.MISSED) is Claim.FENCED
    assert not DjangoJobExecution.objects.exists()
    # The new leader claims the same fire time.
    assert _claim(sink, b) is Claim.CLAIMED
    assert DjangoJobExecution.objects.get().epoch == b.epoch


@db
def test_the_right_epoch_with_the_wrong_owner_or_a_released_lease_is_fenced():
    sink, a = HistorySink(), Lease(ttl=TTL)
    assert a.acquire()
    assert sink.claim("job", RUN_TIME, ("someone:1:else", a.epoch), group="default") is (
        Claim.FENCED
    )
    assert sink.claim("job", RUN_TIME, (a.identity, a.epoch + 1), group="default") is (Claim.FENCED)
    assert sink.claim("job", RUN_TIME, (a.identity, a.epoch), group="other") is Claim.FENCED
    epoch = a.epoch
    a.release()
    assert sink.claim("job", RUN_TIME, (a.identity, epoch), group="default") is Claim.FENCED
    assert not DjangoJobExecution.objects.exists()


@db
def test_a_database_error_is_an_error_outcome_not_an_exception():
    sink, a = HistorySink(), Lease(ttl=TTL)
    assert a.acquire()
    with failing(r"INSERT INTO .*djangojobexecution") as outage:
        assert _claim(sink, a) is Claim.ERROR
    assert outage.failures == 1
    assert _claim(sink, a) is Claim.CLAIMED, "the connection was reset: the next claim works"


def _wait_until_blocked(vendor: str) -> None:
    """Wait until another session's claim waits for a row lock (a condition, not a sleep)."""
    if vendor == "postgresql":
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'INSERT INTO%%'"
        )
    else:
        sql = "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"

    def blocked() -> bool:
        with connections["default"].cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0] > 0

    # MariaDB refreshes INNODB_TRX only if it was not read in the last 100 ms: poll slower.
    interval = 0.02 if vendor == "postgresql" else 0.15
    wait_for(blocked, timeout=10, interval=interval, message="the claim to wait for the lock")


@db
def test_a_claim_waits_for_a_takeover_in_progress_and_is_then_fenced():
    """Without the row lock, READ COMMITTED would read the lease row of the statement's
    snapshot (still ours) and claim while the takeover commits."""
    if connection.vendor not in ("postgresql", "mysql"):
        pytest.skip("SQLite serialises writers: no concurrent takeover to wait for")
    a = Lease(ttl=30)
    assert a.acquire()
    took_over, release_takeover = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def takeover() -> None:  # another process takes the lease (e.g. A's pid looked dead)
        try:
            with transaction.atomic():
                SchedulerLease.objects.filter(name="default").update(
                    owner="b:2:bbbbbbbb", epoch=F("epoch") + 1
                )
                took_over.set()
                release_takeover.wait(20)
        finally:
            connections.close_all()

    def claim() -> None:
        try:
            result["claim"] = _claim(HistorySink(), a)
        finally:
            connections.close_all()

    t1 = threading.Thread(target=takeover)
    t1.start()
    assert took_over.wait(10)
    t2 = threading.Thread(target=claim)
    t2.start()
    try:
        _wait_until_blocked(connection.vendor)
        assert t2.is_alive(), "the claim waits for the takeover to commit"
    finally:
        release_takeover.set()
        t1.join(10)
    t2.join(10)
    assert result["claim"] is Claim.FENCED
    assert not DjangoJobExecution.objects.exists()


@db
def test_sqlite_a_claim_behind_a_takeover_in_progress_is_never_claimed():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite only")
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode=WAL")
    a = Lease(ttl=30)
    assert a.acquire()
    took_over, release_takeover, claim_started = (threading.Event() for _ in range(3))
    result: dict[str, Any] = {}

    def takeover() -> None:
        try:
            with transaction.atomic():
                SchedulerLease.objects.filter(name="default").update(
                    owner="b:2:bbbbbbbb", epoch=F("epoch") + 1
                )
                took_over.set()
                release_takeover.wait(20)
        finally:
            connections.close_all()

    def claim() -> None:
        try:
            claim_started.set()
            result["claim"] = _claim(HistorySink(), a)
        finally:
            connections.close_all()

    t1 = threading.Thread(target=takeover)
    t1.start()
    assert took_over.wait(10)
    t2 = threading.Thread(target=claim)
    t2.start()
    assert claim_started.wait(10)
    time.sleep(0.2)  # SQLite shows no lock waits to poll for; give the claim time to queue
    assert t2.is_alive(), "the claim waits for the writer (busy timeout)"
    release_takeover.set()
    t1.join(10)
    t2.join(40)
    assert result["claim"] in (Claim.FENCED, Claim.ERROR)
    assert not DjangoJobExecution.objects.exists()


# -- through the executor ---------------------------------------------------------------------


class _Failing:
    def __init__(self, pattern: str, times: int) -> None:
        self.regex = re.compile(pattern, re.IGNORECASE | re.DOTALL)
        self.remaining = times
        self.failures = 0
        self.lock = threading.Lock()

    def check(self, sql: str) -> None:
        if not self.regex.search(sql):
            return
        with self.lock:
            if self.remaining <= 0:
                return
            self.remaining -= 1
            self.failures += 1
        raise OperationalError("simulated: server closed the connection unexpectedly")


@contextlib.contextmanager
def failing(pattern: str, times: int = 1) -> Iterator[_Failing]:
    """The next ``times`` statements matching ``pattern`` fail, in whatever thread they run."""
    state = _Failing(pattern, times)
    execute = utils.CursorWrapper.execute

    def patched(self: Any, sql: str, params: Any = None) -> Any:
        state.check(sql)
        return execute(self, sql, params)

    utils.CursorWrapper.execute = patched  # type: ignore[method-assign]
    try:
        yield state
    finally:
        utils.CursorWrapper.execute = execute  # type: ignore[method-assign]


def _start_of_next_second(offset: float = 1.0) -> datetime:
    now = datetime.now(timezone.utc) + timedelta(seconds=offset)
    return now.replace(microsecond=0) + timedelta(seconds=1)


@db
def test_fire_times_are_claimed_before_the_job_store_advances_the_job(make_runtime, monkeypatch):
    """APScheduler calls ``update_job`` right after ``submit_job``. If the claim waited for a
    worker thread, a process paused or killed in between would leave a fire time that the
    store already moved past and nobody claimed: a silent gap. Here the only worker is busy,
    so a claim made by the worker would come after the update."""
    from django_apscheduler_obs import passes
    from tests import jobs

    rt = make_runtime(max_workers=1)
    seen: list[bool] = []
    update, write_pass = rt.jobstore._update_from_loop, passes.write_pass

    def claimed(previous: datetime) -> bool:
        return DjangoJobExecution.objects.filter(job_id="every-second", run_time=previous).exists()

    def checked_update(job: Any) -> None:  # one fire time at a time: claim, then this update
        if job.id == "every-second":
            seen.append(claimed(DjangoJob.objects.get(id=job.id).next_run_time))
        update(job)

    def checked_pass(rows: Any, advances: Any, *args: Any, **kwargs: Any) -> Any:
        # A whole pass: its claims and advances commit together, so once it has committed
        # the fire time the job moved past must have its row.
        if not any(a.job_id == "every-second" for a in advances):
            return write_pass(rows, advances, *args, **kwargs)
        previous = DjangoJob.objects.get(id="every-second").next_run_time
        result = write_pass(rows, advances, *args, **kwargs)
        seen.append(claimed(previous))
        return result

    rt.jobstore._update_from_loop = checked_update
    monkeypatch.setattr(passes, "write_pass", checked_pass)
    jobs.release.clear()
    try:
        rt.scheduler.add_job("tests.jobs:block", "date", id="blocker")
        wait_for(lambda: rt.observer.oldest_running(), message="the blocker to occupy the pool")
        rt.scheduler.add_job(
            "tests.jobs:noop",
            "interval",
            seconds=1,
            id="every-second",
            next_run_time=_start_of_next_second(0),
            coalesce=False,
            max_instances=3,  # queued behind the blocker, not skipped
        )
        wait_for(lambda: len(seen) >= 2, timeout=10, message="two passes")
    finally:
        jobs.release.set()
    assert all(seen), seen
    rt.events.wait(RUN_EVENTS, "every-second", count=2, timeout=10)


@db
def test_a_claim_that_fails_keeps_the_fire_time_and_it_runs_once_on_the_replay(make_runtime):
    rt = make_runtime()
    fire = _start_of_next_second()
    with failing(r"INSERT (IGNORE )?INTO .*djangojobexecution.* SELECT ", times=1) as outage:
        rt.scheduler.add_job(
            "tests.jobs:ledger",
            "date",
            run_date=fire,
            id="once",
            misfire_grace_time=60,
        )
        rt.events.wait(RUN_EVENTS, "once", timeout=10)
    assert outage.failures == 1
    rows = list(DjangoJobExecution.objects.filter(job_id="once"))
    assert [(r.run_time, r.status) for r in rows] == [(fire, DjangoJobExecution.SUCCESS)]
    from tests.testapp.models import Ledger

    assert list(Ledger.objects.values_list("run_time", flat=True)) == [fire]
    assert (
        rt.registry.get_sample_value(
            "apscheduler_claims_total", {"group": "default", "result": "error"}
        )
        == 1
    )
    wait_for(lambda: not DjangoJob.objects.filter(id="once").exists(), message="removal")


@db
def test_a_fenced_executor_does_not_run_the_job_or_advance_it(make_runtime):
    rt = make_runtime()
    fire = _start_of_next_second()
    rt.scheduler.add_job(
        "tests.jobs:ledger", "interval", seconds=3600, id="hourly", next_run_time=fire
    )
    # Another process holds the lease in the database; our local deadline still says leader.
    SchedulerLease.objects.filter(name="default").update(
        owner="b:2:bbbbbbbb",
        epoch=F("epoch") + 1,
        expires_at=datetime(2100, 1, 1, tzinfo=timezone.utc),
    )
    rt.keeper.stop(release=False)  # no renewal to notice it
    rt.lease._deadline = time.monotonic() + 3600
    wait_for(
        lambda: rt.registry.get_sample_value(
            "apscheduler_claims_total", {"group": "default", "result": "fenced"}
        ),
        timeout=10,
        message="a fenced claim",
    )
    wait_for(
        lambda: rt.registry.get_sample_value(
            "apscheduler_stale_writes_rejected_total", {"group": "default"}
        ),
        timeout=5,
        message="the rejected job-state write",
    )
    assert not rt.lease.is_leader(), "the database said so: demoted at once, no replay loop"
    assert not DjangoJobExecution.objects.filter(job_id="hourly").exists()
    assert DjangoJob.objects.get(id="hourly").next_run_time == fire, "not advanced"
    from tests.testapp.models import Ledger

    assert not Ledger.objects.exists()
