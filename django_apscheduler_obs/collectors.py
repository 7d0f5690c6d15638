"""Scrape-time metrics: state read when Prometheus asks, not pushed on every change.

``SchedulerCollector`` describes the jobs (next run, paused, expected interval, info …) and the
scheduler (state, executor saturation, lease) of the running process. It reads the job table
at most every few seconds and unpickles only jobs whose version changed, and it drives the
life cycle of per-job series: jobs added or removed by *any* process get their series created
at zero or removed.

``JobStoreCollector`` is for web processes: it reads next run, last success and running-since
from the database alone, so an "overdue" alert still fires when the scheduler process is down.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apscheduler.job import Job
from apscheduler.schedulers.base import STATE_PAUSED, STATE_RUNNING, STATE_STOPPED
from django.db import DatabaseError
from django.db.models import Max, Min
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from django_apscheduler_obs import signing, triggers
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from django_apscheduler_obs.sinks.metrics import OTHER_JOB
from django_apscheduler_obs.util import reset_connection

if TYPE_CHECKING:
    from django_apscheduler_obs.scheduler import SchedulerRuntime

PREFIX = "apscheduler"
STATES = {STATE_STOPPED: "stopped", STATE_RUNNING: "running", STATE_PAUSED: "paused"}
JOB_STATES = ("scheduled", "paused", "unrestorable")


@dataclass
class JobView:
    """What the collector knows about one job, refreshed when its version changes."""

    id: str
    version: int
    next_run: float | None
    registered: float
    restorable: bool
    name: str = ""
    func: str = ""
    trigger: str = ""
    executor: str = ""
    jobstore: str = ""
    max_instances: int = 1
    coalesce: bool = True
    misfire_grace: float | None = None
    expected_interval: float | None = None
    restore_error: bool = False  # the job store could not restore it (see DjangoJob)

    @property
    def usable(self) -> bool:
        return self.restorable and not self.restore_error


def _job_view(job: Job, version: int, registered: float, jobstore: str) -> JobView:
    return JobView(
        id=job.id,
        version=version,
        next_run=job.next_run_time.timestamp() if job.next_run_time else None,
        registered=registered,
        restorable=True,
        name=job.name,
        func=str(job.func_ref),
        trigger=str(job.trigger),
        executor=job.executor,
        jobstore=jobstore,
        max_instances=job.max_instances,
        coalesce=job.coalesce,
        misfire_grace=job.misfire_grace_time,
        expected_interval=triggers.expected_interval(job.trigger),
    )


class JobCatalog:
    """A cached view of the stored jobs; at most one table read per ``ttl`` seconds.

    Only jobs accepted by ``keep`` (those with their own metric series) are unpickled and held
    as a ``JobView``; the others are only counted, and only one of their ids is held (for
    ``on_change``: its series are everyone's). Holding a full view of each of 100,000 stored
    jobs cost ~180 MiB for series that are folded into one label anyway. The table is read in
    primary-key pages, so a refresh never holds every row at once either.
    """

    PAGE = 5_000

    def __init__(
        self,
        ttl: float = 5.0,
        on_change: Callable[[set[str], set[str]], None] | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> None:
        self.ttl = ttl
        self.on_change = on_change
        self.keep = keep
        self._views: dict[str, JobView] = {}
        self._ids: set[str] = set()
        self._counts = dict.fromkeys(JOB_STATES, 0)
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        self._loaded_at = 0.0

    def views(self) -> list[JobView]:
        """The kept jobs (all jobs when ``keep`` is not set)."""
        with self._lock:
            self._maybe_refresh()
            return list(self._views.values())

    def job_ids(self) -> set[str]:
        """The ids of the kept jobs, and of one folded job if there is any (its series
        stand for all of them)."""
        with self._lock:
            self._maybe_refresh()
            return set(self._ids)

    def counts(self) -> dict[str, int]:
        """Stored jobs by state (scheduled, paused, unrestorable), kept or not."""
        with self._lock:
            self._maybe_refresh()
            return dict(self._counts)

    def _maybe_refresh(self) -> None:
        if time.monotonic() - self._loaded_at >= self.ttl:
            try:
                self._refresh()
            except DatabaseError:
                reset_connection()  # keep serving the last known view

    def _rows(self) -> Iterator[tuple[str, int, Any, Any, str]]:
        last = None
        while True:
            qs = DjangoJob.objects.order_by("id")
            if last is not None:
                qs = qs.filter(id__gt=last)
            page = list(
                qs.values_list("id", "version", "next_run_time", "registered_at", "restore_error")[
                    : self.PAGE
                ]
            )
            yield from page
            if len(page) < self.PAGE:
                return
            last = page[-1][0]

    def _refresh(self) -> None:
        views: dict[str, JobView] = {}
        ids: set[str] = set()
        counts = dict.fromkeys(JOB_STATES, 0)
        stale: dict[str, tuple[int, float]] = {}
        folded = None
        for job_id, version, next_run, registered, restore_error in self._rows():
            if self.keep is not None and not self.keep(job_id):
                # Counted only: holding the ids of 100,000 folded jobs cost ~9 MiB.
                state = "unrestorable" if restore_error else "scheduled" if next_run else "paused"
                counts[state] += 1
                if folded is None or job_id in self._ids:  # keep the same one if it stays
                    folded = job_id
                continue
            ids.add(job_id)
            view = self._views.get(job_id)
            if view is None or view.version != version:
                stale[job_id] = (version, registered.timestamp())
                view = JobView(job_id, version, None, registered.timestamp(), restorable=False)
            view.next_run = next_run.timestamp() if next_run else None
            view.restore_error = bool(restore_error)
            views[job_id] = view
        if folded is not None:
            ids.add(folded)
        stale_ids = list(stale)
        for i in range(0, len(stale_ids), self.PAGE):
            chunk = stale_ids[i : i + self.PAGE]
            states = dict(DjangoJob.objects.filter(id__in=chunk).values_list("id", "job_state"))
            for job_id in chunk:
                old = views[job_id]
                new = self._load(job_id, *stale[job_id], states.get(job_id))
                new.next_run, new.restore_error = old.next_run, old.restore_error
                views[job_id] = new
        for view in views.values():
            if not view.usable:
                counts["unrestorable"] += 1
            else:
                counts["paused" if view.next_run is None else "scheduled"] += 1
        before = self._ids
        self._views, self._ids, self._counts = views, ids, counts
        self._loaded_at = time.monotonic()
        if self.on_change and before != ids:
            self.on_change(ids - before, before - ids)

    def _load(self, job_id: str, version: int, registered: float, state: Any) -> JobView:
        try:
            job = Job.__new__(Job)
            job.__setstate__(pickle.loads(signing.verify(bytes(state))))  # noqa: S301
            return _job_view(job, version, registered, "default")
        except Exception:
            return JobView(job_id, version, None, registered, restorable=False)


class SchedulerCollector(Collector):
    """Per-job and per-scheduler gauges of a running ``runapscheduler`` process."""

    def __init__(self, runtime: SchedulerRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        rt = self.runtime
        views = rt.catalog.views()
        label = rt.metrics.label
        j = ["job_id"]
        next_run = GaugeMetricFamily(
            f"{PREFIX}_job_next_run_timestamp_seconds",
            "Next scheduled fire time (absent while paused).",
            labels=j,
        )
        paused = GaugeMetricFamily(f"{PREFIX}_job_paused", "1 if the job is paused.", labels=j)
        interval = GaugeMetricFamily(
            f"{PREFIX}_job_expected_interval_seconds",
            "Largest gap between consecutive fire times, derived from the trigger.",
            labels=j,
        )
        grace = GaugeMetricFamily(
            f"{PREFIX}_job_misfire_grace_seconds",
            "misfire_grace_time of the job (absent if unlimited).",
            labels=j,
        )
        max_runtime = GaugeMetricFamily(
            f"{PREFIX}_job_max_runtime_seconds", "Declared max_runtime of the job.", labels=j
        )
        registered = GaugeMetricFamily(
            f"{PREFIX}_job_registered_timestamp_seconds", "When the job was first stored.", labels=j
        )
        info = GaugeMetricFamily(
            f"{PREFIX}_job_info",
            "Static description of the job.",
            labels=[
                *j,
                "name",
                "func",
                "trigger",
                "executor",
                "jobstore",
                "max_instances",
                "coalesce",
            ],
        )
        for v in views:
            lv = label(v.id)
            if not v.usable or lv == OTHER_JOB:  # folded jobs are only counted
                continue
            paused.add_metric([lv], 1.0 if v.next_run is None else 0.0)
            registered.add_metric([lv], v.registered)
            if v.next_run is not None:
                next_run.add_metric([lv], v.next_run)
            if v.expected_interval is not None:
                interval.add_metric([lv], v.expected_interval)
            if v.misfire_grace is not None:
                grace.add_metric([lv], float(v.misfire_grace))
            mr = rt.max_runtime(v.id)
            if mr is not None:
                max_runtime.add_metric([lv], float(mr))
            info.add_metric(
                [
                    lv,
                    v.name,
                    v.func,
                    v.trigger,
                    v.executor,
                    v.jobstore,
                    str(v.max_instances),
                    str(v.coalesce).lower(),
                ],
                1.0,
            )
        yield from (next_run, paused, interval, grace, max_runtime, registered, info)

        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Stored jobs by state.", labels=["state"])
        for state, n in rt.catalog.counts().items():
            jobs.add_metric([state], n)
        yield jobs

        oldest = GaugeMetricFamily(
            f"{PREFIX}_job_oldest_running_start_timestamp_seconds",
            "Start of the oldest run still going (present only while running).",
            labels=j,
        )
        running = rt.observer.oldest_running()
        if rt.inflight is not None:  # runs on workers count as running too
            for job_id, ts in rt.inflight.oldest_running.items():
                running[job_id] = min(ts, running.get(job_id, ts))
        for job_id, ts in running.items():
            oldest.add_metric([label(job_id)], ts)
        yield oldest
        if rt.inflight is not None:
            queued = GaugeMetricFamily(
                f"{PREFIX}_remote_oldest_queued_timestamp_seconds",
                "When the oldest run still waiting in a worker engine was enqueued (present "
                "only on the leader, while one waits).",
            )
            if rt.inflight.oldest_queued is not None:
                queued.add_metric([], rt.inflight.oldest_queued)
            yield queued

        state_family = GaugeMetricFamily(
            f"{PREFIX}_scheduler_state", "Scheduler state.", labels=[f"{PREFIX}_scheduler_state"]
        )
        current = STATES.get(rt.scheduler.state, "stopped")
        for name in STATES.values():
            state_family.add_metric([name], 1.0 if name == current else 0.0)
        yield state_family
        yield from self._scheduler_info()
        yield from self._executors()
        self._update_lease_gauges()

    def _scheduler_info(self) -> Iterator[Metric]:
        import apscheduler

        from django_apscheduler_obs import __version__

        rt = self.runtime
        info = GaugeMetricFamily(
            f"{PREFIX}_scheduler_info",
            "Build and configuration of this scheduler.",
            labels=[
                "version",
                "package_version",
                "scheduler_class",
                "timezone",
                "group",
                "identity",
            ],
        )
        info.add_metric(
            [
                apscheduler.__version__,
                __version__,
                type(rt.scheduler).__name__,
                str(rt.scheduler.timezone),
                rt.lease.group,
                rt.lease.identity,
            ],
            1.0,
        )
        yield info

    def _executors(self) -> Iterator[Metric]:
        busy = GaugeMetricFamily(
            f"{PREFIX}_executor_busy_workers",
            "Runs submitted to the executor and not finished.",
            labels=["executor"],
        )
        size = GaugeMetricFamily(
            f"{PREFIX}_executor_max_workers", "Size of the executor's pool.", labels=["executor"]
        )
        for alias, executor in self.runtime.scheduler._executors.items():
            busy.add_metric([alias], float(sum(getattr(executor, "_instances", {}).values())))
            pool = getattr(executor, "_pool", None)
            size.add_metric([alias], float(getattr(pool, "_max_workers", 0)))
        yield busy
        yield size

    def _update_lease_gauges(self) -> None:
        # Leader and remaining TTL are read by the gauges themselves (see build_scheduler).
        rt = self.runtime
        group = rt.lease.group
        if rt.lease.epoch is not None:
            rt.metrics.epoch.labels(group).set(rt.lease.epoch)


class JobStoreCollector(Collector):
    """Job health read from the database only, for a web process's ``/metrics``.

    Register it on the registry your web metrics use (``REGISTRY`` by default). Results are
    cached for ``ttl`` seconds so frequent scrapes cost one set of queries.
    """

    def __init__(self, registry: CollectorRegistry | None = None, ttl: float = 15.0) -> None:
        self.ttl = ttl
        self._cache: list[Metric] = []
        self._at = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._cache = list(self._read())
                    self._at = time.monotonic()
                except DatabaseError:
                    reset_connection()
            return list(self._cache)

    def _read(self) -> Iterator[Metric]:
        j = ["job_id"]
        next_run = GaugeMetricFamily(
            f"{PREFIX}_jobstore_job_next_run_timestamp_seconds",
            "Stored next run time of the job.",
            labels=j,
        )
        for job_id, nrt in DjangoJob.objects.filter(next_run_time__isnull=False).values_list(
            "id", "next_run_time"
        ):
            next_run.add_metric([job_id], nrt.timestamp())
        yield next_run
        success = GaugeMetricFamily(
            f"{PREFIX}_jobstore_job_last_success_timestamp_seconds",
            "End of the last successful run in the history.",
            labels=j,
        )
        rows = (
            DjangoJobExecution.objects.filter(status=DjangoJobExecution.SUCCESS)
            .values("job_id")
            .annotate(ts=Max("finished"))
            .values_list("job_id", "ts")
        )
        for job_id, ts in rows:
            if ts is not None:
                success.add_metric([job_id], float(ts))
        yield success
        running = GaugeMetricFamily(
            f"{PREFIX}_jobstore_job_oldest_running_start_timestamp_seconds",
            "Start of the oldest execution still marked as running.",
            labels=j,
        )
        rows = (
            DjangoJobExecution.objects.filter(
                status__in=(DjangoJobExecution.SENT, DjangoJobExecution.PICKED_UP)
            )
            .values("job_id")
            .annotate(ts=Min("started"))
            .values_list("job_id", "ts")
        )
        for job_id, ts in rows:
            if ts is not None:
                running.add_metric([job_id], ts.timestamp())
        yield running
