"""The three subjects, built the way each one's documentation says to run it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler import events
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from benchmarks.harness import BARE, LEGACY, OURS

UTC = timezone.utc
# One job configuration for all three: this package's defaults (APScheduler's own
# misfire_grace_time of 1 s would turn a slow pass into "missed" rows for the others).
JOB_DEFAULTS = {"misfire_grace_time": 60, "coalesce": True, "max_instances": 1}
MAX_WORKERS = 10


# -- tracing: one global provider whose delegate the benchmarks switch ------------------------


class CountingExporter(SpanExporter):
    """Exports nowhere; counts what it was given (spans are real SDK spans up to here)."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _SwitchableTracer(trace.Tracer):
    """Asks the provider's current delegate on every span (observers keep their tracer)."""

    def __init__(self, provider: SwitchableTracerProvider, args: Any, kwargs: Any) -> None:
        self._provider = provider
        self._tracers = {
            id(p): p.get_tracer(*args, **kwargs) for p in (provider.sdk, provider.noop)
        }

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracers[id(self._provider.current)].start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracers[id(self._provider.current)].start_as_current_span(*args, **kwargs)


class SwitchableTracerProvider(trace.TracerProvider):
    """``trace.set_tracer_provider`` works once per process; this delegates to SDK or no-op."""

    def __init__(self) -> None:
        self.exporter = CountingExporter()
        self.sdk = TracerProvider()
        self.sdk.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.noop = trace.NoOpTracerProvider()
        self.current: trace.TracerProvider = self.sdk

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchableTracer(self, args, kwargs)

    def use_sdk(self, on: bool) -> None:
        self.current = self.sdk if on else self.noop


TRACING = SwitchableTracerProvider()


def install_tracing() -> None:
    trace.set_tracer_provider(TRACING)


# -- models of each subject -------------------------------------------------------------------


def execution_model(subject: str) -> Any:
    if subject == OURS:
        from django_apscheduler_obs.models import DjangoJobExecution
    else:
        from django_apscheduler.models import DjangoJobExecution
    return DjangoJobExecution


def job_model(subject: str) -> Any:
    if subject == OURS:
        from django_apscheduler_obs.models import DjangoJob
    else:
        from django_apscheduler.models import DjangoJob
    return DjangoJob


def clear_tables(subject: str) -> None:
    from benchmarks.harness import truncate

    if subject == BARE:
        return
    if subject == OURS:
        from django_apscheduler_obs.models import JobStoreVersion, SchedulerInstance

        truncate(execution_model(OURS), job_model(OURS), JobStoreVersion, SchedulerInstance)
    else:
        truncate(execution_model(LEGACY), job_model(LEGACY))


# -- a running scheduler of each subject ------------------------------------------------------


class Running:
    """A started scheduler with ``n`` interval jobs of ``benchmarks.jobs:probe``.

    Job ``i`` fires every ``interval`` s from ``phases[i]``: phases are spread evenly over one
    interval so the load is steady, not a burst of every job at once.
    """

    def __init__(
        self, subject: str, n: int, interval: float, lead: float = 3.0, *, burst: bool = False
    ) -> None:
        """``burst``: every job's first fire time is the same instant (a whole second)."""
        from benchmarks import jobs

        self.subject = subject
        self.n = n
        self.interval = interval
        self.events: list[Any] = []
        self.thread_error: BaseException | None = None
        self.runtime: Any = None
        t0 = time.time() + lead
        if burst:
            t0 = float(int(t0) + 1)
            self.phases = [t0] * n
        else:
            self.phases = [t0 + interval * i / n for i in range(n)]
        self.t_first = t0
        jobs.starts.clear()
        if subject == OURS:
            from django_apscheduler_obs.scheduler import build_scheduler

            self.runtime = build_scheduler(registry=CollectorRegistry(), max_workers=MAX_WORKERS)
            self.scheduler = self.runtime.scheduler
        else:
            store: Any
            if subject == LEGACY:
                from django_apscheduler.jobstores import DjangoJobStore

                store = DjangoJobStore()
            else:
                store = MemoryJobStore()
            self.scheduler = BackgroundScheduler(
                jobstores={"default": store},
                executors={"default": ThreadPoolExecutor(MAX_WORKERS)},
                job_defaults=JOB_DEFAULTS,
                timezone=UTC,
            )
        self.scheduler.add_listener(
            self.events.append,
            events.EVENT_JOB_EXECUTED | events.EVENT_JOB_ERROR | events.EVENT_JOB_MISSED,
        )
        for i, phase in enumerate(self.phases):
            start = datetime.fromtimestamp(phase, UTC)
            self.scheduler.add_job(
                "benchmarks.jobs:probe",
                IntervalTrigger(seconds=interval, start_date=start, timezone=UTC),
                args=[i],
                id=f"bench-{i}",
                jobstore="default",
                replace_existing=True,
            )

    def start(self) -> None:
        previous = threading.excepthook

        def hook(args: Any) -> None:  # APScheduler's thread dies by an uncaught exception
            if args.thread is getattr(self.scheduler, "_thread", None):
                self.thread_error = args.exc_value
            previous(args)

        self._previous_hook = previous
        threading.excepthook = hook
        if self.runtime is not None:
            self.runtime.start()
            deadline = time.monotonic() + 20
            while not self.runtime.lease.is_leader() and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            self.scheduler.start()

    def alive(self) -> bool:
        thread = self.scheduler._thread
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        try:
            if self.runtime is not None:
                self.runtime.stop(timeout=10)
            else:
                self.scheduler.shutdown(wait=True)
        finally:
            threading.excepthook = self._previous_hook

    def expected(self, cutoff: float) -> set[tuple[str, float]]:
        out = set()
        for i, phase in enumerate(self.phases):
            k = 0
            while phase + k * self.interval <= cutoff:
                out.add((f"bench-{i}", round(phase + k * self.interval, 3)))
                k += 1
        return out

    def recorded(self, cutoff: float) -> list[tuple[str, float, str]]:
        """(job id, fire time, status) of every recorded fire time up to ``cutoff``."""
        if self.subject == BARE:
            names = {
                events.EVENT_JOB_EXECUTED: "Executed",
                events.EVENT_JOB_ERROR: "Error!",
                events.EVENT_JOB_MISSED: "Missed!",
            }
            return [
                (e.job_id, round(e.scheduled_run_time.timestamp(), 3), names[e.code])
                for e in self.events
                if e.scheduled_run_time.timestamp() <= cutoff + 1e-3
            ]
        model = execution_model(self.subject)
        rows = model.objects.filter(
            job__id__startswith="bench-",
            run_time__lte=datetime.fromtimestamp(cutoff + 1e-3, UTC),
        ).values_list("job_id", "run_time", "status")
        return [(j, round(rt.timestamp(), 3), st) for j, rt, st in rows]

    def start_delays(self, t_from: float, t_to: float) -> list[float]:
        """Start minus scheduled fire time of each probe run started in [t_from, t_to]."""
        from benchmarks import jobs

        out = []
        for i, t in list(jobs.starts):
            if not (t_from <= t <= t_to):
                continue
            phase = self.phases[i]
            k = int((t - phase) // self.interval)
            out.append(t - (phase + k * self.interval))
        return out


def wait_until(when: float) -> None:
    while True:
        left = when - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


def run_window(
    running: Running, seconds: float, on_tick: Callable[[], None] | None = None
) -> tuple[float, float, float | None]:
    """Let it run ``seconds`` from the first fire time; returns (start, end, died_at)."""
    wait_until(running.t_first)
    start = time.time()
    end = start + seconds
    died_at = None
    while time.time() < end:
        time.sleep(0.1)
        if on_tick:
            on_tick()
        if not running.alive():
            died_at = time.time() - start
            break
    return start, min(time.time(), end), died_at


def make_job(scheduler: BackgroundScheduler, func: str, job_id: str, **kw: Any) -> Any:
    """A ``Job`` object without a job store (for driving executors and stores directly)."""
    from apscheduler.job import Job

    job = Job(
        scheduler,
        id=job_id,
        func=func,
        trigger=IntervalTrigger(seconds=60, timezone=UTC),
        executor="default",
        args=kw.get("args", ()),
        kwargs={},
        name=job_id,
        misfire_grace_time=60,
        coalesce=True,
        max_instances=1,
        next_run_time=kw.get("next_run_time"),
    )
    job._jobstore_alias = "default"
    return job


def now_utc() -> datetime:
    return datetime.now(UTC)


def later(seconds: float) -> datetime:
    return now_utc() + timedelta(seconds=seconds)
