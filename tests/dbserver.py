"""Stop and start the machine's PostgreSQL or MariaDB server, for outage tests.

The test settings' database decides which. Skipped where this process may not control the
server; failed instead under CI=true, where every outage test must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from django.db import connection

from tests.conftest import IN_CI, wait_for


def _run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


class Postgres:
    name = "PostgreSQL"

    def __init__(self) -> None:
        versions = sorted(os.listdir("/etc/postgresql")) if Path("/etc/postgresql").is_dir() else []
        self.version = versions[-1] if versions else None

    def controllable(self) -> str | None:
        if not shutil.which("pg_ctlcluster") or self.version is None:
            return "pg_ctlcluster or /etc/postgresql is missing"
        if os.geteuid() != 0:
            return "not root: cannot restart the cluster"
        return None

    def ready(self) -> bool:
        return _run("pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q", timeout=5).returncode == 0

    def stop(self) -> None:
        ctl = ("pg_ctlcluster", "--skip-systemctl-redirect", str(self.version), "main")
        result = _run(*ctl, "stop", "-m", "fast")
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        ctl = ("pg_ctlcluster", "--skip-systemctl-redirect", str(self.version), "main")
        _run(*ctl, "start", timeout=120)
        wait_for(self.ready, timeout=60, interval=0.2, message="PostgreSQL up")


class MariaDB:
    name = "MariaDB"

    def controllable(self) -> str | None:
        if not (shutil.which("mysqladmin") and shutil.which("start-stop-daemon")):
            return "mysqladmin or start-stop-daemon is missing"
        if not Path("/usr/sbin/mariadbd").exists():
            return "/usr/sbin/mariadbd is missing"
        if os.geteuid() != 0:
            return "not root: cannot restart the server"
        return None

    def ready(self) -> bool:
        return (
            _run("mysqladmin", "-h", "127.0.0.1", "-u", "root", "ping", timeout=5).returncode == 0
        )

    def stop(self) -> None:
        result = _run("mysqladmin", "-h", "127.0.0.1", "-u", "root", "shutdown")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: not self.ready(), timeout=20, interval=0.1, message="MariaDB down")

    def start(self) -> None:
        # --pidfile: another mariadbd on the machine (a private instance on another port)
        # must not make start-stop-daemon believe this server is already running.
        _run(
            "start-stop-daemon", "--start", "--oknodo", "--background",
            "--pidfile", "/run/mysqld/mysqld.pid", "--exec", "/usr/sbin/mariadbd",
        )  # fmt: skip
        wait_for(self.ready, timeout=60, interval=0.2, message="MariaDB up")


def server_for_this_database() -> Postgres | MariaDB:
    vendor = connection.vendor
    server: Postgres | MariaDB
    if vendor == "postgresql":
        server = Postgres()
    elif vendor == "mysql":
        server = MariaDB()
    else:
        pytest.skip(f"restarts PostgreSQL or MariaDB; this run uses {vendor}")
    problem = server.controllable()
    if problem is None and not server.ready():
        problem = f"{server.name} is not reachable"
    if problem:
        if IN_CI:
            pytest.fail(f"CI must run the {server.name} outage test: {problem}")
        pytest.skip(problem)
    return server
