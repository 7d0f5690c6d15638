"""Scenario 5: job stores with 10,000 and 100,000 jobs, and scheduler RSS."""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import time
from datetime import datetime, timedelta
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import connection
from django.utils import timezone

from benchmarks.harness import (
    BARE,
    LEGACY,
    OURS,
    STATEMENTS,
    Ratio,
    Row,
    Target,
    bulk_insert,
    data_statements,
    db_datetime,
    subject_database,
    timed,
)
from benchmarks.subjects import UTC, clear_tables, job_model, make_job
from django_apscheduler_obs import signing

BASE = datetime(2030, 1, 1, tzinfo=UTC)  # job i is due at BASE + i s


def job_state(scheduler: Any, job_id: str, next_run: datetime) -> dict[str, Any]:
    template = make_job(scheduler, "benchmarks.jobs:noop", job_id, next_run_time=next_run)
    return template.__getstate__()


def populate(subject: str, store: Any, scheduler: Any, n: int, prefix: str = "scale-") -> None:
    """``n`` jobs, each stored exactly as the subject's own store would store it."""
    state = job_state(scheduler, "x", BASE)
    if subject == BARE:
        for i in range(n):
            s = dict(state, id=f"{prefix}{i:06d}", next_run_time=BASE + timedelta(seconds=i))
            job = Job.__new__(Job)
            job.__setstate__(s)
            job._scheduler = scheduler
            job._jobstore_alias = "default"
            store.add_job(job)
        return
    now = db_datetime(timezone.now())

    def rows() -> Any:
        for i in range(n):
            s = dict(state, id=f"{prefix}{i:06d}", next_run_time=BASE + timedelta(seconds=i))
            blob = pickle.dumps(s, pickle.HIGHEST_PROTOCOL)
            nrt = db_datetime(s["next_run_time"])
            if subject == OURS:
                yield (s["id"], nrt, signing.sign(blob), 1, now, "", "")
            else:
                yield (s["id"], nrt, blob)

    cols = ["id", "next_run_time", "job_state"]
    if subject == OURS:
        cols += ["version", "registered_at", "definition_hash", "restore_error"]
    bulk_insert(job_model(subject), cols, rows())
    if connection.vendor == "postgresql":
        with connection.cursor() as c:
            c.execute(f"ANALYZE {connection.ops.quote_name(job_model(subject)._meta.db_table)}")


def make_store(subject: str) -> tuple[Any, Any]:
    scheduler = BackgroundScheduler(timezone=UTC)
    store: Any
    if subject == OURS:
        from django_apscheduler_obs.jobstores import DjangoJobStore

        store = DjangoJobStore()
    elif subject == LEGACY:
        from django_apscheduler.jobstores import DjangoJobStore as LegacyStore

        store = LegacyStore()
    else:
        store = MemoryJobStore()
    store.start(scheduler, "default")
    return store, scheduler


def _stmts(fn: Any) -> int:
    STATEMENTS.start()
    fn()
    return len(data_statements(STATEMENTS.stop()))


def measure_store(subject: str, n: int, cfg: Any) -> dict[str, Any]:
    ms = 1000.0
    store, scheduler = make_store(subject)
    clear_tables(subject)
    t0 = time.perf_counter()
    populate(subject, store, scheduler, n)
    load_s = time.perf_counter() - t0
    adds = cfg.store_adds
    new_jobs = [
        make_job(
            scheduler,
            "benchmarks.jobs:noop",
            f"add-{i:06d}",
            next_run_time=BASE + timedelta(seconds=n // 2 + i + 0.5),
        )
        for i in range(adds)
    ]
    STATEMENTS.start()
    t0 = time.perf_counter()
    for job in new_jobs:
        store.add_job(job)
    add_s = (time.perf_counter() - t0) / adds
    add_stmts = len(data_statements(STATEMENTS.stop())) / adds
    for job in new_jobs:
        store.remove_job(job.id)
    none_at = BASE - timedelta(seconds=1)
    half_at = BASE + timedelta(seconds=n // 2 - 1)
    all_at = BASE + timedelta(seconds=n)
    assert len(store.get_due_jobs(half_at)) == n // 2, "half due"
    big = cfg.repeats_big
    fresh: list[Any] = [None]  # the store the timed read uses

    def new_store() -> None:
        fresh[0] = None
        gc.collect()
        fresh[0] = make_store(subject)[0]

    m: dict[str, Any] = {
        "jobs": n,
        "bulk_load_s": round(load_s, 2),
        "add_ms": round(add_s * ms, 3),
        "add_stmts": round(add_stmts, 2),
        "due_none_ms": timed(lambda: store.get_due_jobs(none_at), cfg.repeats_small).as_dict(ms),
        # Read again as the scheduler reads them: ours serves rows it has verified before.
        "due_half_ms": timed(lambda: store.get_due_jobs(half_at), big).as_dict(ms, 1),
        # Rows a new store has never seen (after a restart, or every job edited elsewhere).
        # A restarted process has one store: the stores of earlier repeats are collected
        # before the clock starts (their schedulers' listeners make cycles, and ours keeps
        # the states it verified, which a collection in the timed read would walk).
        "due_half_first_ms": timed(
            lambda: fresh[0].get_due_jobs(half_at), big, setup=new_store
        ).as_dict(ms, 1),
        "due_all_ms": timed(lambda: store.get_due_jobs(all_at), big).as_dict(ms, 1),
        "next_run_time_ms": timed(store.get_next_run_time, cfg.repeats_small).as_dict(ms),
        "due_none_stmts": _stmts(lambda: store.get_due_jobs(none_at)),
        "next_run_time_stmts": _stmts(store.get_next_run_time),
    }
    return m


def rss_in_subprocess(subject: str, n: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "benchmarks.rss", subject, str(n)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not start and scrape within {timeout:g} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            data["wall_s"] = round(time.perf_counter() - t0, 1)
            return data
    return {"error": "no result"}


def scenario5(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    rows, ratios, targets = [], [], []
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for n in cfg.store_sizes:
        for subject in (BARE, LEGACY, OURS):
            with subject_database(subject):
                m = measure_store(subject, n, cfg)
            results[(subject, n)] = m
            rows.append(Row("5", f"{n:,} jobs", subject, m))
        for metric in (
            "add_ms",
            "due_none_ms",
            "due_half_ms",
            "due_half_first_ms",
            "due_all_ms",
            "next_run_time_ms",
        ):
            ours = results[(OURS, n)][metric]
            legacy = results[(LEGACY, n)][metric]
            ratios.append(
                Ratio(
                    "5",
                    f"{n:,} jobs",
                    metric,
                    ours["median"] if isinstance(ours, dict) else ours,
                    legacy["median"] if isinstance(legacy, dict) else legacy,
                    LEGACY,
                    "lower",
                )
            )
    # RSS of a whole scheduler process holding the largest store (jobs stay in the table).
    n = max(cfg.store_sizes)
    rss: dict[str, dict[str, Any]] = {}
    for subject in (BARE, LEGACY, OURS):
        with subject_database(subject):
            if subject != BARE:
                store, scheduler = make_store(subject)
                clear_tables(subject)
                populate(subject, store, scheduler, n)
            r = rss_in_subprocess(subject, n, cfg.rss_timeout)
        rss[subject] = r
        rows.append(Row("5", f"scheduler process, {n:,} jobs", subject, r))
    if "rss_mib" in rss[OURS] and "rss_mib" in rss[LEGACY]:
        ratios.append(
            Ratio(
                "5",
                f"scheduler process, {n:,} jobs",
                "rss_mib",
                rss[OURS]["rss_mib"],
                rss[LEGACY]["rss_mib"],
                LEGACY,
                "lower",
            )
        )
    sizes = sorted(cfg.store_sizes)
    worse = []
    for n in sizes:
        for metric in ("add_ms", "due_none_ms", "due_half_ms", "due_all_ms", "next_run_time_ms"):
            o, lg = results[(OURS, n)][metric], results[(LEGACY, n)][metric]
            o = o["median"] if isinstance(o, dict) else o
            lg = lg["median"] if isinstance(lg, dict) else lg
            if o > lg * 1.2 and o - lg > 0.2:  # 20 % and 0.2 ms of noise allowed
                worse.append(f"{metric}@{n:,}: {o} vs {lg}")
    if "rss_mib" not in rss[OURS]:
        worse.append(f"RSS: {rss[OURS].get('error')}")
    elif "rss_mib" in rss[LEGACY] and rss[OURS]["rss_mib"] > rss[LEGACY]["rss_mib"] * 1.2:
        worse.append(f"RSS {rss[OURS]['rss_mib']} vs {rss[LEGACY]['rss_mib']} MiB")
    targets.append(
        Target(
            "5",
            "job store no worse than 0.7 (each operation, each size; RSS)",
            not worse,
            "; ".join(worse) or "holds",
        )
    )
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        growth = {
            metric: round(
                results[(OURS, hi)][metric]["median"] / results[(OURS, lo)][metric]["median"], 2
            )
            for metric in ("due_none_ms", "next_run_time_ms")
        }
        targets.append(
            Target(
                "5",
                f"get_next_run_time and nothing-due get_due_jobs O(1): time at {hi:,} / at {lo:,}",
                all(v < 2.0 for v in growth.values()),
                ", ".join(f"{k} x{v}" for k, v in growth.items()),
            )
        )
    return rows, ratios, targets
