"""Scenarios 7 and 8: a large execution history: cleanup, and the admin pages over it."""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
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
            rt = start + step * i
            job_id = f"hist-{i % HISTORY_JOBS:03d}"
            error = i % 50 == 0
            status = "Error!" if error else "Executed"
            finished = (rt + timedelta(seconds=0.25)).timestamp()
            if subject == OURS:
                yield (
                    job_id,
                    status,
                    db_datetime(rt),
                    0.25,
                    round(finished, 6),
                    "boom" if error else None,
                    "Traceback ..." if error else None,
                    db_datetime(rt + timedelta(milliseconds=3)),
                    0.003,
                    "ValueError" if error else "",
                    "",
                    "",
                    "bench:1:abc",
                    1,
                    "schedule",
                )
            else:
                yield (
                    job_id,
                    status,
                    db_datetime(rt),
                    0.25,
                    round(finished, 2),
                    "boom" if error else None,
                    "Traceback ..." if error else None,
                )

    cols = ["job_id", "status", "run_time", "duration", "finished", "exception", "traceback"]
    if subject == OURS:
        cols += [
            "started",
            "start_delay",
            "error_type",
            "trace_id",
            "span_id",
            "owner",
            "epoch",
            "trigger_source",
        ]
    bulk_insert(model, cols, rows())
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


def _statement_summary(name: str, pages: dict[Any, Any], subject: str, lo: int, hi: int) -> str:
    return f"{name} statements " + ", ".join(
        f"{p}: {pages[(subject, lo, p)]['statements']} -> {pages[(subject, hi, p)]['statements']}"
        for p in ("job list", "execution list")
    )


def scenario8(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    rows, ratios, targets = [], [], []
    total = cfg.history_rows
    pages: dict[tuple[str, int, str], dict[str, Any]] = {}
    for subject in (LEGACY, OURS):
        app = "django_apscheduler_obs" if subject == OURS else "django_apscheduler"
        with subject_database(subject):
            load = ensure_history(subject, total)
            client = _client()
            for jobs in cfg.admin_jobs:
                drop_jobs_beyond(subject, jobs)
                ensure_jobs(subject, jobs)
                for page, model in (
                    ("job list", "djangojob"),
                    ("execution list", "djangojobexecution"),
                ):
                    m = _page(client, f"/admin/{app}/{model}/", cfg.repeats)
                    m["history_rows"] = total
                    if load:
                        m["history_load_s"] = round(load, 1)
                        load = 0.0
                    pages[(subject, jobs, page)] = m
                    rows.append(Row("8", f"{page}, {jobs:,} jobs", subject, m))
    for jobs in cfg.admin_jobs:
        for page in ("job list", "execution list"):
            rows.append(Row("8", f"{page}, {jobs:,} jobs", BARE, {"note": "no admin"}))
            ratios.append(
                Ratio(
                    "8",
                    f"{page}, {jobs:,} jobs",
                    "ms",
                    pages[(OURS, jobs, page)]["ms"]["median"],
                    pages[(LEGACY, jobs, page)]["ms"]["median"],
                    LEGACY,
                    "lower",
                )
            )
    lo, hi = min(cfg.admin_jobs), max(cfg.admin_jobs)
    constant = all(
        pages[(OURS, lo, p)]["statements"] == pages[(OURS, hi, p)]["statements"]
        for p in ("job list", "execution list")
    )
    slow = {
        f"{p}@{j}": pages[(OURS, j, p)]["ms"]["median"]
        for j in cfg.admin_jobs
        for p in ("job list", "execution list")
    }
    targets.append(
        Target(
            "8",
            f"admin statements per page constant in jobs ({lo} vs {hi}), page < 200 ms "
            f"with {total:,} executions",
            constant and max(slow.values()) < 200,
            _statement_summary("obs", pages, OURS, lo, hi)
            + "; obs ms "
            + ", ".join(f"{k} {v}" for k, v in slow.items())
            + "; "
            + _statement_summary("0.7", pages, LEGACY, lo, hi),
        )
    )
    return rows, ratios, targets


# -- scenario 7: cleanup -------------------------------------------------------------------


def scenario7(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    from django_apscheduler.models import DjangoJobExecution as LegacyExecution

    from django_apscheduler_obs import cleanup

    rows, ratios, targets = [], [], []
    total = cfg.history_rows
    results = {}
    for subject in (LEGACY, OURS):
        with subject_database(subject):
            load = ensure_history(subject, total)
            model = execution_model(subject)
            before = model.objects.count()
            with STATEMENTS.capture() as items:
                t0 = time.perf_counter()
                if subject == OURS:
                    cleanup.delete_executions(before=timezone.now() - RETENTION)
                else:
                    LegacyExecution.objects.delete_old_job_executions(
                        int(RETENTION.total_seconds())
                    )
                elapsed = time.perf_counter() - t0
            stmts = data_statements(items)
            after = model.objects.count()
            longest = max(stmts, key=lambda s: s.seconds)
            m = {
                "rows_before": before,
                "deleted": before - after,
                "total_s": round(elapsed, 2),
                "statements": len(stmts),
                "longest_stmt_ms": round(longest.seconds * 1000, 1),
                "longest_stmt": longest.sql[:80],
                "history_load_s": round(load, 1),
            }
            results[subject] = m
            rows.append(Row("7", f"{total:,} rows, half expired", subject, m))
    rows.append(Row("7", f"{total:,} rows, half expired", BARE, {"note": "no history"}))
    case = rows[0].case
    ratios.append(
        Ratio(
            "7",
            case,
            "longest_stmt_ms",
            results[OURS]["longest_stmt_ms"],
            results[LEGACY]["longest_stmt_ms"],
            LEGACY,
            "lower",
        )
    )
    ratios.append(
        Ratio(
            "7",
            case,
            "total_s",
            results[OURS]["total_s"],
            results[LEGACY]["total_s"],
            LEGACY,
            "lower",
        )
    )
    o = results[OURS]
    targets.append(
        Target(
            "7",
            "cleanup: longest single statement < 250 ms",
            o["longest_stmt_ms"] < 250,
            f"obs longest {o['longest_stmt_ms']} ms over {o['statements']} statements, "
            f"{o['total_s']} s total; 0.7 one statement of "
            f"{results[LEGACY]['longest_stmt_ms']} ms",
        )
    )
    return rows, ratios, targets
