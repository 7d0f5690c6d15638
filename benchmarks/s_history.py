"""Scenarios 7 and 8: a large execution history: cleanup, and the admin pages over it."""

from __future__ import annotations

import pickle
import time
from datetime import datetime, timedelta
from typing import Any

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
    Timing,
    bulk_insert,
    data_statements,
    db_datetime,
    subject_database,
    truncate,
)
from benchmarks.s_store import BASE, job_state
from benchmarks.subjects import UTC, execution_model, job_model

HISTORY_JOBS = 100
RETENTION = timedelta(days=7)
SPAN = timedelta(days=14)  # rows spread over 14 days: half older than the retention


def _analyze(model: Any) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as c:
            c.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


def ensure_jobs(subject: str, count: int) -> None:
    """Jobs ``hist-000`` .. up to ``count`` (valid states, so admin pages can describe them)."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from django_apscheduler_obs import signing

    model = job_model(subject)
    have = set(model.objects.filter(id__startswith="hist-").values_list("id", flat=True))
    scheduler = BackgroundScheduler(timezone=UTC)
    state = job_state(scheduler, "x", BASE)
    now = db_datetime(timezone.now())
    rows = []
    for i in range(count):
        job_id = f"hist-{i:03d}"
        if job_id in have:
            continue
        blob = pickle.dumps(dict(state, id=job_id), pickle.HIGHEST_PROTOCOL)
        nrt = db_datetime(BASE + timedelta(minutes=i))
        if subject == OURS:
            rows.append((job_id, nrt, signing.sign(blob), 1, now, "", ""))
        else:
            rows.append((job_id, nrt, blob))
    cols = ["id", "next_run_time", "job_state"]
    if subject == OURS:
        cols += ["version", "registered_at", "definition_hash", "restore_error"]
    if rows:
        bulk_insert(model, cols, rows)
        _analyze(model)


def drop_jobs_beyond(subject: str, count: int) -> None:
    model = job_model(subject)
    model.objects.filter(id__startswith="hist-").filter(id__gte=f"hist-{count:03d}").delete()


def execution_columns(subject: str) -> list[str]:
    cols = ["job_id", "status", "run_time", "duration", "finished", "exception", "traceback"]
    if subject == OURS:
        cols += ["started", "start_delay", "error_type", "trace_id", "span_id", "owner"]
        cols += ["epoch", "trigger_source"]
    return cols


def execution_row(subject: str, job_id: str, rt: datetime, error: bool) -> tuple[Any, ...]:
    """One finished run of 0.25 s at ``rt``, in the order of ``execution_columns``."""
    status = "Error!" if error else "Executed"
    finished = (rt + timedelta(seconds=0.25)).timestamp()
    common = (job_id, status, db_datetime(rt), 0.25)
    exc = ("boom" if error else None, "Traceback ..." if error else None)
    if subject != OURS:
        return (*common, round(finished, 2), *exc)
    return (
        *common,
        round(finished, 6),
        *exc,
        db_datetime(rt + timedelta(milliseconds=3)),
        0.003,
        "ValueError" if error else "",
        "",
        "",
        "bench:1:abc",
        1,
        "schedule",
    )


def ensure_history(subject: str, total: int) -> float:
    """``total`` execution rows over ``HISTORY_JOBS`` jobs and 14 days; returns load seconds."""
    model = execution_model(subject)
    if model.objects.count() == total:
        return 0.0
    truncate(model)
    ensure_jobs(subject, HISTORY_JOBS)
    now = timezone.now()
    start = now - SPAN
    step = SPAN / total
    t0 = time.perf_counter()

    def rows() -> Any:
        for i in range(total):
            yield execution_row(
                subject, f"hist-{i % HISTORY_JOBS:03d}", start + step * i, i % 50 == 0
            )

    bulk_insert(model, execution_columns(subject), rows())
    _analyze(model)
    return time.perf_counter() - t0


# -- scenario 8: admin ---------------------------------------------------------------------


def _client() -> Any:
    from django.contrib.auth import get_user_model
    from django.test import Client

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench").first()
    if user is None:
        user = user_model.objects.create_superuser("bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(user)
    return client


def _page(client: Any, url: str, repeats: int) -> dict[str, Any]:
    response = client.get(url)  # warm-up (template loading, first-query costs)
    assert response.status_code == 200, (url, response.status_code)
    t = Timing()
    stmts: list[Any] = []
    for _ in range(repeats):
        STATEMENTS.start()
        t0 = time.perf_counter()
        response = client.get(url)
        t.values.append(time.perf_counter() - t0)
        stmts = data_statements(STATEMENTS.stop())
    slowest = max(stmts, key=lambda s: s.seconds) if stmts else None
    return {
        "ms": t.as_dict(1000, 1),
        "statements": len(stmts),
        "slowest_stmt_ms": round(slowest.seconds * 1000, 1) if slowest else None,
        "slowest_stmt": slowest.sql[:90] if slowest else None,
        "bytes": len(response.content),
    }


FEW_RUNS = 5  # runs per job of the "little history" case


def ensure_few_runs(subject: str, jobs: int, runs: int = FEW_RUNS) -> None:
    """Replace the history with ``runs`` recent runs of each of ``jobs`` jobs (1 in 10 fails)."""
    model = execution_model(subject)
    truncate(model)
    now = timezone.now()
    rows = [
        execution_row(
            subject,
            f"hist-{j:03d}",
            now - timedelta(minutes=10 * (k + 1), seconds=j),
            (j + k) % 10 == 0,
        )
        for j in range(jobs)
        for k in range(runs)
    ]
    bulk_insert(model, execution_columns(subject), rows)
    _analyze(model)


PAGES = (("job list", "djangojob"), ("execution list", "djangojobexecution"))


def scenario8(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    """The admin's job and execution lists, with a few runs per job, then ``history_rows``.

    The little history goes first: the large one is then left for scenario 7.
    """
    rows, ratios, targets = [], [], []
    total = cfg.history_rows
    histories = [f"{FEW_RUNS} runs per job", f"{total:,} executions"]
    pages: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for subject in (LEGACY, OURS):
        app = "django_apscheduler_obs" if subject == OURS else "django_apscheduler"
        with subject_database(subject):
            # Only the admin's own jobs: jobs left by other scenarios (scenario 5's 100,000)
            # would fill the execution list's job filter of one subject and not the other.
            stray = job_model(subject).objects.exclude(id__startswith="hist-")
            stray._raw_delete(stray.db)
            client = _client()
            for history in histories:
                load = 0.0
                if history == histories[1]:
                    ensure_jobs(subject, HISTORY_JOBS)
                    load = ensure_history(subject, total)
                for jobs in cfg.admin_jobs:
                    drop_jobs_beyond(subject, jobs)
                    ensure_jobs(subject, jobs)
                    if history == histories[0]:
                        ensure_few_runs(subject, jobs)
                    for page, model in PAGES:
                        m = _page(client, f"/admin/{app}/{model}/", cfg.repeats)
                        m["history_rows"] = total if history == histories[1] else FEW_RUNS * jobs
                        if load:
                            m["history_load_s"] = round(load, 1)
                            load = 0.0
                        pages[(subject, history, jobs, page)] = m
                        rows.append(Row("8", _case(page, jobs, history), subject, m))
    for history in histories:
        for jobs in cfg.admin_jobs:
            for page, _model in PAGES:
                case = _case(page, jobs, history)
                rows.append(Row("8", case, BARE, {"note": "no admin"}))
                ratios.append(
                    Ratio(
                        "8",
                        case,
                        "ms",
                        pages[(OURS, history, jobs, page)]["ms"]["median"],
                        pages[(LEGACY, history, jobs, page)]["ms"]["median"],
                        LEGACY,
                        "lower",
                    )
                )
    lo, hi = min(cfg.admin_jobs), max(cfg.admin_jobs)

    def statements(subject: str, history: str) -> str:
        return ", ".join(
            f"{p}: {pages[(subject, history, lo, p)]['statements']} -> "
            f"{pages[(subject, history, hi, p)]['statements']}"
            for p, _model in PAGES
        )

    big = histories[1]
    constant = all(
        pages[(OURS, h, lo, p)]["statements"] == pages[(OURS, h, hi, p)]["statements"]
        for h in histories
        for p, _model in PAGES
    )
    slow = {
        f"{p}@{j}": pages[(OURS, big, j, p)]["ms"]["median"]
        for j in cfg.admin_jobs
        for p, _model in PAGES
    }
    targets.append(
        Target(
            "8",
            f"admin statements per page constant in jobs ({lo} vs {hi}), page < 200 ms "
            f"with {total:,} executions",
            constant and max(slow.values()) < 200,
            f"obs statements {statements(OURS, big)}; obs ms "
            + ", ".join(f"{k} {v}" for k, v in slow.items())
            + f"; 0.7 statements {statements(LEGACY, big)}",
        )
    )
    # ours / 0.7 time of each job list: at most 1 wherever the history is small or large.
    shares = {
        (h, j): pages[(OURS, h, j, "job list")]["ms"]["median"]
        / pages[(LEGACY, h, j, "job list")]["ms"]["median"]
        for h in histories
        for j in cfg.admin_jobs
    }
    targets.append(
        Target(
            "8",
            "job list no slower than 0.7's (obs / 0.7 time <= 1), few runs and "
            f"{total:,} executions",
            max(shares.values()) <= 1,
            "obs / 0.7: "
            + ", ".join(f"{j:,} jobs, {h}: {v:.2f}" for (h, j), v in shares.items())
            + f"; statements with {histories[0]}: obs {statements(OURS, histories[0])}, "
            f"0.7 {statements(LEGACY, histories[0])}",
        )
    )
    ex = {
        j: pages[(OURS, big, j, "execution list")]["ms"]["median"]
        / pages[(LEGACY, big, j, "execution list")]["ms"]["median"]
        for j in cfg.admin_jobs
    }
    targets.append(
        Target(
            "8",
            f"execution list faster than 0.7's with {total:,} executions",
            max(ex.values()) < 1,
            "obs / 0.7: " + ", ".join(f"{j:,} jobs {v:.2f}" for j, v in ex.items()),
        )
    )
    return rows, ratios, targets


def _case(page: str, jobs: int, history: str) -> str:
    return f"{page}, {jobs:,} jobs, {history}"


# -- scenario 7: cleanup -------------------------------------------------------------------


def _cleanup_once(subject: str, total: int) -> dict[str, Any]:
    """Load ``total`` rows (half older than the retention), delete the expired half once."""
    from django_apscheduler.models import DjangoJobExecution as LegacyExecution

    from django_apscheduler_obs import cleanup

    load = ensure_history(subject, total)
    model = execution_model(subject)
    before = model.objects.count()
    with STATEMENTS.capture() as items:
        t0 = time.perf_counter()
        if subject == OURS:
            cleanup.delete_executions(before=timezone.now() - RETENTION)
        else:
            LegacyExecution.objects.delete_old_job_executions(int(RETENTION.total_seconds()))
        elapsed = time.perf_counter() - t0
    stmts = data_statements(items)
    after = model.objects.count()
    longest = max(stmts, key=lambda s: s.seconds)
    return {
        "rows_before": before,
        "deleted": before - after,
        "total_s": round(elapsed, 3),
        "statements": len(stmts),
        "longest_stmt_ms": round(longest.seconds * 1000, 1),
        "longest_stmt": longest.sql[:80],
        "history_load_s": round(load, 1),
    }


def scenario7(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    rows, ratios, targets = [], [], []
    # 100,000 of 200,000 rows, then 500,000 of 1,000,000 (smoke: 2,000 of 4,000, ...).
    for total in (cfg.history_rows // 5, cfg.history_rows):
        case = f"{total:,} rows, half expired"
        results = {}
        for subject in (LEGACY, OURS):
            with subject_database(subject):
                results[subject] = _cleanup_once(subject, total)
            rows.append(Row("7", case, subject, results[subject]))
        rows.append(Row("7", case, BARE, {"note": "no history"}))
        o, legacy = results[OURS], results[LEGACY]
        for metric in ("longest_stmt_ms", "total_s"):
            ratios.append(Ratio("7", case, metric, o[metric], legacy[metric], LEGACY, "lower"))
        targets.append(
            Target(
                "7",
                f"cleanup of {total:,} rows: longest single statement < 250 ms, "
                "total time within 2x of 0.7",
                o["longest_stmt_ms"] < 250 and o["total_s"] <= 2 * legacy["total_s"],
                f"obs longest {o['longest_stmt_ms']} ms over {o['statements']} statements, "
                f"{o['total_s']} s total; 0.7 one statement of {legacy['longest_stmt_ms']} ms, "
                f"{legacy['total_s']} s total: ours/0.7 "
                f"{o['total_s'] / max(legacy['total_s'], 1e-9):.2f}x",
            )
        )
    return rows, ratios, targets
