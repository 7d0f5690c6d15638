"""The leader's watch over runs it handed to workers (``handoff.py``).

Every ``APSCHEDULER_INFLIGHT_POLL_INTERVAL`` seconds, while this process leads:

1. queued runs older than the dispatch timeout become ``Lost`` (no worker picked them up);
2. runs on a worker whose liveness stamp is older than ``APSCHEDULER_WORKER_LIVENESS``, or
   that ran past the job's ``max_runtime``, become ``Abandoned``;
3. finished rows not yet counted (``report_pending``) are read into this process's metrics,
   exactly as a local run is, then flagged counted; their executor gets its
   ``max_instances`` slot back.

All three are conditional UPDATEs on the row, so a worker's pick-up or final write and the
leader's mark never both win. Metrics live in the leader's registry (one ``/metrics``, no
multiprocess mode); the flag on the row, not a cursor in memory, says what is counted, so a
new leader continues where the last one stopped (``docs/workers.md``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connections
from django.db.models import Count, Min, Q

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.runs import JobInfo, Outcome, RunRecord, TriggerSource
from django_apscheduler_obs.util import reset_connection

if TYPE_CHECKING:
    from django_apscheduler_obs.handoff import RemoteExecutor
    from django_apscheduler_obs.lease import Lease
    from django_apscheduler_obs.sinks.metrics import SchedulerMetrics

logger = logging.getLogger(__name__)

EX = DjangoJobExecution
BATCH = 500
LOST_MESSAGE = "Not run: no worker picked it up within the dispatch timeout ({timeout:g} s)."
ABANDONED_MESSAGE = "The worker running this job stopped answering before it finished."
OVERRUN_MESSAGE = "The run went past its max_runtime ({limit:g} s) on its worker."
_OUTCOMES = {EX.SUCCESS: Outcome.SUCCESS, EX.ERROR: Outcome.ERROR, EX.MISSED: Outcome.MISSED}


class _RowError(Exception):
    """An error as recorded on a row: the metrics' ``error_type`` label is the row's."""

    def __init__(self, text: str, error_type: str) -> None:
        super().__init__(text)
        self.recorded_error_type = error_type


class InflightWatch:
    """Marks lost and abandoned remote runs and folds finished ones into the metrics."""

    def __init__(
        self,
        executors: Iterable[RemoteExecutor],
        *,
        lease: Lease,
        metrics: SchedulerMetrics | None = None,
        max_runtime: Callable[[str], float | None] = lambda job_id: None,
        on_abandoned: Callable[[int], None] | None = None,
    ) -> None:
        self.executors = list(executors)
        self.lease = lease
        self.metrics = metrics
        self.max_runtime = max_runtime
        self.on_abandoned = on_abandoned
        self._adopted_epoch: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.counts: dict[str, int] = {EX.QUEUED: 0, EX.PICKED_UP: 0}
        self.oldest_running: dict[str, float] = {}  # job id -> start of its oldest remote run
        self.oldest_queued: float | None = None  # claim time of the oldest run still queued

    def counts_of(self, status: str) -> float:
        """Remote runs in ``status`` at the last poll (a gauge's reading)."""
        return float(self.counts.get(status, 0))

    # -- thread ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and self.executors:
            self._thread = threading.Thread(
                target=self._loop, name="apscheduler-inflight", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(conf.INFLIGHT_POLL_INTERVAL):
                try:
                    self.poll()
                except Exception:
                    logger.exception("The in-flight watch failed; retrying")
                    reset_connection()
        finally:
            connections.close_all()

    # -- one poll ----------------------------------------------------------------------------

    def poll(self, now: datetime | None = None) -> None:
        """One round; does nothing unless this process leads."""
        fence = self.lease.fence()
        if fence is None:
            self._adopted_epoch = None
            self.counts = {EX.QUEUED: 0, EX.PICKED_UP: 0}
            self.oldest_running = {}
            self.oldest_queued = None
            return
        now = now or datetime.now(timezone.utc)
        try:
            if self._adopted_epoch != fence[1]:
                self._adopt()
                self._adopted_epoch = fence[1]
            self.mark_lost(now)
            self.mark_abandoned(now)
            while self.fold() == BATCH:
                pass
            self._read_counts()
        except DatabaseError:
            logger.warning("In-flight watch: database error; retrying", exc_info=True)
            reset_connection()

    def _adopt(self) -> None:
        pending = list(
            EX.objects.filter(Q(status__in=EX.REMOTE_PENDING) | Q(report_pending=True)).values_list(
                "id", "job_id"
            )
        )
        for executor in self.executors:
            executor.adopt(pending)

    def mark_lost(self, now: datetime) -> int:
        timeout = conf.DISPATCH_TIMEOUT
        n = EX.objects.filter(
            status=EX.QUEUED, started__lt=now - timedelta(seconds=timeout)
        ).update(
            status=EX.LOST,
            finished=Decimal(f"{now.timestamp():.6f}"),
            exception=LOST_MESSAGE.format(timeout=timeout),
            error_type="Lost",
            report_pending=True,
        )
        if n:
            logger.error("Marked %d queued run(s) lost: not picked up in %gs", n, timeout)
        return n

    def mark_abandoned(self, now: datetime) -> int:
        liveness = conf.WORKER_LIVENESS
        running = EX.objects.filter(status=EX.PICKED_UP)
        n = running.filter(worker_seen__lt=now - timedelta(seconds=liveness)).update(
            status=EX.ABANDONED, exception=ABANDONED_MESSAGE, report_pending=True
        )
        oldest: dict[str, float] = {}
        for pk, job_id, started in running.values_list("id", "job_id", "started"):
            limit = self.max_runtime(job_id)
            if started is None:
                continue
            if limit is not None and (now - started).total_seconds() > limit:
                n += running.filter(id=pk).update(
                    status=EX.ABANDONED,
                    exception=OVERRUN_MESSAGE.format(limit=limit),
                    report_pending=True,
                )
                continue
            ts = started.timestamp()
            oldest[job_id] = min(ts, oldest.get(job_id, ts))
        self.oldest_running = oldest
        if n:
            logger.error("Marked %d run(s) on workers abandoned", n)
            if self.on_abandoned is not None:
                self.on_abandoned(n)
        return n

    def fold(self) -> int:
        """Count up to ``BATCH`` finished remote runs in the metrics; returns how many."""
        rows = list(
            EX.objects.filter(report_pending=True)
            .order_by("id")
            .values(
                "id",
                "job_id",
                "status",
                "run_time",
                "started",
                "finished",
                "duration",
                "start_delay",
                "queue_wait",
                "exception",
                "error_type",
                "trace_id",
                "span_id",
                "trigger_source",
                "worker",
            )[:BATCH]
        )
        if not rows:
            return 0
        # Flag first: a crash after this counts nothing twice (a gap of one poll's runs in a
        # dying leader's counters, which die with it anyway).
        EX.objects.filter(id__in=[r["id"] for r in rows], report_pending=True).update(
            report_pending=None
        )
        for row in rows:
            self._count(row)
            for executor in self.executors:
                executor.settle(row["id"], row["status"], row["exception"], row["run_time"])
        return len(rows)

    def _count(self, row: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        status = row["status"]
        if status == EX.LOST:
            self.metrics.lost(row["job_id"])
            return
        if status == EX.ABANDONED:
            return  # counted when marked (apscheduler_abandoned_runs_total)
        outcome = _OUTCOMES.get(status)
        if outcome is None:
            return
        info = JobInfo(row["job_id"], row["job_id"], "", "", "", "default", 1, None)
        record = RunRecord(
            info,
            row["run_time"],
            outcome,
            started=row["started"],
            duration=float(row["duration"]) if row["duration"] is not None else None,
            start_delay=row["start_delay"],
            trace_id=row["trace_id"],
            span_id=row["span_id"],
            sampled=bool(row["trace_id"]),
            trigger_source=TriggerSource(row["trigger_source"] or "schedule"),
            worker=row["worker"] or "",
            queue_wait=row["queue_wait"],
        )
        if row["finished"] is not None:
            record.finished = datetime.fromtimestamp(float(row["finished"]), timezone.utc)
        if outcome is Outcome.ERROR:
            record.exception = _RowError(row["exception"] or "", row["error_type"] or "Error")
        try:
            self.metrics.record(record)
        except Exception:
            logger.exception("The metrics sink failed for remote run %s", row["id"])

    def _read_counts(self) -> None:
        counts = {EX.QUEUED: 0, EX.PICKED_UP: 0}
        oldest_queued = None
        for status, n, oldest in (
            EX.objects.filter(status__in=EX.REMOTE_PENDING)
            .values("status")
            .annotate(n=Count("id"), oldest=Min("started"))
            .values_list("status", "n", "oldest")
        ):
            counts[status] = n
            if status == EX.QUEUED and oldest is not None:
                oldest_queued = oldest.timestamp()
        self.counts = counts
        self.oldest_queued = oldest_queued
