"""Django's Tasks framework: ``{"ENGINE": "tasks", "BACKEND": "default", "QUEUE": "jobs"}``.

``django.tasks`` on Django 6.0 and later, the ``django-tasks`` backport before it; any
backend the project sets in ``TASKS`` (a database queue with its ``db_worker``, RQ, …).
Messages are JSON, as the framework requires; a backend that retries a task, or a worker that
claims it twice, is safe: the pick-up is a compare-and-set on the run's row.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.handoff import RunMessage

try:  # Django >= 6.0
    from django.tasks import (
        DEFAULT_TASK_BACKEND_ALIAS,
        DEFAULT_TASK_QUEUE_NAME,
        TaskContext,
        task,
        task_backends,
    )
except ImportError:  # Django 5.2 with the django-tasks backport
    from django_tasks import (  # type: ignore[no-redef,assignment,unused-ignore]
        DEFAULT_TASK_BACKEND_ALIAS,
        DEFAULT_TASK_QUEUE_NAME,
        TaskContext,
        task,
        task_backends,
    )


def _declared_on() -> dict[str, str]:
    """Backend and queue the module-level task is declared on: the first ``tasks``
    executor's (a backend validates them at declaration; each message is re-targeted to the
    backend and queue of its executor, and workers use those)."""
    for options in conf.EXECUTORS.values():
        if isinstance(options, dict) and options.get("ENGINE") == "tasks":
            return {
                "backend": str(options.get("BACKEND", DEFAULT_TASK_BACKEND_ALIAS)),
                "queue_name": str(options.get("QUEUE", DEFAULT_TASK_QUEUE_NAME)),
            }
    return {"backend": DEFAULT_TASK_BACKEND_ALIAS}


def run_scheduled_job(context: TaskContext, message: dict[str, Any]) -> str:
    """Run the fire time ``message`` names (see ``worker.run_message``)."""
    from django_apscheduler_obs.worker import run_message

    ids = list(getattr(context.task_result, "worker_ids", None) or [])
    name = ids[-1] if ids else socket.gethostname()
    return run_message(message, worker=f"{name}:{os.getpid()}")


run_scheduled_job = task(takes_context=True, **_declared_on())(run_scheduled_job)  # type: ignore[assignment,call-overload,unused-ignore]


class TasksEngine:
    def __init__(self, alias: str, options: dict[str, Any]) -> None:
        self.alias = alias
        self.backend = str(options.get("BACKEND", DEFAULT_TASK_BACKEND_ALIAS))
        self.queue = str(options.get("QUEUE", DEFAULT_TASK_QUEUE_NAME))

    def enqueue(self, message: RunMessage) -> None:
        bound = run_scheduled_job.using(backend=self.backend, queue_name=self.queue)  # type: ignore[attr-defined]
        bound.enqueue(message.to_dict())


def backend_exists(alias: str) -> bool:
    return alias in task_backends.settings


def backend_queues(alias: str) -> set[str]:
    """The queues a backend accepts (empty: any)."""
    return set(task_backends[alias].queues)
