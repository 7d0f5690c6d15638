"""The Prometheus sink. Every metric name and label of the package is defined here.

One ``SchedulerMetrics`` owns a dedicated ``CollectorRegistry`` (the scheduler is one process,
so no multiprocess mode: exemplars, ``remove()`` and collectors all work). Series of a job are
created at zero when the job appears and removed when it goes, so ``increase()`` sees the first
failure and dashboards never show ghosts of removed jobs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.runs import JobInfo, Outcome, RunRecord

OTHER_JOB = "_other"
OTHER_ERROR = "_OTHER"  # OpenTelemetry's fallback value for error.type
SKIP_REASONS = ("misfire", "max_instances", "coalesced")
PREFIX = "apscheduler"


class UnsetTimestamp(Collector):
    """A timestamp gauge with no sample until it is first set.

    A plain ``Gauge`` starts at 0, which dashboards and alerts read as "1970-01-01": a
    heartbeat that never happened would look 56 years stale beside the alert that says the
    scheduler never started. Absent is the truthful value of a time that has not happened.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._value: float | None = None
        registry.register(self)

    def set_to_current_time(self) -> None:
        self._value = time.time()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._documentation)
        if self._value is not None:
            family.add_metric([], self._value)
        yield family


class SchedulerMetrics:
    """Metric objects of one scheduler process, and the label bookkeeping around them."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        j = ["job_id"]
        self.runs = Counter(
            f"{PREFIX}_job_runs",
            "Runs of a job by outcome and error type.",
            [*j, "outcome", "error_type"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_job_run_duration_seconds",
            "True start to end of the job's function.",
            [*j, "outcome"],
            buckets=conf.DURATION_BUCKETS,
            registry=r,
        )
        self.start_delay = Histogram(
            f"{PREFIX}_job_start_delay_seconds",
            "True start minus scheduled fire time.",
            j,
            buckets=conf.DELAY_BUCKETS,
            registry=r,
        )
        self.last_duration = Gauge(
            f"{PREFIX}_job_last_run_duration_seconds", "Duration of the last run.", j, registry=r
        )
        self.last_delay = Gauge(
            f"{PREFIX}_job_last_start_delay_seconds", "Start delay of the last run.", j, registry=r
        )
        self.skipped = Counter(
            f"{PREFIX}_job_skipped_runs",
            "Fire times that did not run: misfire, max_instances, or dropped by coalescing.",
            [*j, "reason"],
            registry=r,
        )
        self.in_progress = Gauge(
            f"{PREFIX}_job_runs_in_progress", "Runs of the job executing now.", j, registry=r
        )
        self.last_success = Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "End of the last successful run (seeded from the history at start).",
            j,
            registry=r,
        )
        self.last_failure = Gauge(
            f"{PREFIX}_job_last_failure_timestamp_seconds",
            "End of the last failed run (seeded from the history at start).",
            j,
            registry=r,
        )
        self.heartbeat = UnsetTimestamp(
            f"{PREFIX}_scheduler_heartbeat_timestamp_seconds",
            "Last run of the canary job through the scheduler loop and executor "
            "(absent until the first one).",
            registry=r,
        )
        self.write_errors = Counter(
            f"{PREFIX}_history_write_errors",
            "Execution history writes that failed (retried from the buffer).",
            ["operation"],
            registry=r,
        )
        self.pending_writes = Gauge(
            f"{PREFIX}_history_pending_writes",
            "Execution history writes waiting in memory for the database.",
            registry=r,
        )
        self.dropped_writes = Counter(
            f"{PREFIX}_history_dropped_writes",
            "Execution history writes lost because the buffer was full.",
            registry=r,
        )
        self.cleanup_deleted = Counter(
            f"{PREFIX}_cleanup_deleted_executions",
            "Execution rows deleted by the retention cleanup.",
            registry=r,
        )
        # -- leader lease ------------------------------------------------------------------
        g = ["group"]
        self.leader = Gauge(
            f"{PREFIX}_leader", "1 while this process leads its group.", g, registry=r
        )
        self.epoch = Gauge(f"{PREFIX}_lease_epoch", "Fencing epoch of the lease.", g, registry=r)
        self.acquisitions = Counter(
            f"{PREFIX}_lease_acquisitions", "Times this process became the leader.", g, registry=r
        )
        self.losses = Counter(
            f"{PREFIX}_lease_losses",
            "Times this process stopped leading.",
            [*g, "reason"],
            registry=r,
        )
        self.renewals = Counter(
            f"{PREFIX}_lease_renewals", "Lease renewals by result.", [*g, "result"], registry=r
        )
        self.remaining = Gauge(
            f"{PREFIX}_lease_remaining_seconds", "Time left on this process's lease.", g, registry=r
        )
        self.failover = Histogram(
            f"{PREFIX}_failover_seconds",
            "Previous leader's last renewal to this process's acquisition.",
            g,
            buckets=(0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120),
            registry=r,
        )
        self.claims = Counter(
            f"{PREFIX}_claims", "Fenced claims of fire times by result.", [*g, "result"], registry=r
        )
        self.stale_writes = Counter(
            f"{PREFIX}_stale_writes_rejected",
            "Job-state writes rejected by the fence or a concurrent edit.",
            g,
            registry=r,
        )
        self.abandoned = Counter(
            f"{PREFIX}_abandoned_runs", "Runs of earlier leaders marked abandoned.", g, registry=r
        )
        self.clock_skew = Gauge(
            f"{PREFIX}_clock_skew_seconds", "Database clock minus this host's clock.", g, registry=r
        )
        self.changes = Counter(
            f"{PREFIX}_job_store_changes",
            "Job changes by other processes that woke the leader.",
            g,
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self._lock = threading.Lock()
        self._jobs: dict[str, str] = {}  # job id -> label value (itself or _other)
        self._own_labels = 0  # how many jobs have a series of their own
        self._error_types: dict[str, set[str]] = {}

    # -- label bookkeeping -------------------------------------------------------------------

    def label(self, job_id: str) -> str:
        """Bounded cardinality: the first MAX_JOB_SERIES jobs get their own series."""
        with self._lock:
            value = self._jobs.get(job_id)
            if value is None:
                value = job_id if self._own_labels < conf.MAX_JOB_SERIES else OTHER_JOB
                self._own_labels += value != OTHER_JOB
                self._jobs[job_id] = value
            return value

    def _error_label(self, label: str, error_type: str) -> str:
        with self._lock:
            seen = self._error_types.setdefault(label, set())
            if error_type in seen:
                return error_type
            if len(seen) >= conf.MAX_ERROR_TYPES:
                return OTHER_ERROR
            seen.add(error_type)
            return error_type

    def known_jobs(self) -> set[str]:
        with self._lock:
            return set(self._jobs)

    def add_job(self, job_id: str) -> None:
        """Create the job's series at zero, so the first failure or miss shows in increase()."""
        label = self.label(job_id)
        self.runs.labels(label, Outcome.SUCCESS.value, "")
        # The error-outcome histogram is born with the first error: pre-creating it would
        # add 19 series per job for the rare case (runs_total carries the failure rate).
        self.duration.labels(label, Outcome.SUCCESS.value)
        self.start_delay.labels(label)
        for reason in SKIP_REASONS:
            self.skipped.labels(label, reason)
        self.in_progress.labels(label)

    def remove_job(self, job_id: str) -> None:
        with self._lock:
            label = self._jobs.pop(job_id, None)
            if label is None or label == OTHER_JOB:
                return
            self._own_labels -= 1
            error_types = self._error_types.pop(label, set())
        for metric in (
            self.last_duration,
            self.last_delay,
            self.in_progress,
            self.start_delay,
            self.last_success,
            self.last_failure,
        ):
            _remove(metric, label)
        for outcome in (Outcome.SUCCESS, Outcome.ERROR):
            _remove(self.duration, label, outcome.value)
        for reason in SKIP_REASONS:
            _remove(self.skipped, label, reason)
        _remove(self.runs, label, Outcome.SUCCESS.value, "")
        for error_type in error_types:
            _remove(self.runs, label, Outcome.ERROR.value, error_type)

    # -- the sink ----------------------------------------------------------------------------

    def run_started(self, job: JobInfo) -> None:
        self.in_progress.labels(self.label(job.id)).inc()

    def run_finished(self, job: JobInfo) -> None:
        self.in_progress.labels(self.label(job.id)).dec()

    def record(self, record: RunRecord) -> None:
        label = self.label(record.job.id)
        if record.outcome is Outcome.MISSED:
            self.skipped.labels(label, "misfire").inc()
            return
        exemplar = (
            {"trace_id": record.trace_id, "span_id": record.span_id}
            if record.sampled and record.trace_id
            else None
        )
        outcome = record.outcome.value
        error_type = self._error_label(label, record.error_type) if record.exception else ""
        self.runs.labels(label, outcome, error_type).inc(exemplar=exemplar)
        if record.duration is not None:
            self.duration.labels(label, outcome).observe(record.duration, exemplar=exemplar)
            self.last_duration.labels(label).set(record.duration)
        if record.start_delay is not None:
            delay = max(record.start_delay, 0.0)
            self.start_delay.labels(label).observe(delay, exemplar=exemplar)
            self.last_delay.labels(label).set(delay)
        if record.finished is not None:
            gauge = self.last_success if record.outcome is Outcome.SUCCESS else self.last_failure
            gauge.labels(label).set(record.finished.timestamp())

    def skip(self, job_id: str, reason: str, count: int = 1) -> None:
        if count > 0:
            self.skipped.labels(self.label(job_id), reason).inc(count)

    def seed_last_outcomes(self, rows: Iterable[tuple[str, str, float]]) -> None:
        """(job_id, "success"|"error", unix time) from the history: restarts keep alerts right."""
        for job_id, outcome, ts in rows:
            gauge = self.last_success if outcome == Outcome.SUCCESS.value else self.last_failure
            gauge.labels(self.label(job_id)).set(ts)

    # -- history and cleanup -----------------------------------------------------------------

    def history_write_error(self, operation: str) -> None:
        self.write_errors.labels(operation).inc()

    def history_pending(self, count: int) -> None:
        self.pending_writes.set(count)

    def history_dropped(self) -> None:
        self.dropped_writes.inc()

    def init_history(self) -> None:
        for operation in ("claim", "finish", "skip", "cleanup"):
            self.write_errors.labels(operation)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
