"""Worker engines a job can run on: Celery and Django's Tasks framework.

Each engine is two small halves: ``enqueue`` on the scheduler's side, and the task a worker
runs, which only unpacks the message and calls ``worker.run_message``. Everything a run means
(pick-up, job loading, signature, record, trace) lives in ``worker.py``, once for both.
"""

from __future__ import annotations

from typing import Any

from django.utils.module_loading import import_string

from django_apscheduler_obs.handoff import Engine

ENGINES = {
    "celery": "django_apscheduler_obs.engines.celery.CeleryEngine",
    "tasks": "django_apscheduler_obs.engines.tasks.TasksEngine",
}
OPTIONS = {
    "celery": {"ENGINE", "APP", "QUEUE"},
    "tasks": {"ENGINE", "BACKEND", "QUEUE"},
}


def build_engine(alias: str, options: dict[str, Any]) -> Engine:
    """The engine of executor ``alias`` from its ``APSCHEDULER_EXECUTORS`` entry."""
    cls = import_string(ENGINES[options["ENGINE"]])
    return cls(alias, options)
