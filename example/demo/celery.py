"""The demo's Celery application, used when ``DEMO_CELERY_BROKER`` is set.

As in any Django project: settings first, ``CELERY_*`` settings, then task autodiscovery,
which finds the worker-side task of django-apscheduler-obs (``django_apscheduler_obs.tasks``).
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

app = Celery("demo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
