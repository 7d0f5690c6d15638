"""Leader election through a lease row, with a fencing epoch, and job change detection.

Every statement here is one autocommit statement on the database clock (``DbNow``): no row
lock outlives a statement, so a process that is frozen or cut off between statements holds
nothing. Acquire and renew are separate statements: the epoch rises on every change of leader
and never on renewal, so a deposed leader's claims (``executors.py``) and job writes
(``jobstores.py``) are rejected by the database itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from django.db import DatabaseError, IntegrityError, router, transaction
from django.db import connections as db_connections
from django.db.models import DateTimeField as DTField
from django.db.models import ExpressionWrapper, F, Value
from django.utils import timezone as dj_timezone

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.models import (
    DjangoJobExecution,
    JobStoreVersion,
    SchedulerInstance,
    SchedulerLease,
)
from django_apscheduler_obs.util import DbNow, reset_connection

logger = logging.getLogger(__name__)

EPOCH_START = datetime(1970, 1, 1, tzinfo=timezone.utc)


# -- test hooks ------------------------------------------------------------------------------
# Used by the chaos suite (tests/chaos/) to prove that the harness detects failures and to
# freeze a leader at exact points. They do nothing unless the Django setting
# APSCHEDULER_TEST_HOOKS is True, which no production settings module should ever set.


def _test_hooks_enabled() -> bool:
    from django.conf import settings

    return bool(getattr(settings, "APSCHEDULER_TEST_HOOKS", False))


def unsafe_no_claim() -> bool:
    """TEST-ONLY negative control: every process acts as leader and runs without a claim.

    Enabled by ``DAO_UNSAFE_NO_CLAIM=1`` *and* ``APSCHEDULER_TEST_HOOKS = True``. It recreates
    django-apscheduler 0.7 with several schedulers, so the chaos harness must see duplicates.
    """
    return os.environ.get("DAO_UNSAFE_NO_CLAIM") == "1" and _test_hooks_enabled()


def freeze_point(name: str) -> None:
    """TEST-ONLY: block this thread while the file ``$DAO_TEST_FREEZE_FILE`` exists.

    Points: ``claim`` (the scheduler thread, after reading its fence, before the claim),
    ``update`` (inside the fenced job-state write, after reading the fence) and ``lease``
    (the lease thread, before each tick). The file's content names the point to freeze;
    the lease thread freezes for any content, so the lease expires as in a real pause. A
    thread frozen at the named point creates ``<file>.frozen`` so the harness can wait for it.
    """
    path = os.environ.get("DAO_TEST_FREEZE_FILE")
    if not path or not os.path.exists(path) or not _test_hooks_enabled():
        return
    try:
        with open(path) as f:
            wanted = f.read().strip()
    except OSError:
        return
    if name != "lease" and wanted != name:
        return
    logger.warning("TEST HOOK: thread %s frozen at %r", threading.current_thread().name, name)
    if name != "lease":
        with contextlib.suppress(OSError), open(path + ".frozen", "w") as f:
            f.write(name)
    deadline = time.monotonic() + 120  # a crashed harness must not hang a process forever
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    logger.warning("TEST HOOK: thread %s resumed at %r", threading.current_thread().name, name)


def make_identity() -> str:
    """Unique per process incarnation, so two live processes never share a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _db_now_plus(seconds: float) -> ExpressionWrapper:
    return ExpressionWrapper(DbNow() + Value(timedelta(seconds=seconds)), output_field=DTField())


# Identities of the ``Lease`` objects alive in this process. A lease row owned by one of them
# is held by a live holder even though its pid is ours (several leases in one process: tests,
# an embedded scheduler next to ``runapscheduler``-style code).
_LIVE_IDENTITIES: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _pid_is_gone(pid: int) -> bool:
    """True if no process ``pid`` exists on this host, or only its zombie is left."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    try:  # Linux: a killed child that nobody reaped yet still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _owner_is_dead_local(owner: str) -> bool:
    """True if ``owner`` was a process on this host that no longer exists.

    Lets a restarted scheduler (or a standby on the same host) take over at once instead of
    waiting for the lease to expire. A wrong answer cannot cause a duplicate: the epoch still
    fences the old owner. It can cost leadership churn, so anything uncertain is "alive".
    """
    try:
        host, pid_text, _ = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or pid <= 0:
        return False
    if pid == os.getpid():
        # Our pid: a live Lease of this process, or an earlier incarnation that had our pid
        # (pid 1 in a restarted container) and is certainly gone.
        with _LIVE_LOCK:
            return owner not in _LIVE_IDENTITIES
    return _pid_is_gone(pid)


def bump_change_counter(group: str | None = None) -> None:
    """Tell the leader that jobs changed outside its own loop. Safe to call from anywhere:
    inside a transaction it is a savepoint of it (a failed bump never undoes the caller's
    writes) and is seen with the caller's commit."""
    group = group or conf.GROUP
    alias = router.db_for_write(JobStoreVersion)
    nested = db_connections[alias].in_atomic_block
    counter = JobStoreVersion.objects.using(alias).filter(name=group)
    try:
        with transaction.atomic(using=alias) if nested else contextlib.nullcontext():
            if not counter.update(version=F("version") + 1):
                try:
                    with transaction.atomic(using=alias):
                        JobStoreVersion.objects.using(alias).create(name=group, version=1)
                except IntegrityError:
                    counter.update(version=F("version") + 1)
    except DatabaseError:
        logger.warning(
            "Could not bump the job change counter; the leader re-reads within %ss", conf.MAX_SLEEP
        )


def notify_jobs_changed(group: str | None = None) -> None:
    """Public helper for writes that bypass the ORM signals (``QuerySet.update``, raw SQL)."""
    transaction.on_commit(lambda: bump_change_counter(group))


class Lease:
    """The lease of one process on one scheduler group."""

    def __init__(
        self,
        group: str | None = None,
        *,
        ttl: float | None = None,
        renew_interval: float | None = None,
        identity: str | None = None,
    ) -> None:
        self.group = group or conf.GROUP
        self.ttl = float(ttl if ttl is not None else conf.LEASE_TTL)
        self.renew_interval = float(
            renew_interval if renew_interval is not None else conf.LEASE_RENEW_INTERVAL
        )
        self.identity = identity or make_identity()
        self.margin = self.ttl / 10
        self.epoch: int | None = None
        self._deadline = 0.0  # monotonic
        self.clock_skew = 0.0
        self.last_failover_seconds: float | None = None
        # The acquiring UPDATE ran but its read-back failed: the row may be ours.
        self._unconfirmed = False
        self.lost_reason = ""  # set when something other than the clock ended leadership
        with _LIVE_LOCK:
            _LIVE_IDENTITIES.add(self.identity)

    # -- state ------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Monotonic deadline: survives wall-clock jumps, and a resumed SIGSTOP sees it passed."""
        return self.epoch is not None and time.monotonic() < self._deadline

    def fence(self) -> tuple[str, int] | None:
        """(owner, epoch) to put in a fenced statement, or None when not leading."""
        epoch = self.epoch  # read once: the lease thread may clear it meanwhile
        if epoch is not None and time.monotonic() < self._deadline:
            return self.identity, epoch
        return None

    def fenced_by_database(self, epoch: int) -> None:
        """A fenced statement found that ``epoch`` no longer holds the lease: demote now.

        Always safe (it only gives leadership up); the lease thread reports the loss."""
        if self.epoch == epoch:
            self.lost_reason = "taken_over"
            self._deadline = 0.0

    @property
    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic()) if self.epoch is not None else 0.0

    # -- statements -------------------------------------------------------------------------

    def _ensure_row(self) -> None:
        with contextlib.suppress(IntegrityError):
            SchedulerLease.objects.get_or_create(
                name=self.group, defaults={"expires_at": EPOCH_START, "epoch": 0}
            )

    def acquire(self) -> bool:
        """One conditional UPDATE: take the lease if it expired (or its local owner is dead).

        The epoch goes up by one in the same statement, so every holder has its own epoch.
        """
        with _LIVE_LOCK:
            _LIVE_IDENTITIES.add(self.identity)
        self._ensure_row()
        t0 = time.monotonic()
        qs = SchedulerLease.objects.filter(name=self.group)
        current = qs.values("owner", "epoch", "expires_at", "renewed_at").first()
        if current and current["owner"] == self.identity and self._unconfirmed:
            return self._readopt(current["epoch"], t0)
        if current and current["owner"] and _owner_is_dead_local(current["owner"]):
            # Conditional on the owner we saw: a standby that got there first wins.
            qs = qs.filter(owner=current["owner"], epoch=current["epoch"])
        else:
            # At expires_at itself the lease is over: renewals and claims need "> now".
            qs = qs.filter(expires_at__lte=DbNow())
        n = qs.update(
            owner=self.identity,
            epoch=F("epoch") + 1,
            expires_at=_db_now_plus(self.ttl),
            acquired_at=DbNow(),
            renewed_at=DbNow(),
        )
        if n != 1:
            return False
        self._unconfirmed = True
        row = SchedulerLease.objects.get(name=self.group)
        self._unconfirmed = False
        if row.owner != self.identity:
            return False
        self.epoch = row.epoch
        self._deadline = t0 + self.ttl - self.margin
        self.lost_reason = ""
        self.last_failover_seconds = _failover_seconds(current, row)
        return True

    def _readopt(self, epoch: int, t0: float) -> bool:
        """We took the lease but never learnt our epoch (the read-back failed): renew it."""
        n = SchedulerLease.objects.filter(
            name=self.group, owner=self.identity, epoch=epoch, expires_at__gt=DbNow()
        ).update(expires_at=_db_now_plus(self.ttl), renewed_at=DbNow())
        self._unconfirmed = False
        if n != 1:
            return False
        self.epoch = epoch
        self._deadline = t0 + self.ttl - self.margin
        self.lost_reason = ""
        self.last_failover_seconds = None
        return True

    def renew(self) -> bool:
        """Extend our own unexpired lease; 0 rows means it is lost and we demote at once."""
        epoch = self.epoch
        if epoch is None:
            return False
        t0 = time.monotonic()
        local_before = datetime.now(timezone.utc)
        n = SchedulerLease.objects.filter(
            name=self.group, owner=self.identity, epoch=epoch, expires_at__gt=DbNow()
        ).update(expires_at=_db_now_plus(self.ttl), renewed_at=DbNow())
        if n != 1:
            self.epoch = None
            return False
        if self.lost_reason:  # a fenced statement already demoted us: never undo that
            return True
        self._deadline = t0 + self.ttl - self.margin
        try:
            self._measure_skew(local_before, time.monotonic() - t0)
        except DatabaseError:  # the renewal itself succeeded; the skew waits for the next one
            reset_connection()
        return True

    def _measure_skew(self, local_before: datetime, rtt: float) -> None:
        renewed = (
            SchedulerLease.objects.filter(name=self.group).values_list("renewed_at", flat=True)
        ).first()
        if renewed is None:
            return
        if renewed.tzinfo is None:  # USE_TZ=False: DbNow wrote UTC
            renewed = renewed.replace(tzinfo=timezone.utc)
        local_mid = local_before + timedelta(seconds=rtt / 2)
        self.clock_skew = (renewed - local_mid).total_seconds()

    def release(self) -> None:
        """Graceful stop: expire our lease now so a standby takes over within its poll."""
        epoch = self.epoch
        self.epoch = None  # first: no claim of ours may start after this point
        if epoch is None:
            return
        # Often called from the main thread, whose connection may have died long ago (a
        # database restart): one retry on a fresh connection before leaving it to expire.
        for attempt in (1, 2):
            try:
                SchedulerLease.objects.filter(
                    name=self.group, owner=self.identity, epoch=epoch
                ).update(expires_at=DbNow(), owner="")
                return
            except DatabaseError:
                reset_connection()
                if attempt == 2:
                    logger.warning(
                        "Could not release the scheduler lease; it expires in %ss", self.ttl
                    )

    def forget(self) -> None:
        """This Lease will not be used again: its identity no longer counts as alive here."""
        with _LIVE_LOCK:
            _LIVE_IDENTITIES.discard(self.identity)

    def mark_abandoned(self, spare_live_for: float | None = None) -> int:
        """Runs claimed under older epochs that never finished: their process is gone.

        With ``spare_live_for``, runs whose owner is still alive are left alone: its
        ``SchedulerInstance`` row was refreshed in the last ``spare_live_for`` seconds and it is
        not a dead process of this host. That is a scheduler that released the lease on SIGTERM
        and is finishing its runs, or one that is paused; the sweep (``LeaseKeeper``) marks them
        once their owner stops heartbeating. A paused process that resumes may still finish such
        a run; its final status then replaces ``abandoned`` (the row is matched by owner).
        """
        epoch = self.epoch
        assert epoch is not None
        stale = DjangoJobExecution.objects.filter(status=DjangoJobExecution.SENT, epoch__lt=epoch)
        if spare_live_for is not None:
            owners = set(stale.values_list("owner", flat=True).distinct())
            if not owners:
                return 0
            fresh = set(
                SchedulerInstance.objects.filter(
                    identity__in=owners,
                    last_seen__gte=dj_timezone.now() - timedelta(seconds=spare_live_for),
                ).values_list("identity", flat=True)
            )
            dead = {o for o in owners if o not in fresh or _owner_is_dead_local(o)}
            if not dead:
                return 0
            stale = stale.filter(owner__in=dead)
        return stale.update(
            status=DjangoJobExecution.ABANDONED,
            exception="The scheduler running this job stopped before it finished.",
        )


def _failover_seconds(previous: dict[str, Any] | None, row: SchedulerLease) -> float | None:
    """Time without a leader: our acquisition minus the last sign of life of the previous one
    (its last renewal, or its release)."""
    if not previous or not previous.get("epoch") or row.acquired_at is None:
        return None
    # Released: the lease ended at its release (expires_at); else at its last renewal.
    end = previous["expires_at"] if previous["owner"] == "" else previous["renewed_at"]
    if end is None:
        return None
    return max(0.0, (row.acquired_at - end).total_seconds())


class LeaseKeeper(threading.Thread):
    """Background thread: acquire or renew the lease, poll the change counter, wake the loop.

    It has its own Django connection (connections are per thread) and never raises.
    """

    def __init__(
        self,
        lease: Lease,
        wakeup: Callable[[], None],
        *,
        on_gain: Callable[[Lease, int], None] | None = None,
        on_loss: Callable[[Lease, str], None] | None = None,
        on_renew: Callable[[Lease, str], None] | None = None,
        on_change: Callable[[int], None] | None = None,
        on_abandoned: Callable[[int], None] | None = None,
        standby_poll: float | None = None,
        change_poll: float | None = None,
        change_polling: bool = True,
    ) -> None:
        super().__init__(name="apscheduler-lease", daemon=True)
        self.lease = lease
        self.wakeup = wakeup
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.on_renew = on_renew
        self.on_change = on_change
        self.on_abandoned = on_abandoned
        self.standby_poll = standby_poll if standby_poll is not None else conf.STANDBY_POLL_INTERVAL
        self.change_poll = change_poll if change_poll is not None else conf.CHANGE_POLL_INTERVAL
        self.change_polling = change_polling
        self._stop_event = threading.Event()
        self._step_lock = threading.Lock()
        self._retiring = False
        self._version: int | None = None
        self._last_renew = 0.0
        self._last_seen_write: float | None = None  # None: write at the next step
        self._last_sweep = 0.0
        # SchedulerInstance rows are refreshed every heartbeat_interval; an owner silent for
        # three of them is gone (or paused: it may still finish, and then says so).
        self.heartbeat_interval = max(self.standby_poll, 2.0)
        self.liveness = 3 * self.heartbeat_interval
        self.started_at = dj_timezone.now()

    def retire(self) -> None:
        """Graceful stop, first half: release the lease *now*, so a standby takes over within
        its poll, but keep this process's instance row fresh while it finishes its runs, so the
        new leader does not mark them abandoned. ``stop()`` ends it."""
        with self._step_lock:
            self._retiring = True
            if self.lease.epoch is not None:
                self.lease.release()
                self._lose("released")

    def stop(self, release: bool = True) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=self.standby_poll + 5)
        if release:
            self.lease.release()
            self._forget_instance()
            self.lease.forget()

    def run(self) -> None:
        while not self._stop_event.is_set():
            freeze_point("lease")  # test hook (off unless APSCHEDULER_TEST_HOOKS)
            try:
                self.step()
            except Exception:  # never let the thread die: it is the process's liveness
                logger.exception("Lease thread error")
                reset_connection()
            self._stop_event.wait(self._interval())
        db_connections.close_all()

    def _interval(self) -> float:
        if self.lease.is_leader():
            return min(self.change_poll, self.lease.renew_interval)
        return self.standby_poll

    def step(self) -> None:
        """One tick of the state machine; public so tests can drive it without threads."""
        with self._step_lock:
            if self._retiring:  # released for good: only say that we are still alive
                self._heartbeat_instance()
                return
            self._step()

    def _step(self) -> None:
        lease = self.lease
        now = time.monotonic()
        if lease.epoch is not None and not lease.is_leader():
            self._lose(lease.lost_reason or "expired")
        if lease.is_leader():
            if now - self._last_renew >= lease.renew_interval - 0.01:
                self._renew()
            if lease.is_leader() and now - self._last_sweep >= self.heartbeat_interval:
                self._sweep_abandoned()
            if lease.is_leader() and self.change_polling:
                self._poll_changes()
        else:
            try:
                gained = lease.acquire()
            except DatabaseError:
                reset_connection()
                gained = False
            if gained:
                self._last_renew = time.monotonic()
                self._gain()
        self._heartbeat_instance()

    def _renew(self) -> None:
        try:
            ok = self.lease.renew()
        except DatabaseError:
            logger.warning(
                "Lease renewal failed (database error); leader for %.1fs more", self.lease.remaining
            )
            reset_connection()
            if self.on_renew:
                self.on_renew(self.lease, "error")
            if not self.lease.is_leader():
                self.lease.epoch = None
                self._lose("db_error")
            return
        self._last_renew = time.monotonic()
        if self.on_renew:
            self.on_renew(self.lease, "ok" if ok else "lost")
        if not ok:
            self._lose("taken_over")

    def _gain(self) -> None:
        """Report the gain first (gauges flip with leadership), then mark the runs of dead
        earlier leaders abandoned (reported through ``on_abandoned``), read the change
        baseline and wake the scheduler."""
        lease = self.lease
        logger.info("Became the scheduler leader of group %r (epoch %s)", lease.group, lease.epoch)
        if self.on_gain:
            self.on_gain(lease, 0)
        try:
            n = lease.mark_abandoned(spare_live_for=self.liveness)
        except DatabaseError:
            reset_connection()
            n = 0
        self._last_sweep = time.monotonic()
        if n:
            logger.warning("Marked %d run(s) of earlier leaders as abandoned", n)
            if self.on_abandoned:
                self.on_abandoned(n)
        # The baseline is read *before* the wakeup: a change committed after this read is
        # seen by the next poll; one committed before it is seen by the pass we wake.
        self._version = None
        self._read_version()
        self.wakeup()

    def _sweep_abandoned(self) -> None:
        """Runs of earlier leaders whose process has since gone silent (see ``_gain``)."""
        self._last_sweep = time.monotonic()
        try:
            n = self.lease.mark_abandoned(spare_live_for=self.liveness)
        except DatabaseError:
            reset_connection()
            return
        if n:
            logger.warning("Marked %d run(s) of stopped schedulers as abandoned", n)
            if self.on_abandoned:
                self.on_abandoned(n)

    def _lose(self, reason: str) -> None:
        if reason == "released":  # a graceful stop: expected, nothing for anyone to look at
            logger.info("Released the scheduler lease of group %r", self.lease.group)
        else:
            logger.warning("Lost the scheduler lease of group %r (%s)", self.lease.group, reason)
        self.lease.epoch = None
        if self.on_loss:
            self.on_loss(self.lease, reason)
        self.wakeup()

    def _read_version(self) -> int | None:
        try:
            version = (
                JobStoreVersion.objects.filter(name=self.lease.group)
                .values_list("version", flat=True)
                .first()
            ) or 0
        except DatabaseError:
            reset_connection()
            return None
        if self._version is None:
            self._version = version
        return version

    def _poll_changes(self) -> None:
        known = self._version
        version = self._read_version()
        if version is None:
            return
        # No baseline yet (its read failed at gain): changes may have been missed, so wake.
        if known is None or version != known:
            logger.debug("Job store changed (version %s -> %s); waking up", known, version)
            if self.on_change and known is not None:
                self.on_change(version)
            self.wakeup()
        self._version = version

    def _heartbeat_instance(self) -> None:
        """Keep this process's row fresh for ``apscheduler_status`` (every few seconds)."""
        now = time.monotonic()
        if (
            self._last_seen_write is not None
            and now - self._last_seen_write < self.heartbeat_interval
        ):
            return
        self._last_seen_write = now
        host, pid, _ = self.lease.identity.rsplit(":", 2)
        fields = {
            "group": self.lease.group,
            "hostname": host,
            "pid": int(pid),
            "started_at": self.started_at,
            "last_seen": dj_timezone.now(),
            "is_leader": self.lease.is_leader(),
        }
        # UPDATE, then INSERT the first time: each statement writes first, so SQLite waits
        # for its lock. (update_or_create reads, then writes, in one transaction: SQLite
        # fails that at once when another connection wrote in between.) Only this process
        # writes its own row, so the INSERT does not race.
        mine = SchedulerInstance.objects.filter(identity=self.lease.identity)
        try:
            if not mine.update(**fields):
                SchedulerInstance.objects.create(identity=self.lease.identity, **fields)
        except DatabaseError:
            logger.debug("Could not refresh this scheduler's instance row", exc_info=True)
            self._last_seen_write = None  # try again on the next step, not a heartbeat later
            reset_connection()

    def _forget_instance(self) -> None:
        with contextlib.suppress(DatabaseError):
            SchedulerInstance.objects.filter(identity=self.lease.identity).delete()


def current_leader(group: str | None = None) -> dict[str, Any] | None:
    """The live lease row of ``group`` (owner, epoch, expiry), or None if nobody leads."""
    return (
        SchedulerLease.objects.filter(name=group or conf.GROUP, expires_at__gt=DbNow())
        .exclude(owner="")
        .values("owner", "epoch", "expires_at", "acquired_at", "renewed_at")
        .first()
    )
