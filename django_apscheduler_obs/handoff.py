"""Hand-off: a claimed fire time sent to a worker engine instead of the local pool.

The claim is the same fenced one as a local run's (``executors.py``, ``passes.py``); only its
status differs, ``Queued``. After the claim has committed, each fire time is enqueued with a
message that names the run and nothing else::

    leader:  claim (row "Queued") -> commit -> dispatch span -> engine.enqueue(RunMessage)
    worker:  pick-up (compare-and-set "Queued" -> "Running on worker") -> run -> final status
    leader:  inflight.py reads finished rows into metrics, marks lost and abandoned runs

An enqueue that fails (broker down) marks the row ``Lost`` at once, with the reason, so no
claimed fire time stays queued silently. A crash between the commit and the enqueue leaves a
queued row that the dispatch timeout turns into ``Lost``: visible, never a silent gap.

``max_instances`` holds for remote runs: a job's slot is given back when its run is final,
not when the message is sent (the leader learns that from ``inflight.py``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import pickle
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Protocol

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job
from django.db import DatabaseError
from opentelemetry.trace import Status, StatusCode

from django_apscheduler_obs.executors import (
    ObservedExecutorMixin,
    RunObserver,
    _claim_one,
    _job_info,
    _run_one,
)
from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.passes import PreClaim
from django_apscheduler_obs.runs import TriggerSource
from django_apscheduler_obs.sinks import tracing
from django_apscheduler_obs.sinks.history import Claim
from django_apscheduler_obs.util import recycle_worker_connections, reset_connection

logger = logging.getLogger(__name__)

MESSAGE_VERSION = 1


class MessageError(ValueError):
    """A message that does not name a run (wrong version, missing or malformed fields)."""


@dataclass(frozen=True)
class RunMessage:
    """What travels through the broker: the run's identity, never the job's arguments.

    The worker loads the job itself from the job store and checks its signature, as the
    scheduler does, so nothing pickled crosses the broker.
    """

    execution_id: int
    job_id: str
    run_time: datetime  # the claimed fire time (aware)
    traceparent: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (Django's Tasks framework accepts nothing else)."""
        return {
            "v": MESSAGE_VERSION,
            "execution_id": self.execution_id,
            "job_id": self.job_id,
            "run_time": self.run_time.isoformat(),
            "traceparent": self.traceparent,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RunMessage:
        if not isinstance(data, dict) or data.get("v") != MESSAGE_VERSION:
            raise MessageError(f"not a version {MESSAGE_VERSION} run message: {data!r}"[:300])
        try:
            run_time = datetime.fromisoformat(data["run_time"])
            if run_time.tzinfo is None:
                raise ValueError("run_time has no time zone")
            execution_id = data["execution_id"]
            if not isinstance(execution_id, int) or isinstance(execution_id, bool):
                raise ValueError("execution_id is not an integer")
            return cls(execution_id, str(data["job_id"]), run_time, str(data.get("traceparent")))
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"malformed run message ({exc}): {data!r}"[:300]) from exc


class Engine(Protocol):
    """A worker engine as the scheduler sees it (``engines/``)."""

    alias: str

    def enqueue(self, message: RunMessage) -> None:
        """Publish ``message``; raise if the engine did not accept it."""


@dataclass
class _Slot:
    """One ``submit_job`` of a job: its max_instances slot, held until its runs are final."""

    job_id: str
    remaining: int
    events: list[JobExecutionEvent] = field(default_factory=list)


class RemoteExecutor(ObservedExecutorMixin, BaseExecutor):
    """An executor whose claimed fire times run on a worker engine (``executor="<alias>"``).

    Enqueues happen on a few threads of their own, so a slow or unreachable broker never
    stalls the scheduler loop.
    """

    claim_status = DjangoJobExecution.QUEUED

    def __init__(
        self, engine: Engine, *, observer: RunObserver | None = None, enqueue_threads: int = 4
    ) -> None:
        super().__init__()
        self.engine = engine
        self.alias = engine.alias
        self.observer = observer if observer is not None else RunObserver()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            enqueue_threads, thread_name_prefix=f"apscheduler-enqueue-{engine.alias}"
        )
        self._slots: dict[int, _Slot] = {}  # execution id -> the slot its run holds
        self._slots_lock = threading.Lock()

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait)

    # -- hand-off ----------------------------------------------------------------------------

    def _hand_over(
        self,
        job: Job,
        run_times: list[datetime],
        claims: dict[datetime, PreClaim],
        coalesced: int,
    ) -> None:
        self._pool.submit(_recycling, self._dispatch_all, job, run_times, claims, coalesced)

    def submit_run_now(
        self, job: Job, run_time: datetime, *, traceparent: str | None = None
    ) -> None:
        """Run-now from the admin: claimed and enqueued like a fire time, outside the job's
        max_instances accounting (as a local run-now)."""

        def claim_and_dispatch() -> None:
            info = _job_info(job, job._jobstore_alias)
            pre = _claim_one(
                self.observer,
                job,
                info,
                run_time,
                self._logger,
                TriggerSource.RUN_NOW,
                self.claim_status,
            )
            if pre.result is Claim.CLAIMED:
                self._dispatch(job, [run_time], None, link=traceparent)

        self._pool.submit(_recycling, claim_and_dispatch)

    def _dispatch_all(
        self,
        job: Job,
        run_times: list[datetime],
        claims: dict[datetime, PreClaim],
        coalesced: int,
    ) -> None:
        try:
            info = _job_info(job, job._jobstore_alias)
            if coalesced:
                self.observer.skip(job.id, "coalesced", coalesced)
            queued = [
                t
                for t in run_times
                if claims[t].result is Claim.CLAIMED and claims[t].status == self.claim_status
            ]
            events: list[JobExecutionEvent] = []
            for t in run_times:  # missed, not ours, or not claimed: as a local run would
                if t not in queued:
                    events.extend(
                        _run_one(
                            self.observer,
                            job,
                            info,
                            job._jobstore_alias,
                            t,
                            self._logger,
                            coalesced=0,
                            trigger_source=TriggerSource.SCHEDULE,
                            traceparent=None,
                            pre=claims[t],
                        )
                    )
            slot = _Slot(job.id, len(queued), events)
            if not queued:
                self._run_job_success(job.id, events)
                return
            self._dispatch(job, queued, slot)
        except Exception:
            logger.exception("Could not hand job %r over to %r", job.id, self.alias)

    def _dispatch(
        self,
        job: Job,
        run_times: list[datetime],
        slot: _Slot | None,
        *,
        link: str | None = None,
    ) -> None:
        """Enqueue each claimed (committed) fire time; a slot is released once all are final."""
        info = _job_info(job, job._jobstore_alias)
        ids = self._execution_ids(job.id, run_times)
        if slot is not None and _is_last_fire_time(job, run_times[-1]):
            # APScheduler removes the job from the store with this pass: its worker will
            # load it from the run's row instead (signed, like the store's copy).
            keep_job_state(job, list(ids.values()))
        for run_time in run_times:
            execution_id = ids.get(run_time.timestamp())
            if execution_id is None:  # the row vanished (pruned?) or the read failed
                logger.error("No execution row for %r at %s: not enqueued", job.id, run_time)
                self._settle_slot(slot, None)
                continue
            if slot is not None:
                with self._slots_lock:  # before the enqueue: the run may finish first
                    adopted = self._slots.get(execution_id)
                    self._slots[execution_id] = slot
                if adopted is not None:
                    # A new leader's adopt() saw this row between our commit and now and
                    # took a slot for it: the submission's own slot stands for it instead.
                    self._settle_slot(adopted, None)
            with tracing.dispatch_span(
                info, run_time, execution_id, tracer=self.observer.tracer, executor=self.alias
            ) as (span, traceparent):
                if link:
                    span.set_attribute("apscheduler.run.request_traceparent", link)
                message = RunMessage(execution_id, job.id, run_time, traceparent)
                try:
                    self.engine.enqueue(message)
                except Exception as exc:
                    span.set_status(Status(StatusCode.ERROR, f"enqueue failed: {exc}"))
                    logger.exception(
                        "Could not enqueue %r at %s on %r: run marked lost",
                        job.id,
                        run_time,
                        self.alias,
                    )
                    ctx = span.get_span_context()
                    trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
                    mark_lost(
                        [execution_id],
                        f"Not run: enqueueing it on '{self.alias}' failed: "
                        f"{type(exc).__name__}: {exc}",
                        trace_id=trace_id,
                    )

    def _execution_ids(self, job_id: str, run_times: list[datetime]) -> dict[float, int]:
        """The rows the claim created (one indexed read per submission)."""
        for attempt in range(3):
            try:
                rows = DjangoJobExecution.objects.filter(
                    job_id=job_id, run_time__in=run_times
                ).values_list("run_time", "id")
                return {rt.timestamp(): pk for rt, pk in rows}
            except DatabaseError:
                reset_connection()
                if attempt == 2:
                    logger.exception("Could not read the execution rows of %r", job_id)
        return {}

    # -- runs becoming final (inflight.py) ---------------------------------------------------

    def settle(
        self,
        execution_id: int,
        status: str,
        exception: str | None,
        run_time: datetime | None = None,
    ) -> None:
        """A remote run is final: its event goes to listeners and, with the last run of its
        submission, the job's max_instances slot comes back."""
        with self._slots_lock:
            slot = self._slots.pop(execution_id, None)
        if slot is None:
            return
        self._settle_slot(slot, _event(slot.job_id, status, exception, run_time))

    def _settle_slot(self, slot: _Slot | None, event: JobExecutionEvent | None) -> None:
        if slot is None:
            return
        with self._slots_lock:
            if event is not None:
                slot.events.append(event)
            slot.remaining -= 1
            done = slot.remaining == 0
        if done:
            self._run_job_success(slot.job_id, slot.events)

    def adopt(self, pending: Iterable[tuple[int, str]]) -> None:
        """On becoming leader: hold a slot for every remote run not yet final (claimed by an
        earlier leader, or by us before a lost lease), and release ours that finished while
        another process was counting them."""
        rows = dict(pending)
        with self._slots_lock:
            gone = [pk for pk in self._slots if pk not in rows]
            new = {pk: job_id for pk, job_id in rows.items() if pk not in self._slots}
            for pk, job_id in new.items():
                self._slots[pk] = _Slot(job_id, 1)
        for pk in gone:
            self.settle(pk, "", None)
        if new and self._lock is not None:
            with self._lock:
                for job_id in new.values():
                    self._instances[job_id] += 1

    @property
    def in_flight(self) -> int:
        with self._slots_lock:
            return len(self._slots)


def _event(
    job_id: str, status: str, exception: str | None, run_time: datetime | None
) -> JobExecutionEvent | None:
    """The APScheduler event a local run of that outcome would have sent."""
    code = {
        DjangoJobExecution.SUCCESS: EVENT_JOB_EXECUTED,
        DjangoJobExecution.MISSED: EVENT_JOB_MISSED,
    }.get(status, EVENT_JOB_ERROR if status else 0)
    if not code:
        return None
    return JobExecutionEvent(
        code,
        job_id,
        "default",
        run_time or datetime.now(timezone.utc),
        exception=RuntimeError(exception) if code == EVENT_JOB_ERROR else None,
    )


def _recycling(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn`` on an enqueue thread, then let the thread's connection age out as a job
    worker's does (``APSCHEDULER_WORKER_CONN_MAX_AGE``)."""
    try:
        fn(*args)
    finally:
        recycle_worker_connections()


def _is_last_fire_time(job: Job, run_time: datetime) -> bool:
    """APScheduler's own rule for removing a job after submitting it."""
    now = datetime.now(run_time.tzinfo or timezone.utc)
    return job.trigger.get_next_fire_time(run_time, now) is None


def keep_job_state(job: Job, ids: list[int]) -> None:
    """Store the job's signed state on its runs' rows (``DjangoJobExecution.job_state``)."""
    from django_apscheduler_obs import signing

    if not ids:
        return
    state = signing.sign(pickle.dumps(job.__getstate__(), pickle.HIGHEST_PROTOCOL))
    for attempt in range(3):
        try:
            DjangoJobExecution.objects.filter(id__in=ids).update(job_state=state)
            return
        except DatabaseError:
            reset_connection()
            if attempt == 2:
                logger.exception("Could not keep the state of finishing job %r", job.id)


def mark_lost(ids: list[int], reason: str, *, trace_id: str = "") -> int:
    """Mark queued runs lost: a conditional UPDATE, so a worker that picks the run up at the
    same moment and this mark cannot both win."""
    now = datetime.now(timezone.utc)
    values: dict[str, Any] = {
        "status": DjangoJobExecution.LOST,
        "finished": Decimal(f"{now.timestamp():.6f}"),
        "exception": reason[:1000],
        "error_type": "Lost",
        "report_pending": True,
    }
    if trace_id:
        values["trace_id"] = trace_id
    for attempt in range(3):
        try:
            return DjangoJobExecution.objects.filter(
                id__in=ids, status=DjangoJobExecution.QUEUED
            ).update(**values)
        except DatabaseError:
            reset_connection()
            if attempt == 2:
                logger.exception("Could not mark runs %s lost; the dispatch timeout will", ids)
    return 0
