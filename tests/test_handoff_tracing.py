"""One trace per fire time across the hand-off: the scheduler's dispatch span is the parent of
the worker's run span, and Celery's own OpenTelemetry instrumentation joins the same trace."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.sinks import tracing
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)
EX = DjangoJobExecution


@pytest.fixture
def spans(monkeypatch):
    """An SDK provider for the scheduler (injected) and the worker side (its tracer)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(
        "django_apscheduler_obs.worker.tracing.get_tracer",
        lambda tracer_provider=None: provider.get_tracer(tracing.TRACER_NAME),
    )
    return provider, exporter


def _final(job_id: str) -> EX:
    return wait_for(
        lambda: EX.objects.filter(job_id=job_id, status__in=EX.FINAL_STATUSES).first(),
        timeout=30,
        message=f"a final row of {job_id}",
    )


def test_dispatch_and_run_are_one_trace(make_runtime, settings, spans):
    provider, exporter = spans
    settings.APSCHEDULER_EXECUTORS = {"workers": {"ENGINE": "tasks", "BACKEND": "default"}}
    rt = make_runtime(tracer_provider=provider)
    rt.scheduler.add_job(
        "tests.jobs:noop", "date", run_date=datetime.now(timezone.utc), id="traced",
        executor="workers",
    )  # fmt: skip
    row = _final("traced")
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    dispatch, run = by_name["dispatch traced"], by_name["run traced"]
    assert dispatch.kind is SpanKind.PRODUCER and run.kind is SpanKind.CONSUMER
    assert run.context.trace_id == dispatch.context.trace_id
    assert run.parent is not None and run.parent.span_id == dispatch.context.span_id
    assert dispatch.parent is None  # a fire time starts its own trace
    assert row.trace_id == format(run.context.trace_id, "032x")
    assert row.span_id == format(run.context.span_id, "016x")
    attrs = run.attributes
    assert attrs["apscheduler.run.execution_id"] == row.id
    assert attrs["apscheduler.run.worker"] == row.worker
    assert attrs["faas.trigger"] == "timer" and attrs["code.function.name"] == "tests.jobs.noop"
    assert dispatch.attributes["apscheduler.run.execution_id"] == row.id


@pytest.mark.slow
def test_celery_instrumentation_joins_the_same_trace(make_runtime, settings, spans):
    """A real Celery worker (in-process thread, Redis broker) with
    opentelemetry-instrumentation-celery: dispatch -> apply_async -> run/… -> run <job>."""
    from celery.contrib.testing.worker import start_worker
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    from tests.celery_app import redis_app

    provider, exporter = spans
    queue = f"dao-{uuid.uuid4().hex[:12]}"
    settings.APSCHEDULER_EXECUTORS = {
        "celery": {"ENGINE": "celery", "APP": "tests.celery_app:redis_app", "QUEUE": queue}
    }
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with start_worker(redis_app, queues=[queue], perform_ping_check=False, loglevel="WARNING"):
            rt = make_runtime(tracer_provider=provider)
            rt.scheduler.add_job(
                "tests.jobs:noop", "date", run_date=datetime.now(timezone.utc), id="celery",
                executor="celery",
            )  # fmt: skip
            row = _final("celery")
            wait_for(
                lambda: any(s.name.startswith("run/") for s in exporter.get_finished_spans()),
                message="Celery's run span",
            )
    finally:
        instrumentor.uninstrument()
    assert row.status == EX.SUCCESS
    finished = exporter.get_finished_spans()
    by_name = {s.name: s for s in finished}
    dispatch, run = by_name["dispatch celery"], by_name["run celery"]
    publish = by_name["apply_async/django_apscheduler_obs.run"]
    consume = by_name["run/django_apscheduler_obs.run"]
    assert {s.context.trace_id for s in (dispatch, publish, consume, run)} == {
        dispatch.context.trace_id
    }
    assert publish.parent.span_id == dispatch.context.span_id
    assert consume.parent.span_id == publish.context.span_id
    assert run.parent.span_id == consume.context.span_id  # nested, not a second branch
    assert row.trace_id == format(dispatch.context.trace_id, "032x")
