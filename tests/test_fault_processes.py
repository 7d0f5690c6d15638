"""Faults injected into a real ``runapscheduler`` process on the test database.

Each test starts ``python -m django runapscheduler`` as a subprocess with its own settings
module (written to ``tmp_path``: the test settings, the jobs of the test, every log record at
DEBUG into a file) on the *same* database as the test, scrapes its HTTP endpoint, injects a
real fault (kill -9, SIGTERM, a stopped database server, a read-only or full SQLite file) and
checks the execution rows the process left behind.

Database server restarts (PostgreSQL, MariaDB) affect everything on the server: they happen in
one test per backend, and the outage lasts ``OUTAGE_SECONDS``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, connections
from prometheus_client.parser import text_string_to_metric_families

from django_apscheduler_obs.models import DjangoJobExecution
from tests.conftest import wait_for
from tests.dbserver import server_for_this_database
from tests.demo_process import REPO, free_port, http_get

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

OUTAGE_SECONDS = 20  # how long the database server stays down (minutes would blow CI's budget)

SETTINGS = """\
from tests.settings import *  # noqa: F403
import os

import dj_database_url

DATABASES = {{"default": dj_database_url.parse(os.environ["FAULT_DB_URL"], conn_max_age=600)}}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["OPTIONS"] = {{"timeout": 30}}
APSCHEDULER_HEARTBEAT_INTERVAL = 1
APSCHEDULER_LEASE_TTL = 3
APSCHEDULER_LEASE_RENEW_INTERVAL = 0.5
APSCHEDULER_STANDBY_POLL_INTERVAL = 0.2
APSCHEDULER_CHANGE_POLL_INTERVAL = 0.5
APSCHEDULER_EXECUTION_RETENTION = None
LOGGING = {{
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {{"plain": {{"format": "%(levelname)s %(name)s %(threadName)s %(message)s"}}}},
    "handlers": {{
        "file": {{"class": "logging.FileHandler", "filename": {records!r}, "formatter": "plain"}},
        "console": {{"class": "logging.StreamHandler", "level": "WARNING", "formatter": "plain"}},
    }},
    "root": {{"handlers": ["file", "console"], "level": "DEBUG"}},
}}
{extra}
"""


def database_url() -> str:
    """The test database, as a URL for the subprocess."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    scheme = {"postgresql": "postgres", "mysql": "mysql"}[connection.vendor]
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"{scheme}://{auth}@{s['HOST']}:{s['PORT']}/{s['NAME']}"


class SchedulerProcess:
    """``runapscheduler`` with the jobs given as Python source for ``APSCHEDULER_JOBS``."""

    def __init__(self, workdir: Path, extra_settings: str, db_url: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.records = workdir / "records.log"  # every log record, DEBUG and up
        self.output = workdir / "output.log"  # stdout + stderr
        module = f"fault_settings_{os.getpid()}_{id(self)}"
        (workdir / f"{module}.py").write_text(
            SETTINGS.format(records=str(self.records), extra=extra_settings)
        )
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": module,
            "PYTHONPATH": os.pathsep.join([str(workdir), str(REPO)]),
            "FAULT_DB_URL": db_url or database_url(),
            "PYTHONUNBUFFERED": "1",
        }
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.scheme = "http"
        self.context: Any = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(
        self,
        *args: str,
        healthy: bool = True,
        timeout: float = 40,
        preexec_fn: Callable[[], None] | None = None,
    ) -> SchedulerProcess:
        out = open(self.output, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runapscheduler", "--metrics-port", str(self.port),
             "--metrics-addr", "127.0.0.1", *args],
            env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
        )  # fmt: skip
        out.close()
        if healthy:
            wait_for(
                lambda: self.alive() and self.get("/healthz")[0] == 200,
                timeout=timeout,
                interval=0.1,
                message=f"a healthy scheduler\n{self.tail()}",
            )
        return self

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the scheduler process exited\n{self.tail()}")
        return True

    def get(self, path: str) -> tuple[int, str]:
        try:
            status, body = (
                http_get(self.url + path)
                if self.context is None
                else _https_get(self.url + path, self.context)
            )
        except OSError:
            return 0, ""
        return status, body.decode()

    def scrape(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return text

    def metric(self, name: str, **labels: str) -> float | None:
        return sample(self.scrape(), name, **labels)

    def sigterm(self, timeout: float = 60) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds until the process was gone)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"no exit {timeout}s after SIGTERM\n{self.tail()}") from None
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n: int = 4000) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return text[-n:]

    def log(self) -> str:
        return self.records.read_text(errors="replace") if self.records.exists() else ""


def _https_get(url: str, context: Any) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., SchedulerProcess]]:
    started: list[SchedulerProcess] = []

    def make(extra_settings: str, name: str = "p", **kwargs: Any) -> SchedulerProcess:
        p = SchedulerProcess(tmp_path / f"{name}{len(started)}", extra_settings, **kwargs)
        started.append(p)
        return p

    yield make
    for p in started:
        p.kill()
    connections.close_all()


def rows(job_id: str) -> list[tuple[datetime, str, str, str]]:
    connection.close_if_unusable_or_obsolete()
    return list(
        DjangoJobExecution.objects.filter(job_id=job_id)
        .order_by("run_time")
        .values_list("run_time", "status", "owner", "exception")
    )


def statuses(job_id: str) -> list[str]:
    return [r[1] for r in rows(job_id)]


def jobs_source(*jobs: str) -> str:
    """Settings source declaring ``jobs``; ``NOW`` is fixed here, so that a restarted process
    sees the same declarations (a changed ``next_run_time`` would reschedule the job)."""
    now = datetime.now(timezone.utc).timestamp()
    return (
        "from datetime import datetime, timezone\n"
        f"NOW = datetime.fromtimestamp({now!r}, timezone.utc)\n"
        f"APSCHEDULER_JOBS = [{', '.join(jobs)}]\n"
    )


TICK = '{"id": "tick", "func": "tests.jobs:noop", "trigger": "interval", "seconds": 1}'


def held_job(flag: Path, job_id: str = "held") -> str:
    """Starts at once, runs until ``flag`` exists, then not again for an hour."""
    return (
        f'{{"id": {job_id!r}, "func": "tests.jobs:hold", "args": [{str(flag)!r}], '
        '"trigger": "interval", "hours": 1, "next_run_time": NOW}'
    )


# -- kill -9 and SIGTERM -----------------------------------------------------------------------


def test_kill_9_during_a_run_is_abandoned_on_restart_and_jobs_resume(processes, tmp_path):
    flag = tmp_path / "never"  # the held run never finishes: the process dies first
    settings = jobs_source(held_job(flag), TICK)
    first = processes(settings).start()
    wait_for(lambda: statuses("held") == [DjangoJobExecution.SENT], message="the held run")
    wait_for(lambda: DjangoJobExecution.SUCCESS in statuses("tick"), message="a tick")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    killed_at = datetime.now(timezone.utc)
    ((held_rt, held_status, dead_owner, _),) = rows("held")
    assert held_status == DjangoJobExecution.SENT  # nobody is left to finish it

    second = processes(settings).start()
    # The restarted process takes the dead owner's lease at once and marks its run.
    wait_for(
        lambda: rows("held")[0][1] == DjangoJobExecution.ABANDONED,
        timeout=10,
        message="the killed run to be marked abandoned",
    )
    ((rt, _, owner, exception),) = [r for r in rows("held") if r[0] == held_rt]
    assert owner == dead_owner and "stopped before it finished" in exception
    # Jobs resume: new runs of the interval job are claimed and recorded by the new process.
    wait_for(
        lambda: (
            sum(1 for r in rows("tick") if r[0] > killed_at and r[1] == DjangoJobExecution.SUCCESS)
            >= 2
        ),
        timeout=15,
        message="runs after the restart",
    )
    assert (second.metric("apscheduler_abandoned_runs_total", group="default") or 0) >= 1
    code, _ = second.sigterm()
    assert code == 0
    tick_rows = rows("tick")
    assert len({r[0] for r in tick_rows}) == len(tick_rows)  # one row per fire time
    # The only run that did not finish is the one that was killed.
    unfinished = [
        r
        for j in ("tick", "held")
        for r in rows(j)
        if r[1] not in DjangoJobExecution.FINAL_STATUSES
    ]
    assert unfinished == []
    assert "Traceback" not in second.log()


@pytest.mark.once  # single-job SIGTERM cases on every backend: tests/test_runapscheduler.py
def test_sigterm_during_runs_stops_in_bounded_time_with_every_row_final(processes, tmp_path):
    """One run ends within the shutdown timeout, one never does, one job leaked a thread."""
    settings = jobs_source(
        held_job(tmp_path / "never"),
        '{"id": "short", "func": "tests.jobs:sleep", "args": [2.0], "trigger": "interval", '
        '"hours": 1, "next_run_time": NOW}',
        '{"id": "leaky", "func": "tests.jobs:leak_thread", "trigger": "interval", "hours": 1, '
        '"next_run_time": NOW}',
        TICK,
    )
    p = processes(settings).start("--shutdown-timeout", "4")
    wait_for(lambda: statuses("held") == [DjangoJobExecution.SENT], message="the held run")
    wait_for(lambda: statuses("leaky") == [DjangoJobExecution.SUCCESS], message="the leaky run")
    wait_for(lambda: statuses("short") == [DjangoJobExecution.SENT], message="the short run")
    code, elapsed = p.sigterm()
    assert code == 0, p.tail()
    assert elapsed < 4 + 6, f"stopped in {elapsed:.1f}s with a 4 s shutdown timeout"
    assert statuses("short") == [DjangoJobExecution.SUCCESS]  # finished within the timeout
    assert statuses("held") == [DjangoJobExecution.ABANDONED]  # did not: marked, not left
    assert statuses("leaky") == [DjangoJobExecution.SUCCESS]
    for job_id in ("tick", "short", "held", "leaky"):
        assert all(s in DjangoJobExecution.FINAL_STATUSES for s in statuses(job_id)), job_id
    assert "Stopping with 1 job(s) still running: held" in p.log()


@pytest.mark.once
def test_sigterm_with_a_leaked_thread_and_no_run_left_still_exits(processes, tmp_path):
    settings = jobs_source(
        '{"id": "leaky", "func": "tests.jobs:leak_thread", "trigger": "interval", "hours": 1, '
        '"next_run_time": NOW}',
        TICK,
    )
    p = processes(settings).start("--shutdown-timeout", "3")
    wait_for(lambda: statuses("leaky") == [DjangoJobExecution.SUCCESS], message="the leaky run")
    code, elapsed = p.sigterm(timeout=30)
    assert code == 0, p.tail()
    assert elapsed < 3 + 6, f"stopped in {elapsed:.1f}s"


# -- the database server stays down ------------------------------------------------------------


@contextlib.contextmanager
def database_server_down() -> Iterator[None]:
    """Stop the database server of the test database; start it again on leaving."""
    server = server_for_this_database()
    connections.close_all()  # our own sessions: reopened after the outage
    server.stop()
    try:
        yield
    finally:
        server.start()
        connections.close_all()


@pytest.mark.skipif(
    "os.environ.get('DATABASE_URL', '').split(':')[0] not in ('postgres', 'mysql')",
    reason="needs a database server to stop",
)
def test_database_down_for_a_while_process_stays_up_and_tells_the_truth(processes, tmp_path):
    """The server is stopped for OUTAGE_SECONDS while a run is in flight and jobs are due."""
    flag = tmp_path / "release"
    p = processes(jobs_source(held_job(flag), TICK)).start()
    wait_for(lambda: statuses("held") == [DjangoJobExecution.SENT], message="the held run")
    wait_for(lambda: DjangoJobExecution.SUCCESS in statuses("tick"), message="a tick")
    assert p.get("/readyz")[0] == 200
    errors_before = p.metric("apscheduler_history_write_errors_total", operation="finish") or 0

    seen: dict[str, set[int]] = {"/healthz": set(), "/readyz": set()}
    with database_server_down():
        down_at = time.monotonic()
        flag.touch()  # the held run ends while the database is down: its final status waits
        wait_for(
            lambda: (p.metric("apscheduler_history_pending_writes") or 0) >= 1,
            timeout=15,
            interval=0.2,
            message="the final status of the held run to be buffered",
        )
        while time.monotonic() - down_at < OUTAGE_SECONDS:
            assert p.alive()
            for path in seen:
                seen[path].add(p.get(path)[0])
            text = p.scrape()  # metrics keep flowing from a process without a database
            time.sleep(0.5)
        errors_during = sample(text, "apscheduler_history_write_errors_total", operation="finish")
        assert (errors_during or 0) > errors_before
        assert sample(text, "apscheduler_leader", group="default") == 0  # cannot renew
        status, body = p.get("/healthz")
        assert '"pending_history_writes": 1' in body, body
    up_at = datetime.now(timezone.utc)
    assert seen == {"/healthz": {200}, "/readyz": {503}}, seen

    wait_for(lambda: p.get("/readyz")[0] == 200, timeout=30, interval=0.2, message="/readyz")
    # The buffered final status is written; new fire times are claimed and recorded again.
    wait_for(
        lambda: statuses("held") == [DjangoJobExecution.SUCCESS],
        timeout=30,
        message=f"the buffered final status\n{p.tail()}",
    )
    wait_for(
        lambda: sum(1 for r in rows("tick") if r[0] > up_at and r[1] == "Executed") >= 2,
        timeout=30,
        message="runs after the outage",
    )
    wait_for(
        lambda: p.metric("apscheduler_history_pending_writes") == 0,
        timeout=15,
        message="the buffer to drain",
    )
    assert p.metric("apscheduler_history_dropped_writes_total") == 0
    assert p.metric("apscheduler_leader", group="default") == 1
    assert p.get("/healthz")[0] == 200
    code, _ = p.sigterm()
    assert code == 0, p.tail()
    tick_rows = rows("tick")
    assert len({r[0] for r in tick_rows}) == len(tick_rows)
    assert all(r[1] in DjangoJobExecution.FINAL_STATUSES for r in tick_rows), tick_rows
    # Fire times due during the outage were coalesced into one run after it (no gap filler
    # rows, no duplicates): at most one tick per second of wall time.
    span = (tick_rows[-1][0] - tick_rows[0][0]).total_seconds()
    assert len(tick_rows) <= span + 1


# -- SQLite: a database file that does not take writes ----------------------------------------


def _drop_dac_override() -> None:
    """Run the child as root *without* the capability that ignores file permissions, so a
    read-only file is read-only for it (root otherwise writes anywhere)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0 and os.geteuid() == 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.once
def test_read_only_sqlite_file_is_one_clear_error_retried_not_a_crash_loop(processes, tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    db = directory / "db.sqlite3"
    p = processes(jobs_source(TICK), db_url=f"sqlite:///{db}")
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v0"], env=p.env, cwd=REPO, check=True
    )
    db.chmod(0o444)
    directory.chmod(0o555)
    try:
        p.start(healthy=False, preexec_fn=_drop_dac_override)
        wait_for(
            lambda: p.alive() and p.log().count("Cannot start the scheduler") >= 3,
            timeout=20,
            message=f"three start attempts\n{p.tail()}",
        )
        log = p.log()
        assert "attempt to write a readonly database" in log
        assert "retrying in 1s" in log and "retrying in 2s" in log  # backoff, not a tight loop
        assert "Traceback" not in log and "Traceback" not in p.tail()
        assert p.get("/readyz")[0] == 503  # SELECT 1 works, but the scheduler did not start
        assert p.get("/healthz")[0] == 503
        assert (
            sample(p.scrape(), "apscheduler_scheduler_state", apscheduler_scheduler_state="stopped")
            == 1
        )
    finally:
        directory.chmod(0o755)
        db.chmod(0o644)
    # Writable again: the same process starts on its next attempt and runs jobs.
    wait_for(lambda: p.alive() and p.get("/readyz")[0] == 200, timeout=30, message="a start")
    import sqlite3

    def ticks() -> int:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return int(conn.execute(
                "SELECT COUNT(*) FROM django_apscheduler_obs_djangojobexecution "
                "WHERE job_id = 'tick' AND status = 'Executed'"
            ).fetchone()[0])  # fmt: skip

    wait_for(lambda: ticks() >= 2, timeout=15, message="runs once writable")
    code, _ = p.sigterm()
    assert code == 0


@pytest.mark.once
def test_sigterm_while_waiting_for_the_database_exits_at_once(processes, tmp_path):
    p = processes(jobs_source(TICK), db_url="postgres://postgres@127.0.0.1:1/none")
    p.start(healthy=False)
    wait_for(lambda: p.alive() and "Cannot start the scheduler" in p.log(), timeout=20,
             message=f"a start attempt\n{p.tail()}")  # fmt: skip
    assert "Connection refused" in p.log() or "connection failed" in p.log()
    code, elapsed = p.sigterm(timeout=15)
    assert code == 0 and elapsed < 5
