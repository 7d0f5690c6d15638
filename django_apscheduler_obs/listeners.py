"""The events that never pass through the executor.

Runs are observed by the executor; listeners handle only what does not reach it:
``max_instances`` skips (APScheduler refuses the submission), and job life-cycle changes made
through this scheduler (the collector's catalog picks up changes made by other processes).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from apscheduler import events

from django_apscheduler_obs.executors import HEARTBEAT_JOB_ID
from django_apscheduler_obs.models import DjangoJobExecution

if TYPE_CHECKING:
    from django_apscheduler_obs.scheduler import SchedulerRuntime

logger = logging.getLogger(__name__)


def register(runtime: SchedulerRuntime) -> None:
    scheduler = runtime.scheduler

    def on_max_instances(event: Any) -> None:
        if event.job_id == HEARTBEAT_JOB_ID:
            return
        if runtime.observer.is_fenced_store(event.jobstore) and not runtime.lease.is_leader():
            return  # a deposed leader re-submitting a job it could not advance: not a skip
        runtime.observer.skip(event.job_id, "max_instances", len(event.scheduled_run_times))
        for run_time in event.scheduled_run_times:
            runtime.history.record_skip(
                event.job_id,
                run_time,
                DjangoJobExecution.MAX_INSTANCES,
                f"Execution of job '{event.job_id}' skipped: maximum number of running "
                "instances reached!",
            )

    def on_job_change(event: Any) -> None:
        if event.job_id == HEARTBEAT_JOB_ID:
            return
        if event.code == events.EVENT_JOB_ADDED:
            runtime.metrics.add_job(event.job_id)
        elif event.code == events.EVENT_JOB_REMOVED:
            runtime.metrics.remove_job(event.job_id)
        runtime.catalog.invalidate()

    scheduler.add_listener(on_max_instances, events.EVENT_JOB_MAX_INSTANCES)
    scheduler.add_listener(
        on_job_change,
        events.EVENT_JOB_ADDED | events.EVENT_JOB_REMOVED | events.EVENT_JOB_MODIFIED,
    )
