"""Change stored jobs from any process (a web view, the admin, a shell) without a scheduler.

The running leader sees the change within its change poll: every write here bumps the job
store's change counter after commit. Nothing here runs a job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.jobstores import DjangoJobStore


def _store() -> tuple[BaseScheduler, DjangoJobStore]:
    # Never started: it only lends its time zone and trigger logic to Job methods.
    scheduler = BackgroundScheduler(timezone=conf.TIMEZONE)
    store = DjangoJobStore()
    store.start(scheduler, "default")
    return scheduler, store


def get_job(job_id: str) -> Job | None:
    return _store()[1].lookup_job(job_id)


def _require(store: DjangoJobStore, job_id: str) -> Job:
    job = store.lookup_job(job_id)
    if job is None:
        raise JobLookupError(job_id)
    return job


def pause_job(job_id: str) -> Job:
    _, store = _store()
    job = _require(store, job_id)
    job._modify(next_run_time=None)
    store.update_job(job)
    return job


def resume_job(job_id: str) -> Job:
    scheduler, store = _store()
    job = _require(store, job_id)
    now = datetime.now(scheduler.timezone)
    next_run = job.trigger.get_next_fire_time(None, now)
    if next_run is None:  # a one-off job whose date has passed: nothing left to run
        store.remove_job(job_id)
    else:
        job._modify(next_run_time=next_run)
        store.update_job(job)
    return job


def modify_job(job_id: str, **changes: Any) -> Job:
    """``Job.modify`` semantics: args, kwargs, name, misfire_grace_time, next_run_time, …"""
    _, store = _store()
    job = _require(store, job_id)
    job._modify(**changes)
    store.update_job(job)
    return job


def remove_job(job_id: str) -> None:
    _store()[1].remove_job(job_id)
