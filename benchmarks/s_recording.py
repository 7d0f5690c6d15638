"""Scenarios 3 and 4: the per-run path of each subject, driven directly (no scheduler loop).

Per run, each subject does what its executor thread does for one fire time:

* obs: ``observed_run_job`` (fenced claim INSERT, span, the function, final UPDATE, metrics);
* 0.7: its SUBMITTED listener, APScheduler's ``run_job``, its EXECUTED listener;
* bare: APScheduler's ``run_job``.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

from apscheduler.events import (
    EVENT_JOB_EXECUTED,
    EVENT_JOB_SUBMITTED,
    JobExecutionEvent,
    JobSubmissionEvent,
)
from apscheduler.executors.base import run_job
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import connections
from prometheus_client import CollectorRegistry

from benchmarks.harness import (
    BARE,
    LEGACY,
    OURS,
    STATEMENTS,
    Ratio,
    Row,
    Target,
    Timing,
    data_statements,
    subject_database,
)
from benchmarks.subjects import TRACING, UTC, clear_tables, job_model, make_job, now_utc

LOGGER = "apscheduler.executors.default"


class RunTimes:
    """Unique, recent fire times per job (the claim and 0.7's row are unique per fire time)."""

    def __init__(self) -> None:
        self.last = now_utc()

    def next(self) -> datetime:
        now = now_utc()
        self.last = now if now > self.last else self.last + timedelta(microseconds=1)
        return self.last


def _null_history() -> Any:
    from django_apscheduler_obs.sinks.history import Claim, HistorySink

    class NullHistory(HistorySink):
        """No database: the claim always succeeds, the final write is dropped."""

        def claim(self, *args: Any, **kwargs: Any) -> Claim:
            return Claim.CLAIMED

        def record(self, record: Any) -> None:
            pass

    return NullHistory()


class Paths:
    """The per-run function of each subject (and of obs variants without some sinks)."""

    def __init__(self) -> None:
        from django_apscheduler.jobstores import DjangoResultStoreMixin

        from django_apscheduler_obs.executors import RunObserver
        from django_apscheduler_obs.scheduler import build_scheduler

        self.scheduler = BackgroundScheduler(timezone=UTC)
        # A long lease: a renewal inside a timed loop would be measured with the runs.
        self.runtime = build_scheduler(
            registry=CollectorRegistry(), process_metrics=False, lease_ttl=3600, renew_interval=600
        )
        lease = self.runtime.lease
        fenced = self.runtime.observer.is_fenced_store
        self.observers = {
            "full": self.runtime.observer,
            "no_db": RunObserver(
                history=_null_history(),
                metrics=self.runtime.metrics,
                lease=lease,
                is_fenced_store=fenced,
            ),
            "no_db_no_metrics": RunObserver(
                history=_null_history(), metrics=None, lease=lease, is_fenced_store=fenced
            ),
        }
        DjangoResultStoreMixin.lock = self.scheduler._create_lock()
        self.legacy = DjangoResultStoreMixin

    def ensure_jobs(self, subject: str, ids: list[str]) -> None:
        """0.7's execution rows have a foreign key to its job table: the jobs must exist."""
        if subject == BARE:
            return
        model = job_model(subject)
        for job_id in ids:
            model.objects.get_or_create(id=job_id, defaults={"job_state": b"x"})

    def renew(self) -> None:
        lease = self.runtime.lease
        if not lease.renew():
            assert lease.acquire(), "could not take the benchmark lease"

    def runner(self, subject: str, variant: str = "full") -> Any:
        from django_apscheduler_obs.executors import observed_run_job

        if subject == BARE:
            return lambda job, rt: run_job(job, "default", [rt], LOGGER)
        if subject == LEGACY:
            legacy = self.legacy

            def legacy_run(job: Any, rt: datetime) -> Any:
                legacy.handle_submission_event(
                    JobSubmissionEvent(EVENT_JOB_SUBMITTED, job.id, "default", [rt])
                )
                events = run_job(job, "default", [rt], LOGGER)
                legacy.handle_execution_event(
                    JobExecutionEvent(EVENT_JOB_EXECUTED, job.id, "default", rt, retval=None)
                )
                return events

            return legacy_run
        observer = self.observers[variant]
        return lambda job, rt: observed_run_job(observer, job, "default", [rt], LOGGER)


def _executed_rows(subject: str, prefix: str) -> int:
    from benchmarks.subjects import execution_model

    model = execution_model(subject)
    return model.objects.filter(job__id__startswith=prefix, status="Executed").count()


def _drive(
    paths: Paths, run: Any, ids: list[str], seconds: float
) -> tuple[list[int], list[int], float, list[Any]]:
    """One thread per job id runs ``run`` in a loop for ``seconds``; counts successes."""
    n = len(ids)
    done = [0] * n
    errors = [0] * n
    stop = threading.Event()
    barrier = threading.Barrier(n + 1)

    def work(k: int) -> None:
        job = make_job(paths.scheduler, "benchmarks.jobs:noop", ids[k])
        times = RunTimes()
        barrier.wait()
        try:
            while not stop.is_set():
                try:
                    events = run(job, times.next())
                    if events and events[0].code == EVENT_JOB_EXECUTED:
                        done[k] += 1
                except Exception:
                    errors[k] += 1
        finally:
            connections.close_all()

    workers = [threading.Thread(target=work, args=(k,), name=f"bench-worker-{k}") for k in range(n)]
    for w in workers:
        w.start()
    STATEMENTS.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    return done, errors, elapsed, data_statements(STATEMENTS.stop())


def scenario3(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    """Recording throughput: ``threads`` worker threads run no-op jobs for ``seconds``."""
    rows, ratios, targets = [], [], []
    threads_n, seconds = cfg.record_threads, cfg.record_seconds
    paths = Paths()
    results: dict[str, dict[str, Any]] = {}
    for subject in (BARE, LEGACY, OURS):
        with subject_database(subject) as journal:
            clear_tables(subject)
            TRACING.use_sdk(True)
            ids = [f"rec-{i}" for i in range(threads_n)]
            paths.ensure_jobs(subject, ids)
            if subject == OURS:
                paths.renew()
            run = paths.runner(subject)
            spans0 = TRACING.exporter.count
            done, errors, elapsed, statements = _drive(paths, run, ids, seconds)
            runs = sum(done)
            recorded = runs if subject == BARE else _executed_rows(subject, "rec-")
            m: dict[str, Any] = {
                "journal": journal,
                "threads": threads_n,
                "runs": runs,
                "recorded_rows": None if subject == BARE else recorded,
                "errors": sum(errors),
                "recorded_runs_per_s": round(recorded / elapsed, 1),
                "data_stmts_per_run": round(len(statements) / runs, 2) if runs else None,
            }
            if subject == OURS:
                m["spans"] = TRACING.exporter.count - spans0
                reg = paths.runtime.registry
                m["metric_runs"] = int(
                    sum(
                        reg.get_sample_value(
                            "apscheduler_job_runs_total",
                            {"job_id": i, "outcome": "success", "error_type": ""},
                        )
                        or 0
                        for i in ids
                    )
                )
            results[subject] = m
            rows.append(Row("3", f"{threads_n} threads, {seconds:g} s", subject, m))
    ours, legacy = results[OURS], results[LEGACY]
    case = rows[0].case
    ratios.append(
        Ratio(
            "3",
            case,
            "recorded_runs_per_s",
            ours["recorded_runs_per_s"],
            legacy["recorded_runs_per_s"],
            LEGACY,
            "higher",
        )
    )
    ratios.append(
        Ratio(
            "3",
            case,
            "recorded_runs_per_s",
            ours["recorded_runs_per_s"],
            results[BARE]["recorded_runs_per_s"],
            BARE,
            "higher",
        )
    )
    x = (
        ours["recorded_runs_per_s"] / legacy["recorded_runs_per_s"]
        if legacy["recorded_runs_per_s"]
        else None
    )
    targets.append(
        Target(
            "3",
            ">= 5x django-apscheduler 0.7's recorded runs per second (row + metrics + span)",
            None if x is None else x >= 5,
            f"obs {ours['recorded_runs_per_s']}/s (spans {ours.get('spans')}, metric runs "
            f"{ours.get('metric_runs')}), 0.7 {legacy['recorded_runs_per_s']}/s: "
            + ("n/a" if x is None else f"{x:.2f}x"),
        )
    )
    paths.runtime.lease.release()
    return rows, ratios, targets


def _per_run(run: Any, job: Any, n: int, repeats: int, before: Any = None) -> Timing:
    times = RunTimes()
    t = Timing()
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        for _ in range(n):
            run(job, times.next())
        t.values.append((time.perf_counter() - t0) / n)
    return t


def scenario4(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    """Per-run cost over bare APScheduler, one thread, split into database, metrics, span."""
    rows, ratios, targets = [], [], []
    n, repeats = cfg.overhead_runs, cfg.repeats
    paths = Paths()
    ms = 1000.0
    results: dict[str, Timing] = {}
    stmts: dict[str, float] = {}
    variants = [
        (BARE, "full", True, BARE),
        (LEGACY, "full", True, LEGACY),
        (OURS, "full", True, OURS),
        (OURS, "no_db", True, "obs: no database"),
        (OURS, "no_db_no_metrics", True, "obs: no database, no metrics"),
        (OURS, "no_db_no_metrics", False, "obs: no database, no metrics, no-op tracer"),
    ]
    for subject, variant, sdk, label in variants:
        with subject_database(subject) as journal:
            clear_tables(subject)
            TRACING.use_sdk(sdk)
            job_id = f"ovh-{variant}"
            paths.ensure_jobs(subject, [job_id])
            job = make_job(paths.scheduler, "benchmarks.jobs:noop", job_id)
            run = paths.runner(subject, variant)
            before = paths.renew if subject == OURS else None
            _per_run(run, job, max(10, n // 10), 1, before)  # warm-up
            STATEMENTS.start()
            t = _per_run(run, job, n, repeats, before)
            s = data_statements(STATEMENTS.stop())
            results[label] = t
            stmts[label] = round(len([x for x in s if x.area == "history"]) / (n * repeats), 2)
            TRACING.use_sdk(True)
            rows.append(
                Row(
                    "4",
                    "per run, 1 thread",
                    subject,
                    {
                        "variant": label,
                        "journal": journal,
                        "ms_per_run": t.as_dict(ms, 4),
                        "history_stmts_per_run": stmts[label],
                    },
                )
            )
    paths.runtime.lease.release()
    bare = results[BARE].median
    full = results[OURS].median
    no_db = results["obs: no database"].median
    no_metrics = results["obs: no database, no metrics"].median
    no_span = results["obs: no database, no metrics, no-op tracer"].median
    split = {
        "database_ms": round((full - no_db) * ms, 4),
        "metrics_ms": round((no_db - no_metrics) * ms, 4),
        "span_ms": round((no_metrics - no_span) * ms, 4),
        "executor_machinery_ms": round((no_span - bare) * ms, 4),
        "total_without_db_ms": round((no_db - bare) * ms, 4),
        "total_ms": round((full - bare) * ms, 4),
        "dja_0.7_total_ms": round((results[LEGACY].median - bare) * ms, 4),
    }
    rows.append(Row("4", "overhead over bare (medians)", OURS, split))
    rows.append(
        Row(
            "4",
            "overhead over bare (medians)",
            LEGACY,
            {"total_ms": split["dja_0.7_total_ms"], "note": "all of it is database work"},
        )
    )
    rows.append(Row("4", "overhead over bare (medians)", BARE, {"total_ms": 0.0}))
    ratios.append(
        Ratio(
            "4",
            "overhead over bare",
            "total_ms",
            split["total_ms"],
            split["dja_0.7_total_ms"],
            LEGACY,
            "lower",
        )
    )
    targets.append(
        Target(
            "4",
            "< 1 ms observation overhead per run over bare APScheduler, excluding DB round trips",
            split["total_without_db_ms"] < 1.0,
            f"obs without database {split['total_without_db_ms']} ms (metrics "
            f"{split['metrics_ms']}, span {split['span_ms']}, executor machinery "
            f"{split['executor_machinery_ms']}); database {split['database_ms']} ms; "
            f"0.7 total {split['dja_0.7_total_ms']} ms",
        )
    )
    return rows, ratios, targets
