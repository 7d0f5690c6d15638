"""System checks for every setting, with stable ids (``django_apscheduler_obs.E001`` …).

Wrong settings fail ``manage.py check`` (and therefore ``runapscheduler``, ``migrate``,
``runserver``) with one message per problem, instead of a traceback at the first run.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from typing import Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register

from django_apscheduler_obs.conf import conf

ID = "django_apscheduler_obs"
JOB_DEFAULT_KEYS = {"misfire_grace_time", "coalesce", "max_instances", "executor"}


def _number(value: Any, *, allow_zero: bool = False) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return value >= 0 if allow_zero else value > 0


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _get(read: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, read()
    except Exception as exc:  # e.g. tuple() of a non-iterable
        return False, exc


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []

    def error(code: int, msg: str, hint: str | None = None) -> None:
        errors.append(Error(msg, hint=hint, id=f"{ID}.E{code:03d}"))

    # E001: job defaults
    ok, defaults = _get(lambda: conf.JOB_DEFAULTS)
    if not ok:
        error(1, "APSCHEDULER_JOB_DEFAULTS must be a dict")
        defaults = {}
    unknown = set(defaults) - JOB_DEFAULT_KEYS
    if unknown:
        error(
            1,
            f"APSCHEDULER_JOB_DEFAULTS has unknown keys: {sorted(unknown)}",
            f"Allowed: {sorted(JOB_DEFAULT_KEYS)}",
        )
    grace = defaults.get("misfire_grace_time")
    if grace is not None and not _int(grace):
        error(
            1,
            "APSCHEDULER_JOB_DEFAULTS['misfire_grace_time'] must be None or a positive "
            f"integer (seconds), not {grace!r}",
        )
    if not _int(defaults.get("max_instances", 1)):
        error(1, "APSCHEDULER_JOB_DEFAULTS['max_instances'] must be a positive integer")
    if not isinstance(defaults.get("coalesce", True), bool):
        error(1, "APSCHEDULER_JOB_DEFAULTS['coalesce'] must be True or False")
    executor_names = {"default"} | (
        set(conf.EXECUTORS) if isinstance(conf.EXECUTORS, dict) else set()
    )
    if defaults.get("executor", "default") not in executor_names:
        error(
            1,
            f"APSCHEDULER_JOB_DEFAULTS['executor'] is {defaults['executor']!r}: unknown executor",
            f"Configured executors: {sorted(executor_names)} (APSCHEDULER_EXECUTORS)",
        )

    # E002: pool size
    if not _int(conf.MAX_WORKERS):
        error(2, f"APSCHEDULER_MAX_WORKERS must be a positive integer, not {conf.MAX_WORKERS!r}")

    # E003/E004: retention and cleanup
    retention = conf.EXECUTION_RETENTION
    if retention is not None and not _number(retention):
        error(
            3,
            "APSCHEDULER_EXECUTION_RETENTION must be None (keep everything) or a positive "
            f"number of seconds, not {retention!r}",
        )
    if not _number(conf.CLEANUP_INTERVAL):
        error(4, "APSCHEDULER_CLEANUP_INTERVAL must be a positive number of seconds")
    if not _int(conf.CLEANUP_BATCH_SIZE):
        error(4, "APSCHEDULER_CLEANUP_BATCH_SIZE must be a positive integer")

    # E005/E006: lease and intervals
    intervals = {
        "APSCHEDULER_LEASE_TTL": conf.LEASE_TTL,
        "APSCHEDULER_LEASE_RENEW_INTERVAL": conf.LEASE_RENEW_INTERVAL,
        "APSCHEDULER_STANDBY_POLL_INTERVAL": conf.STANDBY_POLL_INTERVAL,
        "APSCHEDULER_CHANGE_POLL_INTERVAL": conf.CHANGE_POLL_INTERVAL,
        "APSCHEDULER_MAX_SLEEP": conf.MAX_SLEEP,
        "APSCHEDULER_HEARTBEAT_INTERVAL": conf.HEARTBEAT_INTERVAL,
        "APSCHEDULER_RUN_NOW_TIMEOUT": conf.RUN_NOW_TIMEOUT,
        "APSCHEDULER_DISPATCH_TIMEOUT": conf.DISPATCH_TIMEOUT,
        "APSCHEDULER_WORKER_LIVENESS": conf.WORKER_LIVENESS,
        "APSCHEDULER_INFLIGHT_POLL_INTERVAL": conf.INFLIGHT_POLL_INTERVAL,
    }
    for name, value in intervals.items():
        if not _number(value):
            error(6, f"{name} must be a positive number of seconds, not {value!r}")
    if not _number(conf.SHUTDOWN_TIMEOUT, allow_zero=True):
        error(
            6, f"APSCHEDULER_SHUTDOWN_TIMEOUT must be a number >= 0, not {conf.SHUTDOWN_TIMEOUT!r}"
        )
    if (
        _number(conf.LEASE_TTL)
        and _number(conf.LEASE_RENEW_INTERVAL)
        and conf.LEASE_TTL < 3 * conf.LEASE_RENEW_INTERVAL
    ):
        error(
            5,
            f"APSCHEDULER_LEASE_TTL ({conf.LEASE_TTL}) must be at least 3 x "
            f"APSCHEDULER_LEASE_RENEW_INTERVAL ({conf.LEASE_RENEW_INTERVAL})",
            "Two renewals may fail before the lease is lost.",
        )
    elif (
        grace is not None
        and _int(grace)
        and _number(conf.LEASE_TTL)
        and _number(conf.STANDBY_POLL_INTERVAL)
        and grace < conf.LEASE_TTL + conf.STANDBY_POLL_INTERVAL
    ):
        errors.append(
            Warning(
                f"misfire_grace_time ({grace}s) is shorter than a failover "
                f"(lease TTL + standby poll = {conf.LEASE_TTL + conf.STANDBY_POLL_INTERVAL}s)",
                hint="Runs due while a standby takes over will be recorded as missed.",
                id=f"{ID}.W001",
            )
        )

    # E007: time zone
    try:
        zoneinfo.ZoneInfo(str(conf.TIMEZONE))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        error(7, f"APSCHEDULER_TIMEZONE {conf.TIMEZONE!r} is not a known time zone")

    # E008: buckets
    for name, read in (
        ("APSCHEDULER_DURATION_BUCKETS", lambda: conf.DURATION_BUCKETS),
        ("APSCHEDULER_DELAY_BUCKETS", lambda: conf.DELAY_BUCKETS),
    ):
        ok, buckets = _get(read)
        if (
            not ok
            or not buckets
            or not all(_number(b) for b in buckets)
            or list(buckets) != sorted(set(buckets))
        ):
            error(8, f"{name} must be a non-empty, strictly increasing list of positive numbers")

    # E009/E012: cardinality and buffer
    if not _int(conf.MAX_JOB_SERIES):
        error(9, "APSCHEDULER_MAX_JOB_SERIES must be a positive integer")
    if not _int(conf.MAX_ERROR_TYPES):
        error(9, "APSCHEDULER_MAX_ERROR_TYPES must be a positive integer")
    if not _int(conf.HISTORY_BUFFER_SIZE):
        error(12, "APSCHEDULER_HISTORY_BUFFER_SIZE must be a positive integer")

    # E010: jobs declared in settings
    errors.extend(_check_declared_jobs())

    # E015-E018: worker engines, and the executors jobs name
    errors.extend(_check_executors())

    # E011: metrics auth
    ok, auth = _get(lambda: conf.METRICS_BASIC_AUTH)
    if not ok or (
        auth is not None and (len(auth) != 2 or not all(isinstance(x, str) and x for x in auth))
    ):
        error(11, "APSCHEDULER_METRICS_BASIC_AUTH must be None or (user, password) strings")

    # E013: group
    if not isinstance(conf.GROUP, str) or not 0 < len(conf.GROUP) <= 100:
        error(13, "APSCHEDULER_GROUP must be a non-empty string of at most 100 characters")

    # E014: plain types
    plain: tuple[tuple[str, object, type], ...] = (
        ("APSCHEDULER_DATETIME_FORMAT", conf.DATETIME_FORMAT, str),
        ("APSCHEDULER_TRACE_URL_TEMPLATE", conf.TRACE_URL_TEMPLATE, str),
        ("APSCHEDULER_GRAFANA_URL_TEMPLATE", conf.GRAFANA_URL_TEMPLATE, str),
        ("APSCHEDULER_SIGN_JOB_STATE", conf.SIGN_JOB_STATE, bool),
        ("APSCHEDULER_AUTODISCOVER", conf.AUTODISCOVER, bool),
        ("APSCHEDULER_REMOVE_UNDECLARED_JOBS", conf.REMOVE_UNDECLARED_JOBS, bool),
    )
    for setting, setting_value, kind in plain:
        if not isinstance(setting_value, kind):
            error(14, f"{setting} must be a {kind.__name__}, not {type(setting_value).__name__}")
    return errors


def _check_declared_jobs() -> list[CheckMessage]:
    from django_apscheduler_obs.registry import JobDefinitionError, JobRegistry

    jobs = conf.JOBS
    if not isinstance(jobs, (list, tuple)) or not all(isinstance(j, dict) for j in jobs):
        return [Error("APSCHEDULER_JOBS must be a list of dicts", id=f"{ID}.E010")]
    scratch = JobRegistry()
    scratch._discovered = True
    messages: list[CheckMessage] = []
    for entry in jobs:
        entry = dict(entry)
        func, trigger = entry.pop("func", None), entry.pop("trigger", None)
        if func is None or trigger is None:
            messages.append(
                Error(
                    f"APSCHEDULER_JOBS entry {entry.get('id', entry)!r} needs 'func' and 'trigger'",
                    id=f"{ID}.E010",
                )
            )
            continue
        try:
            scratch.add(func, trigger, **entry)
        except JobDefinitionError as exc:
            messages.append(Error(str(exc), id=f"{ID}.E010"))
        except TypeError as exc:
            messages.append(
                Error(f"APSCHEDULER_JOBS entry {entry.get('id')!r}: {exc}", id=f"{ID}.E010")
            )
    return messages


def _check_executors() -> list[CheckMessage]:
    """E015 shape of APSCHEDULER_EXECUTORS, E016 engine not installed, E017 engine
    misconfigured (Celery app, Tasks backend), E018 a job names an executor nobody set up."""
    from django_apscheduler_obs.engines import ENGINES, OPTIONS

    messages: list[CheckMessage] = []

    def error(code: int, msg: str, hint: str | None = None) -> None:
        messages.append(Error(msg, hint=hint, id=f"{ID}.E{code:03d}"))

    executors = conf.EXECUTORS
    if not isinstance(executors, dict):
        error(15, "APSCHEDULER_EXECUTORS must be a dict of executor name -> options")
        return messages
    for alias, options in executors.items():
        where = f"APSCHEDULER_EXECUTORS[{alias!r}]"
        if alias == "default" or not isinstance(alias, str) or not alias:
            error(15, f"{where}: the name must be a non-empty string other than 'default'")
            continue
        engine = options.get("ENGINE") if isinstance(options, dict) else None
        if engine not in ENGINES:
            error(15, f"{where} needs 'ENGINE': one of {sorted(ENGINES)}")
            continue
        unknown = set(options) - OPTIONS[engine]
        if unknown:
            error(15, f"{where} has unknown keys {sorted(unknown)}", f"Allowed: {OPTIONS[engine]}")
        if engine == "celery":
            messages.extend(_check_celery(where, options))
        else:
            messages.extend(_check_tasks(where, options))
    messages.extend(_check_job_executors({"default", *executors}))
    return messages


def _check_celery(where: str, options: dict[str, Any]) -> list[CheckMessage]:
    try:
        import celery  # noqa: F401
    except ImportError:
        return [
            Error(
                f"{where} uses Celery, which is not installed",
                hint="pip install 'django-apscheduler-obs[celery]'",
                id=f"{ID}.E016",
            )
        ]
    path = options.get("APP")
    if not isinstance(path, str) or not path:
        return [Error(f"{where} needs 'APP': e.g. 'proj.celery:app'", id=f"{ID}.E017")]
    from django_apscheduler_obs.engines.celery import TASK_NAME, load_app

    try:
        app = load_app(path)
    except Exception as exc:
        return [Error(f"{where}: cannot load the Celery app {path!r}: {exc}", id=f"{ID}.E017")]
    queue = options.get("QUEUE")
    if queue is not None and not (isinstance(queue, str) and queue):
        return [Error(f"{where}['QUEUE'] must be a non-empty string", id=f"{ID}.E017")]
    import django_apscheduler_obs.engines.celery  # noqa: F401 - registers the shared task

    if TASK_NAME not in app.tasks:
        return [Error(f"{where}: the app {path!r} does not know {TASK_NAME!r}", id=f"{ID}.E017")]
    return []


def _check_tasks(where: str, options: dict[str, Any]) -> list[CheckMessage]:
    try:
        from django_apscheduler_obs.engines import tasks as tasks_engine
    except ImportError:
        return [
            Error(
                f"{where} uses Django's Tasks framework, which needs Django 6.0 or the "
                "django-tasks package",
                hint="pip install django-tasks (Django 5.2)",
                id=f"{ID}.E016",
            )
        ]
    except Exception as exc:  # the task could not be declared on its backend
        return [Error(f"{where}: {type(exc).__name__}: {exc}", id=f"{ID}.E017")]
    backend = options.get("BACKEND", "default")
    if not tasks_engine.backend_exists(backend):
        return [
            Error(f"{where}: TASKS has no backend {backend!r}", id=f"{ID}.E017"),
        ]
    queue = options.get("QUEUE")
    if queue is not None and not (isinstance(queue, str) and queue):
        return [Error(f"{where}['QUEUE'] must be a non-empty string", id=f"{ID}.E017")]
    allowed = tasks_engine.backend_queues(backend)
    if allowed and (queue or tasks_engine.DEFAULT_TASK_QUEUE_NAME) not in allowed:
        return [
            Error(
                f"{where}: queue {queue!r} is not in TASKS[{backend!r}]['QUEUES']",
                hint=f"Allowed: {sorted(allowed)}",
                id=f"{ID}.E017",
            )
        ]
    return []


def _check_job_executors(configured: set[str]) -> list[CheckMessage]:
    """Jobs declared in code or settings that name an executor nobody configured."""
    from django_apscheduler_obs.registry import registry

    try:
        registry.discover()
    except Exception:  # reported by the checks of declared jobs
        return []
    messages: list[CheckMessage] = []
    named = {spec.id: spec.options.get("executor") for spec in registry}
    for entry in conf.JOBS if isinstance(conf.JOBS, (list, tuple)) else ():
        if isinstance(entry, dict) and entry.get("id"):
            named[str(entry["id"])] = entry.get("executor")
    for job_id, executor in sorted(named.items()):
        if executor is not None and executor not in configured:
            messages.append(
                Error(
                    f"Job {job_id!r} runs on executor {executor!r}, which is not configured",
                    hint=f"Configured: {sorted(configured)}; add it to APSCHEDULER_EXECUTORS",
                    id=f"{ID}.E018",
                )
            )
    return messages
