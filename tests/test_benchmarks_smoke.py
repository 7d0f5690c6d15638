"""The benchmark harness runs end to end (smoke sizes) and reports every scenario for every
subject. Performance is not asserted here: ``benchmarks/README.md`` holds the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"1", "2", "3", "4", "5", "6", "7", "8", "9"}
SUBJECTS = {"obs", "dja-0.7", "bare"}


@pytest.mark.once
@pytest.mark.slow
def test_smoke_run_reports_every_scenario_for_every_subject(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "DJANGO_"))}
    env["BENCH_SQLITE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--db", "sqlite", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["failures"] == {}
    seen: dict[str, set[str]] = {}
    for row in data["rows"]:
        seen.setdefault(row["scenario"], set()).add(row["subject"])
    assert set(seen) == SCENARIOS
    for scenario, subjects in seen.items():
        assert subjects == SUBJECTS, (scenario, subjects)
    assert {t["scenario"] for t in data["targets"]} == SCENARIOS
    assert data["meta"]["smoke"] is True
    # The harness saw the subjects work, not just print: runs happened and were recorded.
    s1 = {r["subject"]: r["metrics"] for r in data["rows"] if r["scenario"] == "1"}
    assert s1["bare"]["recorded_once"] > 0
    assert s1["obs"]["recorded_once"] > 0
    s9 = {r["subject"]: r["metrics"] for r in data["rows"] if r["scenario"] == "9"}
    assert s9["obs"]["recorded_once"] == s9["obs"]["jobs"] > 0, s9["obs"]


@pytest.mark.once
@pytest.mark.slow
def test_worker_benchmark_smoke_run(tmp_path: Path) -> None:
    """``python -m benchmarks.workers --smoke``: both of this package's subjects run every
    fire time once through a real Celery worker on Redis; django-celery-beat runs when it is
    installed (its Django pin keeps it out of the test extras) and says so when it is not."""
    out = tmp_path / "workers.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "DJANGO_"))}
    env["BENCH_SQLITE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.workers", "--smoke", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["case"].split(":")[0], r["subject"]): r["metrics"] for r in data["rows"]}
    for case in ("sustained", "burst"):
        for subject in ("obs-local", "obs-celery"):
            m = rows[(case, subject)]
            assert m["runs"] == m["expected"] > 0 and m["duplicates"] == 0, (case, subject, m)
        beat = rows[(case, "celery-beat")]
        assert beat.get("runs") == beat.get("expected") or "not installed" in beat["error"]
    assert rows[("burst", "obs-celery")]["queue_wait_p99_ms"] is not None
