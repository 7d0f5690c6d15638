"""Scenario 9: a burst of jobs due in the same second, each subject's real scheduler.

This is where one durable commit per fire time hurts most: 1,000 fire times due at once cost
1,000 claims and 1,000 job writes one after another in the scheduler thread. This package
claims a whole pass in one commit (``passes.py``); the figure is how long after the fire time
the last job started, and the start delay's p99, with every fire time recorded exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from benchmarks.harness import BARE, LEGACY, OURS, Ratio, Row, Target, percentile, subject_database
from benchmarks.subjects import Running, clear_tables, wait_until

INTERVAL = 3600.0  # one fire time per job in the window
FINAL = ("Executed", "Error!", "Missed!")


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _one_burst(subject: str, n: int, lead: float) -> dict[str, Any]:
    from benchmarks import jobs

    with subject_database(subject) as journal:
        clear_tables(subject)
        running = Running(subject, n, INTERVAL, lead, burst=True)
        running.start()
        try:
            if time.time() > running.t_first:
                return {"journal": journal, "error": f"jobs not stored {lead} s before the burst"}
            wait_until(running.t_first)
            all_started = _wait(lambda: len({i for i, _ in jobs.starts}) >= n, 60)
            cutoff = running.t_first
            _wait(lambda: sum(1 for *_, st in running.recorded(cutoff) if st in FINAL) >= n, 30)
            # When the last final status was seen (polled every 50 ms): runs recorded per
            # second in the burst, through the whole real scheduler.
            recorded_s = time.time() - running.t_first
            recorded = running.recorded(cutoff)
            alive = running.alive()
        finally:
            running.stop()
    delays = [t - running.t_first for _, t in jobs.starts]
    keys = Counter((j, rt) for j, rt, _ in recorded)
    executed = {(j, rt) for j, rt, st in recorded if st == "Executed"}
    expected = running.expected(running.t_first)
    return {
        "journal": journal,
        "jobs": n,
        "all_started": all_started,
        "last_start_s": round(max(delays), 3) if delays else None,
        "delay_p50_ms": round(percentile(delays, 50) * 1000, 1),
        "delay_p99_ms": round(percentile(delays, 99) * 1000, 1),
        "recorded_s": round(recorded_s, 2),
        "recorded_runs_per_s": round(n / recorded_s) if recorded_s > 0 else None,
        "recorded_once": len(expected & executed),
        "missing": len(expected - executed),
        "duplicates": sum(c - 1 for c in keys.values() if c > 1),
        "thread_alive": alive,
    }


def scenario9(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    rows, ratios, targets = [], [], []
    n = cfg.burst_jobs
    case = f"{n:,} jobs due in the same second"
    results = {}
    for subject in (BARE, LEGACY, OURS):
        results[subject] = r = _one_burst(subject, n, cfg.burst_lead_seconds)
        rows.append(Row("9", case, subject, r))
    ours, legacy = results[OURS], results[LEGACY]
    if "error" in ours or "error" in legacy:
        targets.append(Target("9", "burst", None, f"{ours.get('error')} {legacy.get('error')}"))
        return rows, ratios, targets
    for metric in ("delay_p99_ms", "last_start_s"):
        ratios.append(Ratio("9", case, metric, ours[metric], legacy[metric], LEGACY, "lower"))
        ratios.append(Ratio("9", case, metric, ours[metric], results[BARE][metric], BARE, "lower"))
    ratios.append(
        Ratio(
            "9",
            case,
            "recorded_runs_per_s",
            ours["recorded_runs_per_s"],
            legacy["recorded_runs_per_s"],
            LEGACY,
            "higher",
        )
    )
    if legacy["missing"] == 0 and legacy["recorded_runs_per_s"]:
        speedup = ours["recorded_runs_per_s"] / legacy["recorded_runs_per_s"]
        targets.append(
            Target(
                "9",
                f"burst of {n:,}: recorded runs per second >= 5x 0.7",
                speedup >= 5,
                f"{speedup:.1f}x ({ours['recorded_runs_per_s']} vs "
                f"{legacy['recorded_runs_per_s']}/s, all {n:,} final after "
                f"{ours['recorded_s']} vs {legacy['recorded_s']} s)",
            )
        )
    targets.append(
        Target(
            "9",
            f"burst of {n:,}: every fire time recorded once, start delay p99 < 1 s",
            ours["missing"] == 0 and ours["duplicates"] == 0 and ours["delay_p99_ms"] < 1000,
            f"obs p99 {ours['delay_p99_ms']} ms, last start {ours['last_start_s']} s, "
            f"{ours['recorded_once']}/{n} recorded once, {ours['duplicates']} duplicates; "
            f"0.7 p99 {legacy['delay_p99_ms']} ms, last start {legacy['last_start_s']} s, "
            f"{legacy['missing']} missing; bare p99 {results[BARE]['delay_p99_ms']} ms",
        )
    )
    return rows, ratios, targets
