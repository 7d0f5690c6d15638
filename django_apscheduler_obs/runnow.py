"""Run-now: the admin asks, the active scheduler runs.

The web process never runs a job. ``request_run()`` writes a ``RunRequest`` row (with the W3C
``traceparent`` of the current request's span, if any) after checking that some scheduler holds
a live lease. The leader's ``RunNowPoller`` thread reads queued rows about every second and
hands each to the observed executor (``submit_run_now``) with ``run_time = requested_at``; the
run is claimed, timed, traced (its span *links* to the admin request) and recorded like any
other, with ``trigger_source=run_now``, as the execution row ``(job_id, requested_at)``. The
poller then follows that row to set the request's final status and its ``execution`` link.

Status of a request::

    queued -> running -> done | failed
    queued -> refused   (no scheduler, unknown job, not picked up in RUN_NOW_TIMEOUT)
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connections
from django.db.models import Q
from django.utils import timezone
from opentelemetry.propagate import inject

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.lease import current_leader
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, RunRequest
from django_apscheduler_obs.util import reset_connection

if TYPE_CHECKING:
    from django_apscheduler_obs.scheduler import SchedulerRuntime

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between two looks at the queue (leader only)
BATCH = 50  # pending requests handled per poll


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span, or "" when there is none."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent", "")[:55]


def request_run(job_id: str, requested_by: str = "", *, group: str | None = None) -> RunRequest:
    """Queue a run of ``job_id`` for the active scheduler; never runs anything here.

    Returns the request row; its status is ``refused`` (with a message) when no scheduler
    holds a live lease or the job does not exist, so the caller can say so at once.
    """
    group = group or conf.GROUP
    request = RunRequest(
        job_id=job_id,
        group=group,
        requested_by=requested_by[:150],
        requested_at=timezone.now(),
        traceparent=current_traceparent(),
    )
    if not DjangoJob.objects.filter(id=job_id).exists():
        request.status = RunRequest.REFUSED
        request.message = f"No job with id {job_id!r}."
    elif current_leader(group) is None:
        request.status = RunRequest.REFUSED
        request.message = (
            f"No scheduler is running for group {group!r} (no live lease): nothing would run "
            "this job. Start `manage.py runapscheduler` and try again."
        )
    request.save()
    return request


def _final_request_status(execution_status: str) -> str | None:
    if execution_status == DjangoJobExecution.SUCCESS:
        return RunRequest.DONE
    if execution_status in DjangoJobExecution.FINAL_STATUSES:
        return RunRequest.FAILED
    return None  # still running


class RunNowPoller(threading.Thread):
    """The leader's side of run-now; a standby only checks its lease, without a query."""

    def __init__(self, runtime: SchedulerRuntime, interval: float = POLL_INTERVAL) -> None:
        super().__init__(name="apscheduler-run-now", daemon=True)
        self.runtime = runtime
        self.interval = interval
        self._stop_event = threading.Event()

    @property
    def group(self) -> str:
        return self.runtime.lease.group

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.interval):
                try:
                    self.step()
                except DatabaseError as exc:  # an outage: say it once a poll, no traceback
                    logger.warning("Run-now poller cannot read the queue: %s", exc)
                    reset_connection()
                except Exception:  # never let the thread die
                    logger.exception("Run-now poller error")
                    reset_connection()
        finally:
            connections.close_all()

    def step(self) -> None:
        """One look at the queue; public so tests can drive it without the thread."""
        if not self.runtime.lease.is_leader():
            return
        pending = list(
            RunRequest.objects.filter(group=self.group, status__in=RunRequest.PENDING_STATUSES)
            .order_by("id")
            .only("id", "job_id", "requested_at", "traceparent", "status", "handled_at")[:BATCH]
        )
        if not pending:
            return
        now = timezone.now()
        timeout = timedelta(seconds=float(conf.RUN_NOW_TIMEOUT))
        running = [r for r in pending if r.status == RunRequest.RUNNING]
        if running:
            self._follow(running, now, timeout)
        for request in pending:
            if request.status == RunRequest.QUEUED and self.runtime.lease.is_leader():
                self._start(request, now, timeout)

    # -- queued -> running -----------------------------------------------------------------

    def _set(self, request: RunRequest, expect: str, **values: Any) -> bool:
        """Move a request on only if nobody else did (one conditional UPDATE)."""
        return bool(RunRequest.objects.filter(pk=request.pk, status=expect).update(**values))

    def _start(self, request: RunRequest, now: datetime, timeout: timedelta) -> None:
        if now - request.requested_at > timeout:
            self._set(
                request,
                RunRequest.QUEUED,
                status=RunRequest.REFUSED,
                handled_at=now,
                handled_by=self.runtime.lease.identity,
                message=f"Not picked up within {conf.RUN_NOW_TIMEOUT} s; not run.",
            )
            return
        if not self._set(
            request,
            RunRequest.QUEUED,
            status=RunRequest.RUNNING,
            handled_at=now,
            handled_by=self.runtime.lease.identity,
        ):
            return
        message = self._submit(request)
        if message:
            logger.warning(
                "Run-now request %s of %r refused: %s", request.pk, request.job_id, message
            )
            self._set(request, RunRequest.RUNNING, status=RunRequest.REFUSED, message=message)
        else:
            logger.info("Run-now request %s: running %r", request.pk, request.job_id)

    def _submit(self, request: RunRequest) -> str:
        """Hand the job to the observed executor; returns why not, or "" when submitted."""
        from django_apscheduler_obs.executors import ObservedExecutorMixin

        job = self.runtime.jobstore.lookup_job(request.job_id)
        if job is None:
            error = (
                DjangoJob.objects.filter(id=request.job_id)
                .values_list("restore_error", flat=True)
                .first()
            )
            return f"The job cannot be loaded: {error}" if error else "The job no longer exists."
        executor = self.runtime.scheduler._executors.get(job.executor)
        if not isinstance(executor, ObservedExecutorMixin):
            return f"The job's executor {job.executor!r} cannot run jobs on request."
        try:
            executor.submit_run_now(
                job, request.requested_at, traceparent=request.traceparent or None
            )
        except Exception as exc:  # e.g. the pool is shutting down
            return f"Could not submit the run: {exc}"
        return ""

    # -- running -> done / failed ----------------------------------------------------------

    def _follow(self, running: list[RunRequest], now: datetime, timeout: timedelta) -> None:
        """Link each running request to its execution row and finish it when the row is."""
        keys = reduce(or_, (Q(job_id=r.job_id, run_time=r.requested_at) for r in running))
        executions = {
            (e.job_id, e.run_time): e
            for e in DjangoJobExecution.objects.filter(keys).only(
                "id", "job_id", "run_time", "status", "exception"
            )
        }
        for request in running:
            execution = executions.get((request.job_id, request.requested_at))
            if execution is None:
                handled = request.handled_at or request.requested_at
                if now - handled > timeout:
                    self._set(
                        request,
                        RunRequest.RUNNING,
                        status=RunRequest.FAILED,
                        message=f"No execution was recorded within {conf.RUN_NOW_TIMEOUT} s "
                        "(the scheduler may have lost its lease).",
                    )
                continue
            final = _final_request_status(execution.status)
            values: dict[str, Any] = {"execution_id": execution.pk}
            if final is not None:
                values["status"] = final
                if final == RunRequest.FAILED:
                    values["message"] = execution.status + (
                        f": {execution.exception}" if execution.exception else ""
                    )
            if final is not None or request.execution_id != execution.pk:
                self._set(request, RunRequest.RUNNING, **values)


# -- life cycle, called by SchedulerRuntime.start()/stop() ----------------------------------

_pollers: dict[str, RunNowPoller] = {}
_pollers_lock = threading.Lock()


def start_poller(runtime: SchedulerRuntime) -> RunNowPoller:
    poller = RunNowPoller(runtime)
    with _pollers_lock:
        _pollers[runtime.lease.identity] = poller
    poller.start()
    return poller


def stop_poller(runtime: SchedulerRuntime) -> None:
    with _pollers_lock:
        poller = _pollers.pop(runtime.lease.identity, None)
    if poller is not None:
        poller.stop()


def poller_of(runtime: SchedulerRuntime) -> RunNowPoller | None:
    return _pollers.get(runtime.lease.identity)
