"""Retention: delete old execution rows in small batches.

django-apscheduler 0.7 deletes expired history in one statement, which on a large table holds
locks for seconds while the scheduler wants to write. Here each statement touches at most
``APSCHEDULER_CLEANUP_BATCH_SIZE`` rows found through the ``run_time`` index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from django.utils import timezone

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.models import DjangoJobExecution

logger = logging.getLogger(__name__)

CLEANUP_JOB_ID = "django_apscheduler_obs.cleanup"

# Set by the scheduler so the built-in job can count what it deleted.
on_deleted: Callable[[int], None] | None = None


def delete_executions(
    *,
    before: datetime,
    job_ids: Iterable[str] | None = None,
    statuses: Iterable[str] | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
) -> int:
    """Delete executions whose run time is at or before ``before`` (0.7's ``lte``); returns
    how many (with ``dry_run``, how many would go)."""
    batch_size = batch_size or conf.CLEANUP_BATCH_SIZE
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    qs = DjangoJobExecution.objects.filter(run_time__lte=before)
    if job_ids:
        qs = qs.filter(job_id__in=list(job_ids))
    if statuses:
        qs = qs.filter(status__in=list(statuses))
    if dry_run:
        return qs.count()
    total = 0
    while True:
        ids = list(qs.order_by("run_time").values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        deleted, _ = DjangoJobExecution.objects.filter(id__in=ids).delete()
        total += deleted
        if on_deleted is not None:
            on_deleted(deleted)
        if len(ids) < batch_size:
            break
    return total


def cleanup_job() -> int:
    """The built-in job ``django_apscheduler_obs.cleanup``: applies the retention setting."""
    retention = conf.EXECUTION_RETENTION
    if retention is None:
        return 0
    deleted = delete_executions(before=timezone.now() - timedelta(seconds=retention))
    logger.info("Deleted %d execution(s) older than %s s", deleted, retention)
    return deleted
