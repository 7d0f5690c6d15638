"""Celery workers beside the chaos ``Cluster``: processes, Redis, and the audit of remote runs.

This module is also the Celery application the chaos processes use
(``APP: "tests.chaos.workers:redis_app"`` for the schedulers, ``celery -A
tests.chaos.workers:redis_app worker`` for the workers): the same ``redis_app`` as
``tests/celery_app.py``, plus two signal receivers that log every publish (in the schedulers)
and every delivery (in the workers) with the run's execution id and Celery's task id. The
audit reads them back from the process logs: one publish per fire time, whatever the failovers,
and a dropped delivery is a redelivery of that one message, not a second enqueue.

So this module imports nothing heavy at import time: no pytest, no Django models.

* ``Worker``: a ``celery worker`` process on the test database (``tests.cmd_settings``), its
  log in a file; ``kill()`` is kill -9 of its process group, ``stop()`` a warm shutdown.
* ``Redis``: shutdown and restart of the machine's redis-server (the broker restart fault),
  and ``ensure_up()`` for a teardown after a test that died while it was down.
* ``audit()``: every expected fire time of every job has exactly one execution row, in a final
  status that says what happened (Executed, or Lost, Abandoned, Missed: never a silent gap);
  the Ledger (no unique constraint) has no fire time twice; a Lost run never ran; no run was
  published twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from celery import signals

from tests.celery_app import REDIS_URL, redis_app

__all__ = ["redis_app"]

ROOT = Path(__file__).resolve().parents[2]
UTC = timezone.utc
APP = "tests.chaos.workers:redis_app"
TASK_NAME = "django_apscheduler_obs.run"

logger = logging.getLogger(__name__)

PUBLISHED = re.compile(r"chaos publish: run (\d+) task (\S+)")
DELIVERED = re.compile(r"chaos delivery: run (\d+) task (\S+) redelivered=(\S+)")
DROPPED = re.compile(r"Run (\d+) of '([^']*)' at .* was already picked up or marked lost")
ENQUEUE_FAILED = "Not run: enqueueing it on"
# handoff.py's log line for an enqueue that raised (the run is then marked Lost, unless the
# dispatch timeout marked it first: with the broker down, kombu takes ~6 s to give up).
COULD_NOT_ENQUEUE = re.compile(
    r"Could not enqueue '([^']*)' at (\S+ \S+) on '[^']*': run marked lost"
)
DISPATCH_TIMED_OUT = "Not run: no worker picked it up within the dispatch timeout"
CONNECTED = "Connected to redis://"
# Celery 5.7 / kombu 5.7: how a worker holding unacknowledged messages dies when the Redis
# connection drops (the consumer collects the connection, then closing its channel tries to
# restore those messages through a client it can no longer build).
CELERY_RESTART_CRASH = (
    "Unrecoverable error: AttributeError(\"'NoneType' object has no attribute 'hostname'\")"
)


# -- what the chaos processes log ------------------------------------------------------------


def _execution_id(message: Any) -> Any:
    return message.get("execution_id") if isinstance(message, dict) else None


@signals.after_task_publish.connect
def _log_publish(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
    """In a scheduler: the broker accepted the message of this run."""
    if sender != TASK_NAME or not isinstance(body, tuple) or not isinstance(headers, dict):
        return
    kwargs = body[1] if len(body) > 1 and isinstance(body[1], dict) else {}
    run = _execution_id(kwargs.get("message"))
    logger.warning("chaos publish: run %s task %s", run, headers.get("id"))


@signals.task_prerun.connect
def _log_delivery(sender: Any = None, task_id: Any = None, kwargs: Any = None, **_: Any) -> None:
    """In a worker: a delivery of this run's message (before the pick-up decides)."""
    if getattr(sender, "name", None) != TASK_NAME:
        return
    run = _execution_id((kwargs or {}).get("message"))
    info = getattr(getattr(sender, "request", None), "delivery_info", None) or {}
    logger.warning(
        "chaos delivery: run %s task %s redelivered=%s", run, task_id, info.get("redelivered")
    )


# -- waiting -----------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    """``predicate()`` until truthy, or fail after ``timeout`` seconds (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- settings shared by the schedulers and the workers ----------------------------------------


def database_json() -> str:
    """The test database, as the test process uses it, for ``tests.cmd_settings``."""
    from django.db import connection

    db = dict(connection.settings_dict)
    if db["ENGINE"].endswith("sqlite3"):
        # As tests/chaos/settings.py: wait on the lock, and take it up front in transactions.
        db["OPTIONS"] = {**db.get("OPTIONS", {}), "timeout": 30, "transaction_mode": "IMMEDIATE"}
    return json.dumps(db, default=str)


def process_env(settings: dict[str, Any], log_level: str = "INFO") -> dict[str, str]:
    """Environment of a process on ``tests.cmd_settings`` with ``settings`` on top."""
    return {
        "DJANGO_SETTINGS_MODULE": "tests.cmd_settings",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DAO_TEST_DATABASE": database_json(),
        "DAO_TEST_SETTINGS": json.dumps(settings),
        "DAO_TEST_LOG_LEVEL": log_level,
    }


# -- workers -------------------------------------------------------------------------------------


class Worker:
    """``celery worker`` (prefork, 2 children) named ``name@host`` on ``queue``."""

    def __init__(
        self,
        name: str,
        queue: str,
        log: Path,
        settings: dict[str, Any],
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        argv = [
            sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", queue,
            "-n", f"{name}@%h", "-c", "2", "--without-heartbeat", "--without-gossip",
            "--without-mingle", "--loglevel", "INFO",
        ]  # fmt: skip
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DAO_"))},
            **process_env(settings),
            **(env or {}),
        }
        full_env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"worker {self.name} exited ({self.proc.returncode}):\n{self.tail()}"
                )
            return "ready." in self.text()

        wait_until(ready, timeout=timeout, what=f"worker {self.name} ready")

    def kill(self) -> None:
        """kill -9 of the worker and its pool children."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM to the main process: running tasks finish,
        prefetched messages go back to the broker)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15) -> None:
        """Warm shutdown; kill -9 of the group if it takes longer than ``timeout``."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stray pool children, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._out.close()


def dropped(logs: Iterable[str]) -> Counter[int]:
    """Deliveries each run's pick-up refused, from worker logs: execution id -> count."""
    out: Counter[int] = Counter()
    for text in logs:
        for match in DROPPED.finditer(text):
            out[int(match.group(1))] += 1
    return out


def published(logs: Iterable[str]) -> dict[int, list[str]]:
    """Execution id -> Celery task ids the schedulers published for it."""
    out: dict[int, list[str]] = {}
    for text in logs:
        for match in PUBLISHED.finditer(text):
            if match.group(1) != "None":
                out.setdefault(int(match.group(1)), []).append(match.group(2))
    return out


def delivered(logs: Iterable[str]) -> dict[int, list[str]]:
    """Execution id -> Celery task ids of each delivery to a worker (redeliveries repeat)."""
    out: dict[int, list[str]] = {}
    for text in logs:
        for match in DELIVERED.finditer(text):
            if match.group(1) != "None":
                out.setdefault(int(match.group(1)), []).append(match.group(2))
    return out


def enqueue_failures(logs: Iterable[str]) -> list[tuple[str, datetime]]:
    """(job id, run time) of every enqueue that failed, from the schedulers' logs."""
    out = []
    for text in logs:
        for match in COULD_NOT_ENQUEUE.finditer(text):
            out.append((match.group(1), datetime.fromisoformat(match.group(2)).astimezone(UTC)))
    return out


def publish_again(queue: str, message: dict[str, Any]) -> None:
    """A duplicate publish of a run's message, through the same app and task name."""
    redis_app.send_task(TASK_NAME, kwargs={"message": message}, queue=queue)


# -- the broker --------------------------------------------------------------------------------


class Redis:
    """The machine's redis-server on 127.0.0.1:6379 (no persistence, as it runs here)."""

    port = 6379

    def __init__(self) -> None:
        self.dir = "/var/lib/redis"

    def _cli(self, *args: str, db: str = "0") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "-n", db, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    def up(self) -> bool:
        try:
            return self._cli("ping").stdout.strip() == "PONG"
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE``: every queued and unacknowledged message is gone."""
        result = self._cli("config", "get", "dir").stdout.split()
        if len(result) == 2 and os.path.isdir(result[1]):
            self.dir = result[1]
        self._cli("shutdown", "nosave")
        wait_until(lambda: not self.up(), timeout=15, what="redis-server down")

    def start(self) -> None:
        argv = [
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1",
            "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", self.dir if os.path.isdir(self.dir) else "/tmp",
        ]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
        wait_until(self.up, timeout=30, what="redis-server answering PONG", interval=0.05)

    def ensure_up(self) -> None:
        if not self.up():
            self.start()

    def forget_queue(self, queue: str) -> None:
        """Delete a test's queue and its bindings (whatever was still queued in it)."""
        keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        self._cli("del", *keys, db=REDIS_URL.rsplit("/", 1)[-1])


# -- the audit ---------------------------------------------------------------------------------

# DjangoJobExecution.SUCCESS, LOST, ABANDONED, MISSED (models are not imported at import time)
ALLOWED_FINAL = ("Executed", "Lost", "Abandoned", "Missed!")


@dataclass
class WorkerAudit:
    first: str
    last: str
    fire_times: int
    statuses: dict[str, int]  # of the expected fire times' rows
    ledger_rows: int  # for the expected fire times
    duplicates: int  # Ledger rows beyond one per (job, run time), over every row of the jobs
    duplicated: list[str]  # those fire times
    missing: list[str]  # expected fire times without an execution row: a silent gap
    not_final: list[str]  # rows still queued or running
    unexpected_status: list[str]  # final, but not Executed/Lost/Abandoned/Missed
    executed_without_ledger: list[str]  # recorded Executed, but the job's row is not there
    lost_but_ran: list[str]  # recorded Lost (never ran), but the job's row is there
    published_twice: list[str]  # execution ids the schedulers published more than once
    executed_unpublished: list[str]  # Executed, without a publish in the scheduler logs
    enqueue_failures: int  # enqueues that raised (scheduler logs)
    enqueue_failed_not_lost: list[str]  # ... whose run is not recorded Lost
    lost_reasons: dict[str, int]
    publishes: int
    deliveries: int
    redeliveries: int  # deliveries beyond the first of a task id
    drops: int  # deliveries the pick-up refused
    abandoned_with_ledger: list[str] = field(default_factory=list)  # killed after its write

    @property
    def ok(self) -> bool:
        return not (
            self.duplicates
            or self.missing
            or self.not_final
            or self.unexpected_status
            or self.executed_without_ledger
            or self.lost_but_ran
            or self.published_twice
            or self.enqueue_failed_not_lost
        )


def expected_fire_times(
    jobs: dict[str, tuple[float, float]], until: float
) -> list[tuple[str, datetime]]:
    """``jobs``: id -> (first fire time, interval; 0 for a one-off), epoch seconds."""
    last = datetime.fromtimestamp(until, tz=UTC)
    out = []
    for job, (start, interval) in jobs.items():
        t = datetime.fromtimestamp(start, tz=UTC)
        while t <= last:
            out.append((job, t))
            if not interval:
                break
            t += timedelta(seconds=interval)
    return out


def _rows(job_ids: list[str]) -> list[tuple[Any, ...]]:
    from django_apscheduler_obs.models import DjangoJobExecution
    from tests.chaos.harness import _db_retry

    return _db_retry(
        lambda: list(
            DjangoJobExecution.objects.filter(job_id__in=job_ids).values_list(
                "id", "job_id", "run_time", "status", "exception"
            )
        )
    )


def wait_final(
    jobs: dict[str, tuple[float, float]], until: float, timeout: float
) -> tuple[int, int]:
    """Wait until every expected fire time up to ``until`` has a final row (or ``timeout``);
    returns (final, expected). A fire time that never gets one is the audit's to report."""
    from django_apscheduler_obs.models import DjangoJobExecution

    expected = set(expected_fire_times(jobs, until))
    deadline = time.monotonic() + timeout
    while True:
        final = {
            (job, rt.astimezone(UTC))
            for _, job, rt, status, _ in _rows(list(jobs))
            if status in DjangoJobExecution.FINAL_STATUSES
        }
        done = len(expected & final)
        if done == len(expected) or time.monotonic() > deadline:
            return done, len(expected)
        time.sleep(0.1)


def audit(
    jobs: dict[str, tuple[float, float]],
    until: float,
    scheduler_logs: Iterable[str],
    worker_logs: Iterable[str],
) -> WorkerAudit:
    from django_apscheduler_obs.models import DjangoJobExecution as EX
    from tests.chaos.harness import _db_retry
    from tests.testapp.models import Ledger

    job_ids = list(jobs)
    expected = expected_fire_times(jobs, until)
    ledger = Counter(
        (job, rt.astimezone(UTC))
        for job, rt in _db_retry(
            lambda: list(
                Ledger.objects.filter(job_id__in=job_ids).values_list("job_id", "run_time")
            )
        )
    )
    rows = {
        (job, rt.astimezone(UTC)): (pk, status, exc) for pk, job, rt, status, exc in _rows(job_ids)
    }
    worker_logs = list(worker_logs)
    scheduler_logs = list(scheduler_logs)
    pubs = published(scheduler_logs)
    failed = enqueue_failures(scheduler_logs)
    deliveries = delivered(worker_logs)

    def label(key: tuple[str, datetime]) -> str:
        row = rows.get(key)
        where = f"{key[0]}@{key[1].isoformat()}"
        return f"{where}=no row" if row is None else f"{where}=#{row[0]} {row[1]}"

    missing: list[str] = []
    not_final: list[str] = []
    unexpected: list[str] = []
    no_ledger: list[str] = []
    lost_ran: list[str] = []
    abandoned_ran: list[str] = []
    unpublished: list[str] = []
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for key in expected:
        row = rows.get(key)
        if row is None:
            missing.append(label(key))
            continue
        pk, status, exc = row
        statuses[status] += 1
        ran = ledger.get(key, 0)
        if status not in EX.FINAL_STATUSES:
            not_final.append(label(key))
        elif status not in ALLOWED_FINAL:
            unexpected.append(f"{label(key)}: {exc}")
        if status == EX.SUCCESS:
            if not ran:
                no_ledger.append(label(key))
            if pk not in pubs:
                unpublished.append(label(key))
        elif status == EX.LOST:
            reasons["enqueue failed" if (exc or "").startswith(ENQUEUE_FAILED) else
                    "dispatch timeout" if (exc or "").startswith(DISPATCH_TIMED_OUT) else
                    exc or ""] += 1  # fmt: skip
            if ran:
                lost_ran.append(label(key))
        elif status == EX.ABANDONED and ran:
            abandoned_ran.append(label(key))
    by_id = {pk: f"{job}@{rt.isoformat()}" for (job, rt), (pk, _, _) in rows.items()}
    twice = [
        f"#{pk} {by_id.get(pk, '?')}: tasks {tasks}"
        for pk, tasks in sorted(pubs.items())
        if len(tasks) > 1
    ]
    all_deliveries = [task for tasks in deliveries.values() for task in tasks]
    return WorkerAudit(
        first=min((t for _, t in expected), default=datetime.fromtimestamp(until, UTC)).isoformat(),
        last=datetime.fromtimestamp(until, tz=UTC).isoformat(),
        fire_times=len(expected),
        statuses=dict(statuses),
        ledger_rows=sum(ledger.get(k, 0) for k in expected),
        duplicates=sum(n - 1 for n in ledger.values() if n > 1),
        duplicated=sorted(f"{j}@{t.isoformat()}" for (j, t), n in ledger.items() if n > 1),
        missing=missing,
        not_final=not_final,
        unexpected_status=unexpected,
        executed_without_ledger=no_ledger,
        lost_but_ran=lost_ran,
        published_twice=twice,
        executed_unpublished=unpublished,
        enqueue_failures=len(failed),
        enqueue_failed_not_lost=[
            label(key) for key in failed if rows.get(key, (0, "", ""))[1] != EX.LOST
        ],
        lost_reasons=dict(reasons),
        publishes=sum(len(t) for t in pubs.values()),
        deliveries=len(all_deliveries),
        redeliveries=len(all_deliveries) - len(set(all_deliveries)),
        drops=sum(dropped(worker_logs).values()),
        abandoned_with_ledger=abandoned_ran,
    )
