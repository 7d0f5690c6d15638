"""How projects declare jobs: ``@scheduled_job`` in ``<app>/jobs.py`` and/or ``APSCHEDULER_JOBS``.

Declarations are collected at import time (``<app>/jobs.py`` is autodiscovered, as the admin
discovers ``admin.py``) and synced into the job store when the scheduler starts. The sync is
idempotent: it is keyed by job id and a hash of the definition, so restarting a scheduler (or
starting a standby) neither resets interval jobs nor duplicates anything. A job whose trigger
did not change keeps its next run time.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import obj_to_ref, ref_to_obj
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Q
from django.utils.module_loading import autodiscover_modules

from django_apscheduler_obs.conf import conf

logger = logging.getLogger(__name__)

# Options of scheduler.add_job that a declaration may carry.
JOB_OPTIONS = (
    "name",
    "misfire_grace_time",
    "coalesce",
    "max_instances",
    "executor",
    "next_run_time",
)


class JobDefinitionError(ImproperlyConfigured):
    """A declared job is invalid; the message names the job id."""


@dataclass
class JobSpec:
    id: str
    func: Callable[..., Any]
    trigger: BaseTrigger
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    max_runtime: float | None = None  # seconds; exported for the "stuck" alert

    @property
    def func_ref(self) -> str:
        return obj_to_ref(self.func)

    trigger_key: str = ""  # the declaration of the trigger, stable across processes

    def trigger_hash(self) -> str:
        return hashlib.sha256(self.trigger_key.encode()).hexdigest()[:32]

    def definition_hash(self) -> str:
        """Trigger hash (32 hex) + hash of the rest (32 hex): the first half tells a changed
        schedule (reschedule) from changed arguments (modify, keep the next run time)."""
        parts = [
            self.func_ref,
            repr(self.args),
            repr(sorted(self.kwargs.items())),
            repr(sorted(self.options.items())),
        ]
        rest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
        return self.trigger_hash() + rest


class JobRegistry:
    """The declared jobs of this process. ``reset()`` is for tests."""

    def __init__(self) -> None:
        self._specs: dict[str, JobSpec] = {}
        self._discovered = False

    def reset(self) -> None:
        self._specs.clear()
        self._discovered = False

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, job_id: str) -> JobSpec | None:
        return self._specs.get(job_id)

    def max_runtime(self, job_id: str) -> float | None:
        spec = self._specs.get(job_id)
        return spec.max_runtime if spec else None

    def add(
        self,
        func: Callable[..., Any] | str,
        trigger: BaseTrigger | str,
        *,
        id: str | None = None,  # noqa: A002 - APScheduler's name
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        max_runtime: float | None = None,
        replace: bool = False,
        **trigger_and_options: Any,
    ) -> JobSpec:
        """Validate and record one job; every error names the job id."""
        job_id = id
        if isinstance(func, str):
            try:
                func = ref_to_obj(func)
            except (ImportError, LookupError, ValueError) as exc:
                raise JobDefinitionError(
                    f"Job {job_id or func!r}: cannot import function {func!r}: {exc}"
                ) from exc
        if not callable(func):
            raise JobDefinitionError(f"Job {job_id!r}: {func!r} is not callable")
        try:
            ref = obj_to_ref(func)
        except ValueError as exc:
            raise JobDefinitionError(
                f"Job {job_id!r}: the function must be importable by reference "
                f"(module-level, not a lambda or a nested function): {exc}"
            ) from exc
        job_id = job_id or ref.replace(":", ".")
        options = {k: trigger_and_options.pop(k) for k in JOB_OPTIONS if k in trigger_and_options}
        if isinstance(trigger, str) and "timezone" not in trigger_and_options:
            # As ``scheduler.add_job("cron", hour=3)`` does: the scheduler's time zone, not
            # the host's (a cron job at 03:00 means 03:00 in APSCHEDULER_TIMEZONE).
            trigger_and_options["timezone"] = conf.TIMEZONE
        try:
            trigger_obj = _make_trigger(trigger, dict(trigger_and_options))
        except (ValueError, TypeError, LookupError) as exc:
            raise JobDefinitionError(f"Job {job_id!r}: invalid trigger: {exc}") from exc
        args = tuple(args)
        kwargs = dict(kwargs or {})
        try:
            pickle.dumps((args, kwargs), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise JobDefinitionError(
                f"Job {job_id!r}: arguments cannot be stored (not picklable): {exc}"
            ) from exc
        if max_runtime is not None and not (
            isinstance(max_runtime, (int, float)) and max_runtime > 0
        ):
            raise JobDefinitionError(f"Job {job_id!r}: max_runtime must be a positive number")
        if job_id in self._specs and not replace:
            existing = self._specs[job_id]
            raise JobDefinitionError(
                f"Job {job_id!r} is declared twice ({existing.func_ref} and {ref}); "
                "job ids must be unique"
            )
        spec = JobSpec(
            job_id,
            func,
            trigger_obj,
            args,
            kwargs,
            options,
            max_runtime,
            _trigger_key(trigger, trigger_obj, trigger_and_options),
        )
        self._specs[job_id] = spec
        return spec

    def discover(self) -> None:
        """Import ``<app>/jobs.py`` of every installed app and read ``APSCHEDULER_JOBS``."""
        if self._discovered:
            return
        self._discovered = True
        if conf.AUTODISCOVER:
            autodiscover_modules("jobs")
        for entry in conf.JOBS:
            entry = dict(entry)
            func = entry.pop("func", None)
            trigger = entry.pop("trigger", None)
            if func is None or trigger is None:
                raise JobDefinitionError(
                    f"APSCHEDULER_JOBS entry {entry.get('id', entry)!r} needs 'func' and 'trigger'"
                )
            self.add(func, trigger, replace=entry.pop("replace", False), **entry)


registry = JobRegistry()


def scheduled_job(
    trigger: BaseTrigger | str,
    *,
    id: str | None = None,  # noqa: A002
    max_runtime: float | None = None,
    **kwargs: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a job: ``@scheduled_job("cron", hour=3, id="nightly_report")``.

    Takes the arguments of ``scheduler.add_job`` (trigger, trigger fields, ``args``,
    ``kwargs``, ``misfire_grace_time``, ``coalesce``, ``max_instances``, ``name``, ``executor``)
    plus ``max_runtime`` (seconds, for the "stuck" alert). The id defaults to
    ``module.function``. The function itself is returned unchanged.
    """

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        registry.add(func, trigger, id=id, max_runtime=max_runtime, **kwargs)
        return func

    return decorator


def _trigger_key(declared: BaseTrigger | str, trigger: BaseTrigger, fields: dict[str, Any]) -> str:
    """What was declared, not the trigger built from it: an interval trigger built without a
    start date gets ``now + interval``, which would change the hash at every start."""
    if isinstance(declared, str):
        return f"{declared}:{sorted((k, repr(v)) for k, v in fields.items())!r}"
    state = dict(trigger.__getstate__())
    if isinstance(trigger, (IntervalTrigger, CalendarIntervalTrigger)):
        state.pop("start_date", None)
    return f"{type(trigger).__qualname__}:{sorted((k, repr(v)) for k, v in state.items())!r}"


def _make_trigger(trigger: BaseTrigger | str, fields: dict[str, Any]) -> BaseTrigger:
    if isinstance(trigger, BaseTrigger):
        if fields:
            raise ValueError(f"unexpected arguments for a trigger instance: {sorted(fields)}")
        return trigger
    if trigger == "cron" and "expression" in fields:
        from apscheduler.triggers.cron import CronTrigger

        expression = fields.pop("expression")
        return CronTrigger.from_crontab(expression, **fields)
    from apscheduler.schedulers.base import BaseScheduler as _Base

    return _Base._create_plugin_instance(_Base, "trigger", trigger, fields)


def sync_jobs(scheduler: BaseScheduler, jobstore: str = "default") -> dict[str, list[str]]:
    """Upsert declared jobs into ``jobstore``; returns ids by action (added/updated/...).

    * new id: added;
    * same definition hash: untouched (its next run time is kept);
    * changed, same trigger: modified in place (next run time kept);
    * changed trigger: rescheduled;
    * declared earlier (has a hash) but no longer declared: removed (its history is kept).
    """
    from django_apscheduler_obs.models import DjangoJob

    registry.discover()
    report: dict[str, list[str]] = {
        "added": [],
        "updated": [],
        "rescheduled": [],
        "unchanged": [],
        "removed": [],
    }
    declared = {spec.id for spec in registry}
    # Only declared jobs and jobs declared earlier (they have a hash): a store of 100,000 jobs
    # added through the API is not read into memory at every start.
    rows = {
        job_id: (digest, next_run_time, restore_error)
        for job_id, digest, next_run_time, restore_error in DjangoJob.objects.filter(
            Q(id__in=declared) | ~Q(definition_hash="")
        ).values_list("id", "definition_hash", "next_run_time", "restore_error")
    }
    stored = {job_id: row[0] for job_id, row in rows.items()}
    # A new deploy may have fixed what made a declared job unrestorable: try again.
    DjangoJob.objects.filter(id__in=declared).exclude(restore_error="").update(restore_error="")
    for spec in registry:
        digest = spec.definition_hash()
        old = stored.get(spec.id)
        # Still unrestorable (corrupt, signed with a lost key...): rewrite it from its
        # declaration, keeping its place in the schedule.
        broken = (
            old is not None
            and (old != digest or bool(rows[spec.id][2]))
            and scheduler.get_job(spec.id, jobstore) is None
        )
        if old == digest and not broken:
            report["unchanged"].append(spec.id)
            continue
        common: dict[str, Any] = {"args": spec.args, "kwargs": spec.kwargs, **spec.options}

        def store(spec: JobSpec = spec, common: dict[str, Any] = common, **extra: Any) -> None:
            scheduler.add_job(spec.func, spec.trigger, id=spec.id, jobstore=jobstore,
                              replace_existing=True, **{**common, **extra})  # fmt: skip

        same_trigger = old is not None and old[:32] == digest[:32]
        if broken and same_trigger:
            # Rewrite the unrestorable state from its declaration; keep its next run time.
            next_run_time = rows[spec.id][1]
            if next_run_time is not None and next_run_time.tzinfo is None:
                next_run_time = next_run_time.replace(tzinfo=scheduler.timezone)
            store(next_run_time=next_run_time)
            report["updated"].append(spec.id)
        elif old is None:
            store()
            report["added"].append(spec.id)
        elif same_trigger:
            scheduler.modify_job(spec.id, jobstore, func=spec.func, **common)
            report["updated"].append(spec.id)
        else:
            store()
            report["rescheduled"].append(spec.id)
        DjangoJob.objects.filter(id=spec.id).update(definition_hash=digest, restore_error="")
    if conf.REMOVE_UNDECLARED_JOBS:
        for job_id, digest in stored.items():
            if digest and job_id not in declared:
                try:
                    scheduler.remove_job(job_id, jobstore)
                except Exception:  # already gone
                    DjangoJob.objects.filter(id=job_id).delete()
                report["removed"].append(job_id)
    for action, ids in report.items():
        if ids and action != "unchanged":
            logger.info("Declared jobs %s: %s", action, ", ".join(ids))
    return report
