"""One span per run around the job's own code: names, attributes, parenting, errors, links."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.sinks.tracing import TraceContextFilter
from tests import jobs
from tests.conftest import RUN_EVENTS

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_once(runtime, func: str, job_id: str, **kwargs):
    runtime.scheduler.add_job(func, "interval", hours=1, id=job_id, next_run_time=_now(), **kwargs)
    runtime.events.wait(RUN_EVENTS, job_id)
    return DjangoJobExecution.objects.get(job_id=job_id)


def run_spans(exporter: InMemorySpanExporter, job_id: str):
    return [s for s in exporter.get_finished_spans() if s.name == f"run {job_id}"]


def test_successful_run_is_one_root_internal_span_with_its_attributes(
    make_runtime, provider, exporter
):
    rt = make_runtime(tracer_provider=provider)
    row = run_once(rt, "tests.jobs:noop", "traced_ok")
    (span,) = run_spans(exporter, "traced_ok")
    assert span.kind is SpanKind.INTERNAL
    assert span.parent is None
    assert span.status.status_code is StatusCode.UNSET
    attrs = span.attributes
    assert attrs["code.function.name"] == "tests.jobs.noop"
    assert attrs["apscheduler.job.id"] == "traced_ok"
    assert attrs["apscheduler.run.outcome"] == "success"
    assert attrs["apscheduler.run.trigger_source"] == "schedule"
    assert attrs["apscheduler.scheduler.epoch"] == rt.lease.epoch
    assert datetime.fromisoformat(attrs["apscheduler.job.scheduled_time"]) == row.run_time
    assert attrs["apscheduler.job.start_delay"] == pytest.approx(row.start_delay)
    # The execution row links to the trace.
    assert row.trace_id == format(span.context.trace_id, "032x")
    assert row.span_id == format(span.context.span_id, "016x")


def test_failed_run_has_error_status_type_and_exception_event(make_runtime, provider, exporter):
    rt = make_runtime(tracer_provider=provider)
    row = run_once(rt, "tests.jobs:fail", "traced_fail")
    (span,) = run_spans(exporter, "traced_fail")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "boom <b>html</b>"
    assert span.attributes["error.type"] == "ValueError"
    assert span.attributes["apscheduler.run.outcome"] == "error"
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "ValueError"
    assert row.status == DjangoJobExecution.ERROR and row.trace_id


def test_spans_made_by_the_job_nest_under_the_run_span(make_runtime, provider, exporter):
    jobs.inner_tracer_provider = provider
    try:
        rt = make_runtime(tracer_provider=provider)
        run_once(rt, "tests.jobs:traced_inner", "traced_inner")
    finally:
        jobs.inner_tracer_provider = None
    (run,) = run_spans(exporter, "traced_inner")
    (inner,) = [s for s in exporter.get_finished_spans() if s.name == "inner work"]
    assert inner.parent is not None
    assert inner.parent.span_id == run.context.span_id
    assert inner.context.trace_id == run.context.trace_id


def test_run_now_links_to_the_requesting_trace(make_runtime, provider, exporter):
    rt = make_runtime(tracer_provider=provider)
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        hours=1,
        id="linked",
        next_run_time=_now() + timedelta(hours=1),
    )
    with provider.get_tracer("admin").start_as_current_span("POST run-now") as request_span:
        ctx = request_span.get_span_context()
        traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
    job = rt.scheduler.get_job("linked")
    executor = rt.scheduler._lookup_executor("default")
    executor.submit_run_now(job, _now().replace(microsecond=0), traceparent=traceparent)
    rt.events.wait(RUN_EVENTS, "linked")
    (span,) = run_spans(exporter, "linked")
    assert span.parent is None  # a new trace, linked rather than parented
    assert [link.context.span_id for link in span.links] == [ctx.span_id]
    assert span.attributes["apscheduler.run.trigger_source"] == "run_now"


def test_without_an_sdk_runs_are_recorded_and_no_trace_id_is_stored(make_runtime):
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    rt = make_runtime()
    row = run_once(rt, "tests.jobs:noop", "untraced")
    assert row.status == DjangoJobExecution.SUCCESS
    assert row.trace_id == ""


class BrokenExporter(SpanExporter):
    def export(self, spans):  # type: ignore[no-untyped-def]
        raise RuntimeError("collector unreachable")

    def shutdown(self) -> None:
        pass


def test_a_failing_exporter_never_breaks_a_run(make_runtime):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(BrokenExporter()))
    rt = make_runtime(tracer_provider=provider)
    row = run_once(rt, "tests.jobs:noop", "exporter_down")
    assert row.status == DjangoJobExecution.SUCCESS
    runs = rt.registry.get_sample_value(
        "apscheduler_job_runs_total",
        {"job_id": "exporter_down", "outcome": "success", "error_type": ""},
    )
    assert runs == 1


def test_log_records_of_a_job_carry_its_trace_and_span_ids(make_runtime, provider, exporter):
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("tests.jobs")
    logger.addHandler(handler)
    try:
        rt = make_runtime(tracer_provider=provider)
        row = run_once(rt, "tests.jobs:logs_a_line", "logging_job")
    finally:
        logger.removeHandler(handler)
    (record,) = [r for r in records if r.getMessage() == "hello from the job"]
    assert record.otelTraceID == row.trace_id
    assert record.otelSpanID == row.span_id
    assert record.otelTraceContext == f" [trace={row.trace_id}]"
    # Outside a run there is no trace: the context is empty, not "[trace=0]".
    logger.addHandler(handler)
    try:
        logger.warning("outside any run")
    finally:
        logger.removeHandler(handler)
    outside = records[-1]
    assert outside.getMessage() == "outside any run"
    assert (outside.otelTraceID, outside.otelTraceContext) == ("0", "")
