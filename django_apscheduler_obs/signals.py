"""Job rows saved or deleted through the ORM (admin, shell, web code) wake the leader.

The scheduler's own writes use ``QuerySet.update()``, which sends no signal, so the leader is
not woken by its own progress. Writes that bypass signals can call ``notify_jobs_changed()``.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from django_apscheduler_obs.lease import bump_change_counter
from django_apscheduler_obs.models import DjangoJob


@receiver(post_save, sender=DjangoJob, dispatch_uid="django_apscheduler_obs.job_saved")
@receiver(post_delete, sender=DjangoJob, dispatch_uid="django_apscheduler_obs.job_deleted")
def job_changed(sender: Any, **kwargs: Any) -> None:
    # After commit, as its own short statement: never a hot-row lock inside the caller's
    # transaction (django-celery-beat's singleton row learned this the hard way).
    transaction.on_commit(bump_change_counter)
