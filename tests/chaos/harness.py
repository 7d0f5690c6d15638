"""The chaos harness: real ``runapscheduler`` processes, real faults, and a ledger audit.

A ``Cluster`` starts N ``python -m django runapscheduler`` processes on the test database
(settings ``tests.chaos.settings``), finds the leader from the lease row's owner
(``host:pid:uuid``), and injects faults: ``kill -9``, ``SIGSTOP``/``SIGCONT``, a freeze at an
exact point (test hook), ``SIGTERM``, a database restart. Each fault records how long the group
was without a leader. ``audit()`` then checks every job and every expected fire time against
the ``Ledger`` table (no unique constraint) and the execution table.

Everything waits on conditions (the lease row, a marker file, a metric), with deadlines;
the only plain sleeps are the fault durations themselves (a pause *is* time).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections

ROOT = Path(__file__).resolve().parents[2]
UTC = timezone.utc

TTL = 3.0
RENEW = 0.75
STANDBY_POLL = 0.5
CHANGE_POLL = 0.5
# Bounds of the design: a crash or a pause costs at most TTL + standby poll; a graceful stop
# at most one standby poll. The slack covers scheduling on a loaded 2-core machine.
CRASH_BOUND = TTL + STANDBY_POLL + 0.5
SIGTERM_BOUND = STANDBY_POLL + 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _db_retry(fn: Any, attempts: int = 50) -> Any:
    """Run an ORM read from the harness, riding out a database restart."""
    for i in range(attempts):
        try:
            return fn()
        except DatabaseError:
            connections.close_all()
            if i == attempts - 1:
                raise
            time.sleep(0.2)
    return None


@dataclass
class Proc:
    slot: int
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    freeze_file: Path
    started: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"group": "default", **labels}.items())))
        return self.metrics().get(key, 0.0)


@dataclass
class Fault:
    kind: str
    at: float  # wall clock (time.time()) when the fault was injected
    old_owner: str
    old_epoch: int
    new_owner: str = ""
    new_epoch: int = 0
    failover_s: float | None = None  # new acquired_at (DB clock) - at
    bound_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def within_bound(self) -> bool:
        return self.bound_s is None or (
            self.failover_s is not None and self.failover_s <= self.bound_s
        )


@dataclass
class Audit:
    jobs: list[str]
    first: str
    last: str
    fire_times: int
    ledger_rows: int
    duplicates: int  # ledger rows beyond one per fire time, over every fire time seen
    duplicated_fire_times: int
    gaps: list[str]  # fire times with no ledger row and no abandoned execution
    abandoned_gaps: list[str]  # fire times with no ledger row whose execution is abandoned
    # Ran once, but the job's own ledger write failed because the database went away (the
    # PostgreSQL restart): recorded Error! with the driver's error. Not a scheduler gap.
    failed_gaps: list[str]
    abandoned_rows: int
    statuses: dict[str, int]
    unfinished: list[str]  # execution rows still "running" (claimed; their process stopped)

    @property
    def ok(self) -> bool:
        return self.duplicates == 0 and not self.gaps


class Cluster:
    """N ``runapscheduler`` processes sharing the test database."""

    def __init__(
        self,
        workdir: Path,
        *,
        jobs: str = "interval",
        job_count: int = 3,
        slow_job: bool = False,
        start: float | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jobs = jobs
        self.job_count = job_count
        self.slow_job = slow_job
        # job id -> interval in seconds, for the audit
        self.intervals = {f"every-second-{i}": 1 for i in range(job_count)}
        if slow_job:
            self.intervals["slow"] = 2
        # Jobs start on a whole second, a little after the processes are up.
        self.start = float(start if start is not None else int(time.time()) + 4)
        self.extra_args = extra_args
        self.extra_env = env or {}
        self.procs: list[Proc] = []
        self.retired: list[Proc] = []
        self.faults: list[Fault] = []
        self.seed = seed if seed is not None else random.SystemRandom().randrange(1 << 30)
        self.random = random.Random(self.seed)
        self._next_slot = 0
        db = connections["default"].settings_dict
        self.db_name = str(db["NAME"])
        self.vendor = connections["default"].vendor

    # -- processes ------------------------------------------------------------------------------

    def env(self, slot: int) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTEST_", "DAO_", "CHAOS_")) and k != "DJANGO_SETTINGS_MODULE"
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "tests.chaos.settings",
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                "CHAOS_DB_NAME": self.db_name,
                "CHAOS_START": str(self.start),
                "CHAOS_JOBS": self.jobs,
                "CHAOS_JOB_COUNT": str(self.job_count),
                "CHAOS_SLOW_JOB": "1" if self.slow_job else "0",
                "DAO_TEST_FREEZE_FILE": str(self.workdir / f"freeze-{slot}"),
            }
        )
        env.update(self.extra_env)
        return env

    def spawn(self) -> Proc:
        slot = self._next_slot
        self._next_slot += 1
        port = _free_port()
        log = self.workdir / f"proc-{slot}.log"
        args = [
            sys.executable,
            "-m",
            "django",
            "runapscheduler",
            "--lease-ttl",
            str(TTL),
            "--renew",
            str(RENEW),
            "--standby-poll",
            str(STANDBY_POLL),
            "--change-poll",
            str(CHANGE_POLL),
            "--metrics-port",
            str(port),
            "--metrics-addr",
            "127.0.0.1",
            *self.extra_args,
        ]
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                args, cwd=ROOT, env=self.env(slot), stdout=out, stderr=subprocess.STDOUT
            )
        proc = Proc(slot, popen, port, log, self.workdir / f"freeze-{slot}", time.time())
        self.procs.append(proc)
        return proc

    def spawn_many(self, n: int) -> list[Proc]:
        procs = [self.spawn() for _ in range(n)]
        for p in procs:
            self.wait_serving(p)
        return procs

    def wait_serving(self, proc: Proc, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"process {proc.slot} exited:\n{self.tail(proc)}")
            with contextlib.suppress(OSError):
                proc.metrics()
                return
            time.sleep(0.1)
        raise AssertionError(f"process {proc.slot} never served metrics:\n{self.tail(proc)}")

    def tail(self, proc: Proc, lines: int = 40) -> str:
        try:
            return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def retire(self, proc: Proc) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
            self.retired.append(proc)

    def stop_all(self) -> None:
        for p in self.procs + self.retired:
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.popen.terminate()
        for p in self.procs + self.retired:
            with contextlib.suppress(OSError):
                p.freeze_file.unlink()
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)

    # -- the lease --------------------------------------------------------------------------

    def lease(self) -> dict[str, Any] | None:
        from django_apscheduler_obs.lease import current_leader

        return _db_retry(current_leader)

    def leader(self, timeout: float = 15) -> tuple[Proc, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.lease()
            if row:
                pid = int(row["owner"].rsplit(":", 2)[1])
                for p in self.procs:
                    if p.pid == pid and p.alive():
                        return p, row
            time.sleep(0.02)
        raise AssertionError(f"no live leader within {timeout}s; lease: {self.lease()}")

    def wait_new_epoch(self, old_epoch: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.lease()
            if row and row["epoch"] > old_epoch:
                return row
            time.sleep(0.01)
        raise AssertionError(f"no takeover from epoch {old_epoch} within {timeout}s")

    def _fault(self, kind: str, leader: Proc, row: dict[str, Any], bound: float | None) -> Fault:
        fault = Fault(kind, time.time(), row["owner"], row["epoch"], bound_s=bound)
        self.faults.append(fault)
        return fault

    def _took_over(self, fault: Fault) -> dict[str, Any]:
        new = self.wait_new_epoch(fault.old_epoch)
        fault.new_owner, fault.new_epoch = new["owner"], new["epoch"]
        acquired = new["acquired_at"].timestamp()
        fault.failover_s = round(acquired - fault.at, 3)
        return new

    def _random_offset(self) -> None:
        """Faults land at random points of the one-second job cycle."""
        time.sleep(self.random.random())

    # -- faults -----------------------------------------------------------------------------

    def kill9(self, replace: bool = True) -> Fault:
        self._random_offset()
        leader, row = self.leader()
        fault = self._fault("kill -9", leader, row, CRASH_BOUND)
        os.kill(leader.pid, signal.SIGKILL)
        self.retire(leader)
        self._took_over(fault)  # before reaping it: a zombie must count as dead
        leader.popen.wait(5)
        if replace:
            self.wait_serving(self.spawn())
        return fault

    def kill9_mid_run(self, job_id: str = "slow") -> Fault:
        """kill -9 the leader while it runs ``job_id``: that fire time must end ``abandoned``."""
        from django_apscheduler_obs.models import DjangoJobExecution

        leader, row = self.leader()

        def running() -> Any:
            return (
                DjangoJobExecution.objects.filter(
                    job_id=job_id, status=DjangoJobExecution.SENT, owner=row["owner"]
                )
                .order_by("-run_time")
                .first()
            )

        deadline = time.monotonic() + 10
        while (execution := _db_retry(running)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{job_id} never ran on the leader")
            time.sleep(0.01)
        fault = self._fault("kill -9 mid-run", leader, row, CRASH_BOUND)
        os.kill(leader.pid, signal.SIGKILL)
        self.retire(leader)
        self._took_over(fault)
        leader.popen.wait(5)
        fault.notes["killed_run"] = execution.run_time.isoformat()
        deadline = time.monotonic() + 5
        while _db_retry(lambda: DjangoJobExecution.objects.get(pk=execution.pk).status) != (
            DjangoJobExecution.ABANDONED
        ):
            if time.monotonic() > deadline:
                raise AssertionError("the killed run was not marked abandoned")
            time.sleep(0.02)
        fault.notes["killed_run_status"] = DjangoJobExecution.ABANDONED
        self.wait_serving(self.spawn())
        return fault

    def sigstop(self, duration: float = 2 * TTL) -> Fault:
        self._random_offset()
        leader, row = self.leader()
        fault = self._fault("SIGSTOP", leader, row, CRASH_BOUND)
        os.kill(leader.pid, signal.SIGSTOP)
        try:
            self._took_over(fault)
            remaining = fault.at + duration - time.time()
            if remaining > 0:
                time.sleep(remaining)  # the pause itself
        finally:
            os.kill(leader.pid, signal.SIGCONT)
        fault.notes["resumed_demoted_s"] = self._demoted(leader)
        return fault

    def freeze(self, point: str, duration: float = 2 * TTL) -> Fault:
        """Freeze the leader's thread at ``point`` (``claim``/``update``) and its lease thread."""
        leader, row = self.leader()
        before = leader.metrics()
        fault = self._fault(f"freeze@{point}", leader, row, CRASH_BOUND + RENEW)
        marker = Path(f"{leader.freeze_file}.frozen")
        with contextlib.suppress(OSError):
            marker.unlink()
        tmp = leader.freeze_file.with_suffix(".tmp")
        tmp.write_text(point)
        tmp.rename(leader.freeze_file)
        try:
            self._wait_file(marker, timeout=10, what=f"a thread frozen at {point!r}")
            fault.notes["frozen_after_s"] = round(time.time() - fault.at, 3)
            self._took_over(fault)
            remaining = fault.at + duration - time.time()
            if remaining > 0:
                time.sleep(remaining)
        finally:
            with contextlib.suppress(OSError):
                leader.freeze_file.unlink()
        fault.notes["resumed_demoted_s"] = self._demoted(leader)
        after = self._settled_metrics(leader)
        for name, labels in [
            ("apscheduler_claims_total", {"result": "fenced"}),
            ("apscheduler_stale_writes_rejected_total", {}),
        ]:
            key = (name, tuple(sorted({"group": "default", **labels}.items())))
            fault.notes[f"old:{name}{labels or ''}"] = after.get(key, 0) - before.get(key, 0)
        new_pid = int(fault.new_owner.rsplit(":", 2)[1])
        for p in self.procs:
            if p.pid == new_pid:  # replays of fire times the frozen leader had claimed
                fault.notes["new:apscheduler_claims_total{'result': 'conflict'}"] = p.metric(
                    "apscheduler_claims_total", result="conflict"
                )
        return fault

    def sigterm(self) -> Fault:
        self._random_offset()
        leader, row = self.leader()
        fault = self._fault("SIGTERM", leader, row, SIGTERM_BOUND)
        leader.popen.terminate()
        self.retire(leader)
        self._took_over(fault)
        fault.notes["exit_code"] = leader.popen.wait(15)
        return fault

    def restart_database(self) -> Fault | None:
        """One fast restart of the PostgreSQL server (the server is shared: once per run)."""
        if self.vendor != "postgresql":
            return None
        host = str(connections["default"].settings_dict.get("HOST") or "")
        if (
            shutil.which("pg_ctlcluster") is None
            or not os.path.isdir("/etc/postgresql")
            or host not in ("", "localhost", "127.0.0.1", "::1")
        ):
            return None  # not a server this machine can restart
        leader, row = self.leader()
        fault = self._fault("PG restart", leader, row, None)
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        t0 = time.monotonic()
        subprocess.run(
            [
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                "-m",
                "fast",
                version,
                "main",
                "restart",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        fault.notes["restart_s"] = round(time.monotonic() - t0, 3)
        connections.close_all()
        leader_after, row_after = self.leader(timeout=30)
        fault.new_owner, fault.new_epoch = row_after["owner"], row_after["epoch"]
        fault.notes["same_leader"] = leader_after is leader
        fault.notes["all_alive"] = all(p.alive() for p in self.procs)
        return fault

    # -- helpers ----------------------------------------------------------------------------

    def _wait_file(self, path: Path, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def _demoted(self, proc: Proc, timeout: float = 5) -> float:
        """Seconds until a resumed old leader reports itself a standby (its leader gauge)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if proc.metric("apscheduler_leader") == 0:
                    return round(time.monotonic() - t0, 3)
            time.sleep(0.02)
        raise AssertionError(f"process {proc.slot} did not demote after resuming")

    def _settled_metrics(self, proc: Proc) -> dict[Any, float]:
        # The resumed threads finish their statements within a moment; read after they did.
        time.sleep(0.5)
        return proc.metrics()

    def alive_all(self) -> bool:
        return all(p.alive() for p in self.procs)

    # -- the audit --------------------------------------------------------------------------

    def audit(self, until: float) -> Audit:
        """Every fire time of every interval job in ``[start, until - 2 s]``: exactly one Ledger
        row, or none with an abandoned execution row."""
        from django_apscheduler_obs.models import DjangoJobExecution
        from tests.testapp.models import Ledger

        job_ids = list(self.intervals)
        first = datetime.fromtimestamp(self.start, tz=UTC)
        last = datetime.fromtimestamp(int(until - 2), tz=UTC)
        expected = []
        for job, interval in self.intervals.items():
            t = first
            while t <= last:
                expected.append((job, t))
                t += timedelta(seconds=interval)
        rows = _db_retry(
            lambda: list(
                Ledger.objects.filter(job_id__in=job_ids).values_list("job_id", "run_time")
            )
        )
        counts = Counter((job, rt.astimezone(UTC)) for job, rt in rows)
        rows_ = _db_retry(
            lambda: list(
                DjangoJobExecution.objects.filter(job_id__in=job_ids).values_list(
                    "job_id", "run_time", "status", "owner", "epoch", "error_type"
                )
            )
        )
        executions = {(job, rt.astimezone(UTC)): status for job, rt, status, *_ in rows_}
        db_failures = {
            (job, rt.astimezone(UTC))
            for job, rt, status, _, _, error_type in rows_
            if status == DjangoJobExecution.ERROR
            and error_type.rsplit(".", 1)[-1] in ("OperationalError", "InterfaceError")
        }
        unfinished = [
            f"{job}@{rt.astimezone(UTC).isoformat()} owner={owner} epoch={epoch} "
            f"ledger={counts.get((job, rt.astimezone(UTC)), 0)}"
            for job, rt, status, owner, epoch, _ in rows_
            if status == DjangoJobExecution.SENT
        ]
        gaps, abandoned_gaps, failed_gaps = [], [], []
        for key in expected:
            if counts.get(key, 0) == 0:
                label = f"{key[0]}@{key[1].isoformat()}={executions.get(key, 'no row')}"
                if executions.get(key) == DjangoJobExecution.ABANDONED:
                    abandoned_gaps.append(label)
                elif key in db_failures:
                    failed_gaps.append(label)
                else:
                    gaps.append(label)
        return Audit(
            jobs=job_ids,
            first=first.isoformat(),
            last=last.isoformat(),
            fire_times=len(expected),
            ledger_rows=sum(counts[k] for k in expected),
            duplicates=sum(n - 1 for n in counts.values() if n > 1),
            duplicated_fire_times=sum(1 for n in counts.values() if n > 1),
            gaps=gaps,
            abandoned_gaps=abandoned_gaps,
            failed_gaps=failed_gaps,
            abandoned_rows=sum(1 for s in executions.values() if s == DjangoJobExecution.ABANDONED),
            statuses=dict(Counter(executions.values())),
            unfinished=unfinished,
        )

    def report(self, audit: Audit | None, path: Path | None = None, **extra: Any) -> str:
        data = {
            "vendor": self.vendor,
            "seed": self.seed,
            "audit": asdict(audit) if audit else None,
            "faults": [{**asdict(f), "within_bound": f.within_bound} for f in self.faults],
            **extra,
        }
        text = json.dumps(data, indent=2, default=str)
        if path is not None:
            path.write_text(text)
        return text
