"""Calling a job's function: clock, span and ``current_run()`` around it, the same everywhere.

The scheduler's thread pool (``executors.py``) and a worker engine (``worker.py``) both run a
claimed fire time through ``invoke``, so a run measures, traces and reports identically
wherever it runs; only how the run was claimed and where its record goes differ.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback as tb_module
from collections.abc import Callable
from datetime import datetime, timezone

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.job import Job
from opentelemetry import trace

from django_apscheduler_obs.runs import CurrentRun, JobInfo, Outcome, RunRecord, enter_run, exit_run
from django_apscheduler_obs.sinks import tracing

logger = logging.getLogger(__name__)


def invoke(
    job: Job,
    info: JobInfo,
    record: RunRecord,
    *,
    tracer: trace.Tracer,
    run_logger: logging.Logger,
    jobstore_alias: str,
    traceparent: str | None = None,
    parent: str | None = None,
    on_started: Callable[[], None] | None = None,
) -> JobExecutionEvent:
    """Run ``job.func`` once for ``record.run_time``; fill ``record`` with what happened.

    ``traceparent`` links the run to a request (run-now); ``parent`` makes it the child of a
    dispatch span (a run on a worker). Returns the event APScheduler's ``run_job`` would.
    Never raises for the job's own exceptions: they are the record's outcome.
    """
    run_time = record.run_time
    with tracing.run_span(
        info, record, tracer=tracer, traceparent=traceparent, parent=parent
    ) as span:
        record.started = datetime.now(timezone.utc)
        record.start_delay = (record.started - run_time).total_seconds()
        if on_started is not None:
            on_started()
        current = CurrentRun(job.id, run_time, record.trigger_source, record.epoch, record.trace_id)
        if record.execution_id is not None:  # known on a worker: spare the job the lookup
            current.__dict__["execution_id"] = record.execution_id
        token = enter_run(current)
        run_logger.info('Running job "%s" (scheduled at %s)', job, run_time)
        t0 = time.perf_counter()
        try:
            retval = job.func(*job.args, **job.kwargs)
        except BaseException:
            record.duration = time.perf_counter() - t0
            exc, tb = sys.exc_info()[1:]
            assert exc is not None
            record.outcome = Outcome.ERROR
            record.exception = exc
            record.traceback = "".join(tb_module.format_tb(tb))
            run_logger.exception('Job "%s" raised an exception', job)
            event = JobExecutionEvent(
                EVENT_JOB_ERROR,
                job.id,
                jobstore_alias,
                run_time,
                exception=exc,
                traceback=record.traceback,
            )
            tb_module.clear_frames(tb)
            del tb
        else:
            record.duration = time.perf_counter() - t0
            run_logger.info('Job "%s" executed successfully', job)
            event = JobExecutionEvent(
                EVENT_JOB_EXECUTED, job.id, jobstore_alias, run_time, retval=retval
            )
        finally:
            exit_run(token)
            record.finished = datetime.now(timezone.utc)
        try:
            tracing.finish_span(span, record)
        except Exception:
            logger.exception("The tracing sink failed")
    return event
