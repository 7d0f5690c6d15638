"""Runs on real worker processes: ``celery worker`` on Redis and on RabbitMQ, and the Tasks
framework's ``db_worker`` on the test database, each started and killed by the test.

The scheduler runs in the test process (a real runtime with its lease), the workers in their
own processes on the same database. Every wait is on an event: a row reaching a state, or a
line in the worker's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from django_apscheduler_obs.handoff import RunMessage
from django_apscheduler_obs.models import DjangoJobExecution
from tests.conftest import metric_value, wait_for
from tests.testapp.models import Ledger

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
EX = DjangoJobExecution
ROOT = Path(__file__).resolve().parent.parent
LIVENESS = 2.0  # seconds without a sign of life before a worker's run is abandoned


class Worker:
    """A worker process with its log in a file; ``kill()`` is kill -9 of its process group."""

    def __init__(self, argv: list[str], log: Path, settings: dict[str, Any]) -> None:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.cmd_settings",
            "PYTHONPATH": str(ROOT),
            "DAO_TEST_DATABASE": json.dumps(connection.settings_dict, default=str),
            "DAO_TEST_SETTINGS": json.dumps(settings),
            "DAO_TEST_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, *, count: int = 1, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.text()}")
            return self.text().count(needle) >= count

        wait_for(seen, timeout=timeout, interval=0.05, message=f"{needle!r} in the worker log")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(argv: list[str], settings: dict[str, Any], ready: str) -> Worker:
        worker = Worker(argv, tmp_path / f"worker-{len(workers)}.log", settings)
        workers.append(worker)
        worker.wait_log(ready)
        return worker

    yield start
    for worker in workers:
        worker.stop()


BROKERS = {"redis": "tests.celery_app:redis_app", "rabbitmq": "tests.celery_app:rabbitmq_app"}


def celery_setup(settings: Any, broker: str) -> tuple[dict[str, Any], str]:
    queue = f"dao-{uuid.uuid4().hex[:12]}"  # nothing left by another run can reach us
    executors = {"celery": {"ENGINE": "celery", "APP": BROKERS[broker], "QUEUE": queue}}
    worker_settings = {
        "APSCHEDULER_EXECUTORS": executors,
        "APSCHEDULER_WORKER_LIVENESS": LIVENESS,
    }
    settings.APSCHEDULER_EXECUTORS = executors
    settings.APSCHEDULER_WORKER_LIVENESS = LIVENESS
    settings.APSCHEDULER_INFLIGHT_POLL_INTERVAL = 0.1
    return worker_settings, queue


def celery_argv(broker: str, queue: str, name: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", BROKERS[broker], "worker", "-Q", queue,
        "-n", f"{name}@%h", "-c", "2", "--without-heartbeat", "--without-gossip",
        "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip


def _final(job_id: str, count: int, timeout: float = 60) -> list[EX]:
    def rows() -> list[EX] | None:
        found = list(EX.objects.filter(job_id=job_id, status__in=EX.FINAL_STATUSES))
        return found if len(found) >= count else None

    return wait_for(rows, timeout=timeout, message=f"{count} final run(s) of {job_id}")


def _every_second(rt: Any, job_id: str, executor: str, func: str = "tests.jobs:ledger") -> None:
    rt.scheduler.add_job(
        func,
        "interval",
        seconds=1,
        id=job_id,
        executor=executor,
        next_run_time=datetime.now(timezone.utc),
        misfire_grace_time=60,
        coalesce=False,
        max_instances=5,
    )


def _assert_ran_once_each(job_id: str, rows: list[EX], worker_prefix: str | None) -> None:
    ledger = list(Ledger.objects.filter(job_id=job_id).values_list("run_time", flat=True))
    assert len(ledger) == len(set(ledger)), "a fire time ran twice"
    succeeded = {r.run_time for r in rows if r.status == EX.SUCCESS}
    assert succeeded <= set(ledger)
    for row in rows:
        assert row.status == EX.SUCCESS, (row.status, row.exception)
        if worker_prefix is None:
            assert row.worker is None
        else:
            assert row.worker.startswith(worker_prefix), row.worker
            assert row.queue_wait is not None and row.queue_wait >= 0


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_celery_runs_remote_jobs_beside_local_ones(make_runtime, start_worker, settings, broker):
    worker_settings, queue = celery_setup(settings, broker)
    start_worker(celery_argv(broker, queue, "w1"), worker_settings, "ready.")
    rt = make_runtime()
    _every_second(rt, "remote", "celery")
    _every_second(rt, "local", "default")
    remote = _final("remote", 3)
    local = _final("local", 3)
    rt.scheduler.pause()
    _assert_ran_once_each("remote", remote, "w1@")
    _assert_ran_once_each("local", local, None)
    # The leader's /metrics counts the worker's runs in the series local runs use.
    labels = {"job_id": "remote", "outcome": "success", "error_type": ""}
    wait_for(
        lambda: (metric_value(rt.registry, "apscheduler_job_runs_total", labels) or 0) >= 3,
        message="remote runs in the leader's metrics",
    )


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_duplicate_celery_delivery_is_dropped(make_runtime, start_worker, settings, broker):
    worker_settings, queue = celery_setup(settings, broker)
    worker = start_worker(celery_argv(broker, queue, "w1"), worker_settings, "ready.")
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:ledger", "date", run_date=datetime.now(timezone.utc) + timedelta(days=1),
        id="dup", executor="celery",
    )  # fmt: skip
    run_time = datetime.now(timezone.utc).replace(microsecond=0)
    row = EX.objects.create(job_id="dup", run_time=run_time, status=EX.QUEUED, started=run_time)
    engine = rt.scheduler._executors["celery"].engine
    message = RunMessage(row.id, "dup", run_time)
    engine.enqueue(message)  # a duplicate publish: the same run, twice
    engine.enqueue(message)
    worker.wait_log("already picked up or marked lost")
    (done,) = _final("dup", 1)
    assert done.status == EX.SUCCESS
    assert Ledger.objects.filter(job_id="dup").count() == 1


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_worker_killed_mid_run_leaves_an_abandoned_row_and_its_redelivery_is_dropped(
    make_runtime, start_worker, settings, broker
):
    worker_settings, queue = celery_setup(settings, broker)
    first = start_worker(celery_argv(broker, queue, "w1"), worker_settings, "ready.")
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:sleep", "date", run_date=datetime.now(timezone.utc), args=[60],
        id="killed", executor="celery",
    )  # fmt: skip
    wait_for(
        lambda: EX.objects.filter(job_id="killed", status=EX.PICKED_UP).exists(),
        timeout=30,
        message="the run picked up",
    )
    first.kill()  # kill -9 mid-run: acks_late keeps the message unacknowledged
    (row,) = _final("killed", 1, timeout=30)
    assert row.status == EX.ABANDONED and row.worker.startswith("w1@")
    # The broker redelivers the message to the next worker; the pick-up refuses it.
    second = start_worker(celery_argv(broker, queue, "w2"), worker_settings, "ready.")
    second.wait_log("already picked up or marked lost", timeout=60)
    row.refresh_from_db()
    assert row.status == EX.ABANDONED and row.worker.startswith("w1@")
    assert metric_value(rt.registry, "apscheduler_abandoned_runs_total", {"group": "default"}) == 1


def test_tasks_db_worker_runs_remote_jobs(make_runtime, start_worker, settings):
    queue = f"dao-{uuid.uuid4().hex[:12]}"
    executors = {"tasks": {"ENGINE": "tasks", "BACKEND": "db", "QUEUE": queue}}
    settings.APSCHEDULER_EXECUTORS = executors
    settings.APSCHEDULER_INFLIGHT_POLL_INTERVAL = 0.1
    argv = [
        sys.executable, "-m", "django", "db_worker", "--backend", "db", "--queue-name", queue,
        "--interval", "0.1", "--no-startup-delay", "--no-reload", "--worker-id", "dbw1",
        "-v", "2",
    ]  # fmt: skip
    start_worker(argv, {"APSCHEDULER_EXECUTORS": executors}, "Starting worker")
    rt = make_runtime()
    _every_second(rt, "queued-in-db", "tasks")
    _every_second(rt, "local", "default")
    remote = _final("queued-in-db", 3)
    local = _final("local", 2)
    rt.scheduler.pause()
    _assert_ran_once_each("queued-in-db", remote, "dbw1:")
    _assert_ran_once_each("local", local, None)


def test_tasks_rq_worker_runs_remote_jobs(make_runtime, start_worker, settings):
    """A Redis-based backend of the Tasks framework: django-tasks-rq and django-rq's worker."""
    import redis

    redis.Redis(db=13).flushdb()  # the fixed queue of tests/settings.py: nothing left over
    executors = {"rq": {"ENGINE": "tasks", "BACKEND": "rq", "QUEUE": "dao-rq"}}
    settings.APSCHEDULER_EXECUTORS = executors
    settings.APSCHEDULER_INFLIGHT_POLL_INTERVAL = 0.1
    argv = [
        sys.executable, "-m", "django", "rqworker", "dao-rq", "--job-class",
        "django_tasks_rq.Job", "--worker-class", "rq.worker.SimpleWorker", "--name", "rqw1",
    ]  # fmt: skip
    start_worker(argv, {"APSCHEDULER_EXECUTORS": executors}, "Listening on")
    rt = make_runtime()
    _every_second(rt, "queued-in-redis", "rq")
    remote = _final("queued-in-redis", 3)
    rt.scheduler.pause()
    _assert_ran_once_each("queued-in-redis", remote, "rqw1:")
