"""Observed executors: the one place where a run is claimed, timed, traced and recorded.

APScheduler 3 sends no event when a run starts, and sends EXECUTED/ERROR/MISSED only after
``run_job`` returns for every run time (SUBMITTED may even arrive after EXECUTED). Listeners
alone can measure neither the start delay nor the pure duration, nor put a span around the
job's code. So ``_do_submit_job`` submits ``observed_run_job`` instead of APScheduler's
``run_job``; it keeps ``run_job``'s contract (same misfire rule, same events returned), so the
scheduler and any user listener see exactly what they saw before.

Per fire time::

    [scheduler thread, before APScheduler advances the job in its store]
    misfire check -> fenced claim (INSERT the execution row)
    [worker thread]
    span + clock -> job.func -> RunRecord -> sinks: history (UPDATE the row), metrics, span
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from apscheduler.events import (
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from opentelemetry.trace import TracerProvider

from django_apscheduler_obs.invoke import invoke
from django_apscheduler_obs.jobstores import in_scheduler_loop, request_replay
from django_apscheduler_obs.lease import freeze_point, unsafe_no_claim
from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.passes import ClaimRow, PreClaim, Submission, pass_batch
from django_apscheduler_obs.runs import JobInfo, Outcome, RunRecord, TriggerSource
from django_apscheduler_obs.sinks import tracing
from django_apscheduler_obs.sinks.history import Claim, HistorySink
from django_apscheduler_obs.util import recycle_worker_connections

if TYPE_CHECKING:
    from django_apscheduler_obs.lease import Lease
    from django_apscheduler_obs.sinks.metrics import SchedulerMetrics

logger = logging.getLogger(__name__)

HEARTBEAT_JOB_ID = "django_apscheduler_obs.heartbeat"
MAX_COALESCE_REPLAY = 1000  # a second-level cron after a day's outage: stop counting there


class RunObserver:
    """The sinks of one scheduler, each isolated so one failing never costs the others."""

    def __init__(
        self,
        *,
        history: HistorySink | None = None,
        metrics: SchedulerMetrics | None = None,
        lease: Lease | None = None,
        is_fenced_store: Callable[[str], bool] = lambda alias: True,
        max_runtime: Callable[[str], float | None] = lambda job_id: None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.history = history if history is not None else HistorySink(metrics)
        self.metrics = metrics
        self.lease = lease
        self.is_fenced_store = is_fenced_store
        self.max_runtime = max_runtime
        self.tracer = tracing.get_tracer(tracer_provider)
        self._running: dict[str, dict[int, float]] = {}  # job id -> {run key: start ts}
        self._running_lock = threading.Lock()

    @property
    def group(self) -> str:
        from django_apscheduler_obs.conf import conf

        return self.lease.group if self.lease is not None else conf.GROUP

    def fence(self, jobstore: str) -> tuple[bool, tuple[str, int] | None]:
        """(fenced?, (owner, epoch)) for a job of ``jobstore``."""
        if self.lease is None or not self.is_fenced_store(jobstore):
            return False, None
        return True, self.lease.fence()

    def claim(self, job: JobInfo, run_time: datetime, status: str, **kwargs: Any) -> Claim:
        return self.claim_fenced(job, run_time, status, **kwargs)[0]

    def claim_fenced(
        self, job: JobInfo, run_time: datetime, status: str, **kwargs: Any
    ) -> tuple[Claim, tuple[str, int] | None]:
        """The claim and the (owner, epoch) it was made under (read *before* the statement:
        the database decides whether that epoch still holds)."""
        if unsafe_no_claim():  # TEST-ONLY negative control of the chaos suite
            return Claim.CLAIMED, None
        fenced, fence = self.fence(job.jobstore)
        if fenced and fence is None:
            result = Claim.FENCED  # we know locally that we lost the lease: no statement
        else:
            freeze_point("claim")  # TEST-ONLY hook: off unless APSCHEDULER_TEST_HOOKS
            result = self.history.claim(
                job.id, run_time, fence, group=self.group, status=status, **kwargs
            )
            if result is Claim.FENCED and fence is not None and self.lease is not None:
                # The database says this epoch no longer leads: stop acting on it now, not
                # at the local deadline (no replays of fire times we cannot claim).
                self.lease.fenced_by_database(fence[1])
        if self.metrics is not None:
            self.metrics.claims.labels(self.group, result.value).inc()
        return result, fence

    def _isolated(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("The %s sink failed; the run and the other sinks are unaffected", what)

    def started(self, job: JobInfo, key: int, ts: float) -> None:
        with self._running_lock:
            self._running.setdefault(job.id, {})[key] = ts
        if self.metrics is not None:
            self._isolated("metrics", self.metrics.run_started, job)

    def finished(self, job: JobInfo, key: int) -> None:
        with self._running_lock:
            runs = self._running.get(job.id)
            if runs is not None:
                runs.pop(key, None)
                if not runs:
                    del self._running[job.id]
        if self.metrics is not None:
            self._isolated("metrics", self.metrics.run_finished, job)

    def oldest_running(self) -> dict[str, float]:
        """Start (unix time) of the oldest run still going, per job: the stuck alert's input."""
        with self._running_lock:
            return {job_id: min(runs.values()) for job_id, runs in self._running.items() if runs}

    def record(self, record: RunRecord, *, history: bool = True) -> None:
        if history:
            self._isolated("history", self.history.record, record)
        if self.metrics is not None:
            self._isolated("metrics", self.metrics.record, record)

    def skip(self, job_id: str, reason: str, count: int = 1) -> None:
        if self.metrics is not None:
            self._isolated("metrics", self.metrics.skip, job_id, reason, count)


def count_coalesced(job: Job, run_times: list[datetime]) -> int:
    """Fire times that ``coalesce=True`` dropped before this submission (APScheduler drops
    them without any event), found by replaying the trigger from the job's stored next run."""
    if not run_times or not job.coalesce or job.next_run_time is None:
        return 0
    last = run_times[-1]
    count = 0
    fire_time: datetime | None = job.next_run_time
    while fire_time is not None and fire_time < last and count < MAX_COALESCE_REPLAY:
        count += 1
        fire_time = job.trigger.get_next_fire_time(fire_time, last)
    return count


def observed_run_job(
    observer: RunObserver,
    job: Job,
    jobstore_alias: str,
    run_times: list[datetime],
    logger_name: str,
    *,
    coalesced: int = 0,
    trigger_source: TriggerSource = TriggerSource.SCHEDULE,
    traceparent: str | None = None,
    claims: dict[datetime, PreClaim] | None = None,
) -> list[JobExecutionEvent]:
    """APScheduler's ``run_job`` contract, with a claim, a span and a record per run time.

    ``claims``: fire times already claimed by the scheduler thread (``claim_fire_times``).
    """
    run_logger = logging.getLogger(logger_name)
    events: list[JobExecutionEvent] = []
    info = _job_info(job, jobstore_alias)
    if coalesced:
        observer.skip(job.id, "coalesced", coalesced)
    recycle_worker_connections()
    try:
        for run_time in run_times:
            events.extend(
                _run_one(
                    observer,
                    job,
                    info,
                    jobstore_alias,
                    run_time,
                    run_logger,
                    coalesced=coalesced,
                    trigger_source=trigger_source,
                    traceparent=traceparent,
                    pre=claims.get(run_time) if claims is not None else None,
                )
            )
            coalesced = 0
    finally:
        recycle_worker_connections()
    return events


def _job_info(job: Job, jobstore_alias: str) -> JobInfo:
    info = JobInfo.of(job)
    if not info.jobstore:
        info = JobInfo(**{**info.__dict__, "jobstore": jobstore_alias})
    return info


def claim_row(
    job: Job,
    run_time: datetime,
    run_logger: logging.Logger,
    trigger_source: TriggerSource,
    status: str = DjangoJobExecution.SENT,
) -> ClaimRow:
    """The execution row that claims ``run_time``: ``status`` (running here, or queued for a
    worker), or missed by APScheduler's misfire rule of ``run_job`` (unchanged)."""
    if job.misfire_grace_time is not None and trigger_source is TriggerSource.SCHEDULE:
        difference = datetime.now(timezone.utc) - run_time
        if difference > timedelta(seconds=job.misfire_grace_time):
            run_logger.warning('Run time of job "%s" was missed by %s', job, difference)
            message = f"Run time of job '{job.id}' was missed by {difference}"
            return ClaimRow(job.id, run_time, DjangoJobExecution.MISSED, exception=message)
    return ClaimRow(
        job.id,
        run_time,
        status,
        started=datetime.now(timezone.utc),
        trigger_source=trigger_source,
    )


def _claim_one(
    observer: RunObserver,
    job: Job,
    info: JobInfo,
    run_time: datetime,
    run_logger: logging.Logger,
    trigger_source: TriggerSource,
    status: str = DjangoJobExecution.SENT,
) -> PreClaim:
    row = claim_row(job, run_time, run_logger, trigger_source, status)
    result, fence = observer.claim_fenced(
        info,
        run_time,
        row.status,
        started=row.started,
        trigger_source=row.trigger_source,
        exception=row.exception,
    )
    return PreClaim(result, row.status, fence, row.exception or "")


def claim_fire_times(
    observer: RunObserver,
    job: Job,
    jobstore_alias: str,
    run_times: list[datetime],
    logger_name: str,
    status: str = DjangoJobExecution.SENT,
) -> dict[datetime, PreClaim]:
    """Claim every fire time in the scheduler thread, *before* APScheduler advances the job.

    ``_process_jobs`` calls ``submit_job`` and then ``update_job``. Claiming here, not in the
    worker, means that no pause or crash can fall between "the store moved past this fire time"
    and "this fire time is claimed": a process that stops after this point leaves a claimed
    row (run late, or marked ``abandoned`` by the next leader), never a silent gap. A claim
    that fails on a database error asks the job store not to advance the job, so the fire time
    is replayed (and claimed) on a later pass, by this leader or the next one.
    """
    run_logger = logging.getLogger(logger_name)
    info = _job_info(job, jobstore_alias)
    claims: dict[datetime, PreClaim] = {}
    for run_time in run_times:
        pre = _claim_one(observer, job, info, run_time, run_logger, TriggerSource.SCHEDULE, status)
        if pre.result is Claim.ERROR and observer.is_fenced_store(info.jobstore):
            pre = PreClaim(pre.result, pre.status, pre.fence, pre.message, request_replay(job.id))
        claims[run_time] = pre
    return claims


def _run_one(
    observer: RunObserver,
    job: Job,
    info: JobInfo,
    jobstore_alias: str,
    run_time: datetime,
    run_logger: logging.Logger,
    *,
    coalesced: int,
    trigger_source: TriggerSource,
    traceparent: str | None,
    pre: PreClaim | None = None,
) -> list[JobExecutionEvent]:
    if pre is None:
        pre = _claim_one(observer, job, info, run_time, run_logger, trigger_source)
    claim = pre.result
    if pre.status == DjangoJobExecution.MISSED:
        if claim is Claim.ERROR and not pre.replay:  # keep the record: written later
            observer.history.record_skip(job.id, run_time, DjangoJobExecution.MISSED, pre.message)
        elif claim is not Claim.CLAIMED:  # someone else's, fenced, or replayed later
            return []
        observer.record(RunRecord(info, run_time, Outcome.MISSED), history=False)
        return [JobExecutionEvent(EVENT_JOB_MISSED, job.id, jobstore_alias, run_time)]

    if claim is not Claim.CLAIMED:
        if claim is Claim.ERROR and not pre.replay:
            # Not claimed, so not run (at most once), and the job store advanced the job:
            # this row says why the fire time did not run.
            observer.history.record_skip(
                job.id,
                run_time,
                DjangoJobExecution.MISSED,
                f"Not run: the database was unreachable when '{job.id}' was due",
            )
        else:
            run_logger.info('Skipping job "%s" at %s: %s', job, run_time, claim.value)
        return []

    fence = pre.fence
    if (
        job.misfire_grace_time is not None
        and trigger_source is TriggerSource.SCHEDULE
        and datetime.now(timezone.utc) - run_time > timedelta(seconds=job.misfire_grace_time)
    ):
        # Claimed in time but it waited in the pool past its grace time: APScheduler's rule
        # says missed. The claimed row becomes "missed" (matched by our owner).
        difference = datetime.now(timezone.utc) - run_time
        run_logger.warning('Run time of job "%s" was missed by %s', job, difference)
        observer.record(RunRecord(info, run_time, Outcome.MISSED, owner=fence[0] if fence else ""))
        return [JobExecutionEvent(EVENT_JOB_MISSED, job.id, jobstore_alias, run_time)]

    record = RunRecord(
        info,
        run_time,
        Outcome.SUCCESS,
        # The claim wrote our identity as owner; the final UPDATE matches on it.
        owner=fence[0] if fence is not None else "",
        epoch=fence[1] if fence is not None else None,
        trigger_source=trigger_source,
        coalesced=coalesced,
    )
    key = id(record)
    # A run counts as running until its record is written: a graceful stop waits for
    # running runs, so it must not see this one finished before its row is.
    try:
        event = invoke(
            job,
            info,
            record,
            tracer=observer.tracer,
            run_logger=run_logger,
            jobstore_alias=jobstore_alias,
            traceparent=traceparent,
            on_started=lambda: observer.started(info, key, record.started.timestamp()),  # type: ignore[union-attr]
        )
        observer.record(record)
    finally:
        observer.finished(info, key)
    return [event]


class ObservedExecutorMixin:
    """Claims every fire time, then hands the claimed runs over (``_hand_over``)."""

    # The status a runnable fire time is claimed with: running here.
    claim_status = DjangoJobExecution.SENT
    observer: RunObserver
    _pool: Any
    _scheduler: Any
    _logger: logging.Logger
    _run_job_error: Callable[..., None]
    _run_job_success: Callable[..., None]

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        if job.id == HEARTBEAT_JOB_ID:  # the canary: through the pool, nothing recorded
            self._submit(job, run_times, lambda: _heartbeat(job, run_times))
            return
        coalesced = count_coalesced(job, run_times)

        def submit(claims: dict[datetime, PreClaim]) -> None:
            self._hand_over(job, run_times, claims, coalesced)

        batch = pass_batch(self._scheduler, job._jobstore_alias) if in_scheduler_loop() else None
        if batch is not None and not unsafe_no_claim():
            # A pass over a Django store: its claims are written with the whole pass's, when
            # the pass ends (passes.py), and the runs go to the pool after that commit.
            rows = [
                claim_row(job, t, self._logger, TriggerSource.SCHEDULE, self.claim_status)
                for t in run_times
            ]
            batch.submissions.append(
                Submission(
                    job,
                    run_times,
                    rows,
                    submit=lambda pre: self._settle(job, pre, submit),
                    release=lambda: self._run_job_success(job.id, []),
                )
            )
            return
        # In this (the scheduler's) thread, before APScheduler's update_job advances the job.
        submit(
            claim_fire_times(
                self.observer,
                job,
                job._jobstore_alias,
                run_times,
                self._logger.name,
                self.claim_status,
            )
        )

    def _hand_over(
        self,
        job: Job,
        run_times: list[datetime],
        claims: dict[datetime, PreClaim],
        coalesced: int,
    ) -> None:
        """The fire times are claimed: run them here, in the pool (``handoff.py`` sends them
        to a worker engine instead)."""
        self._submit(
            job,
            run_times,
            lambda: observed_run_job(
                self.observer,
                job,
                job._jobstore_alias,
                run_times,
                self._logger.name,
                coalesced=coalesced,
                claims=claims,
            ),
        )

    def _settle(
        self,
        job: Job,
        claims: dict[datetime, PreClaim],
        submit: Callable[[dict[datetime, PreClaim]], None],
    ) -> None:
        """The pass's claims of ``job`` are known: count them, then hand the runs over."""
        for pre in claims.values():
            if self.observer.metrics is not None:
                self.observer.metrics.claims.labels(self.observer.group, pre.result.value).inc()
        submit(claims)

    def submit_run_now(
        self, job: Job, run_time: datetime, *, traceparent: str | None = None
    ) -> None:
        """Run ``job`` once for ``run_time`` outside its trigger (admin run-now)."""
        self._submit(
            job,
            [run_time],
            lambda: observed_run_job(
                self.observer,
                job,
                job._jobstore_alias,
                [run_time],
                self._logger.name,
                trigger_source=TriggerSource.RUN_NOW,
                traceparent=traceparent,
            ),
            count_instance=False,
        )

    def _submit(
        self,
        job: Job,
        run_times: list[datetime],
        fn: Callable[[], list[JobExecutionEvent]],
        count_instance: bool = True,
    ) -> None:
        def callback(f: Any) -> None:
            exc = f.exception()
            if not count_instance:  # outside max_instances accounting: just dispatch
                if exc:
                    self._logger.error("Error running job %s", job.id, exc_info=exc)
                else:
                    for event in f.result():
                        self._scheduler._dispatch_event(event)
                return
            if exc:
                self._run_job_error(job.id, exc, getattr(exc, "__traceback__", None))
            else:
                self._run_job_success(job.id, f.result())

        future = self._pool.submit(fn)
        future.add_done_callback(callback)

    @property
    def busy_workers(self) -> int:
        return sum(self._instances.values()) if hasattr(self, "_instances") else 0

    @property
    def max_workers(self) -> int:
        return int(getattr(self._pool, "_max_workers", 0))


def _heartbeat(job: Job, run_times: list[datetime]) -> list[JobExecutionEvent]:
    job.func(*job.args, **job.kwargs)
    return [JobExecutionEvent(EVENT_JOB_EXECUTED, job.id, job._jobstore_alias, run_times[-1])]


class ObservedThreadPoolExecutor(ObservedExecutorMixin, ThreadPoolExecutor):
    """``ThreadPoolExecutor`` whose runs are claimed, timed, traced and recorded.

    Plugin alias: ``observed_threadpool``. Without an observer (created by alias from a
    config dict) it records history only, with no lease and no metrics.
    """

    def __init__(
        self,
        max_workers: int = 10,
        pool_kwargs: dict[str, Any] | None = None,
        *,
        observer: RunObserver | None = None,
    ) -> None:
        super().__init__(max_workers, pool_kwargs)
        self.observer = observer if observer is not None else RunObserver()
