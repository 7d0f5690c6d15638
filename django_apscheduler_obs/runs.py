"""``RunRecord``: everything known about one run of one fire time, built once by the executor.

Each sink (history, metrics, tracing) turns the same record into its own output, so no two
places compute timings differently.
"""

from __future__ import annotations

import enum
import functools
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from apscheduler.job import Job


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    ERROR = "error"
    MISSED = "missed"


class TriggerSource(str, enum.Enum):
    SCHEDULE = "schedule"
    RUN_NOW = "run_now"


EXCEPTION_MAX_LENGTH = 1000  # DjangoJobExecution.exception is a CharField(max_length=1000)


@dataclass(frozen=True)
class JobInfo:
    """The fields of a Job that sinks need, copied so a run never touches the live Job."""

    id: str
    name: str
    func_ref: str
    trigger: str
    executor: str
    jobstore: str
    max_instances: int
    misfire_grace_time: float | None

    @classmethod
    def of(cls, job: Job) -> JobInfo:
        return cls(
            id=job.id,
            name=job.name,
            func_ref=str(getattr(job, "func_ref", "")),
            trigger=str(job.trigger),
            executor=job.executor,
            jobstore=str(getattr(job, "_jobstore_alias", "") or ""),
            max_instances=job.max_instances,
            misfire_grace_time=job.misfire_grace_time,
        )

    @property
    def code_function(self) -> str:
        """``module:qualname`` as the dotted name OpenTelemetry's ``code.function.name`` wants."""
        return self.func_ref.replace(":", ".")


@dataclass
class RunRecord:
    job: JobInfo
    run_time: datetime  # scheduled fire time (aware)
    outcome: Outcome
    started: datetime | None = None  # true start of the function (wall clock, aware)
    finished: datetime | None = None
    duration: float | None = None  # monotonic end - start
    start_delay: float | None = None  # started - run_time
    exception: BaseException | None = None
    traceback: str | None = None
    trace_id: str = ""
    span_id: str = ""
    sampled: bool = False
    owner: str = ""
    epoch: int | None = None
    trigger_source: TriggerSource = TriggerSource.SCHEDULE
    coalesced: int = 0
    # A run on a worker: its row, the worker, and picked up - enqueued (seconds).
    execution_id: int | None = None
    worker: str = ""
    queue_wait: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_type(self) -> str:
        """Class name only: messages may carry job arguments or secrets."""
        if self.exception is None:
            return ""
        recorded = getattr(self.exception, "recorded_error_type", None)
        if isinstance(recorded, str):  # an error read back from a row (a worker's run)
            return recorded
        cls = type(self.exception)
        module = cls.__module__
        return (
            cls.__qualname__
            if module in ("builtins", "__main__")
            else f"{module}.{cls.__qualname__}"
        )

    @property
    def exception_text(self) -> str | None:
        if self.exception is None:
            return None
        text = str(self.exception) or type(self.exception).__name__
        if len(text) > EXCEPTION_MAX_LENGTH:
            text = text[: EXCEPTION_MAX_LENGTH - 1] + "…"
        return text


@dataclass(frozen=True)
class CurrentRun:
    """The run a job function is executing in, as ``current_run()`` returns it.

    ``run_time`` is the fire time the scheduler claimed, not the clock: a job that processes
    "the hour that ended at ``run_time``" does the same work however late it starts, and the
    execution row of that fire time is unique, so a job can make itself idempotent on it.
    """

    job_id: str
    run_time: datetime  # scheduled fire time (aware)
    trigger_source: TriggerSource  # SCHEDULE, or RUN_NOW for a run-now request
    epoch: int | None = None  # the leader's fencing epoch that claimed it (None: not fenced)
    trace_id: str = ""  # 32 hex digits of the run's trace, "" when no tracer is set

    @functools.cached_property
    def execution_id(self) -> int | None:
        """The id of this fire time's ``DjangoJobExecution`` row; looked up (one indexed
        query) on first use only, so runs that never ask pay nothing. None if the run has no
        row (history off, or the row could not be written)."""
        from django_apscheduler_obs.models import DjangoJobExecution

        return (
            DjangoJobExecution.objects.filter(job_id=self.job_id, run_time=self.run_time)
            .values_list("id", flat=True)
            .first()
        )


_current: ContextVar[CurrentRun | None] = ContextVar("apscheduler_current_run", default=None)


def current_run() -> CurrentRun | None:
    """The run the calling code executes in, or None outside a job's run.

    Set in the thread that runs the job's function for the duration of the call. Like any
    context variable it does not follow the job into threads it starts itself
    (``contextvars.copy_context().run`` carries it there).
    """
    return _current.get()


def enter_run(run: CurrentRun) -> Token[CurrentRun | None]:
    """Make ``run`` the current run (the executor calls this around the job's function)."""
    return _current.set(run)


def exit_run(token: Token[CurrentRun | None]) -> None:
    _current.reset(token)
