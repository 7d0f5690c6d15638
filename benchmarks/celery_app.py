"""The Celery application of the worker benchmarks: Redis, one in-process worker.

Both subjects publish to it: this package's hand-off (task ``django_apscheduler_obs.run``)
and django-celery-beat (task ``benchmarks.beat_probe``).
"""

from __future__ import annotations

import os
import time

from celery import Celery

import django_apscheduler_obs.engines.celery  # noqa: F401 - registers the worker-side task

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/14")

app = Celery("benchmarks")
app.conf.update(
    broker_url=BROKER,
    task_publish_retry=False,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)

# (tag, wall-clock start) of every beat_probe run.
beat_starts: list[tuple[str, float]] = []


@app.task(name="benchmarks.beat_probe", ignore_result=True)
def beat_probe(tag: str) -> None:
    """What a django-celery-beat periodic task runs: notes when it started."""
    beat_starts.append((tag, time.time()))
