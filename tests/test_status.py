"""``manage.py apscheduler_status``: output, JSON and exit codes (it is a health check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, SchedulerInstance
from tests.conftest import wait_for
from tests.test_admin import add_runs, live_lease, store_job

EX = DjangoJobExecution
ROOT = Path(__file__).resolve().parent.parent


def status(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, error message) of the command run in-process."""
    out = StringIO()
    try:
        call_command("apscheduler_status", *args, "--no-color", stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), str(exc)
    return 0, out.getvalue(), ""


def healthy_setup() -> None:
    store_job("healthy")
    add_runs("healthy", 3)
    store_job("resting", paused=True)


@pytest.mark.django_db
def test_healthy_jobs_exit_zero():
    healthy_setup()
    code, out, _ = status()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "JOB",
        "NEXT",
        "RUN",
        "(UTC)",
        "LAST",
        "OUTCOME",
        "LAST",
        "SUCCESS",
        "(UTC)",
        "STATE",
    ]
    healthy = next(line for line in lines if line.startswith("healthy "))
    assert "Executed" in healthy and healthy.endswith("ok") and "never" not in healthy
    resting = next(line for line in lines if line.startswith("resting "))
    assert resting.split()[1] == "paused" and "never" in resting and resting.endswith("paused")
    assert "Leader (default): none (no live lease)" in out
    assert "Standbys: none" in out and "problem:" not in out


@pytest.mark.django_db
def test_failing_job_exits_one():
    healthy_setup()
    store_job("broken")
    add_runs("broken", 3)
    add_runs("broken", 1, errors_every=1, end=datetime.now(timezone.utc) + timedelta(seconds=1))
    code, out, message = status()
    assert code == 1
    assert next(line for line in out.splitlines() if line.startswith("broken ")).endswith("FAILING")
    assert "problem: broken: last run failed (Error!)" in out
    assert message == "1 problem(s): broken: last run failed (Error!)"


@pytest.mark.django_db
def test_a_success_after_a_failure_is_healthy_and_running_rows_do_not_count():
    store_job("recovered")
    add_runs("recovered", 1, errors_every=1, end=datetime.now(timezone.utc) - timedelta(minutes=5))
    add_runs("recovered", 1)
    EX.objects.create(job_id="recovered", status=EX.SENT, run_time=datetime.now(timezone.utc))
    code, out, _ = status()
    assert code == 0
    assert next(line for line in out.splitlines() if line.startswith("recovered ")).endswith(
        "ok (running)"
    )


@pytest.mark.django_db
def test_abandoned_counts_as_failing():
    store_job("died")
    EX.objects.create(job_id="died", status=EX.ABANDONED, run_time=datetime.now(timezone.utc))
    assert status()[0] == 1


@pytest.mark.django_db
def test_overdue_job_and_grace():
    healthy_setup()
    store_job("late", next_run_time=datetime.now(timezone.utc) - timedelta(minutes=10))
    code, out, message = status()
    assert code == 1
    assert "OVERDUE 10 min" in next(line for line in out.splitlines() if line.startswith("late "))
    assert "late: overdue by 10 min" in message
    # a longer grace forgives it; a grace of zero flags what is only seconds late
    assert status("--grace", "900")[0] == 0
    store_job("just_late", next_run_time=datetime.now(timezone.utc) - timedelta(seconds=5))
    code, _, message = status("--grace", "900")
    assert code == 0
    code, _, message = status("--grace", "0")
    assert code == 1 and "just_late: overdue" in message


@pytest.mark.django_db
def test_unrestorable_job_exits_one():
    store_job("gone")
    DjangoJob.objects.filter(id="gone").update(restore_error="ModuleNotFoundError: x")
    code, out, message = status()
    assert code == 1 and "UNRESTORABLE" in out and "gone: state cannot be restored" in message


@pytest.mark.django_db
def test_json_output():
    healthy_setup()
    store_job("late", next_run_time=datetime.now(timezone.utc) - timedelta(minutes=3))
    add_runs("late", 2, errors_every=1)
    live_lease(owner="sched1:42:abcd")
    now = datetime.now(timezone.utc)
    for identity, seen in [("sched1:42:abcd", now), ("sched2:43:bcde", now - timedelta(hours=1))]:
        SchedulerInstance.objects.create(
            identity=identity, hostname=identity[:6], pid=1, started_at=now, last_seen=seen
        )
    code, out, _ = status("--json")
    assert code == 1
    data = json.loads(out)
    assert data["healthy"] is False and data["grace_seconds"] == 60
    jobs = {job["id"]: job for job in data["jobs"]}
    assert set(jobs) == {"healthy", "resting", "late"}
    assert jobs["healthy"]["last_outcome"] == "Executed" and not jobs["healthy"]["overdue"]
    assert jobs["healthy"]["last_success_at"] is not None
    assert jobs["resting"]["paused"] is True and jobs["resting"]["next_run_time"] is None
    late = jobs["late"]
    assert late["overdue"] is True and 170 < late["overdue_seconds"] < 400
    assert late["failing"] is True and late["last_error"] == "boom"
    assert data["leader"]["identity"] == "sched1:42:abcd" and data["leader"]["epoch"] == 1
    instances = {i["identity"]: i for i in data["instances"]}
    assert instances["sched1:42:abcd"]["leader"] is True
    assert instances["sched2:43:bcde"]["stale"] is True
    assert len(data["problems"]) == 2


@pytest.mark.django_db
def test_require_leader():
    healthy_setup()
    assert status()[0] == 0
    code, _, message = status("--require-leader")
    assert code == 1 and "no scheduler leads group 'default'" in message
    live_lease()
    assert status("--require-leader")[0] == 0


@pytest.mark.django_db
def test_bad_grace_is_a_usage_error():
    with pytest.raises(CommandError, match="must not be negative"):
        call_command("apscheduler_status", "--grace", "-1")


@pytest.mark.django_db(transaction=True)
def test_leader_and_standby_of_running_schedulers(make_runtime):
    leader = make_runtime()
    standby = make_runtime(wait_leader=False)
    wait_for(
        lambda: (
            SchedulerInstance.objects.filter(
                identity__in=[leader.lease.identity, standby.lease.identity]
            ).count()
            == 2
        ),
        message="both scheduler instances to report",
    )
    code, out, _ = status()
    assert code == 0
    assert f"Leader (default): {leader.lease.identity}, epoch {leader.lease.epoch}" in out
    assert f"Standby: {standby.lease.identity} (last seen" in out


def _database_url() -> str:
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    scheme = "postgres" if connection.vendor == "postgresql" else "mysql"
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    return f"{scheme}://{s['USER']}{password}@{s['HOST']}:{s['PORT']}/{s['NAME']}"


@pytest.mark.django_db(transaction=True)
def test_exit_codes_of_the_real_command():
    """As a container health check runs it: a process, its exit code, its output."""
    healthy_setup()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "django", "apscheduler_status", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert "healthy" in ok.stdout
    store_job("late", next_run_time=datetime.now(timezone.utc) - timedelta(minutes=5))
    bad = run("--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["problems"] == ["late: overdue by 5 min"]
    assert "late: overdue by 5 min" in bad.stderr
    assert run("--grace", "-3").returncode == 2


@pytest.mark.django_db
def test_runs_on_workers_show_as_queued_running_or_lost():
    now = datetime.now(timezone.utc)
    store_job("queued")
    EX.objects.create(job_id="queued", status=EX.QUEUED, run_time=now)
    store_job("on_worker")
    EX.objects.create(job_id="on_worker", status=EX.PICKED_UP, run_time=now, worker="w:1")
    code, out, _ = status()
    lines = out.splitlines()
    assert next(line for line in lines if line.startswith("queued ")).endswith(
        "(queued for a worker)"
    )
    assert next(line for line in lines if line.startswith("on_worker ")).endswith("(running)")
    assert code == 0
    store_job("lost")
    EX.objects.create(job_id="lost", status=EX.LOST, run_time=now, exception="Not run")
    code, out, _ = status()
    assert code == 1 and "problem: lost: last run failed (Lost)" in out
