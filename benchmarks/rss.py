"""``python -m benchmarks.rss SUBJECT N``: RSS of a scheduler process over N stored jobs.

Run by scenario 5 in a fresh process (the parent has already stored the jobs, due in 2030), so
the figure is one scheduler's and nothing else's. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    subject, n = sys.argv[1], int(sys.argv[2])
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    import django

    django.setup()
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from django_apscheduler.jobstores import DjangoJobStore as LegacyStore
    from prometheus_client import CollectorRegistry, generate_latest

    from benchmarks.harness import BARE, LEGACY, OURS, rss_kib
    from benchmarks.s_store import populate
    from benchmarks.subjects import JOB_DEFAULTS, UTC
    from django_apscheduler_obs.scheduler import build_scheduler

    base = rss_kib()
    out: dict[str, object] = {}
    t0 = time.perf_counter()
    if subject == OURS:
        rt = build_scheduler(registry=CollectorRegistry())
        rt.start()
        while not rt.lease.is_leader():
            time.sleep(0.05)
        out["start_s"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        body = generate_latest(rt.registry)  # one Prometheus scrape, as in production
        out["first_scrape_s"] = round(time.perf_counter() - t1, 2)
        out["scrape_bytes"] = len(body)
        out["catalog_jobs"] = sum(rt.catalog.counts().values())
        out["described_jobs"] = len(rt.catalog.views())
        stop = rt.stop
    else:
        store = LegacyStore() if subject == LEGACY else MemoryJobStore()
        scheduler = BackgroundScheduler(
            jobstores={"default": store},
            executors={"default": ThreadPoolExecutor(10)},
            job_defaults=JOB_DEFAULTS,
            timezone=UTC,
        )
        scheduler.start()
        if subject == BARE:  # the memory store holds the jobs itself
            populate(BARE, store, scheduler, n)
        out["start_s"] = round(time.perf_counter() - t0, 2)
        stop = scheduler.shutdown
    time.sleep(2)  # a few loop passes
    rss = rss_kib()
    out.update(
        rss_mib=round(rss / 1024, 1),
        baseline_mib=round(base / 1024, 1),
        scheduler_mib=round((rss - base) / 1024, 1),
    )
    stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
