"""The leader lease: its state machine with two ``Lease`` objects, the fast takeover from a
dead local owner, the database clock on every backend, and the lease thread (``LeaseKeeper``)
that wakes the scheduler on gain and on job changes.

Statements are autocommit (as in production), so every test uses a transactional database.
Lease expiry is time, so the tests that wait for it use ``time.monotonic()`` deadlines; every
other wait is on a condition.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import OperationalError, connection, connections
from django.db.models.functions import Now

from django_apscheduler_obs import lease as lease_mod
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.lease import (
    Lease,
    LeaseKeeper,
    _owner_is_dead_local,
    bump_change_counter,
    current_leader,
)
from django_apscheduler_obs.models import DjangoJobExecution, SchedulerInstance, SchedulerLease
from django_apscheduler_obs.util import DbNow
from tests.conftest import RUN_EVENTS, wait_for
from tests.dbfail import outage

db = pytest.mark.django_db(transaction=True)

TTL = 1.0
HOST = socket.gethostname()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def row() -> SchedulerLease:
    return SchedulerLease.objects.get(name="default")


def acquire_within(lease: Lease, timeout: float, interval: float = 0.02) -> float:
    """Poll ``acquire()`` (a standby's poll, made fast); return when it succeeded (monotonic)."""
    deadline = time.monotonic() + timeout
    while not lease.acquire():
        if time.monotonic() > deadline:
            raise AssertionError(f"{lease.identity} did not acquire within {timeout}s")
        time.sleep(interval)
    return time.monotonic()


# -- the state machine ----------------------------------------------------------------------


@db
def test_two_leases_acquire_renew_expire_take_over_release():
    a, b = Lease(ttl=TTL), Lease(ttl=TTL)
    epochs: list[int] = []

    assert a.acquire() and a.is_leader()
    epochs.append(a.epoch)
    assert row().owner == a.identity and row().epoch == a.epoch
    # B lives in the same process as A: A's pid is alive, so no "dead owner" shortcut.
    assert not b.acquire() and not b.is_leader() and b.epoch is None

    before = row().expires_at
    t_renew = time.monotonic()
    assert a.renew() and a.is_leader()
    assert row().expires_at > before
    assert row().epoch == epochs[-1], "a renewal never moves the epoch"

    # A stops renewing (as if killed): B gets the lease once it expired in DB time, not before.
    t_gain = acquire_within(b, timeout=TTL + 1)
    assert t_gain - t_renew >= TTL - 0.05, "taken over before the lease expired"
    assert b.epoch == epochs[-1] + 1
    epochs.append(b.epoch)
    assert not a.is_leader(), "A's monotonic deadline (TTL - margin) passed before the DB expiry"

    # A comes back: its renewal matches no row, so it is demoted at once.
    a._deadline = time.monotonic() + 10  # even with a local clock that still says "leader"
    assert not a.renew()
    assert a.epoch is None and not a.is_leader() and a.fence() is None
    assert row().owner == b.identity

    # Release: the standby takes over on its next poll, without waiting for the TTL.
    b.release()
    assert b.epoch is None and not b.is_leader()
    t0 = time.monotonic()
    assert a.acquire(), "a released lease is free at once"
    assert time.monotonic() - t0 < 0.5
    epochs.append(a.epoch)
    assert epochs == sorted(set(epochs)) and epochs == [epochs[0] + i for i in range(3)]
    assert row().epoch == epochs[-1]


@db
def test_a_lease_renewed_in_time_is_never_taken():
    a, b = Lease(ttl=TTL), Lease(ttl=TTL)
    assert a.acquire()
    epoch = a.epoch
    end = time.monotonic() + 2.5 * TTL
    while time.monotonic() < end:
        assert a.renew()
        assert not b.acquire()
        time.sleep(TTL / 4)
    assert a.is_leader() and a.epoch == epoch == row().epoch


@db
def test_leadership_ends_at_the_monotonic_deadline_as_after_sigstop(monkeypatch):
    a = Lease(ttl=TTL)
    assert a.acquire()
    assert a.fence() == (a.identity, a.epoch)
    real = time.monotonic
    # A process resumed after a pause longer than the TTL: monotonic time kept running.
    monkeypatch.setattr(lease_mod.time, "monotonic", lambda: real() + TTL)
    assert not a.is_leader() and a.fence() is None and a.remaining == 0.0


@db
def test_release_only_releases_our_own_epoch():
    a, b = Lease(ttl=TTL), Lease(ttl=TTL)
    assert a.acquire()
    stale_epoch = a.epoch
    SchedulerLease.objects.filter(name="default").update(
        expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc)
    )
    assert b.acquire()
    a.epoch = stale_epoch  # A still believes it leads
    a.release()
    assert row().owner == b.identity and row().epoch == b.epoch and b.renew()


@db
def test_release_retries_once_on_a_fresh_connection():
    """SIGTERM releases from the main thread, whose connection may have died long ago."""
    from tests.test_claims import failing

    a, b = Lease(ttl=30), Lease(ttl=30)
    assert a.acquire()
    with failing(r"^UPDATE .*schedulerlease", times=1) as outage:
        a.release()
    assert outage.failures == 1
    assert row().owner == "" and b.acquire(), "released after all: no wait for the TTL"


@db
def test_failover_seconds_measures_the_time_without_a_leader():
    a, b = Lease(ttl=TTL), Lease(ttl=TTL)
    assert a.acquire()
    assert a.last_failover_seconds is None  # first acquisition of the row... or not measured
    acquire_within(b, timeout=TTL + 1)
    assert TTL - 0.05 <= b.last_failover_seconds <= TTL + 0.5
    b.release()
    assert a.acquire()
    assert a.last_failover_seconds < 0.5, "after a release the gap is only the poll"


@db
def test_a_lost_read_back_after_acquiring_is_recovered_without_waiting_for_the_ttl(monkeypatch):
    a, b = Lease(ttl=TTL), Lease(ttl=TTL)
    real_get = SchedulerLease.objects.get
    calls = {"n": 0}

    def flaky_get(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("connection lost after the UPDATE committed")
        return real_get(*args, **kwargs)

    with (
        mock.patch.object(type(SchedulerLease.objects), "get", side_effect=flaky_get),
        pytest.raises(OperationalError),
    ):
        a.acquire()
    assert a.epoch is None and row().owner == a.identity  # the DB says A leads
    epoch = row().epoch
    assert a.acquire() and a.epoch == epoch, "re-adopted with the epoch it was given"
    assert not b.acquire()


# -- the dead-local-owner fast takeover -----------------------------------------------------


def _hold_lease_for(owner: str, epoch: int = 7) -> None:
    """A lease row held by ``owner`` for another hour (so only the fast path can take it)."""
    SchedulerLease.objects.update_or_create(
        name="default",
        defaults={
            "owner": owner,
            "epoch": epoch,
            "expires_at": _utcnow() + timedelta(hours=1),
            "renewed_at": _utcnow(),
        },
    )


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


@db
def test_a_dead_local_owner_is_taken_over_at_once_with_epoch_plus_one():
    pid = _exited_pid()
    _hold_lease_for(f"{HOST}:{pid}:deadbeef", epoch=7)
    b = Lease(ttl=TTL)
    t0 = time.monotonic()
    assert b.acquire()
    assert time.monotonic() - t0 < 0.5
    assert b.epoch == 8 and row().owner == b.identity


@db
def test_a_killed_but_unreaped_owner_counts_as_dead():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        proc.kill()
        wait_for(
            lambda: lease_mod._pid_is_gone(proc.pid), timeout=5, message="the zombie state"
        )  # killed, not reaped: a zombie, which still answers kill(pid, 0)
        os.kill(proc.pid, 0)
        _hold_lease_for(f"{HOST}:{proc.pid}:deadbeef")
        assert Lease(ttl=TTL).acquire()
    finally:
        proc.wait()


@db
def test_live_remote_or_unparsable_owners_are_not_taken_over():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for owner in [
            f"{HOST}:{sleeper.pid}:cafecafe",  # alive on this host
            f"{HOST}-elsewhere:{_exited_pid()}:cafecafe",  # another host: we cannot know
            "no-pid-here",
            f"{HOST}:notanumber:cafecafe",
        ]:
            _hold_lease_for(owner)
            assert not _owner_is_dead_local(owner), owner
            assert not Lease(ttl=TTL).acquire(), owner
            assert row().owner == owner
    finally:
        sleeper.kill()
        sleeper.wait()


@db
def test_our_own_pid_is_dead_only_for_an_identity_no_live_lease_has():
    a = Lease(ttl=TTL)
    assert a.acquire()
    # Another Lease of this very process: A is alive, B waits for expiry.
    assert not _owner_is_dead_local(a.identity)
    assert not Lease(ttl=TTL).acquire()
    # An earlier incarnation with our pid (pid 1 in a restarted container) is gone.
    _hold_lease_for(f"{HOST}:{os.getpid()}:0ld1ncar")
    assert _owner_is_dead_local(f"{HOST}:{os.getpid()}:0ld1ncar")
    c = Lease(ttl=TTL)
    assert c.acquire()
    # A Lease that was stopped (forgotten) no longer counts as alive.
    c.forget()
    d = Lease(ttl=TTL)
    assert d.acquire() and d.epoch == c.epoch + 1


# -- the database clock ---------------------------------------------------------------------


def _db_now() -> datetime:
    Lease(ttl=TTL)._ensure_row()
    value = SchedulerLease.objects.annotate(now=DbNow()).values_list("now", flat=True).first()
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value


@db
def test_db_now_is_utc_on_every_backend():
    before = _utcnow()
    value = _db_now()
    after = _utcnow()
    assert before - timedelta(seconds=1) <= value <= after + timedelta(seconds=1)


@db
def test_acquire_sets_expiry_ttl_ahead_in_utc():
    a = Lease(ttl=3)
    before = _utcnow()
    assert a.acquire()
    expires = row().expires_at
    assert before + timedelta(seconds=2) <= expires <= _utcnow() + timedelta(seconds=4)
    assert abs(a.clock_skew) < 1
    assert a.renew() and abs(a.clock_skew) < 1, "same host: the measured skew is about 0"


SESSION_TZ = {
    # MariaDB/MySQL: CURRENT_TIMESTAMP (Django's Now()) follows the session time zone.
    "mysql": ("SET time_zone = '+05:00'", "SET time_zone = '-03:00'"),
    "postgresql": ("SET TIME ZONE 'Asia/Karachi'", "SET TIME ZONE 'America/Sao_Paulo'"),
}


@db
def test_the_lease_expires_correctly_with_a_non_utc_session_time_zone():
    if connection.vendor not in SESSION_TZ:
        pytest.skip("SQLite has no session time zone")
    set_a, set_b = SESSION_TZ[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(set_a)
        if connection.vendor == "mysql":
            cursor.execute("SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), CURRENT_TIMESTAMP)")
            assert cursor.fetchone()[0] == 5 * 3600, "the session is really not on UTC"
    a = Lease(ttl=TTL)
    assert a.acquire()
    # Compared in SQL: Django reads PostgreSQL timestamps as if the session were on UTC.
    assert SchedulerLease.objects.filter(
        expires_at__gt=DbNow(), expires_at__lt=lease_mod._db_now_plus(TTL + 0.5)
    ).exists(), "expires TTL after the DB's UTC clock"
    if connection.vendor == "mysql":
        assert abs((row().expires_at - _utcnow()).total_seconds() - TTL) < 1
    if connection.vendor == "mysql":
        # The trap this guards against: Now() says the fresh lease expired hours ago.
        assert SchedulerLease.objects.filter(expires_at__lt=Now()).exists()
    assert a.renew()
    t_renew = time.monotonic()

    result: dict[str, Any] = {}

    def standby() -> None:  # another session, in yet another time zone
        try:
            with connections["default"].cursor() as cursor:
                cursor.execute(set_b)
            b = Lease(ttl=TTL)
            result["at_once"] = b.acquire()
            result["gained_at"] = acquire_within(b, timeout=TTL + 2)
            result["epoch"] = b.epoch
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=standby)
    thread.start()
    thread.join(TTL + 5)
    assert "error" not in result, result.get("error")
    assert result["at_once"] is False
    assert TTL - 0.05 <= result["gained_at"] - t_renew <= TTL + 1
    assert result["epoch"] == a.epoch + 1
    assert not a.renew()


# -- the lease thread -----------------------------------------------------------------------


class Spy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1


def keeper_for(lease: Lease, **kwargs: Any) -> tuple[LeaseKeeper, Spy, dict[str, list[Any]]]:
    wakeup = Spy()
    seen: dict[str, list[Any]] = {"gain": [], "loss": [], "renew": [], "change": []}
    keeper = LeaseKeeper(
        lease,
        wakeup,
        on_gain=lambda lease, n: seen["gain"].append((lease.epoch, n)),
        on_loss=lambda lease, reason: seen["loss"].append(reason),
        on_renew=lambda lease, result: seen["renew"].append(result),
        on_change=lambda version: seen["change"].append(version),
        standby_poll=0.05,
        change_poll=0.05,
        **kwargs,
    )
    return keeper, wakeup, seen


@db
def test_keeper_wakes_the_scheduler_on_gain_and_on_each_change():
    keeper, wakeup, seen = keeper_for(Lease(ttl=TTL, renew_interval=0.3))
    keeper.step()
    assert keeper.lease.is_leader() and wakeup.calls == 1 and len(seen["gain"]) == 1
    keeper.step()
    assert wakeup.calls == 1, "nothing changed: no wakeup"
    bump_change_counter()
    keeper.step()
    assert wakeup.calls == 2 and len(seen["change"]) == 1
    keeper.step()
    assert wakeup.calls == 2
    bump_change_counter()
    bump_change_counter()
    keeper.step()
    assert wakeup.calls == 3


@db
def test_a_change_between_gain_and_the_first_poll_is_not_lost():
    keeper, wakeup, _ = keeper_for(Lease(ttl=TTL, renew_interval=0.3))
    keeper.step()  # gain: the baseline is read before the wakeup
    assert wakeup.calls == 1
    bump_change_counter()  # committed after the pass that the gain woke up
    keeper.step()
    assert wakeup.calls == 2


@db
def test_an_unknown_baseline_wakes_on_the_first_poll(monkeypatch):
    keeper, wakeup, _ = keeper_for(Lease(ttl=TTL, renew_interval=0.3))
    with mock.patch.object(keeper, "_read_version", return_value=None):
        keeper.step()  # gain, but the version could not be read
    assert wakeup.calls == 1 and keeper._version is None
    keeper.step()
    assert wakeup.calls == 2, "a change may have been missed: wake once more"


@db
def test_a_standby_does_not_poll_changes_and_cannot_gain():
    holder = Lease(ttl=TTL)
    assert holder.acquire()
    keeper, wakeup, seen = keeper_for(Lease(ttl=TTL, renew_interval=0.3))
    with mock.patch.object(keeper, "_poll_changes") as poll:
        keeper.step()
        bump_change_counter()
        keeper.step()
    assert poll.call_count == 0 and wakeup.calls == 0 and not seen["gain"]


@db
def test_keeper_keeps_leading_through_renewal_errors_until_its_deadline(monkeypatch):
    keeper, wakeup, seen = keeper_for(Lease(ttl=TTL, renew_interval=0.05))
    keeper.step()
    assert keeper.lease.is_leader()
    with mock.patch.object(keeper.lease, "renew", side_effect=OperationalError("server gone")):
        time.sleep(0.06)
        keeper.step()
        assert seen["renew"] == ["error"] and keeper.lease.is_leader(), "one error is tolerated"
        deadline = keeper.lease._deadline
        while time.monotonic() < deadline:
            time.sleep(0.05)
        keeper.step()
    assert seen["loss"] and seen["loss"][0] in ("db_error", "expired")
    assert not keeper.lease.is_leader() and keeper.lease.epoch is None
    assert wakeup.calls == 2, "woken on gain, and on loss (the store now answers as a standby)"


@db
def test_keeper_demotes_at_once_when_taken_over(caplog):
    keeper, wakeup, seen = keeper_for(Lease(ttl=TTL, renew_interval=0.01))
    keeper.step()
    epoch = keeper.lease.epoch
    # Someone else holds it now (the DB says so; our local deadline has not passed yet).
    SchedulerLease.objects.filter(name="default").update(owner="other:1:x", epoch=epoch + 1)
    time.sleep(0.02)
    with caplog.at_level(logging.INFO, logger="django_apscheduler_obs.lease"):
        keeper.step()
    assert seen["renew"] == ["lost"] and seen["loss"] == ["taken_over"]
    assert not keeper.lease.is_leader()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "Lost the scheduler lease of group 'default' (taken_over)")
    ]


@db
def test_a_claim_fenced_by_the_database_demotes_at_once():
    keeper, wakeup, seen = keeper_for(Lease(ttl=TTL, renew_interval=0.3))
    keeper.step()
    lease = keeper.lease
    lease.fenced_by_database(lease.epoch - 1)  # an older epoch's statement: not about us
    assert lease.is_leader()
    lease.fenced_by_database(lease.epoch)
    assert not lease.is_leader() and lease.fence() is None
    keeper.step()
    assert seen["loss"] == ["taken_over"] and lease.epoch is None


@db
def test_keeper_demotes_when_it_wakes_up_past_its_deadline(monkeypatch):
    keeper, _, seen = keeper_for(Lease(ttl=TTL, renew_interval=0.3))
    keeper.step()
    real = time.monotonic
    monkeypatch.setattr(lease_mod.time, "monotonic", lambda: real() + 2 * TTL)
    keeper.step()
    assert seen["loss"][0] == "expired"


@db
def test_on_gain_marks_runs_of_older_epochs_abandoned():
    DjangoJobExecution.objects.create(
        job_id="j", run_time=_utcnow() - timedelta(seconds=9), status="Started execution", epoch=1
    )
    DjangoJobExecution.objects.create(
        job_id="j", run_time=_utcnow() - timedelta(seconds=8), status="Executed", epoch=1
    )
    SchedulerLease.objects.create(
        name="default", owner="", epoch=1, expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc)
    )
    swept: list[int] = []
    keeper, _, seen = keeper_for(Lease(ttl=TTL), on_abandoned=swept.append)
    keeper.step()
    assert seen["gain"] == [(2, 0)] and swept == [1]
    statuses = sorted(DjangoJobExecution.objects.values_list("status", flat=True))
    assert statuses == ["Abandoned", "Executed"]


@db
def test_a_stopped_keeper_releases_and_a_standby_takes_over_on_its_next_poll():
    a_keeper, _, _ = keeper_for(Lease(ttl=3))
    a_keeper.step()
    b_keeper, b_wakeup, _ = keeper_for(Lease(ttl=3))
    b_keeper.start()
    try:
        time.sleep(0.1)
        assert b_wakeup.calls == 0
        t0 = time.monotonic()
        a_keeper.stop(release=True)
        wait_for(b_keeper.lease.is_leader, timeout=1.0, interval=0.005, message="takeover")
        assert time.monotonic() - t0 <= b_keeper.standby_poll + 0.5
        wait_for(lambda: b_wakeup.calls >= 1, timeout=1.0, message="the wakeup on gain")
    finally:
        b_keeper.stop()
    assert current_leader() is None


# -- with a real scheduler --------------------------------------------------------------------


@db
def test_a_standby_store_returns_nothing_and_sleeps_until_woken(make_runtime):
    leader = make_runtime()
    leader.scheduler.add_job("tests.jobs:noop", "interval", seconds=3600, id="hourly")
    standby = make_runtime(wait_leader=False)
    assert not standby.lease.is_leader()
    far = _utcnow() + timedelta(days=2)
    assert standby.jobstore.get_due_jobs(far) == []
    assert standby.jobstore.get_next_run_time() is None
    assert [j.id for j in leader.jobstore.get_due_jobs(far)] == ["hourly"]
    assert leader.jobstore.get_next_run_time() is not None
    leader.stop(timeout=1)
    wait_for(standby.lease.is_leader, timeout=1.5, message="takeover after release")
    assert standby.jobstore.get_next_run_time() is not None


@db
def test_a_job_added_by_another_process_runs_at_its_first_fire_time(make_runtime, settings):
    rt = make_runtime()
    rt.scheduler.add_job("tests.jobs:noop", "interval", seconds=3600, id="hourly")
    fire = (_utcnow() + timedelta(seconds=1.5)).replace(microsecond=0)

    def add_elsewhere() -> None:  # a web process: a scheduler-less store, its own connection
        try:
            scheduler = BackgroundScheduler(timezone="UTC")
            store = DjangoJobStore()
            job = Job(
                scheduler,
                id="added",
                func="tests.jobs:noop",
                args=(),
                kwargs={},
                trigger=scheduler._create_trigger("date", {"run_date": fire}),
                executor="default",
                name="added",
                misfire_grace_time=60,
                coalesce=False,
                max_instances=1,
                next_run_time=fire,
            )
            store.add_job(job)
        finally:
            connections.close_all()

    thread = threading.Thread(target=add_elsewhere)
    thread.start()
    thread.join(10)
    rt.events.wait(RUN_EVENTS, "added", timeout=10)
    row = DjangoJobExecution.objects.get(job_id="added")
    assert row.status == DjangoJobExecution.SUCCESS
    lag = (row.started - fire).total_seconds()
    assert 0 <= lag < settings.APSCHEDULER_CHANGE_POLL_INTERVAL + 1


# -- abandoned runs: dead owners at once, live ones (finishing after SIGTERM) spared ------------


def _running_row(owner: str, seconds_ago: int, epoch: int = 1) -> DjangoJobExecution:
    return DjangoJobExecution.objects.create(
        job_id="j",
        run_time=_utcnow() - timedelta(seconds=seconds_ago),
        status=DjangoJobExecution.SENT,
        owner=owner,
        epoch=epoch,
    )


def _instance(identity: str, seen_ago: float) -> None:
    host, pid, _ = identity.rsplit(":", 2)
    SchedulerInstance.objects.update_or_create(
        identity=identity,
        defaults={
            "hostname": host,
            "pid": int(pid),
            "started_at": _utcnow() - timedelta(minutes=5),
            "last_seen": _utcnow() - timedelta(seconds=seen_ago),
        },
    )


@db
def test_gain_marks_runs_of_dead_owners_and_the_sweep_those_that_go_silent():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        live = f"{HOST}:{sleeper.pid}:11111111"  # heartbeating: finishing after its SIGTERM
        silent = "other-host:12:22222222"  # its instance row is stale
        gone = "other-host:13:33333333"  # no instance row at all
        dead_local = f"{HOST}:{_exited_pid()}:44444444"  # fresh row, but the pid is gone
        _instance(live, seen_ago=0.5)
        _instance(silent, seen_ago=60)
        _instance(dead_local, seen_ago=0.5)
        rows = {o: _running_row(o, i + 5) for i, o in enumerate([live, silent, gone, dead_local])}
        SchedulerLease.objects.create(
            name="default", owner="", epoch=1, expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc)
        )
        swept: list[int] = []
        keeper, _, seen = keeper_for(Lease(ttl=TTL, renew_interval=0.3), on_abandoned=swept.append)
        keeper.step()
        assert seen["gain"] == [(2, 0)] and swept == [3]

        def status(owner: str) -> str:
            return DjangoJobExecution.objects.get(pk=rows[owner].pk).status

        assert status(live) == DjangoJobExecution.SENT
        assert {status(o) for o in (silent, gone, dead_local)} == {"Abandoned"}
        # The live owner stops heartbeating: the leader's sweep marks its run.
        _instance(live, seen_ago=keeper.liveness + 1)
        keeper._last_sweep = 0.0
        keeper.step()
        assert status(live) == "Abandoned" and swept == [3, 1]
    finally:
        sleeper.kill()
        sleeper.wait()


@db
def test_a_retired_keeper_releases_at_once_keeps_heartbeating_and_never_reacquires(caplog):
    a_keeper, _, a_seen = keeper_for(Lease(ttl=3))
    a_keeper.heartbeat_interval = 0.05
    a_keeper.step()
    assert a_keeper.lease.is_leader()
    b = Lease(ttl=3)
    with caplog.at_level(logging.INFO, logger="django_apscheduler_obs.lease"):
        a_keeper.retire()
    assert a_seen["loss"] == ["released"] and not a_keeper.lease.is_leader()
    # a graceful stop is no reason for a warning
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "Released the scheduler lease of group 'default'")
    ]
    assert b.acquire(), "released: free at once"
    b.release()
    seen_before = SchedulerInstance.objects.get(identity=a_keeper.lease.identity).last_seen
    time.sleep(0.06)
    a_keeper.step()
    assert not a_keeper.lease.is_leader(), "a retired keeper does not take the lease back"
    assert SchedulerInstance.objects.get(identity=a_keeper.lease.identity).last_seen > seen_before
    a_keeper.stop(release=True)
    assert not SchedulerInstance.objects.filter(identity=a_keeper.lease.identity).exists()


@db
def test_a_failed_instance_row_write_is_retried_on_the_next_step_not_a_heartbeat_later():
    """The row is what ``apscheduler_status`` and the admin list as leader and standbys."""
    keeper, _, _ = keeper_for(Lease(ttl=TTL))
    keeper.heartbeat_interval = 3600.0
    rows = SchedulerInstance.objects.filter(identity=keeper.lease.identity)
    with outage(r"schedulerinstance") as db_down:
        db_down.down, db_down.remaining = True, 1  # one failed write, as a lock timeout would
        keeper.step()
    assert db_down.failures == 1 and not rows.exists()
    keeper.step()
    assert rows.get().is_leader
    seen = rows.get().last_seen
    keeper.step()  # written: the next refresh waits for the heartbeat interval again
    assert rows.get().last_seen == seen
    keeper.stop(release=True)


@db
def test_sigterm_hands_over_at_once_and_the_running_run_is_not_abandoned(make_runtime):
    """``runtime.stop()`` is what runapscheduler does on SIGTERM."""
    from tests import jobs

    a = make_runtime()
    b = make_runtime(wait_leader=False)
    jobs.release.clear()
    a.scheduler.add_job("tests.jobs:block", "date", id="long")
    wait_for(lambda: a.observer.oldest_running(), message="the long run to start")
    stopper = threading.Thread(target=a.stop, kwargs={"timeout": 10})
    t0 = time.monotonic()
    stopper.start()
    try:
        wait_for(b.lease.is_leader, timeout=2, interval=0.005, message="the takeover")
        assert time.monotonic() - t0 <= 0.2 + 0.5, "standby poll + slack, not the run's length"
        wait_for(  # on_gain runs after the new leader's look for abandoned runs
            lambda: b.registry.get_sample_value(
                "apscheduler_lease_acquisitions_total", {"group": "default"}
            ),
            message="the new leader's gain",
        )
        b.keeper._sweep_abandoned()  # and one of its periodic sweeps
        row = DjangoJobExecution.objects.get(job_id="long")
        assert row.status == DjangoJobExecution.SENT, "still running, not abandoned"
    finally:
        jobs.release.set()
        stopper.join(15)
    assert DjangoJobExecution.objects.get(job_id="long").status == DjangoJobExecution.SUCCESS
    assert (
        b.registry.get_sample_value("apscheduler_abandoned_runs_total", {"group": "default"}) == 0
    )
