"""Faulty jobs in a real scheduler runtime: each is reported, none stops the others.

One runtime runs a healthy job next to a job that hangs, one that leaks threads, one that
raises on every run, one whose module disappears in a "deploy" and one whose stored state is
corrupted under it. Each fault must show up where people look (execution row or
``restore_error``, a metric, a log record) while the healthy job keeps recording runs.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from apscheduler import events
from prometheus_client import generate_latest

from django_apscheduler_obs import signing
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from tests import jobs
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class Records(logging.Handler):
    """Every log record of the process (all loggers, all threads), formatted with exc info."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    def text(self) -> str:
        with self._lock2:
            return "\n".join(self.format(r) for r in self.records)

    def matching(self, level: int, fragment: str) -> list[logging.LogRecord]:
        with self._lock2:
            return [r for r in self.records if r.levelno >= level and fragment in r.getMessage()]


@pytest.fixture
def records():
    handler = Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
def deployed_module(tmp_path: Path):
    """A module of job functions that a later "deploy" removes."""
    name = f"deployed_jobs_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text("def work():\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()

    def remove() -> None:
        path.unlink()
        sys.modules.pop(name, None)
        importlib.invalidate_caches()

    yield name, remove
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)


def runs(job_id: str, status: str | None = None, after: datetime | None = None) -> int:
    qs = DjangoJobExecution.objects.filter(job_id=job_id)
    if status:
        qs = qs.filter(status=status)
    if after:
        qs = qs.filter(run_time__gt=after)
    return qs.count()


def sample(runtime, name: str, **labels: str) -> float | None:
    return runtime.registry.get_sample_value(name, labels)


def test_faulty_jobs_are_reported_and_do_not_stop_the_others(
    make_runtime, records, deployed_module
):
    module, undeploy = deployed_module
    jobs.release.clear()
    jobs.leaked.clear()
    runtime = make_runtime(max_workers=4)
    sched = runtime.scheduler
    now = datetime.now(timezone.utc)
    try:
        sched.add_job("tests.jobs:noop", "interval", seconds=1, id="healthy", next_run_time=now)
        sched.add_job("tests.jobs:fail", "interval", seconds=1, id="raises", next_run_time=now)
        sched.add_job("tests.jobs:block", "interval", hours=1, id="hangs", next_run_time=now)
        sched.add_job(
            "tests.jobs:leak_thread", "interval", seconds=1, id="leaks", next_run_time=now
        )
        sched.add_job(f"{module}:work", "interval", seconds=1, id="removed", next_run_time=now)
        sched.add_job("tests.jobs:noop", "interval", hours=1, id="corrupt")
        for job_id in ("healthy", "raises", "leaks", "removed"):
            runtime.events.wait(events.EVENT_JOB_EXECUTED | events.EVENT_JOB_ERROR, job_id)
        wait_for(lambda: runs("hangs", DjangoJobExecution.SENT) == 1, message="the hung run")

        # A deploy removes the module of "removed"; the state of "corrupt" is overwritten
        # with bytes that are signed (so they pass the signature) but are not a pickle.
        undeploy()
        DjangoJob.objects.filter(id="corrupt").update(
            job_state=signing.sign(b"\x80\x05not a pickle at all"),
            next_run_time=datetime.now(timezone.utc),
        )
        faults_at = datetime.now(timezone.utc)
        wait_for(
            lambda: DjangoJob.objects.exclude(restore_error="").count() == 2,
            timeout=10,
            message="both unrestorable jobs to be flagged",
        )
        # The healthy job keeps recording runs, one per second, after every fault is in.
        wait_for(
            lambda: runs("healthy", DjangoJobExecution.SUCCESS, after=faults_at) >= 3,
            timeout=10,
            message="healthy runs after the faults",
        )
        wait_for(
            lambda: runs("raises", DjangoJobExecution.ERROR, after=faults_at) >= 2,
            message="failing runs after the faults",
        )
        assert runtime.health()[0], runtime.health()  # 1 of 4 workers is stuck: still healthy

        # -- each fault is reported --------------------------------------------------------
        # Raises on every run: Error! rows with exception, traceback and the class name.
        row = DjangoJobExecution.objects.filter(
            job_id="raises", status=DjangoJobExecution.ERROR
        ).first()
        assert row.error_type == "ValueError"
        assert "boom" in row.exception and "raise ValueError" in row.traceback
        assert runs("raises", DjangoJobExecution.SUCCESS) == 0
        assert (
            sample(
                runtime,
                "apscheduler_job_runs_total",
                job_id="raises",
                outcome="error",
                error_type="ValueError",
            )
            >= 2
        )
        assert records.matching(logging.ERROR, 'Job "fail')
        # Hangs: one row still running, with its true start; in-progress and oldest-running
        # gauges (the ApschedulerJobStuck alert's input).
        hung = DjangoJobExecution.objects.get(job_id="hangs")
        assert hung.status == DjangoJobExecution.SENT and hung.started is not None
        assert sample(runtime, "apscheduler_job_runs_in_progress", job_id="hangs") == 1
        # Until a run writes its final row, the row's start is its claim's time; the gauge
        # has the true start, after the claim's commit and the hand-over to a worker thread.
        oldest = sample(
            runtime, "apscheduler_job_oldest_running_start_timestamp_seconds", job_id="hangs"
        )
        assert hung.started.timestamp() <= oldest < hung.started.timestamp() + 1
        # Leaks threads: its runs succeed and the leaked threads do not block anything.
        assert runs("leaks", DjangoJobExecution.SUCCESS) >= 2
        assert sum(t.name == "leaked-by-job" for t in threading.enumerate()) >= 2
        # Removed in a deploy, corrupt state: kept, flagged with the reason, logged once,
        # counted as unrestorable; their history is kept.
        reasons = dict(
            DjangoJob.objects.exclude(restore_error="").values_list("id", "restore_error")
        )
        assert set(reasons) == {"removed", "corrupt"}
        assert "could not import module" in reasons["removed"] and module in reasons["removed"]
        assert "UnpicklingError" in reasons["corrupt"] or "Error" in reasons["corrupt"]
        for job_id in ("removed", "corrupt"):
            assert len(records.matching(logging.ERROR, f"Unable to restore job {job_id!r}")) == 1
        assert runs("removed", DjangoJobExecution.SUCCESS) >= 1  # the runs before the deploy
        assert runs("removed", after=faults_at + timedelta(seconds=1)) == 0  # skipped since
        runtime.catalog.invalidate()
        text = generate_latest(runtime.registry).decode()
        assert 'apscheduler_jobs{state="unrestorable"} 2.0' in text
        assert sched.get_job("removed") is None and sched.get_job("healthy") is not None
        assert runtime.scheduler._thread.is_alive()
    finally:
        jobs.release.set()
        jobs.leaked.set()
    # The hung run ends: its row gets its final status like any other.
    wait_for(lambda: runs("hangs", DjangoJobExecution.SUCCESS) == 1, message="the hung run's end")


def test_every_worker_hung_turns_healthz_red_but_runs_resume_after(make_runtime):
    """All workers held by a hanging job: the canary cannot run (/healthz 503 is tested in
    test_server); here: once the hang ends, the fire times due meanwhile run (coalesced)."""
    jobs.release.clear()
    runtime = make_runtime(max_workers=1, heartbeat_interval=0.3)
    now = datetime.now(timezone.utc)
    try:
        runtime.scheduler.add_job(
            "tests.jobs:block", "interval", hours=1, id="hog", next_run_time=now
        )
        wait_for(lambda: runs("hog", DjangoJobExecution.SENT) == 1, message="the hog")
        runtime.scheduler.add_job("tests.jobs:noop", "interval", seconds=1, id="starved")
        wait_for(lambda: not runtime.health()[0], timeout=5, message="unhealthy")
        assert runs("starved") == 0  # nothing can run: no worker
    finally:
        jobs.release.set()
    wait_for(lambda: runtime.health()[0], timeout=5, message="healthy again")
    wait_for(lambda: runs("starved", DjangoJobExecution.SUCCESS) >= 2, message="starved runs")
