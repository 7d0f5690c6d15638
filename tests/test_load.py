"""Load: 20 runs/s for 30 s through the real runtime, on the configured database.

Every fire time must be recorded exactly once and run exactly once (the ledger has no unique
constraint, so a duplicate run would show there), the scheduler thread must stay alive, and
the start delay stays bounded. django-apscheduler 0.7's scheduler thread dies on SQLite under
this load (``database is locked`` escapes ``update_job``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from django.db import connection

from django_apscheduler_obs.models import DjangoJobExecution
from tests.conftest import wait_for
from tests.testapp.models import Ledger

JOBS = 20
INTERVAL = 1.0  # s: 20 jobs x 1/s = 20 runs/s
DURATION = 30  # s of fire times per job

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_20_runs_per_second_for_30_seconds(make_runtime, capsys):
    rt = make_runtime(max_workers=20)
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=3)
    expected = {start + timedelta(seconds=INTERVAL * i) for i in range(DURATION)}
    for n in range(JOBS):
        rt.scheduler.add_job(
            "tests.jobs:ledger",
            "interval",
            seconds=INTERVAL,
            start_date=start,  # all 20 due in the same instant: the worst burst
            end_date=start + timedelta(seconds=DURATION - INTERVAL / 2),
            id=f"load-{n:02d}",
            coalesce=False,
            max_instances=3,
        )
    t0 = time.monotonic()
    total = JOBS * DURATION
    ids = [f"load-{n:02d}" for n in range(JOBS)]
    final = DjangoJobExecution.objects.filter(
        job_id__in=ids, status__in=DjangoJobExecution.FINAL_STATUSES
    )
    wait_for(
        lambda: final.count() >= total or not rt.scheduler._thread.is_alive(),
        timeout=DURATION + 45,
        interval=0.5,
        message=f"{total} final rows",
    )
    wall = time.monotonic() - t0
    assert rt.scheduler._thread.is_alive(), "the scheduler thread died"
    assert rt.lease.is_leader()
    wait_for(lambda: rt.history.pending == 0, timeout=15, message="history buffer empty")

    rows = list(
        DjangoJobExecution.objects.filter(job_id__in=ids).values_list(
            "job_id", "run_time", "status", "start_delay"
        )
    )
    by_job: dict[str, list[datetime]] = {}
    for job_id, run_time, _, _ in rows:
        by_job.setdefault(job_id, []).append(run_time)
    statuses = Counter(status for _, _, status, _ in rows)
    delays = sorted(d for *_, d in rows if d is not None)
    ledger = Counter(Ledger.objects.filter(job_id__in=ids).values_list("job_id", "run_time"))
    report = {
        "database": connection.vendor,
        "fire_times": total,
        "rows": len(rows),
        "runs": sum(ledger.values()),
        "statuses": dict(statuses),
        "max_start_delay_s": round(max(delays), 4) if delays else None,
        "p50_start_delay_s": round(statistics.median(delays), 4) if delays else None,
        "p99_start_delay_s": round(delays[int(len(delays) * 0.99) - 1], 4) if delays else None,
        "wall_s": round(wall, 1),
    }
    artifacts = Path(os.environ.get("ARTIFACTS_DIR", ".artifacts"))
    artifacts.mkdir(exist_ok=True)
    (artifacts / f"load-{connection.vendor}.json").write_text(json.dumps(report, indent=2))
    with capsys.disabled():
        print(f"\nload report: {json.dumps(report)}")

    assert len(by_job) == JOBS
    for job_id, run_times in by_job.items():
        assert len(run_times) == len(set(run_times)), f"{job_id}: duplicate rows"
        assert set(run_times) == expected, f"{job_id}: missing or extra fire times"
    assert statuses == {DjangoJobExecution.SUCCESS: total}, statuses
    assert all(count == 1 for count in ledger.values()), "a fire time ran twice"
    assert set(ledger) == {(j, rt_) for j in by_job for rt_ in expected}
    assert report["max_start_delay_s"] < 10
