"""The OpenTelemetry sink: one INTERNAL span per run, wrapping the job's own code.

The span is current while the job's function runs, so database or HTTP spans made by the job
nest under it, and log records carry its trace and span ids. With no SDK configured the API
hands out non-recording spans: no cost beyond a few attribute checks.

There is no ``job.*`` namespace in the semantic conventions yet, so system-specific attributes
live under ``apscheduler.*`` (as the Celery instrumentation uses ``celery.*``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from django_apscheduler_obs.runs import JobInfo, RunRecord

TRACER_NAME = "django_apscheduler_obs"

# Attribute keys (constants, as the Celery instrumentation keeps them).
CODE_FUNCTION = "code.function.name"
ERROR_TYPE = "error.type"
JOB_ID = "apscheduler.job.id"
JOB_NAME = "apscheduler.job.name"
JOB_TRIGGER = "apscheduler.job.trigger"
JOB_EXECUTOR = "apscheduler.job.executor"
JOB_JOBSTORE = "apscheduler.job.jobstore"
SCHEDULED_TIME = "apscheduler.job.scheduled_time"
START_DELAY = "apscheduler.job.start_delay"
COALESCED = "apscheduler.job.coalesced_runs"
TRIGGER_SOURCE = "apscheduler.run.trigger_source"
OUTCOME = "apscheduler.run.outcome"
OWNER = "apscheduler.scheduler.owner"
EPOCH = "apscheduler.scheduler.epoch"
EXECUTION_ID = "apscheduler.run.execution_id"
WORKER = "apscheduler.run.worker"
QUEUE_WAIT = "apscheduler.run.queue_wait"
# OpenTelemetry's FaaS attributes are the nearest convention to a timer-fired job.
FAAS_TRIGGER = "faas.trigger"
FAAS_TIME = "faas.time"


def get_tracer(tracer_provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """Our tracer from ``tracer_provider`` (tests, custom setups) or the global provider."""
    from django_apscheduler_obs import __version__

    return trace.get_tracer(TRACER_NAME, __version__, tracer_provider)


def _exception_as_event() -> bool:
    """Exception span events are deprecated in favour of logs; honour the semconv opt-in."""
    opt_in = os.environ.get("OTEL_SEMCONV_EXCEPTION_SIGNAL_OPT_IN", "")
    return opt_in in ("", "logs/dup")


@contextlib.contextmanager
def run_span(
    job: JobInfo,
    record: RunRecord,
    *,
    tracer: trace.Tracer | None = None,
    traceparent: str | None = None,
    parent: str | None = None,
) -> Iterator[trace.Span]:
    """Start the run's span as a new root; a run-now request's trace is *linked*, not parent.

    ``parent``: the ``traceparent`` of the scheduler's dispatch span, on a worker. The run is
    its child; when the engine's own instrumentation (Celery's) already opened a span of that
    trace, the run nests under it instead, so the trace has no gap and no second root.
    """
    links = []
    if traceparent:
        remote = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
        if remote.is_valid:
            links.append(Link(remote))
    start_ctx = otel_context.Context()  # a run is a root, whatever the thread
    if parent:
        start_ctx = extract({"traceparent": parent})
        wanted = trace.get_current_span(start_ctx).get_span_context()
        current = trace.get_current_span().get_span_context()
        if current.is_valid and wanted.is_valid and current.trace_id == wanted.trace_id:
            start_ctx = otel_context.get_current()
    token = otel_context.attach(start_ctx)
    try:
        with (tracer or get_tracer()).start_as_current_span(
            f"run {job.id}",
            kind=SpanKind.CONSUMER if parent else SpanKind.INTERNAL,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            ctx = span.get_span_context()
            if ctx.is_valid:
                record.trace_id = format(ctx.trace_id, "032x")
                record.span_id = format(ctx.span_id, "016x")
                record.sampled = ctx.trace_flags.sampled
            if span.is_recording():
                attrs: dict[str, Any] = {
                    CODE_FUNCTION: job.code_function,
                    JOB_ID: job.id,
                    JOB_NAME: job.name,
                    JOB_TRIGGER: job.trigger,
                    JOB_EXECUTOR: job.executor,
                    JOB_JOBSTORE: job.jobstore,
                    SCHEDULED_TIME: record.run_time.isoformat(),
                    TRIGGER_SOURCE: record.trigger_source.value,
                    FAAS_TRIGGER: "timer",
                    FAAS_TIME: record.run_time.isoformat(),
                }
                if record.execution_id is not None:
                    attrs[EXECUTION_ID] = record.execution_id
                if record.worker:
                    attrs[WORKER] = record.worker
                if record.queue_wait is not None:
                    attrs[QUEUE_WAIT] = record.queue_wait
                if record.epoch is not None:
                    attrs[OWNER] = record.owner
                    attrs[EPOCH] = record.epoch
                if record.coalesced:
                    attrs[COALESCED] = record.coalesced
                span.set_attributes(attrs)
            yield span
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def dispatch_span(
    job: JobInfo,
    run_time: datetime,
    execution_id: int,
    *,
    tracer: trace.Tracer | None = None,
    executor: str = "",
) -> Iterator[tuple[trace.Span, str]]:
    """The scheduler's PRODUCER span for handing one fire time to an engine, and the
    ``traceparent`` to send with it (empty when no tracer records): the worker's run span is
    its child, so the claim, the enqueue and the run are one trace."""
    token = otel_context.attach(otel_context.Context())  # a fire time starts its own trace
    try:
        with (tracer or get_tracer()).start_as_current_span(
            f"dispatch {job.id}", kind=SpanKind.PRODUCER, record_exception=False
        ) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        CODE_FUNCTION: job.code_function,
                        JOB_ID: job.id,
                        JOB_EXECUTOR: executor or job.executor,
                        SCHEDULED_TIME: run_time.isoformat(),
                        EXECUTION_ID: execution_id,
                        FAAS_TRIGGER: "timer",
                        FAAS_TIME: run_time.isoformat(),
                    }
                )
            carrier: dict[str, str] = {}
            inject(carrier)
            yield span, carrier.get("traceparent", "")
    finally:
        otel_context.detach(token)


def finish_span(span: trace.Span, record: RunRecord) -> None:
    """Set what is known only after the run: outcome, delay, error."""
    if not span.is_recording():
        return
    span.set_attribute(OUTCOME, record.outcome.value)
    if record.start_delay is not None:
        span.set_attribute(START_DELAY, record.start_delay)
    if record.exception is not None:
        span.set_attribute(ERROR_TYPE, record.error_type)
        span.set_status(Status(StatusCode.ERROR, record.exception_text))
        if _exception_as_event():
            span.record_exception(record.exception)


class TraceContextFilter:
    """Logging filter that adds the current span's ids to every record.

    ``%(otelTraceID)s``/``%(otelSpanID)s`` follow OpenTelemetry's logging instrumentation
    ("0" outside a span). ``%(otelTraceContext)s`` is `` [trace=<id>]`` inside a span and empty
    outside one, so a format such as ``"%(name)s%(otelTraceContext)s %(message)s"`` shows a
    trace id only when there is one: a job's lines then carry the id stored on its row.
    """

    def filter(self, record: Any) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.otelTraceID = format(ctx.trace_id, "032x")
            record.otelSpanID = format(ctx.span_id, "016x")
            record.otelTraceContext = f" [trace={record.otelTraceID}]"
        else:
            record.otelTraceID = record.otelSpanID = "0"
            record.otelTraceContext = ""
        return True


def configure_from_env(service_name: str) -> bool:
    """Install an SDK tracer provider when the standard ``OTEL_*`` variables ask for one.

    Does nothing when a provider is already set (``opentelemetry-instrument`` or the project
    did it), when the SDK is not installed, or when no exporter is configured: tracing then
    stays a no-op at no cost. Returns True if it installed a provider.
    """
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name == "none" or not (exporter_name or endpoint):
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        return False
    current = trace.get_tracer_provider()
    if type(current).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return False
    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            return False
        exporter = OTLPSpanExporter()
    env_named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if env_named else {SERVICE_NAME: service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def shutdown_provider() -> None:
    """Flush spans before the process exits."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()
