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

from django.db import DatabaseError, IntegrityError, transaction
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


def make_identity() -> str:
    """Unique per process incarnation, so two live processes never share a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _db_now_plus(seconds: float) -> ExpressionWrapper:
    return ExpressionWrapper(DbNow() + Value(timedelta(seconds=seconds)), output_field=DTField())


def _owner_is_dead_local(owner: str) -> bool:
    """True if ``owner`` was a process on this host that no longer exists.

    Lets a restarted scheduler take over at once instead of waiting for the lease to expire.
    Safe even if wrong (two hosts with one name): the epoch still fences the old owner.
    """
    try:
        host, pid_text, _ = owner.split(":")
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if pid == os.getpid():  # our pid, another incarnation: it is gone (pid reuse in containers)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def bump_change_counter(group: str | None = None) -> None:
    """Tell the leader that jobs changed outside its own loop. Safe to call from anywhere."""
    group = group or conf.GROUP
    try:
        if not JobStoreVersion.objects.filter(name=group).update(version=F("version") + 1):
            try:
                JobStoreVersion.objects.create(name=group, version=1)
            except IntegrityError:
                JobStoreVersion.objects.filter(name=group).update(version=F("version") + 1)
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

    # -- state ------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Monotonic deadline: survives wall-clock jumps, and a resumed SIGSTOP sees it passed."""
        return self.epoch is not None and time.monotonic() < self._deadline

    def fence(self) -> tuple[str, int] | None:
        """(owner, epoch) to put in a fenced statement, or None when not leading."""
        if self.is_leader():
            assert self.epoch is not None
            return self.identity, self.epoch
        return None

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
        """One conditional UPDATE: take the lease if it expired (or its local owner is dead)."""
        self._ensure_row()
        t0 = time.monotonic()
        qs = SchedulerLease.objects.filter(name=self.group)
        current = qs.values("owner", "renewed_at").first()
        if current and current["owner"] and _owner_is_dead_local(current["owner"]):
            qs = qs.filter(owner=current["owner"])
        else:
            qs = qs.filter(expires_at__lt=DbNow())
        n = qs.update(
            owner=self.identity,
            epoch=F("epoch") + 1,
            expires_at=_db_now_plus(self.ttl),
            acquired_at=DbNow(),
            renewed_at=DbNow(),
        )
        if n != 1:
            return False
        row = SchedulerLease.objects.get(name=self.group)
        if row.owner != self.identity:
            return False
        self.epoch = row.epoch
        self._deadline = t0 + self.ttl - self.margin
        if current and current["renewed_at"] and row.acquired_at and row.epoch > 1:
            self.last_failover_seconds = max(
                0.0, (row.acquired_at - current["renewed_at"]).total_seconds()
            )
        else:
            self.last_failover_seconds = None
        return True

    def renew(self) -> bool:
        """Extend our own unexpired lease; 0 rows means it is lost and we demote at once."""
        if self.epoch is None:
            return False
        t0 = time.monotonic()
        local_before = datetime.now(timezone.utc)
        n = SchedulerLease.objects.filter(
            name=self.group, owner=self.identity, epoch=self.epoch, expires_at__gt=DbNow()
        ).update(expires_at=_db_now_plus(self.ttl), renewed_at=DbNow())
        if n != 1:
            self.epoch = None
            return False
        self._deadline = t0 + self.ttl - self.margin
        self._measure_skew(local_before, time.monotonic() - t0)
        return True

    def _measure_skew(self, local_before: datetime, rtt: float) -> None:
        renewed = (
            SchedulerLease.objects.filter(name=self.group).values_list("renewed_at", flat=True)
        ).first()
        if renewed is None:
            return
        if renewed.tzinfo is None:
            renewed = renewed.replace(tzinfo=timezone.utc)
        local_mid = local_before + timedelta(seconds=rtt / 2)
        self.clock_skew = (renewed - local_mid).total_seconds()

    def release(self) -> None:
        """Graceful stop: expire our lease now so a standby takes over within its poll."""
        if self.epoch is None:
            return
        try:
            SchedulerLease.objects.filter(
                name=self.group, owner=self.identity, epoch=self.epoch
            ).update(expires_at=DbNow(), owner="")
        except DatabaseError:
            logger.warning("Could not release the scheduler lease; it expires in %ss", self.ttl)
        self.epoch = None

    def mark_abandoned(self) -> int:
        """Runs claimed under older epochs that never finished: their process is gone."""
        assert self.epoch is not None
        return DjangoJobExecution.objects.filter(
            status=DjangoJobExecution.SENT, epoch__lt=self.epoch
        ).update(
            status=DjangoJobExecution.ABANDONED,
            exception="The scheduler running this job stopped before it finished.",
        )


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
        self.standby_poll = standby_poll if standby_poll is not None else conf.STANDBY_POLL_INTERVAL
        self.change_poll = change_poll if change_poll is not None else conf.CHANGE_POLL_INTERVAL
        self.change_polling = change_polling
        self._stop_event = threading.Event()
        self._version: int | None = None
        self._last_renew = 0.0
        self._last_seen_write = 0.0
        self.started_at = dj_timezone.now()

    def stop(self, release: bool = True) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=self.standby_poll + 5)
        if release:
            self.lease.release()
            self._forget_instance()

    def run(self) -> None:
        while not self._stop_event.is_set():
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
        lease = self.lease
        now = time.monotonic()
        if lease.epoch is not None and not lease.is_leader():
            self._lose("expired")
        if lease.is_leader():
            if now - self._last_renew >= lease.renew_interval - 0.01:
                self._renew()
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
        lease = self.lease
        logger.info("Became the scheduler leader of group %r (epoch %s)", lease.group, lease.epoch)
        n = 0
        try:
            n = lease.mark_abandoned()
            if n:
                logger.warning("Marked %d run(s) of earlier leaders as abandoned", n)
        except DatabaseError:
            reset_connection()
        self._version = None
        if self.on_gain:
            self.on_gain(lease, n)
        self.wakeup()

    def _lose(self, reason: str) -> None:
        logger.warning("Lost the scheduler lease of group %r (%s)", self.lease.group, reason)
        self.lease.epoch = None
        if self.on_loss:
            self.on_loss(self.lease, reason)
        self.wakeup()

    def _poll_changes(self) -> None:
        try:
            version = (
                JobStoreVersion.objects.filter(name=self.lease.group)
                .values_list("version", flat=True)
                .first()
            ) or 0
        except DatabaseError:
            reset_connection()
            return
        if self._version is not None and version != self._version:
            logger.debug("Job store changed (version %s -> %s); waking up", self._version, version)
            if self.on_change:
                self.on_change(version)
            self.wakeup()
        self._version = version

    def _heartbeat_instance(self) -> None:
        """Keep this process's row fresh for ``apscheduler_status`` (every few seconds)."""
        now = time.monotonic()
        if now - self._last_seen_write < max(self.standby_poll, 2.0):
            return
        self._last_seen_write = now
        host, pid, _ = self.lease.identity.split(":")
        try:
            SchedulerInstance.objects.update_or_create(
                identity=self.lease.identity,
                defaults={
                    "group": self.lease.group,
                    "hostname": host,
                    "pid": int(pid),
                    "started_at": self.started_at,
                    "last_seen": dj_timezone.now(),
                    "is_leader": self.lease.is_leader(),
                },
            )
        except DatabaseError:
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
