"""Start the example project's ``runapscheduler`` as a real process, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANAGE = REPO / "example" / "manage.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class DemoProcess:
    """``example/manage.py runapscheduler`` with ``DEMO_FAST=1`` on its own SQLite file."""

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.db = workdir / "demo.sqlite3"
        self.port = free_port()
        self.env = {
            **os.environ,
            "DEMO_FAST": "1",
            "DATABASE_URL": f"sqlite:///{self.db}",
            "DJANGO_SETTINGS_MODULE": "demo.settings",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.env.pop("DJANGO_SETTINGS_MODULE_OVERRIDE", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "scheduler.log"
        self.manage("migrate", "--no-input", "-v0")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, str(MANAGE), *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def start(self, timeout: float = 30) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, str(MANAGE), "runapscheduler", "--metrics-port", str(self.port),
             "--metrics-addr", "127.0.0.1"],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"scheduler exited: {self.log.read_text()[-3000:]}")
            try:
                if http_get(f"{self.url}/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"scheduler not healthy in {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 40) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def scrape(self, openmetrics: bool = False) -> str:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
        status, body = http_get(f"{self.url}/metrics", headers)
        assert status == 200
        return body.decode()
