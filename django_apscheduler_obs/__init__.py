"""APScheduler 3 for Django: a database job store, execution history you can see (admin,
Prometheus, OpenTelemetry), and several schedulers with one leader."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "current_run", "scheduled_job"]


def __getattr__(name: str) -> object:
    # Lazy, so importing the package does not import Django models before apps are ready.
    if name == "scheduled_job":
        from django_apscheduler_obs.registry import scheduled_job

        return scheduled_job
    if name == "current_run":
        from django_apscheduler_obs.runs import current_run

        return current_run
    raise AttributeError(name)
