"""``build_scheduler()``: job store, observed executor, sinks, listeners, lease, built-in jobs.

Everything a ``runapscheduler`` process needs is assembled here, in one place, so the
management command stays thin and tests can build the same thing in-process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from apscheduler.triggers.interval import IntervalTrigger
from django.db import DatabaseError, connections
from django.db.backends.signals import connection_created
from django.db.models import Max
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from django_apscheduler_obs import cleanup, listeners, runnow
from django_apscheduler_obs.collectors import JobCatalog, SchedulerCollector
from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.engines import build_engine
from django_apscheduler_obs.executors import (
    HEARTBEAT_JOB_ID,
    ObservedThreadPoolExecutor,
    RunObserver,
)
from django_apscheduler_obs.handoff import RemoteExecutor
from django_apscheduler_obs.inflight import InflightWatch
from django_apscheduler_obs.jobstores import DjangoJobStore, scheduler_loop
from django_apscheduler_obs.lease import Lease, LeaseKeeper, unsafe_no_claim
from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.registry import registry as job_registry
from django_apscheduler_obs.registry import sync_jobs
from django_apscheduler_obs.sinks.history import HistorySink
from django_apscheduler_obs.sinks.metrics import OTHER_JOB, SchedulerMetrics
from django_apscheduler_obs.util import reset_connection

logger = logging.getLogger(__name__)

INTERNAL_JOBSTORE = "django_apscheduler_obs.internal"


class ObservedScheduler(BackgroundScheduler):
    """A ``BackgroundScheduler`` whose loop survives anything a job store raises.

    An exception escaping ``_process_jobs`` ends APScheduler's scheduler thread for good
    (django-apscheduler 0.7 loses its scheduler to ``database is locked`` this way).
    """

    def _main_loop(self) -> None:
        try:
            super()._main_loop()
        finally:
            connections.close_all()  # this thread's connection; threads do not close theirs

    def _process_jobs(self) -> float | None:
        with scheduler_loop():
            try:
                return super()._process_jobs()
            except Exception:
                logger.exception(
                    "Error in the scheduler loop; retrying in %ss", self.jobstore_retry_interval
                )
                reset_connection()
                return float(self.jobstore_retry_interval)


def configure_sqlite(sender: Any, connection: Any, **kwargs: Any) -> None:
    """WAL lets readers and the single writer proceed together; wait, don't fail, on locks."""
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")


@dataclass
class SchedulerRuntime:
    """A built scheduler and the parts around it; ``start()``/``stop()`` drive it."""

    scheduler: ObservedScheduler
    lease: Lease
    keeper: LeaseKeeper
    metrics: SchedulerMetrics
    history: HistorySink
    observer: RunObserver
    catalog: JobCatalog
    jobstore: DjangoJobStore
    heartbeat_interval: float
    inflight: InflightWatch | None = None  # runs handed to worker engines (inflight.py)
    started_monotonic: float = 0.0
    last_heartbeat: float = 0.0
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def max_runtime(self, job_id: str) -> float | None:
        return job_registry.max_runtime(job_id)

    # -- health ------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.metrics.heartbeat.set_to_current_time()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while the loop runs and the canary went through the executor recently."""
        now = time.monotonic()
        since = self.last_heartbeat or self.started_monotonic
        age = now - since if since else None
        running = self.scheduler.state == STATE_RUNNING
        healthy = running and age is not None and age < 3 * self.heartbeat_interval
        return healthy, {
            "state": {0: "stopped", 1: "running", 2: "paused"}.get(self.scheduler.state),
            "heartbeat_age_s": None if age is None else round(age, 3),
            "leader": self.lease.is_leader(),
            "epoch": self.lease.epoch,
            "identity": self.lease.identity,
            "pending_history_writes": self.history.pending,
        }

    # -- life cycle --------------------------------------------------------------------------

    def start(self, *, sync: bool = True, lease: bool = True) -> None:
        connection_created.connect(configure_sqlite, dispatch_uid="django_apscheduler_obs")
        self.metrics.init_history()
        self.started_monotonic = time.monotonic()
        self.scheduler.start(paused=True)
        self.scheduler.add_job(
            self.heartbeat,
            IntervalTrigger(seconds=self.heartbeat_interval),
            id=HEARTBEAT_JOB_ID,
            jobstore=INTERNAL_JOBSTORE,
            replace_existing=True,
            next_run_time=datetime.now(timezone.utc),
            misfire_grace_time=None,
        )
        if sync:
            self._register_builtin_jobs()
            sync_jobs(self.scheduler, "default")
        self._seed_metrics()
        if lease:
            self.keeper.start()
        self.scheduler.resume()
        runnow.start_poller(self)  # issue 6: run-now requests from the admin (acts while leading)
        if self.inflight is not None:
            self.inflight.start()

    def _register_builtin_jobs(self) -> None:
        if conf.EXECUTION_RETENTION is not None:
            job_registry.add(
                cleanup.cleanup_job,
                "interval",
                seconds=conf.CLEANUP_INTERVAL,
                id=cleanup.CLEANUP_JOB_ID,
                replace=True,
                max_runtime=conf.CLEANUP_INTERVAL,
            )
        else:
            job_registry._specs.pop(cleanup.CLEANUP_JOB_ID, None)
        cleanup.on_deleted = self.metrics.cleanup_deleted.inc

    def _seed_metrics(self) -> None:
        """Last success/failure from the history: a restart must not blind the alerts."""
        try:
            for view in self.catalog.views():
                self.metrics.add_job(view.id)
            rows = (
                DjangoJobExecution.objects.filter(
                    status__in=[DjangoJobExecution.SUCCESS, DjangoJobExecution.ERROR],
                    finished__isnull=False,
                )
                .values("job_id", "status")
                .annotate(ts=Max("finished"))
                .values_list("job_id", "status", "ts")
            )
            self.metrics.seed_last_outcomes(
                (job_id, "success" if status == DjangoJobExecution.SUCCESS else "error", float(ts))
                for job_id, status, ts in rows
            )
        except DatabaseError:
            logger.warning("Could not seed metrics from the execution history", exc_info=True)
            reset_connection()

    def stop(self, timeout: float | None = None) -> int:
        """Stop taking runs, wait up to ``timeout`` for running ones, record the rest.

        Returns how many runs were still going when the time ran out (recorded abandoned).
        """
        if self._stopped.is_set():
            return 0
        self._stopped.set()
        runnow.stop_poller(self)  # issue 6: take no more run-now requests
        timeout = conf.SHUTDOWN_TIMEOUT if timeout is None else timeout
        if self.scheduler.state == STATE_RUNNING:
            self.scheduler.pause()
        # A pass already under way has claimed fire times: let it hand them to the executor
        # before the executor is shut down (issue 5: no claimed run left behind by a SIGTERM).
        with self.scheduler._jobstores_lock:
            pass
        # Release the lease now (a standby takes over within its poll, not after our runs);
        # our instance row stays fresh, so the new leader leaves our running runs alone.
        self.keeper.retire()
        deadline = time.monotonic() + timeout
        while self.observer.oldest_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        unfinished = self.observer.oldest_running()
        if unfinished:
            logger.warning(
                "Stopping with %d job(s) still running: %s",
                len(unfinished),
                ", ".join(sorted(unfinished)),
            )
            try:
                DjangoJobExecution.objects.filter(
                    status=DjangoJobExecution.SENT, owner=self.lease.identity
                ).update(
                    status=DjangoJobExecution.ABANDONED,
                    exception="The scheduler was stopped before this run finished.",
                )
            except DatabaseError:
                logger.error("Could not mark unfinished runs as abandoned; the next leader will")
        if self.inflight is not None:
            self.inflight.stop()
        self.keeper.stop(release=True)
        self.scheduler.shutdown(wait=False)
        self.history.close()
        return len(unfinished)


def build_scheduler(
    *,
    registry: CollectorRegistry | None = None,
    group: str | None = None,
    lease_ttl: float | None = None,
    renew_interval: float | None = None,
    standby_poll: float | None = None,
    change_poll: float | None = None,
    change_polling: bool = True,
    max_workers: int | None = None,
    heartbeat_interval: float | None = None,
    process_metrics: bool = True,
    tracer_provider: TracerProvider | None = None,
) -> SchedulerRuntime:
    """Assemble a scheduler process. Nothing touches the database until ``start()``."""
    metrics = SchedulerMetrics(registry, process=process_metrics)
    history = HistorySink(metrics)
    lease = Lease(group, ttl=lease_ttl, renew_interval=renew_interval)
    if unsafe_no_claim():  # TEST-ONLY negative control (needs APSCHEDULER_TEST_HOOKS)
        logger.error("DAO_UNSAFE_NO_CLAIM: every process runs every job, without claims")
    jobstore = DjangoJobStore(lease=None if unsafe_no_claim() else lease)
    jobstore.on_stale_write = metrics.stale_writes.labels(lease.group).inc
    observer = RunObserver(
        history=history,
        metrics=metrics,
        lease=lease,
        is_fenced_store=lambda alias: alias == "default",
        max_runtime=job_registry.max_runtime,
        tracer_provider=tracer_provider,
    )
    executor = ObservedThreadPoolExecutor(max_workers or conf.MAX_WORKERS, observer=observer)
    remote = {
        alias: RemoteExecutor(build_engine(alias, options), observer=observer)
        for alias, options in conf.EXECUTORS.items()
    }
    inflight = (
        InflightWatch(
            remote.values(),
            lease=lease,
            metrics=metrics,
            max_runtime=job_registry.max_runtime,
            on_abandoned=metrics.abandoned.labels(lease.group).inc,
        )
        if remote
        else None
    )
    if inflight is not None:
        counts = inflight.counts_of
        queued, picked_up = DjangoJobExecution.QUEUED, DjangoJobExecution.PICKED_UP
        metrics.remote_runs.labels("queued").set_function(lambda: counts(queued))
        metrics.remote_runs.labels("running").set_function(lambda: counts(picked_up))
    scheduler = ObservedScheduler(
        jobstores={"default": jobstore, INTERNAL_JOBSTORE: MemoryJobStore()},
        executors={"default": executor, **remote},
        job_defaults=conf.JOB_DEFAULTS,
        timezone=conf.TIMEZONE,
        jobstore_retry_interval=1,
    )
    # Jobs beyond the series cap are only counted, not described: memory stays flat.
    catalog = JobCatalog(keep=lambda job_id: metrics.label(job_id) != OTHER_JOB)

    runtime_ref: list[SchedulerRuntime] = []

    def on_gain(lease: Lease, abandoned: int) -> None:
        metrics.epoch.labels(lease.group).set(lease.epoch or 0)
        if runtime_ref:  # a standby's last outcomes may be stale: re-read the history
            runtime_ref[0]._seed_metrics()
        metrics.acquisitions.labels(lease.group).inc()
        if lease.last_failover_seconds is not None:
            metrics.failover.labels(lease.group).observe(lease.last_failover_seconds)
        if abandoned:
            metrics.abandoned.labels(lease.group).inc(abandoned)

    def on_loss(lease: Lease, reason: str) -> None:
        metrics.losses.labels(lease.group, reason).inc()

    def on_renew(lease: Lease, result: str) -> None:
        metrics.renewals.labels(lease.group, result).inc()
        metrics.clock_skew.labels(lease.group).set(lease.clock_skew)

    def on_change(version: int) -> None:
        metrics.changes.labels(lease.group).inc()
        catalog.invalidate()

    keeper = LeaseKeeper(
        lease,
        scheduler.wakeup,
        on_gain=on_gain,
        on_loss=on_loss,
        on_renew=on_renew,
        on_change=on_change,
        on_abandoned=metrics.abandoned.labels(lease.group).inc,
        standby_poll=standby_poll,
        change_poll=change_poll,
        change_polling=change_polling,
    )
    g = lease.group
    # Read when scraped, from the lease's monotonic deadline: a lease that lapsed while
    # nobody looked never shows 1, and a scrape right after winning never shows 0.
    metrics.leader.labels(g).set_function(lambda: 1.0 if lease.is_leader() else 0.0)
    metrics.remaining.labels(g).set_function(lambda: lease.remaining)
    metrics.epoch.labels(g)
    metrics.acquisitions.labels(g)
    metrics.stale_writes.labels(g)
    metrics.abandoned.labels(g)
    metrics.changes.labels(g)
    metrics.failover.labels(g)
    for result in ("claimed", "conflict", "fenced", "error"):
        metrics.claims.labels(g, result)
    for reason in ("expired", "taken_over", "db_error", "released"):
        metrics.losses.labels(g, reason)
    for result in ("ok", "lost", "error"):
        metrics.renewals.labels(g, result)

    runtime = SchedulerRuntime(
        scheduler=scheduler,
        lease=lease,
        keeper=keeper,
        metrics=metrics,
        history=history,
        observer=observer,
        catalog=catalog,
        jobstore=jobstore,
        heartbeat_interval=heartbeat_interval or conf.HEARTBEAT_INTERVAL,
        inflight=inflight,
    )

    def on_catalog_change(added: set[str], removed: set[str]) -> None:
        for job_id in added:
            metrics.add_job(job_id)
        for job_id in removed:
            metrics.remove_job(job_id)

    catalog.on_change = on_catalog_change
    runtime_ref.append(runtime)
    metrics.registry.register(SchedulerCollector(runtime))
    listeners.register(runtime)
    return runtime
