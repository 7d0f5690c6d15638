"""``RunRecord``: everything known about one run of one fire time, built once by the executor.

Each sink (history, metrics, tracing) turns the same record into its own output, so no two
places compute timings differently.
"""

from __future__ import annotations

import enum
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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_type(self) -> str:
        """Class name only: messages may carry job arguments or secrets."""
        if self.exception is None:
            return ""
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
