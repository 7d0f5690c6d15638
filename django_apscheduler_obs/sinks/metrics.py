"""The Prometheus sink. Every metric name and label of the package is defined here.

One ``SchedulerMetrics`` owns a dedicated ``CollectorRegistry`` (the scheduler is one process,
so no multiprocess mode: exemplars, ``remove()`` and collectors all work). Series of a job are
created at zero when the job appears and removed when it goes, so ``increase()`` sees the first
failure and dashboards never show ghosts of removed jobs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.runs import JobInfo, Outcome, RunRecord

logger = logging.getLogger(__name__)

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


Encoder = Callable[[Any], bytes]
_RENDERING: ContextVar[Encoder | None] = ContextVar("dao_rendering", default=None)


class _Families:
    """The smallest collector: ``encoder(_Families(metrics))`` renders just these families."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


class _RenderedFamily(Metric):
    """A family that ``render`` copies as text; it has no samples of its own."""

    def __init__(self, source: Metric, text: bytes) -> None:
        super().__init__(source.name, source.documentation, source.type, source.unit)
        self.text = text


class JobSeries(Collector):
    """The per-job metrics, with each series' exposition text cached between scrapes.

    Rendering ~50 samples per job through prometheus_client costs ~0.3 ms a job, most of it
    in building and formatting samples that have not changed since the last scrape. Each
    child (one label set) is rendered alone by the very encoder of the scrape and kept with
    the stamp of its job label; ``SchedulerMetrics`` stamps a label after changing it, so a
    scrape re-renders only the jobs that changed. ``collect()`` outside ``render`` is the
    plain prometheus_client path, which ``generate_latest`` and ``get_sample_value`` use.
    """

    def __init__(self, metrics: tuple[Any, ...], stamps: dict[str, int]) -> None:
        self._metrics = metrics
        self._stamps = stamps
        # (metric name, encoder key) -> label values -> (stamp, child, text, created text)
        self._cache: dict[tuple[str, Any], dict[tuple[str, ...], tuple[Any, ...]]] = {}
        self._heads: dict[tuple[str, Any], tuple[bytes, bytes]] = {}
        self._lock = threading.Lock()
        self._broken = False

    def describe(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield from metric.describe()

    def collect(self) -> Iterator[Metric]:
        encoder = _RENDERING.get()
        for metric in self._metrics:
            if encoder is None or self._broken:
                yield from metric.collect()
                continue
            try:
                with self._lock:
                    text = self._render(metric, encoder)
            except Exception:
                # The cache reads prometheus_client's children and samples, which are not
                # public API: if a release changes them, serve the plain path, never a 500.
                logger.exception("Cached metrics rendering failed; using prometheus_client's")
                self._broken = True
                yield from metric.collect()
                continue
            yield _RenderedFamily(metric.describe()[0], text)

    def _render(self, metric: Any, encoder: Encoder) -> bytes:
        key = (metric._name, _encoder_key(encoder))
        head = self._heads.get(key)
        if head is None:
            head = (_strip_eof(encoder(_Families(metric.describe()))), b"")
        with metric._lock:
            children = metric._metrics.copy()
        old = self._cache.get(key, {})
        new: dict[tuple[str, ...], tuple[Any, ...]] = {}
        lines: list[bytes] = [head[0]]
        created: list[bytes] = []
        stamps = self._stamps
        for values, child in children.items():
            stamp = stamps.get(values[0], 0)  # read before rendering: a later change re-stamps
            entry = old.get(values)
            if entry is None or entry[0] != stamp or entry[1] is not child:
                text, created_head, created_text = self._render_child(
                    metric, values, child, encoder, head[0]
                )
                if created_head and not head[1]:
                    head = (head[0], created_head)
                entry = (stamp, child, text, created_text)
            new[values] = entry
            lines.append(entry[2])
            if entry[3]:
                created.append(entry[3])
        self._cache[key] = new
        self._heads[key] = head
        if created:  # the text format moves ``*_created`` into a gauge family of its own
            lines.append(head[1])
            lines.extend(created)
        return b"".join(lines)

    @staticmethod
    def _render_child(
        metric: Any, values: tuple[str, ...], child: Any, encoder: Encoder, head: bytes
    ) -> tuple[bytes, bytes, bytes]:
        family = metric.describe()[0]
        series = dict(zip(metric._labelnames, values, strict=True))
        for suffix, labels, value, ts, exemplar, native in child._samples():
            family.add_sample(
                metric._name + suffix, {**series, **labels}, value, ts, exemplar, native
            )
        body = _strip_eof(encoder(_Families([family])))[len(head) :]
        cut = body.find(b"# HELP ")
        if cut < 0:
            return body, b"", b""
        end = body.index(b"\n", body.index(b"\n", cut) + 1) + 1  # HELP and TYPE lines
        return body[:cut], body[cut:end], body[end:]


def _encoder_key(encoder: Encoder) -> Any:
    func = getattr(encoder, "func", encoder)
    keywords = getattr(encoder, "keywords", None) or {}
    return (func, tuple(sorted(keywords.items())))


_EOF = b"# EOF\n"


def _strip_eof(text: bytes) -> bytes:
    return text[: -len(_EOF)] if text.endswith(_EOF) else text


def render(registry: Any, encoder: Encoder = generate_latest) -> bytes:
    """``encoder(registry)``, with the job series copied from their cache.

    ``encoder`` is ``generate_latest``, the OpenMetrics one, or what ``choose_encoder``
    returns; the output has the same lines in the same order as ``encoder(registry)``.
    """
    eof = encoder(_Families([]))  # b"" in the text format, "# EOF" in OpenMetrics
    out: list[bytes] = []
    pending: list[Metric] = []
    token = _RENDERING.set(encoder)
    try:
        for metric in registry.collect():
            if isinstance(metric, _RenderedFamily):
                if pending:
                    out.append(_strip_eof(encoder(_Families(pending))))
                    pending = []
                out.append(metric.text)
            else:
                pending.append(metric)
    finally:
        _RENDERING.reset(token)
    if pending:
        out.append(_strip_eof(encoder(_Families(pending))))
    out.append(eof)
    return b"".join(out)


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
            registry=None,
        )
        self.duration = Histogram(
            f"{PREFIX}_job_run_duration_seconds",
            "True start to end of the job's function.",
            [*j, "outcome"],
            buckets=conf.DURATION_BUCKETS,
            registry=None,
        )
        self.start_delay = Histogram(
            f"{PREFIX}_job_start_delay_seconds",
            "True start minus scheduled fire time.",
            j,
            buckets=conf.DELAY_BUCKETS,
            registry=None,
        )
        self.last_duration = Gauge(
            f"{PREFIX}_job_last_run_duration_seconds", "Duration of the last run.", j, registry=None
        )
        self.last_delay = Gauge(
            f"{PREFIX}_job_last_start_delay_seconds",
            "Start delay of the last run.",
            j,
            registry=None,
        )
        self.skipped = Counter(
            f"{PREFIX}_job_skipped_runs",
            "Fire times that did not run: misfire, max_instances, or dropped by coalescing.",
            [*j, "reason"],
            registry=None,
        )
        self.in_progress = Gauge(
            f"{PREFIX}_job_runs_in_progress", "Runs of the job executing now.", j, registry=None
        )
        self.last_success = Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "End of the last successful run (seeded from the history at start).",
            j,
            registry=None,
        )
        self.last_failure = Gauge(
            f"{PREFIX}_job_last_failure_timestamp_seconds",
            "End of the last failed run (seeded from the history at start).",
            j,
            registry=None,
        )
        # Runs on workers only (handoff.py): born with a job's first remote run.
        self.queue_wait = Histogram(
            f"{PREFIX}_job_queue_wait_seconds",
            "Enqueued by the scheduler to picked up by a worker.",
            j,
            buckets=conf.DELAY_BUCKETS,
            registry=None,
        )
        self.lost_runs = Counter(
            f"{PREFIX}_job_lost_runs",
            "Claimed runs no worker picked up within the dispatch timeout, or that could "
            "not be enqueued.",
            j,
            registry=None,
        )
        self._stamps: dict[str, int] = {}  # job label -> tick of its last change
        self._ticks = itertools.count(1)
        self.job_series = JobSeries(
            (
                self.runs,
                self.duration,
                self.start_delay,
                self.last_duration,
                self.last_delay,
                self.skipped,
                self.in_progress,
                self.last_success,
                self.last_failure,
                self.queue_wait,
                self.lost_runs,
            ),
            self._stamps,
        )
        r.register(self.job_series)
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
        self.remote_runs = Gauge(
            f"{PREFIX}_remote_runs",
            "Runs handed to worker engines and not final: queued, or running on a worker "
            "(read from the database by the leader; 0 on a standby).",
            ["state"],
            registry=r,
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
        # Jobs with a series of their own; every other job is _other. Only these are held:
        # one entry per stored job cost ~9 MiB at 100,000 jobs, for jobs all labelled alike.
        self._own: set[str] = set()
        # Runs under way: the label a run started under, so that it ends under the same one
        # even if its job got a series of its own meanwhile (a slot freed up).
        self._running: dict[str, tuple[str, int]] = {}
        self._error_types: dict[str, set[str]] = {}

    # -- label bookkeeping -------------------------------------------------------------------

    def label(self, job_id: str) -> str:
        """Bounded cardinality: a job gets its own series while fewer than MAX_JOB_SERIES
        jobs have one; the others share ``_other`` (a slot freed by a removed job goes to
        the next job that asks)."""
        with self._lock:
            if job_id in self._own:
                return job_id
            if len(self._own) < conf.MAX_JOB_SERIES:
                self._own.add(job_id)
                return job_id
            return OTHER_JOB

    def _error_label(self, label: str, error_type: str) -> str:
        with self._lock:
            seen = self._error_types.setdefault(label, set())
            if error_type in seen:
                return error_type
            if len(seen) >= conf.MAX_ERROR_TYPES:
                return OTHER_ERROR
            seen.add(error_type)
            return error_type

    def _touch(self, label: str) -> None:
        """Mark the job's series changed (after the change: a scrape re-renders it)."""
        self._stamps[label] = next(self._ticks)

    def known_jobs(self) -> set[str]:
        """The jobs with a series of their own."""
        with self._lock:
            return set(self._own)

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
        if conf.EXECUTORS:  # jobs may run on workers: a first lost run must show in increase()
            self.lost_runs.labels(label)
        self._touch(label)

    def remove_job(self, job_id: str) -> None:
        with self._lock:
            if job_id not in self._own:
                return
            self._own.discard(job_id)
            label = job_id
            error_types = self._error_types.pop(label, set())
            self._stamps.pop(label, None)  # a job added again gets new children anyway
        for metric in (
            self.last_duration,
            self.last_delay,
            self.in_progress,
            self.start_delay,
            self.last_success,
            self.last_failure,
            self.queue_wait,
            self.lost_runs,
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
        label = self.label(job.id)
        with self._lock:
            label, count = self._running.get(job.id, (label, 0))  # runs of a job share one
            self._running[job.id] = (label, count + 1)
        self.in_progress.labels(label).inc()
        self._touch(label)

    def run_finished(self, job: JobInfo) -> None:
        with self._lock:
            label, count = self._running.pop(job.id, (None, 0))
            if count > 1 and label is not None:
                self._running[job.id] = (label, count - 1)
        if label is None:
            label = self.label(job.id)
        self.in_progress.labels(label).dec()
        self._touch(label)

    def record(self, record: RunRecord) -> None:
        label = self.label(record.job.id)
        try:
            self._record(label, record)
        finally:
            self._touch(label)

    def _record(self, label: str, record: RunRecord) -> None:
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
        if record.queue_wait is not None:
            self.queue_wait.labels(label).observe(max(record.queue_wait, 0.0), exemplar=exemplar)

    def lost(self, job_id: str) -> None:
        """A run handed to a worker engine that never ran (inflight.py, handoff.py)."""
        label = self.label(job_id)
        self.lost_runs.labels(label).inc()
        self._touch(label)

    def skip(self, job_id: str, reason: str, count: int = 1) -> None:
        if count > 0:
            label = self.label(job_id)
            self.skipped.labels(label, reason).inc(count)
            self._touch(label)

    def seed_last_outcomes(self, rows: Iterable[tuple[str, str, float]]) -> None:
        """(job_id, "success"|"error", unix time) from the history: restarts keep alerts right."""
        for job_id, outcome, ts in rows:
            gauge = self.last_success if outcome == Outcome.SUCCESS.value else self.last_failure
            label = self.label(job_id)
            gauge.labels(label).set(ts)
            self._touch(label)

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
