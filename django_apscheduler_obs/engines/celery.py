"""Celery: ``executor="<alias>"`` with ``{"ENGINE": "celery", "APP": "proj.celery:app"}``.

The worker-side task is a ``shared_task`` named ``django_apscheduler_obs.run``; a project's
Celery app finds it with ``app.autodiscover_tasks()`` (this package's ``tasks.py``).

``acks_late``: a message is acknowledged after the run, so a worker killed mid-run (or a
broker that drops the connection) gets it redelivered. Redelivery is safe: the pick-up is a
compare-and-set on the run's row, so the second copy finds the run taken and is dropped.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

from celery import Celery, shared_task

from django_apscheduler_obs.handoff import RunMessage

TASK_NAME = "django_apscheduler_obs.run"


@shared_task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
def run_scheduled_job(self: Any, message: dict[str, Any]) -> str:
    """Run the fire time ``message`` names (see ``worker.run_message``)."""
    from django_apscheduler_obs.worker import run_message

    request = self.request
    hostname = request.hostname or "celery"
    return run_message(message, worker=f"{hostname}:{os.getpid()}")


def load_app(path: str) -> Celery:
    """``"proj.celery:app"`` or ``"proj.celery.app"``: the project's Celery application."""
    from django.utils.module_loading import import_string

    app = import_string(path.replace(":", "."))
    if not isinstance(app, Celery):
        raise TypeError(f"{path} is a {type(app).__name__}, not a Celery application")
    return app


class CeleryEngine:
    def __init__(self, alias: str, options: dict[str, Any]) -> None:
        self.alias = alias
        self.app_path = str(options["APP"])
        self.queue: str | None = options.get("QUEUE")

    @cached_property
    def app(self) -> Celery:
        return load_app(self.app_path)

    def enqueue(self, message: RunMessage) -> None:
        # Through the registered task (not send_task), so Celery's OpenTelemetry
        # instrumentation, when installed, wraps the publish in its own span.
        task = self.app.tasks[TASK_NAME]
        task.apply_async(kwargs={"message": message.to_dict()}, queue=self.queue)
