"""``python -m benchmarks.workers [--db sqlite|postgres|mariadb] [--smoke] [--json out.json]``

Runs handed to Celery, side by side in one process, on one Redis broker and one in-process
Celery worker (threads pool):

- ``obs-local``: this package's scheduler, jobs in its own pool (the reference);
- ``obs-celery``: this package's scheduler with ``executor="celery"``: claim, enqueue, worker
  pick-up, record;
- ``celery-beat``: django-celery-beat's ``DatabaseScheduler`` in an embedded beat, the same
  worker.

Two cases: **sustained** (``jobs`` jobs every second for ``seconds``) gives runs per second and
database statements per run (every statement of every thread of the process: scheduler,
enqueue threads, worker threads, the leader's in-flight watch); **burst** (``burst`` jobs due in
the same second) gives the time until the last one was published to the broker and the start
delay p50/p99 (worker start - fire time). celery-beat records nothing per run (no row, no
metric), which is what its figures show.

django-celery-beat 2.9 declares ``Django<6.1``; on Django 6.1 install it without its pins:
``pip install --no-deps django-celery-beat django-timezone-field python-crontab
cron-descriptor``. Without it, its rows say so and the other subjects still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

LOCAL, CELERY, BEAT = "obs-local", "obs-celery", "celery-beat"
SUBJECTS = (LOCAL, CELERY, BEAT)
FINAL = ("Executed", "Error!", "Missed!", "Lost", "Abandoned")


def _beat_installed() -> bool:
    try:
        import django_celery_beat  # noqa: F401
    except ImportError:
        return False
    return True


def _wait(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Published:
    """Wall-clock time of every message this process published to the broker."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, sender: Any = None, **kwargs: Any) -> None:
        with self._lock:
            self.times.append(time.time())

    def reset(self) -> None:
        with self._lock:
            self.times = []


PUBLISHED = Published()


def _flush_broker() -> None:
    import redis

    from benchmarks.celery_app import BROKER

    redis.Redis.from_url(BROKER).flushdb()


def _clear() -> None:
    from benchmarks import jobs
    from benchmarks.celery_app import beat_starts
    from benchmarks.harness import truncate
    from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution

    truncate(DjangoJobExecution, DjangoJob)
    if _beat_installed():
        from django_celery_beat.models import IntervalSchedule, PeriodicTask

        PeriodicTask.objects.all().delete()
        IntervalSchedule.objects.all().delete()
    jobs.starts.clear()
    beat_starts.clear()
    PUBLISHED.reset()
    _flush_broker()


def _obs_window(subject: str, n: int, seconds: float, every: float, first: float) -> dict:
    """This package's runtime with ``n`` probe jobs; returns the runs and statements."""
    from django.conf import settings
    from prometheus_client import CollectorRegistry

    from benchmarks import jobs
    from benchmarks.harness import STATEMENTS, data_statements, percentile
    from django_apscheduler_obs.models import DjangoJobExecution
    from django_apscheduler_obs.scheduler import build_scheduler

    settings.APSCHEDULER_EXECUTORS = (
        {"celery": {"ENGINE": "celery", "APP": "benchmarks.celery_app:app"}}
        if subject == CELERY
        else {}
    )
    settings.APSCHEDULER_INFLIGHT_POLL_INTERVAL = 0.5
    settings.APSCHEDULER_EXECUTION_RETENTION = None
    rt = build_scheduler(registry=CollectorRegistry(), process_metrics=False)
    rt.start()
    _wait(rt.lease.is_leader, 30)
    start = datetime.fromtimestamp(first, timezone.utc)
    for i in range(n):
        rt.scheduler.add_job(
            "benchmarks.jobs:probe",
            "interval",
            seconds=every,
            args=[i],
            id=f"w{i}",
            next_run_time=start,
            executor="celery" if subject == CELERY else "default",
            misfire_grace_time=60,
            coalesce=True,
            # A remote run gives its slot back when the leader sees it final (one in-flight
            # poll): with 1 it would skip fire times that beat, which has no limit, runs.
            max_instances=5,
        )
    end = first + seconds
    expected = n * max(1, int(seconds / every))
    time.sleep(max(0.0, first - time.time() - 0.2))
    STATEMENTS.start()
    rows_done = _wait(
        lambda: (
            DjangoJobExecution.objects.filter(
                run_time__lt=datetime.fromtimestamp(end, timezone.utc), status="Executed"
            ).count()
            >= expected
        ),
        seconds + 60,
    )
    took = time.time() - first
    statements = _measured(data_statements(STATEMENTS.stop()))
    rt.scheduler.pause()
    rows = list(
        DjangoJobExecution.objects.filter(
            run_time__lt=datetime.fromtimestamp(end, timezone.utc)
        ).values_list("job_id", "run_time", "status", "start_delay", "queue_wait")
    )
    rt.stop(timeout=5)
    keys = Counter((j, rt_) for j, rt_, *_ in rows)
    done = [r for r in rows if r[2] == "Executed"]
    delays = [r[3] for r in done if r[3] is not None]
    waits = [r[4] for r in done if r[4] is not None]
    by_thread = Counter(s.thread for s in statements)
    return {
        "runs": len(done),
        "expected": expected,
        "complete": rows_done,
        "duplicates": sum(c - 1 for c in keys.values() if c > 1),
        "runs_per_s": round(len(done) / took, 1) if took > 0 else None,
        "statements_per_run": round(len(statements) / len(done), 2) if done else None,
        "statements_by_thread": dict(by_thread),
        "delay_p50_ms": round(percentile(delays, 50) * 1000, 1) if delays else None,
        "delay_p99_ms": round(percentile(delays, 99) * 1000, 1) if delays else None,
        "queue_wait_p99_ms": round(percentile(waits, 99) * 1000, 1) if waits else None,
        "last_publish_s": round(max(PUBLISHED.times) - first, 3) if PUBLISHED.times else None,
        "probe_runs": len(jobs.starts),
    }


def _beat_window(n: int, seconds: float, every: float, first: float) -> dict:
    """django-celery-beat: ``n`` periodic tasks due at ``first``, then every ``every`` s."""
    from celery.beat import EmbeddedService
    from django_celery_beat.models import IntervalSchedule, PeriodicTask
    from django_celery_beat.schedulers import DatabaseScheduler

    from benchmarks.celery_app import app, beat_starts
    from benchmarks.harness import STATEMENTS, data_statements, percentile

    interval = IntervalSchedule.objects.create(every=int(every), period=IntervalSchedule.SECONDS)
    last = datetime.fromtimestamp(first, timezone.utc) - timedelta(seconds=every)
    PeriodicTask.objects.bulk_create(
        PeriodicTask(
            name=f"b{i}",
            task="benchmarks.beat_probe",
            interval=interval,
            args=json.dumps([f"b{i}"]),
            last_run_at=last,
        )
        for i in range(n)
    )
    from django_celery_beat.models import PeriodicTasks

    PeriodicTasks.update_changed()
    beat = EmbeddedService(app, thread=True, scheduler_cls=DatabaseScheduler)
    beat.start()
    end = first + seconds
    expected = n * max(1, int(seconds / every))
    time.sleep(max(0.0, first - time.time() - 0.2))
    STATEMENTS.start()
    complete = _wait(
        lambda: sum(1 for _, t in beat_starts if t < end + 5) >= expected, seconds + 60
    )
    took = time.time() - first
    statements = _measured(data_statements(STATEMENTS.stop()))
    beat.stop()
    runs = [t for _, t in beat_starts]
    # Beat has no fire-time record: the delay is the start after the due second of each run.
    delays = sorted(t - (first + every * int((t - first) // every)) for t in runs if t >= first)
    tags = Counter(tag for tag, _ in beat_starts)
    return {
        "runs": len(runs),
        "expected": expected,
        "complete": complete,
        "duplicates": None,  # beat keeps no per-fire-time record to tell
        "runs_per_s": round(len(runs) / took, 1) if took > 0 else None,
        "statements_per_run": round(len(statements) / len(runs), 2) if runs else None,
        "statements_by_thread": dict(Counter(s.thread for s in statements)),
        "delay_p50_ms": round(percentile(delays, 50) * 1000, 1) if delays else None,
        "delay_p99_ms": round(percentile(delays, 99) * 1000, 1) if delays else None,
        "queue_wait_p99_ms": None,
        "last_publish_s": round(max(PUBLISHED.times) - first, 3) if PUBLISHED.times else None,
        "probe_runs": sum(tags.values()),
    }


def _measured(statements: list[Any]) -> list[Any]:
    """Leave out the benchmark's own polling (the main thread)."""
    return [s for s in statements if s.thread != "main"]


def _case(subject: str, n: int, seconds: float, every: float, lead: float) -> dict:
    from benchmarks.harness import subject_database

    if subject == BEAT and not _beat_installed():
        return {"error": "django-celery-beat is not installed (see the module docstring)"}
    with subject_database("obs"):
        _clear()
        first = float(int(time.time() + lead))
        if subject == BEAT:
            return _beat_window(n, seconds, every, first)
        return _obs_window(subject, n, seconds, every, first)


def run(smoke: bool) -> tuple[list[Any], list[Any], list[Any]]:
    from celery.contrib.testing.worker import start_worker
    from celery.signals import after_task_publish

    from benchmarks.celery_app import app
    from benchmarks.harness import Ratio, Row, Target

    sustained_jobs, seconds = (10, 3.0) if smoke else (50, 20.0)
    burst = 100 if smoke else 1000
    after_task_publish.connect(PUBLISHED, weak=False)
    rows: list[Row] = []
    ratios: list[Ratio] = []
    targets: list[Target] = []
    results: dict[tuple[str, str], dict] = {}
    with start_worker(
        app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING"
    ):
        for case, n, secs, every, lead in (
            (f"sustained: {sustained_jobs} jobs every second", sustained_jobs, seconds, 1, 3),
            (f"burst: {burst} jobs due in the same second", burst, 1, 3600, 8 if smoke else 25),
        ):
            for subject in SUBJECTS:
                print(f"   {case}: {subject}", flush=True)
                r = _case(subject, n, secs, every, lead)
                results[(case, subject)] = r
                rows.append(Row("10", case, subject, r))
            ours = results[(case, CELERY)]
            for other in (LOCAL, BEAT):
                theirs = results[(case, other)]
                if "error" in ours or "error" in theirs:
                    continue
                metrics = [("statements_per_run", "lower"), ("delay_p99_ms", "lower")]
                if case.startswith("burst"):
                    metrics.append(("last_publish_s", "lower"))
                for metric, better in metrics:
                    if ours.get(metric) is not None and theirs.get(metric) is not None:
                        ratios.append(
                            Ratio("10", case, metric, ours[metric], theirs[metric], other, better)
                        )
        burst_case = f"burst: {burst} jobs due in the same second"
        ours = results[(burst_case, CELERY)]
        if "error" not in ours:
            targets.append(
                Target(
                    "10",
                    f"burst of {burst} on Celery: every fire time run once",
                    ours["runs"] == ours["expected"] and ours["duplicates"] == 0,
                    f"{ours['runs']}/{ours['expected']} run, {ours['duplicates']} duplicates, "
                    f"last published {ours['last_publish_s']} s after the fire time, "
                    f"start delay p99 {ours['delay_p99_ms']} ms",
                )
            )
    return rows, ratios, targets


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import create_database, summary, tables

    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    parser.add_argument("--db", choices=["sqlite", "postgres", "mariadb"], default="sqlite")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--db-name", default="dao_bench_workers")
    parser.add_argument("--db-port", type=int)
    args = parser.parse_args(argv)
    os.environ["BENCH_DB"] = args.db
    os.environ["BENCH_DB_NAME"] = args.db_name
    port = args.db_port or {"postgres": 5432, "mariadb": 3306}.get(args.db, 0)
    os.environ["BENCH_DB_PORT"] = str(port)
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    os.environ["BENCH_WORKERS"] = "1"
    create_database(args.db, args.db_name, port)

    import django

    django.setup()
    from django.core.management import call_command

    from benchmarks import harness
    from benchmarks.subjects import install_tracing

    install_tracing()
    harness.install_statement_counter()
    call_command("migrate", run_syncdb=True, verbosity=0)
    print(f"worker benchmarks on {harness.db_server_version()}", flush=True)
    rows, ratios, targets = run(args.smoke)
    print("\n".join(tables(rows, markdown=False)))
    print("\n".join(summary(ratios, targets, markdown=False)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "meta": {"db": args.db, "smoke": args.smoke, **harness.machine_info()},
                    "rows": [asdict(r) for r in rows],
                    "ratios": [{**asdict(r), "value": r.value} for r in ratios],
                    "targets": [asdict(t) for t in targets],
                },
                f,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
