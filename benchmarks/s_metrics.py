"""Scenario 6: /metrics scrape time and size with 10, 100 and 1,000 jobs."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks.harness import (
    BARE,
    LEGACY,
    OURS,
    STATEMENTS,
    Ratio,
    Row,
    Target,
    Timing,
    data_statements,
    subject_database,
)
from benchmarks.subjects import clear_tables


def _scrape(fn: Any, repeats: int, before: Any = None) -> tuple[Timing, int, int]:
    t = Timing()
    size = 0
    stmts = 0
    for _ in range(repeats):
        if before is not None:
            before()
        STATEMENTS.start()
        t0 = time.perf_counter()
        body = fn()
        t.values.append(time.perf_counter() - t0)
        stmts = len(data_statements(STATEMENTS.stop()))
        size = len(body)
    return t, size, stmts


def scenario6(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    # As runapscheduler serves it: without ``*_created`` samples (a process-wide switch).
    prometheus_client.disable_created_metrics()
    try:
        return _scenario6(cfg)
    finally:
        prometheus_client.enable_created_metrics()


def _scenario6(cfg: Any) -> tuple[list[Row], list[Ratio], list[Target]]:
    from django_apscheduler_obs import server
    from django_apscheduler_obs.scheduler import build_scheduler
    from django_apscheduler_obs.sinks.metrics import render

    rows, targets = [], []
    ms = 1000.0
    worst = {}
    for n in cfg.scrape_sizes:
        with subject_database(OURS):
            clear_tables(OURS)
            rt = build_scheduler(registry=CollectorRegistry())
            for i in range(n):
                rt.scheduler.add_job(
                    "benchmarks.jobs:noop",
                    "interval",
                    minutes=10,
                    id=f"m-{i:04d}",
                    jobstore="default",
                )
            rt.start()
            deadline = time.monotonic() + 20
            while not rt.lease.is_leader() and time.monotonic() < deadline:
                time.sleep(0.02)
            httpd, _thread = server.serve(rt, 0, "127.0.0.1")
            url = f"http://127.0.0.1:{httpd.server_port}/metrics"

            def cold(rt: Any = rt) -> None:
                rt.catalog._views = {}
                rt.catalog.invalidate()

            def http(url: str = url) -> bytes:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    return resp.read()

            reps = cfg.repeats
            # What /metrics serves (``render``: job series re-rendered only when they
            # changed), and prometheus_client's own ``generate_latest`` beside it.
            gen = lambda rt=rt: render(rt.registry)  # noqa: E731
            stock = lambda rt=rt: generate_latest(rt.registry)  # noqa: E731
            t_first, _, _ = _scrape(gen, 1, cold)  # nothing rendered yet: once per process
            t_stock, _, _ = _scrape(stock, reps, rt.catalog.invalidate)
            t_cold, size, s_cold = _scrape(gen, reps, cold)
            t_refresh, _, s_refresh = _scrape(gen, reps, rt.catalog.invalidate)
            t_cached, _, s_cached = _scrape(gen, reps)
            t_http, http_size, _ = _scrape(http, reps, rt.catalog.invalidate)
            httpd.shutdown()
            httpd.server_close()
            rt.stop()
        m = {
            "first_ms": round(t_first.median * ms, 2),
            "cold_ms": t_cold.as_dict(ms, 2),
            "refresh_ms": t_refresh.as_dict(ms, 2),
            "cached_ms": t_cached.as_dict(ms, 2),
            "http_ms": t_http.as_dict(ms, 2),
            "generate_latest_ms": t_stock.as_dict(ms, 2),
            "bytes": size,
            "http_bytes": http_size,
            "stmts_cold": s_cold,
            "stmts_refresh": s_refresh,
            "stmts_cached": s_cached,
        }
        worst[n] = max(t_cold.median, t_refresh.median, t_http.median) * ms
        rows.append(Row("6", f"{n:,} jobs", OURS, m))
        for subject in (LEGACY, BARE):
            rows.append(Row("6", f"{n:,} jobs", subject, {"note": "no metrics endpoint"}))
    n = max(cfg.scrape_sizes)
    targets.append(
        Target(
            "6",
            f"/metrics under 100 ms at {n:,} jobs (cold, refresh and HTTP medians; the first "
            "scrape of a process renders every series and is shown apart)",
            worst[n] < 100,
            f"slowest median {worst[n]:.1f} ms",
        )
    )
    return rows, [], targets
