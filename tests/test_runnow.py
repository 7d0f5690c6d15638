"""Run-now: the web process queues, the leader runs it through the observed executor."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from django.test import Client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from django_apscheduler_obs import runnow
from django_apscheduler_obs.models import DjangoJobExecution, RunRequest
from tests import jobs
from tests.conftest import RUN_EVENTS, wait_for
from tests.test_admin import VIEW_ALL, csrf_client, job_url, make_user, store_job

EX = DjangoJobExecution


def finished(request_id: int, timeout: float = 15) -> RunRequest:
    return wait_for(
        lambda: RunRequest.objects.filter(
            pk=request_id, status__in=[RunRequest.DONE, RunRequest.FAILED, RunRequest.REFUSED]
        ).first(),
        timeout=timeout,
        message=f"run-now request {request_id} to finish",
    )


@pytest.mark.django_db(transaction=True)
def test_leader_runs_the_request_and_links_its_execution(make_runtime):
    rt = make_runtime()
    store_job("report", paused=True)  # a paused job can still be run by hand
    request = runnow.request_run("report", "alice")
    assert request.status == RunRequest.QUEUED and request.traceparent == ""

    done = finished(request.pk)
    assert done.status == RunRequest.DONE
    assert done.handled_by == rt.lease.identity
    execution = EX.objects.get(pk=done.execution_id)
    assert execution.job_id == "report"
    assert execution.run_time == request.requested_at  # keyed by the request time, to the µs
    assert execution.status == EX.SUCCESS
    assert execution.trigger_source == "run_now"
    assert execution.owner == rt.lease.identity and execution.epoch == rt.lease.epoch
    assert execution.started is not None and execution.start_delay >= 0
    # the job itself was not touched: still paused, no scheduled run appeared
    assert rt.scheduler.get_job("report").next_run_time is None
    assert EX.objects.filter(job_id="report").count() == 1


@pytest.mark.django_db(transaction=True)
def test_failing_job_fails_the_request(make_runtime):
    make_runtime()
    store_job("bad", func="tests.jobs:fail")
    request = runnow.request_run("bad", "alice")
    done = finished(request.pk)
    assert done.status == RunRequest.FAILED
    assert done.message.startswith("Error!: boom")
    assert EX.objects.get(pk=done.execution_id).status == EX.ERROR


@pytest.mark.django_db(transaction=True)
def test_the_web_request_returns_before_the_job_runs(make_runtime):
    """The POST only queues: the job blocks until the test releases it, long after the
    response; the request is seen running with its execution row, then done."""
    make_runtime()
    store_job("slow", func="tests.jobs:block")
    jobs.release.clear()
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    main_thread = threading.get_ident()
    try:
        response = client.post(job_url("slow", "run-now"), {"csrfmiddlewaretoken": token})
        assert response.status_code == 302
        request = RunRequest.objects.get()
        running = wait_for(
            lambda: RunRequest.objects.filter(
                pk=request.pk, status=RunRequest.RUNNING, execution__isnull=False
            ).first(),
            message="the request to be running with its execution row",
        )
        assert EX.objects.get(pk=running.execution_id).status == EX.SENT
        page = client.get(job_url("slow")).content.decode()
        assert 'data-status="running"' in page and "dao-execution-link" in page
    finally:
        jobs.release.set()
    done = finished(request.pk)
    assert done.status == RunRequest.DONE
    assert threading.get_ident() == main_thread
    page = client.get(job_url("slow")).content.decode()
    assert 'data-status="done"' in page
    assert f"/admin/django_apscheduler_obs/djangojobexecution/{done.execution_id}/change/" in page


@pytest.mark.django_db(transaction=True)
def test_only_the_leader_takes_requests(make_runtime):
    leader = make_runtime()
    standby = make_runtime(wait_leader=False)
    assert not standby.lease.is_leader()
    store_job("j")
    requests = [runnow.request_run("j", "alice") for _ in range(3)]
    for request in requests:
        assert finished(request.pk).handled_by == leader.lease.identity
    assert EX.objects.filter(job_id="j", trigger_source="run_now").count() == 3


@pytest.mark.django_db(transaction=True)
def test_run_span_links_to_the_admin_request(make_runtime):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    make_runtime(tracer_provider=provider)
    store_job("traced")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))

    with provider.get_tracer("web").start_as_current_span("POST run-now") as web_span:
        client.post(job_url("traced", "run-now"), {"csrfmiddlewaretoken": token})
    web = web_span.get_span_context()
    request = RunRequest.objects.get()
    assert request.traceparent == f"00-{web.trace_id:032x}-{web.span_id:016x}-{web.trace_flags:02x}"

    done = finished(request.pk)
    run_span = wait_for(
        lambda: [s for s in exporter.get_finished_spans() if s.name == "run traced"],
        message="the run's span",
    )[0]
    assert run_span.context.trace_id != web.trace_id  # a root of its own …
    assert run_span.parent is None
    assert [(link.context.trace_id, link.context.span_id) for link in run_span.links] == [
        (web.trace_id, web.span_id)  # … linked to the admin request
    ]
    assert run_span.attributes["apscheduler.run.trigger_source"] == "run_now"
    execution = EX.objects.get(pk=done.execution_id)
    assert execution.trace_id == f"{run_span.context.trace_id:032x}"


@pytest.mark.django_db
def test_no_scheduler_refuses_without_queueing():
    store_job("j")
    request = runnow.request_run("j", "alice")
    assert request.status == RunRequest.REFUSED
    assert "No scheduler is running" in request.message


@pytest.mark.django_db
def test_unknown_job_is_refused():
    request = runnow.request_run("ghost", "alice")
    assert request.status == RunRequest.REFUSED and "ghost" in request.message


@pytest.mark.django_db(transaction=True)
def test_stale_and_vanished_requests_are_refused_by_the_poller(make_runtime, settings):
    settings.APSCHEDULER_RUN_NOW_TIMEOUT = 5
    rt = make_runtime()
    store_job("j")
    # queued long ago (the scheduler was down): never run late
    stale = RunRequest.objects.create(
        job_id="j", requested_at=datetime.now(timezone.utc) - timedelta(minutes=10)
    )
    # queued, then the job was removed
    store_job("gone")
    vanished = runnow.request_run("gone", "alice")
    assert vanished.status == RunRequest.QUEUED
    from django_apscheduler_obs.models import DjangoJob

    DjangoJob.objects.filter(id="gone").delete()

    stale = finished(stale.pk)
    assert stale.status == RunRequest.REFUSED and "Not picked up within 5 s" in stale.message
    vanished = finished(vanished.pk)
    assert vanished.status == RunRequest.REFUSED and "no longer exists" in vanished.message
    assert not EX.objects.exists()
    assert rt.lease.is_leader()


@pytest.mark.django_db(transaction=True)
def test_stopped_scheduler_stops_its_poller(make_runtime):
    rt = make_runtime()
    poller = runnow.poller_of(rt)
    assert poller is not None and poller.is_alive()
    rt.stop(timeout=1)
    assert not poller.is_alive() and runnow.poller_of(rt) is None


@pytest.mark.django_db(transaction=True)
def test_run_now_from_the_admin_end_to_end(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        hours=1,
        id="hourly",
        next_run_time=datetime.now(timezone.utc),
    )
    rt.events.wait(RUN_EVENTS, "hourly")  # its scheduled run
    client = Client()
    client.force_login(make_user("root", superuser=True))
    response = client.post(job_url("hourly", "run-now"), follow=True)
    assert "Run-now queued for hourly" in response.content.decode()
    done = finished(RunRequest.objects.get().pk)
    rows = list(EX.objects.filter(job_id="hourly").order_by("run_time"))
    assert [r.trigger_source for r in rows] == ["schedule", "run_now"]
    assert rows[1].pk == done.execution_id
    # the run-now did not move the job's schedule
    assert rt.scheduler.get_job("hourly").next_run_time > datetime.now(timezone.utc) + timedelta(
        minutes=50
    )
