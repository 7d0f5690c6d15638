"""Found by Celery's ``app.autodiscover_tasks()``: the worker-side task of the Celery engine.

Nothing here when Celery is not installed. Django's Tasks framework needs no discovery: its
messages name their task by import path (``engines/tasks.py``).
"""

from __future__ import annotations

try:
    from django_apscheduler_obs.engines.celery import run_scheduled_job
except ImportError:  # Celery is optional
    pass
else:
    __all__ = ["run_scheduled_job"]
