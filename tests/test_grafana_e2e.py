"""End to end: the demo scheduler, scraped by a real Prometheus that loads the shipped rules.

Asserts what the offline checks cannot: every dashboard query returns data from a live
scheduler (so names, labels and joins match what the package really exports) and the demo's
failing, starved and overlapping jobs fire their alerts while the health alerts stay quiet.
Everything waits on Prometheus' HTTP API with one shared deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.demo_process import MANAGE, DemoProcess, free_port, http_get
from tests.test_grafana import DASHBOARDS, RULES, metric_names_module

pytestmark = [pytest.mark.slow, pytest.mark.once]

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET = 90.0  # seconds for all polling once Prometheus scrapes the demo
STARTUP_TIMEOUT = 60.0

#: Grafana variables, set to match everything; ranges sized for a 1 s scrape interval.
E2E_VARIABLES = {
    "__rate_interval": "20s",
    "__range": "5m",
    "__interval": "2s",
    "job": ".*",
    "instance": ".*",
    "job_id": ".*",
}

#: Queries that legitimately return nothing in a one-process demo, by source (panel ids left out).
NO_DATA_IN_DEMO = {
    "apscheduler-overview.json: 'Failover time p95' A": (
        "the failover histogram gets its series at the first failover; the demo has one process"
    ),
    "apscheduler-overview.json: annotation 'Leader changes'": (
        "the lease epoch does not change after the first scrape in a one-process demo"
    ),
    "apscheduler-job.json: annotation 'Leader changes'": (
        "the lease epoch does not change after the first scrape in a one-process demo"
    ),
}

#: Alerts that must not even be pending while the demo runs.
QUIET_IN_DEMO = (
    "ApschedulerTargetDown",
    "ApschedulerTargetAbsent",
    "ApschedulerSchedulerNotRunning",
    "ApschedulerHeartbeatStale",
    "ApschedulerMultipleActiveSchedulers",
    "ApschedulerNoLeader",
    "ApschedulerClaimsFenced",
    "ApschedulerExecutionHistoryWriteErrors",
    "ApschedulerClockSkew",
    "ApschedulerRunsAbandoned",
    "ApschedulerWorkerBacklog",
    "ApschedulerJobRunsLost",
)

T = TypeVar("T")


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return f"--- last {lines} lines of {path} ---\n" + "\n".join(text[-lines:])


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, args: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
        with log.open("wb") as out:
            popen = subprocess.Popen(
                args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return cls(popen, log)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL; only this process, by its pid."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=15)


def poll(
    check: Callable[[], T | None], deadline: float, describe: Callable[[], str], every: float = 0.5
) -> T:
    """Call ``check`` until it returns a value other than None; fail at ``deadline``."""
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(describe())
        time.sleep(every)  # pacing between polls of the HTTP API, not a wait for an event


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is required in CI (apt-get install prometheus)")
        pytest.skip(f"{binary} is not installed (apt-get install prometheus)")
    return path


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """The demo project in fast mode (migrated, on its own SQLite file), serving metrics."""
    if not MANAGE.exists():
        pytest.fail(f"{MANAGE} is missing")
    scheduler = DemoProcess(tmp_path_factory.mktemp("demo"))
    try:
        scheduler.start(timeout=STARTUP_TIMEOUT)
        yield scheduler
    finally:
        if scheduler.proc is not None and scheduler.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # stop() killed it then
                scheduler.stop(timeout=20)


@dataclass
class Prometheus:
    url: str
    proc: Process
    scheduler: DemoProcess
    deadline: float

    def api(self, path: str, **params: str) -> Any:
        """GET/POST an API endpoint; a query error fails the test with Prometheus' message."""
        data = urllib.parse.urlencode(params).encode() if params else None
        request = urllib.request.Request(self.url + path, data=data)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            pytest.fail(f"{path} {params}: HTTP {exc.code} {exc.read().decode(errors='replace')}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/query", query=expr)["result"])

    def logs(self) -> str:
        return tail(self.scheduler.log) + "\n" + tail(self.proc.log, 20)


@pytest.fixture(scope="module")
def prometheus(demo: DemoProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus scraping the demo every second and evaluating the shipped rules."""
    binary = require("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "apscheduler", "static_configs": [{"targets": [f"127.0.0.1:{demo.port}"]}]}
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    web = f"127.0.0.1:{free_port()}"
    proc = Process.start(
        [binary, f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={web}",
         "--enable-feature=exemplar-storage", "--log.level=warn"],
        workdir / "prometheus.log",
    )  # fmt: skip
    try:
        prom = Prometheus(f"http://{web}", proc, demo, 0.0)

        def target_up() -> bool | None:
            assert proc.alive(), "prometheus exited\n" + tail(proc.log)
            try:
                if http_get(prom.url + "/-/ready")[0] != 200:
                    return None
            except OSError:  # not listening yet
                return None
            return True if prom.query('up{job="apscheduler"} == 1') else None

        poll(target_up, time.monotonic() + STARTUP_TIMEOUT,
             lambda: "prometheus never scraped the demo\n" + prom.logs())  # fmt: skip
        prom.deadline = time.monotonic() + TOTAL_BUDGET
        yield prom
    finally:
        proc.stop()


# -- tests ---------------------------------------------------------------------------------------


def test_every_dashboard_query_returns_data(prometheus: Prometheus) -> None:
    mod = metric_names_module()
    exprs = {
        re.sub(r"panel \d+ ", "", e.source): mod.substitute(e.expr, E2E_VARIABLES)
        for path in DASHBOARDS.values()
        for e in mod.dashboard_exprs(path)
    }
    assert set(NO_DATA_IN_DEMO) <= set(exprs), "stale entries in NO_DATA_IN_DEMO"
    pending = {source: expr for source, expr in exprs.items() if source not in NO_DATA_IN_DEMO}

    def all_seen() -> bool | None:
        for source, expr in list(pending.items()):
            if prometheus.query(expr):
                del pending[source]
        return True if not pending else None

    poll(
        all_seen, prometheus.deadline,
        lambda: "dashboard queries without data:\n"
        + "\n".join(f"  {source}\n    {expr}" for source, expr in pending.items())
        + "\n" + prometheus.logs(),
        every=1.0,
    )  # fmt: skip


def test_demo_alerts(prometheus: Prometheus) -> None:
    expected_firing = {
        ("ApschedulerJobFailing", "demo_fail"),
        ("ApschedulerJobMissedRuns", "demo_missed"),
        ("ApschedulerJobMaxInstancesReached", "demo_overlap"),
    }
    alerts: list[dict[str, Any]] = []

    def active() -> set[tuple[str, str, str]]:
        return {
            (a["labels"]["alertname"], a["labels"].get("job_id", ""), a["state"]) for a in alerts
        }

    def fired() -> bool | None:
        alerts[:] = prometheus.api("/api/v1/alerts")["alerts"]
        got = active()
        firing = {(name, job_id) for name, job_id, state in got if state == "firing"}
        # The failure ratio of demo_fail is 100 %; its 15m "for" keeps it pending here.
        high_rate = {
            ("ApschedulerJobHighFailureRate", "demo_fail", s) for s in ("pending", "firing")
        }
        return True if expected_firing <= firing and got & high_rate else None

    poll(fired, prometheus.deadline,
         lambda: f"expected firing {sorted(expected_firing)}, got {sorted(active())}\n"
         + prometheus.logs())  # fmt: skip

    noisy = {(n, j, s) for n, j, s in active() if n in QUIET_IN_DEMO}
    noisy |= {
        (n, j, s) for n, j, s in active() if n == "ApschedulerJobFailing" and j != "demo_fail"
    }
    assert not noisy, f"alerts that must stay quiet in the demo: {sorted(noisy)}"
    for alert in alerts:
        assert alert["annotations"]["runbook_url"].endswith(alert["labels"]["alertname"].lower())
