"""``manage.py runapscheduler`` as a real process: clean stop on SIGTERM/SIGINT, and one clear
line on stderr (non-zero exit) for every bad flag or setting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from django_apscheduler_obs.models import DjangoJobExecution, SchedulerLease
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(*args: str, settings: dict[str, Any] | None = None, database: bool = True):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.cmd_settings",
        "PYTHONPATH": str(ROOT),
        "DAO_TEST_SETTINGS": json.dumps(settings or {}),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if database:
        env["DAO_TEST_DATABASE"] = json.dumps(connection.settings_dict, default=str)
    return [sys.executable, "-X", "faulthandler", "-m", "django", "runapscheduler", *args], env


def run_failing(*args: str, settings: dict[str, Any] | None = None) -> tuple[int, list[str]]:
    argv, env = command(*args, settings=settings)
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, lines


# -- bad flags and settings: one line, non-zero exit ---------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--metrics-port", "0"], 2, "argument --metrics-port: invalid port 0: must be 1-65535"),
        (["--metrics-port", "70000"], 2, "invalid port 70000"),
        (["--metrics-port", "abc"], 2, "invalid port 'abc': not a number"),
        (["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
        (
            ["--lease-ttl", "1", "--renew", "1"],
            1,
            "--lease-ttl (1) must be at least 3 x --renew (1)",
        ),
        (["--lease-ttl", "-5"], 2, "argument --lease-ttl: '-5' must be greater than 0"),
        (["--max-workers", "0"], 1, "--max-workers must be at least 1"),
        (
            ["--metrics-port", "9", "--metrics-certfile", "/nonexistent/cert.pem"],
            1,
            "cannot load TLS files",
        ),
        (["--metrics-keyfile", "/tmp/key.pem"], 1, "need --metrics-certfile"),
    ],
)
def test_bad_flags(args, code, message):
    returncode, lines = run_failing(*args)
    assert returncode == code, lines
    assert len(lines) == 1, lines
    assert message in lines[0]


@pytest.mark.django_db
def test_unreadable_tls_file(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    returncode, lines = run_failing("--metrics-port", "9", "--metrics-certfile", str(cert))
    assert returncode == 1 and len(lines) == 1, lines
    assert "cannot load TLS files" in lines[0]


@pytest.mark.django_db
def test_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        returncode, lines = run_failing("--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
    assert returncode == 1 and len(lines) == 1, lines
    assert f"cannot serve metrics on 127.0.0.1:{port}" in lines[0]
    assert "in use" in lines[0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("settings", "check_id"),
    [
        ({"APSCHEDULER_MAX_WORKERS": 0}, "django_apscheduler_obs.E002"),
        ({"APSCHEDULER_TIMEZONE": "Nowhere/Never"}, "django_apscheduler_obs.E007"),
        (
            {
                "APSCHEDULER_JOBS": [
                    {"func": "tests.jobs:noop", "trigger": "cron", "hour": 25, "id": "bad_cron"}
                ]
            },
            "django_apscheduler_obs.E010",
        ),  # fmt: skip
    ],
)
def test_bad_setting_fails_the_system_check_with_its_id(settings, check_id):
    returncode, lines = run_failing(settings=settings)
    assert returncode == 1 and len(lines) == 1, lines
    assert check_id in lines[0]
    if check_id.endswith("E010"):
        assert "'bad_cron'" in lines[0]


def test_errors_raise_command_error_under_call_command():
    with pytest.raises(CommandError, match="invalid port"):
        call_command("runapscheduler", "--metrics-port", "0")
    with pytest.raises(CommandError, match="must be at least 3 x --renew"):
        call_command("runapscheduler", "--lease-ttl", "1", "--renew", "1")


# -- clean stop ------------------------------------------------------------------------------


class Scheduler:
    """A ``runapscheduler`` process with its own lease group and metrics port."""

    def __init__(self, jobs: list[dict[str, Any]], *args: str) -> None:
        self.port = free_port()
        self.group = f"cmd-{uuid.uuid4().hex[:8]}"
        argv, env = command(
            "--metrics-port", str(self.port), "--metrics-addr", "127.0.0.1",
            "--group", self.group, "--lease-ttl", "6", "--renew", "1", "--standby-poll", "0.5",
            *args,
            settings={"APSCHEDULER_JOBS": jobs, "APSCHEDULER_EXECUTION_RETENTION": None,
                      "APSCHEDULER_HEARTBEAT_INTERVAL": 1},
        )  # fmt: skip
        env["DAO_TEST_LOG_LEVEL"] = "WARNING"
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out = ""

    def healthz(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return json.loads(r.read()) if r.status == 200 else None
        except OSError:
            if self.proc.poll() is not None:
                raise AssertionError(f"runapscheduler exited: {self.proc.communicate()}") from None
            return None

    def stop(self, signum: int, timeout: float = 30) -> tuple[int, float, str]:
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        try:
            self.out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"runapscheduler did not stop in {timeout}s:\n{err}") from None
        return self.proc.returncode, time.monotonic() - t0, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def started_row(job_id: str) -> DjangoJobExecution:
    return wait_for(
        lambda: DjangoJobExecution.objects.filter(
            job_id=job_id, status=DjangoJobExecution.SENT
        ).first(),
        timeout=20,
        message=f"{job_id} to start",
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_a_job_runs_waits_for_it_and_exits_0(signum):
    jobs = [{"func": "tests.jobs:sleep", "trigger": "interval", "seconds": 1, "args": [2],
             "id": "slow", "max_instances": 1}]  # fmt: skip
    proc = Scheduler(jobs, "--shutdown-timeout", "15")
    try:
        health = wait_for(proc.healthz, timeout=20, message="/healthz")
        assert health["state"] == "running"
        row = started_row("slow")
        returncode, took, err = proc.stop(signum)
    finally:
        proc.kill()
    assert returncode == 0, err
    assert took < 10
    # what a person at the terminal sees: who runs, where the metrics are, how to stop
    assert f"; metrics on http://127.0.0.1:{proc.port}/metrics. Press Ctrl-C" in proc.out
    row.refresh_from_db()
    assert row.status == DjangoJobExecution.SUCCESS
    assert not DjangoJobExecution.objects.filter(status=DjangoJobExecution.SENT).exists()
    # The lease was released for a standby to take over at once.
    lease = SchedulerLease.objects.get(name=proc.group)
    assert lease.owner == ""


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigterm_with_a_stuck_job_marks_it_abandoned_after_the_bounded_wait():
    jobs = [{"func": "tests.jobs:sleep", "trigger": "interval", "seconds": 2, "args": [120],
             "id": "stuck", "max_instances": 1}]  # fmt: skip
    proc = Scheduler(jobs, "--shutdown-timeout", "1")
    try:
        wait_for(proc.healthz, timeout=20, message="/healthz")
        row = started_row("stuck")
        returncode, took, err = proc.stop(signal.SIGTERM)
    finally:
        proc.kill()
    assert returncode == 0, err
    assert took < 8
    row.refresh_from_db()
    assert row.status == DjangoJobExecution.ABANDONED
    assert "stopped before this run finished" in row.exception
    assert not DjangoJobExecution.objects.filter(status=DjangoJobExecution.SENT).exists()
