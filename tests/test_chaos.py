"""Chaos suite: three ``runapscheduler`` processes, one leader, real faults (design §11.2).

Runs on the database of the test run (SQLite WAL file, PostgreSQL or MariaDB). Three jobs
fire every second from a whole second, ``coalesce=False``, ``misfire_grace_time=60``; each run
appends a row to ``Ledger`` (no unique constraint). The timeline: kill -9 of the leader (and a
replacement), SIGSTOP of the leader for 2 × TTL three times, a leader frozen before its claim
and one frozen inside its job-state write, one PostgreSQL restart (PostgreSQL only), SIGTERM of
the leader. Then every job and every fire time in ``[first, end - 2 s]`` must have exactly one
Ledger row (or none with an ``Abandoned`` execution), and every failover must be within its
bound. Two negative controls prove the harness can fail: without claims it must see
duplicates, and with change polling off an added job must not run in the window.

The JSON report of each run is written next to the process logs (``tmp_path``) and, when
``CHAOS_REPORT_DIR`` is set, there too. ``CHAOS_DB_RESTART=0`` skips the PostgreSQL restart
(the server may be shared with other test runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import CHANGE_POLL, ROOT, Cluster, _db_retry

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

UTC = timezone.utc


@pytest.fixture
def cluster_factory(transactional_db: Any, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def factory(name: str = "cluster", **kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_path / name, **kwargs)
        clusters.append(cluster)
        return cluster

    yield factory
    for cluster in clusters:  # before the test database is flushed or dropped
        cluster.stop_all()


def _save(cluster: Cluster, name: str, text: str) -> None:
    (cluster.workdir / f"{name}.json").write_text(text)
    target = os.environ.get("CHAOS_REPORT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / f"{name}-{cluster.vendor}.json").write_text(text)
    print(f"\n=== {name} ({cluster.vendor}) ===\n{text}")


def _ledger_count(job_ids: list[str], since: datetime) -> dict[str, int]:
    from tests.testapp.models import Ledger

    rows = _db_retry(
        lambda: list(
            Ledger.objects.filter(job_id__in=job_ids, run_time__gte=since).values_list(
                "job_id", flat=True
            )
        )
    )
    return {job: rows.count(job) for job in job_ids}


def wait_running(cluster: Cluster, timeout: float = 20) -> None:
    """The group is running again: every job has a Ledger row for a fire time from now on."""
    since = datetime.fromtimestamp(int(time.time()), tz=UTC)
    jobs = [f"every-second-{i}" for i in range(cluster.job_count)]
    deadline = time.monotonic() + timeout
    while not all(_ledger_count(jobs, since).values()):
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not running again within {timeout}s")
        time.sleep(0.05)


def test_chaos_timeline(cluster_factory):
    cluster = cluster_factory("timeline", slow_job=True)
    cluster.spawn_many(3)
    cluster.leader()
    wait_running(cluster, timeout=cluster.start - time.time() + 15)

    cluster.kill9(replace=True)
    wait_running(cluster)
    cluster.kill9_mid_run("slow")
    wait_running(cluster)
    for _ in range(3):
        cluster.sigstop()
        wait_running(cluster)
    cluster.freeze("claim")
    wait_running(cluster)
    cluster.freeze("update")
    wait_running(cluster)
    if os.environ.get("CHAOS_DB_RESTART", "1") != "0":
        cluster.restart_database()
        wait_running(cluster, timeout=30)
    cluster.sigterm()
    wait_running(cluster)
    time.sleep(2.5)  # the audit window ends 2 s before the end: let the last fire times run
    end = time.time()
    alive = cluster.alive_all()
    audit = cluster.audit(end)
    cluster.stop_all()
    _save(cluster, "chaos-timeline", cluster.report(audit, alive=alive))

    assert alive, "a scheduler process died"
    assert audit.duplicates == 0, audit
    assert not audit.gaps, audit
    assert audit.fire_times >= 3 * 30
    assert audit.abandoned_gaps, "the run killed mid-way is a gap recorded as abandoned"
    by_kind = {f.kind: f for f in cluster.faults}
    for fault in cluster.faults:
        assert fault.within_bound, fault
        if fault.kind != "PG restart":
            assert fault.new_epoch == fault.old_epoch + 1, fault
    # The frozen leaders were stopped by the database, not by their own clocks.
    claim_freeze = by_kind["freeze@claim"].notes
    assert claim_freeze["old:apscheduler_claims_total{'result': 'fenced'}"] >= 1, claim_freeze
    update_freeze = by_kind["freeze@update"].notes
    assert update_freeze["old:apscheduler_stale_writes_rejected_total"] >= 1, update_freeze
    if "PG restart" in by_kind:
        assert by_kind["PG restart"].notes["all_alive"]


def test_negative_control_without_claims_the_audit_reports_duplicates(cluster_factory):
    """DAO_UNSAFE_NO_CLAIM=1 (test-only hook): every process acts, nothing claims."""
    cluster = cluster_factory("unsafe", env={"DAO_UNSAFE_NO_CLAIM": "1"})
    cluster.spawn_many(3)
    wait_running(cluster, timeout=cluster.start - time.time() + 15)
    time.sleep(8)  # a few dozen fire times
    end = time.time()
    audit = cluster.audit(end)
    cluster.stop_all()
    _save(cluster, "chaos-negative-unsafe", cluster.report(audit))
    assert audit.duplicates > 0, "the harness must detect duplicate runs"


def _add_job_elsewhere(cluster: Cluster, job_id: str, fire: float) -> None:
    """A web process or shell: no scheduler, a plain job store, its own connection."""
    subprocess.run(
        [sys.executable, "-m", "tests.chaos.add_job", job_id, str(fire)],
        cwd=ROOT,
        env=cluster.env(99),
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.mark.parametrize("polling", [True, False], ids=["change-poll", "no-change-poll"])
def test_a_job_added_by_another_process_runs_at_its_first_fire_time(cluster_factory, polling):
    from django_apscheduler_obs.models import DjangoJobExecution
    from tests.testapp.models import Ledger

    # Only an hourly job, started 10 minutes ago: the leader sleeps for ~50 minutes (capped
    # at the 60 s resync), so nothing but the change poll can wake it.
    cluster = cluster_factory(
        "change" if polling else "no-change",
        jobs="hourly",
        start=int(time.time()) - 600,
        extra_args=() if polling else ("--no-change-poll",),
    )
    cluster.spawn_many(3)
    leader, _ = cluster.leader()
    time.sleep(1)  # the leader's pass after its gain is done; it sleeps on the hourly job
    fire = float(int(time.time()) + 3)
    _add_job_elsewhere(cluster, "added", fire)
    assert time.time() < fire, "added before its fire time"
    window = fire + CHANGE_POLL + 1
    executed: DjangoJobExecution | None = None
    while time.time() < window + 1:
        executed = _db_retry(lambda: DjangoJobExecution.objects.filter(job_id="added").first())
        if executed is not None and executed.status != DjangoJobExecution.SENT:
            break
        time.sleep(0.05)
    ran = Ledger.objects.filter(job_id="added").count()
    lag = (
        (executed.started.timestamp() - fire) if executed is not None and executed.started else None
    )
    cluster.stop_all()
    _save(
        cluster,
        f"chaos-{'change' if polling else 'negative-no-change-poll'}",
        cluster.report(
            None,
            added_fire=datetime.fromtimestamp(fire, tz=UTC).isoformat(),
            lag_s=None if lag is None else round(lag, 3),
            ledger_rows=ran,
            bound_s=CHANGE_POLL + 1,
        ),
    )
    if polling:
        assert executed is not None and executed.status == DjangoJobExecution.SUCCESS
        assert ran == 1
        assert 0 <= lag < CHANGE_POLL + 1, lag
    else:
        assert executed is None and ran == 0, "with change polling off it must not have run"
