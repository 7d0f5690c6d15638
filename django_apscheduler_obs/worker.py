"""The worker's side of a hand-off: pick the run up, load the job, run it, record it.

Whatever engine delivered the message (Celery, Django's Tasks framework), the run goes::

    pick-up:  UPDATE … SET status = "Running on worker", worker = …
              WHERE id = ? AND status = "Queued"
              0 rows: the run was already picked up (a redelivery, a duplicate publish), or the
              leader marked it lost: the message is dropped and nothing runs
    load:     the job's signed state from the job store, checked as the scheduler checks it
    run:      invoke.py (span as the child of the dispatch span, clock, current_run())
    record:   UPDATE … the final status WHERE id = ? AND worker = us (report_pending: the
              leader reads it into its metrics)

While the run goes on, a thread refreshes ``worker_seen`` on the rows this process runs; the
leader marks a run whose worker stopped refreshing it (kill -9) abandoned.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from apscheduler.job import Job
from django.db import DatabaseError, close_old_connections, connections
from django.db.models import F

from django_apscheduler_obs import signing
from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.handoff import MessageError, RunMessage
from django_apscheduler_obs.invoke import invoke
from django_apscheduler_obs.lease import _test_hooks_enabled
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from django_apscheduler_obs.runs import JobInfo, Outcome, RunRecord, TriggerSource
from django_apscheduler_obs.sinks import tracing
from django_apscheduler_obs.sinks.history import is_transient
from django_apscheduler_obs.util import get_django_internal_datetime, reset_connection

logger = logging.getLogger(__name__)

# What run_message returns (the engine's task result; also logged).
DONE = "done"
DUPLICATE = "duplicate"  # picked up elsewhere, or marked lost before we got it
REJECTED = "rejected"  # the message does not name a run


class JobLoadError(Exception):
    """The job could not be loaded on this worker: the run fails with this message."""


def run_message(message: Any, *, worker: str) -> str:
    """Run the fire time ``message`` names, at most once whatever the deliveries."""
    close_old_connections()
    try:
        try:
            msg = RunMessage.from_dict(message)
        except MessageError as exc:
            logger.error("Dropped a message that names no run: %s", exc)
            return REJECTED
        if not _pick_up(msg, worker):
            logger.warning(
                "Run %s of %r at %s was already picked up or marked lost: message dropped",
                msg.execution_id,
                msg.job_id,
                msg.run_time,
            )
            return DUPLICATE
        _run(msg, worker)
        return DONE
    finally:
        close_old_connections()


def unsafe_no_pick_up() -> bool:
    """TEST-ONLY negative control: every delivery runs, without the compare-and-set.

    Enabled by ``DAO_UNSAFE_NO_PICKUP=1`` *and* ``APSCHEDULER_TEST_HOOKS = True``: the chaos
    suite must then see a redelivered message run twice.
    """
    return os.environ.get("DAO_UNSAFE_NO_PICKUP") == "1" and _test_hooks_enabled()


def _pick_up(msg: RunMessage, worker: str) -> bool:
    """The compare-and-set that makes every delivery after the first a no-op."""
    now = datetime.now(timezone.utc)
    if unsafe_no_pick_up():
        DjangoJobExecution.objects.filter(id=msg.execution_id).update(
            status=DjangoJobExecution.PICKED_UP, picked_up_at=now, worker=worker[:200]
        )
        return True
    n = _retrying(
        "pick-up",
        lambda: DjangoJobExecution.objects.filter(
            id=msg.execution_id,
            job_id=msg.job_id,  # a message naming a row of another job picks nothing up
            run_time=get_django_internal_datetime(msg.run_time),
            status=DjangoJobExecution.QUEUED,
        ).update(
            # enqueued_at first: MySQL evaluates SET left to right, with updated values.
            enqueued_at=F("started"),
            status=DjangoJobExecution.PICKED_UP,
            started=now,
            picked_up_at=now,
            worker=worker[:200],
            worker_seen=now,
        ),
    )
    return n == 1


def _run(msg: RunMessage, worker: str) -> None:
    row = _retrying(
        "read",
        lambda: (
            DjangoJobExecution.objects.filter(id=msg.execution_id)
            .values("trigger_source", "enqueued_at", "picked_up_at", "owner", "epoch")
            .get()
        ),
    )
    try:
        source = TriggerSource(row["trigger_source"])
    except ValueError:
        source = TriggerSource.SCHEDULE
    picked_up = row["picked_up_at"]
    queue_wait = (
        (picked_up - row["enqueued_at"]).total_seconds()
        if picked_up is not None and row["enqueued_at"] is not None
        else None
    )
    try:
        job = load_job(msg.job_id, msg.execution_id)
        info = JobInfo.of(job)
    except JobLoadError as exc:
        job, info = None, JobInfo(msg.job_id, msg.job_id, "", "", "", "default", 1, None)
        load_error: JobLoadError | None = exc
    else:
        load_error = None
    record = RunRecord(
        info,
        msg.run_time,
        Outcome.SUCCESS,
        owner=row["owner"],
        epoch=row["epoch"],
        trigger_source=source,
        execution_id=msg.execution_id,
        worker=worker,
        queue_wait=queue_wait,
    )
    _beats.add(msg.execution_id, worker)
    try:
        if job is not None:
            invoke(
                job,
                info,
                record,
                tracer=tracing.get_tracer(),
                run_logger=logging.getLogger("django_apscheduler_obs.worker.run"),
                jobstore_alias="default",
                parent=msg.traceparent or None,
            )
        else:
            assert load_error is not None
            logger.error("Run %s of %r failed: %s", msg.execution_id, msg.job_id, load_error)
            with tracing.run_span(info, record, parent=msg.traceparent or None) as span:
                now = datetime.now(timezone.utc)
                record.started = record.finished = now
                record.start_delay = (now - msg.run_time).total_seconds()
                record.duration = 0.0
                record.outcome = Outcome.ERROR
                record.exception = load_error
                tracing.finish_span(span, record)
        _record(record, worker)
    finally:
        _beats.discard(msg.execution_id)


def load_job(job_id: str, execution_id: int | None = None) -> Job:
    """The job as the scheduler would restore it: signed state checked, then unpickled.

    From the job store; or, for the last fire time of a job the scheduler has since removed
    (a one-off job), from the copy kept on the run's row. A job this worker cannot load
    (removed, tampered, code missing on this worker) raises ``JobLoadError``; the job store
    row is left alone (the scheduler may well load it).
    """
    stored = _retrying(
        "job",
        lambda: DjangoJob.objects.filter(id=job_id).values_list("job_state", flat=True).first(),
    )
    if stored is None and execution_id is not None:
        stored = _retrying(
            "job",
            lambda: (
                DjangoJobExecution.objects.filter(id=execution_id, job_id=job_id)
                .exclude(job_state=None)
                .values_list("job_state", flat=True)
                .first()
            ),
        )
    if stored is None:
        raise JobLoadError(f"The job '{job_id}' no longer exists in the job store")
    try:
        state = pickle.loads(signing.verify(bytes(stored)))  # noqa: S301 - signature checked
        job = Job.__new__(Job)
        job.__setstate__(state)
    except signing.BadSignature as exc:
        raise JobLoadError(
            f"The stored state of '{job_id}' failed its signature check: {exc}"
        ) from exc
    except Exception as exc:
        raise JobLoadError(
            f"The job '{job_id}' cannot be restored on this worker "
            f"({type(exc).__name__}: {exc}); is the worker running the same code?"
        ) from exc
    job._jobstore_alias = "default"
    return job


_FINAL = {
    Outcome.SUCCESS: DjangoJobExecution.SUCCESS,
    Outcome.ERROR: DjangoJobExecution.ERROR,
    Outcome.MISSED: DjangoJobExecution.MISSED,
}


def _record(record: RunRecord, worker: str) -> None:
    """The final status, matched on our pick-up (an "abandoned" mark made while this worker
    was unreachable is replaced: the run did finish)."""
    values = {
        "status": _FINAL[record.outcome],
        "finished": _dec(record.finished.timestamp() if record.finished else None),
        "duration": _dec(record.duration),
        "started": record.started,
        "start_delay": record.start_delay,
        "exception": record.exception_text,
        "traceback": record.traceback,
        "error_type": record.error_type[:200],
        "trace_id": record.trace_id,
        "span_id": record.span_id,
        "queue_wait": record.queue_wait,
        "worker_seen": datetime.now(timezone.utc),
        "report_pending": True,
    }
    n = _retrying(
        "final status",
        lambda: DjangoJobExecution.objects.filter(
            id=record.execution_id,
            worker=worker[:200],
            status__in=(DjangoJobExecution.PICKED_UP, DjangoJobExecution.ABANDONED),
        ).update(**values),
        patience=max(conf.WORKER_LIVENESS, 5.0),
    )
    if n == 0:
        logger.warning(
            "Run %s was not ours any more; its outcome is not recorded", record.execution_id
        )


def _dec(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(f"{value:.6f}")


def _retrying(what: str, fn: Any, *, patience: float = 30.0) -> Any:
    """``fn()`` through short database outages (with a new connection each time), for up to
    ``patience`` seconds; then the error propagates and the engine reports the task failed
    (the leader marks the run abandoned or lost: it never stays running)."""
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            return fn()
        except DatabaseError as exc:
            reset_connection()
            if not is_transient(exc) or time.monotonic() > deadline:
                logger.exception("Worker could not write the %s of a run", what)
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _Beats:
    """Refreshes ``worker_seen`` of this process's runs every quarter of the liveness."""

    def __init__(self) -> None:
        self._runs: dict[int, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def add(self, execution_id: int, worker: str) -> None:
        with self._lock:
            self._runs[execution_id] = worker[:200]
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="apscheduler-worker-liveness", daemon=True
                )
                self._thread.start()

    def discard(self, execution_id: int) -> None:
        with self._lock:
            self._runs.pop(execution_id, None)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    self._wake.wait(conf.WORKER_LIVENESS / 4)
                    runs = dict(self._runs)
                    if not runs:
                        self._thread = None
                        return
                try:
                    for worker in set(runs.values()):
                        DjangoJobExecution.objects.filter(
                            id__in=[pk for pk, w in runs.items() if w == worker],
                            worker=worker,
                            status=DjangoJobExecution.PICKED_UP,
                        ).update(worker_seen=datetime.now(timezone.utc))
                except DatabaseError:
                    reset_connection()
                    logger.warning("Could not refresh the liveness of running runs", exc_info=True)
        finally:
            connections.close_all()


_beats = _Beats()
