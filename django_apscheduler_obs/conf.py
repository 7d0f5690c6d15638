"""Every setting of the package, read lazily so ``override_settings`` works in tests.

This is the only module that reads ``django.conf.settings``. Each property has a default;
``checks.py`` validates the values and reports problems with stable ids.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

# Jobs run far longer than HTTP requests: spend buckets on minutes and hours.
DEFAULT_DURATION_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
)  # fmt: skip
# Start delay: milliseconds on a healthy scheduler, minutes after an outage.
DEFAULT_DELAY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
)  # fmt: skip

# APScheduler's own default misfire_grace_time is 1 s, which turns a busy pool or a leader
# failover (lease TTL + standby poll = 17 s by default) into missed runs.
DEFAULT_JOB_DEFAULTS: dict[str, Any] = {
    "misfire_grace_time": 60,
    "coalesce": True,
    "max_instances": 1,
}


class Settings:
    """Typed, lazy access to the ``APSCHEDULER_*`` settings."""

    # -- django-apscheduler 0.7 settings, same names and defaults --------------------------

    @property
    def DATETIME_FORMAT(self) -> str:
        return getattr(settings, "APSCHEDULER_DATETIME_FORMAT", "N j, Y, f:s a")

    @property
    def RUN_NOW_TIMEOUT(self) -> float:
        """How long the admin waits for a run-now request to be picked up (seconds)."""
        return getattr(settings, "APSCHEDULER_RUN_NOW_TIMEOUT", 25)

    # -- scheduler ---------------------------------------------------------------------------

    @property
    def TIMEZONE(self) -> str:
        return getattr(settings, "APSCHEDULER_TIMEZONE", None) or settings.TIME_ZONE or "UTC"

    @property
    def JOB_DEFAULTS(self) -> dict[str, Any]:
        return {**DEFAULT_JOB_DEFAULTS, **getattr(settings, "APSCHEDULER_JOB_DEFAULTS", {})}

    @property
    def MAX_WORKERS(self) -> int:
        return getattr(settings, "APSCHEDULER_MAX_WORKERS", 10)

    @property
    def JOBS(self) -> list[dict[str, Any]]:
        """Jobs declared in settings, in addition to ``@scheduled_job`` in ``<app>/jobs.py``."""
        return getattr(settings, "APSCHEDULER_JOBS", [])

    @property
    def AUTODISCOVER(self) -> bool:
        return getattr(settings, "APSCHEDULER_AUTODISCOVER", True)

    @property
    def REMOVE_UNDECLARED_JOBS(self) -> bool:
        """Remove jobs that were declared in code earlier but no longer are."""
        return getattr(settings, "APSCHEDULER_REMOVE_UNDECLARED_JOBS", True)

    @property
    def SHUTDOWN_TIMEOUT(self) -> float:
        """Seconds ``runapscheduler`` waits for running jobs after SIGTERM/SIGINT."""
        return getattr(settings, "APSCHEDULER_SHUTDOWN_TIMEOUT", 30)

    @property
    def HEARTBEAT_INTERVAL(self) -> float:
        return getattr(settings, "APSCHEDULER_HEARTBEAT_INTERVAL", 30)

    @property
    def SIGN_JOB_STATE(self) -> bool:
        """Sign stored job state with SECRET_KEY and refuse tampered rows (recommended)."""
        return getattr(settings, "APSCHEDULER_SIGN_JOB_STATE", True)

    @property
    def WORKER_CONN_MAX_AGE(self) -> float | None:
        """Seconds a job worker keeps its database connection (``None``: for its life);
        independent of ``CONN_MAX_AGE``, which is about requests."""
        return getattr(settings, "APSCHEDULER_WORKER_CONN_MAX_AGE", 600)

    # -- runs on workers (handoff.py, worker.py, inflight.py) --------------------------------

    @property
    def EXECUTORS(self) -> dict[str, dict[str, Any]]:
        """Worker engines a job can name with ``executor=``, e.g.
        ``{"celery": {"ENGINE": "celery", "APP": "proj.celery:app", "QUEUE": "jobs"}}``."""
        return getattr(settings, "APSCHEDULER_EXECUTORS", {})

    @property
    def DISPATCH_TIMEOUT(self) -> float:
        """Seconds a run may wait in the engine before the leader marks it lost."""
        return getattr(settings, "APSCHEDULER_DISPATCH_TIMEOUT", 300)

    @property
    def WORKER_LIVENESS(self) -> float:
        """Seconds without a sign of life from a worker's run before it counts as abandoned;
        a worker refreshes its runs every quarter of it."""
        return getattr(settings, "APSCHEDULER_WORKER_LIVENESS", 60)

    @property
    def INFLIGHT_POLL_INTERVAL(self) -> float:
        """How often the leader reads the runs it handed to workers (finished, lost, dead)."""
        return getattr(settings, "APSCHEDULER_INFLIGHT_POLL_INTERVAL", 1)

    # -- execution history -------------------------------------------------------------------

    @property
    def EXECUTION_RETENTION(self) -> float | None:
        """Seconds an execution row is kept; ``None`` disables the built-in cleanup job."""
        return getattr(settings, "APSCHEDULER_EXECUTION_RETENTION", 7 * 24 * 3600)

    @property
    def CLEANUP_INTERVAL(self) -> float:
        return getattr(settings, "APSCHEDULER_CLEANUP_INTERVAL", 3600)

    @property
    def CLEANUP_BATCH_SIZE(self) -> int:
        return getattr(settings, "APSCHEDULER_CLEANUP_BATCH_SIZE", 1000)

    @property
    def HISTORY_BUFFER_SIZE(self) -> int:
        """Final statuses kept in memory while the database is unreachable."""
        return getattr(settings, "APSCHEDULER_HISTORY_BUFFER_SIZE", 10_000)

    # -- leader lease ------------------------------------------------------------------------

    @property
    def GROUP(self) -> str:
        return getattr(settings, "APSCHEDULER_GROUP", "default")

    @property
    def LEASE_TTL(self) -> float:
        return getattr(settings, "APSCHEDULER_LEASE_TTL", 15)

    @property
    def LEASE_RENEW_INTERVAL(self) -> float:
        return getattr(settings, "APSCHEDULER_LEASE_RENEW_INTERVAL", 5)

    @property
    def STANDBY_POLL_INTERVAL(self) -> float:
        return getattr(settings, "APSCHEDULER_STANDBY_POLL_INTERVAL", 2)

    @property
    def CHANGE_POLL_INTERVAL(self) -> float:
        return getattr(settings, "APSCHEDULER_CHANGE_POLL_INTERVAL", 2)

    @property
    def MAX_SLEEP(self) -> float:
        """The leader re-reads the job store at least this often, whatever changed."""
        return getattr(settings, "APSCHEDULER_MAX_SLEEP", 60)

    # -- metrics -----------------------------------------------------------------------------

    @property
    def DURATION_BUCKETS(self) -> tuple[float, ...]:
        return tuple(getattr(settings, "APSCHEDULER_DURATION_BUCKETS", DEFAULT_DURATION_BUCKETS))

    @property
    def DELAY_BUCKETS(self) -> tuple[float, ...]:
        return tuple(getattr(settings, "APSCHEDULER_DELAY_BUCKETS", DEFAULT_DELAY_BUCKETS))

    @property
    def MAX_JOB_SERIES(self) -> int:
        """Jobs beyond this many are reported as ``job_id="_other"``."""
        return getattr(settings, "APSCHEDULER_MAX_JOB_SERIES", 200)

    @property
    def MAX_ERROR_TYPES(self) -> int:
        """Distinct ``error_type`` values per job before the rest become ``_OTHER``."""
        return getattr(settings, "APSCHEDULER_MAX_ERROR_TYPES", 10)

    @property
    def METRICS_BASIC_AUTH(self) -> tuple[str, str] | None:
        """``("user", "password")`` to require HTTP basic auth on the metrics endpoint."""
        value = getattr(settings, "APSCHEDULER_METRICS_BASIC_AUTH", None)
        return tuple(value) if value else None

    # -- admin links -------------------------------------------------------------------------

    @property
    def TRACE_URL_TEMPLATE(self) -> str:
        """e.g. ``"https://grafana.example.com/explore?traceId={trace_id}"``; empty hides links."""
        return getattr(settings, "APSCHEDULER_TRACE_URL_TEMPLATE", "")

    @property
    def GRAFANA_URL_TEMPLATE(self) -> str:
        """e.g. ``"https://grafana.example.com/d/apscheduler-job?var-job_id={job_id}"``."""
        return getattr(settings, "APSCHEDULER_GRAFANA_URL_TEMPLATE", "")


conf = Settings()
