"""The Prometheus sink and collector, fed by real runs through the observed executor."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import prometheus_client
import pytest
from apscheduler import events
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from django_apscheduler_obs.collectors import JobCatalog
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from django_apscheduler_obs.runs import JobInfo, Outcome, RunRecord
from django_apscheduler_obs.sinks.metrics import (
    OTHER_ERROR,
    OTHER_JOB,
    SchedulerMetrics,
    render,
)
from tests import jobs
from tests.conftest import RUN_EVENTS, wait_for

db = pytest.mark.django_db(transaction=True)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def value(runtime, name: str, **labels: str) -> float | None:
    return runtime.registry.get_sample_value(name, labels)


def runs(runtime, job_id: str, outcome: str = "success", error_type: str = "") -> float | None:
    return value(
        runtime, "apscheduler_job_runs_total", job_id=job_id, outcome=outcome, error_type=error_type
    )


@db
def test_a_successful_run_is_counted_timed_and_stamped(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:sleep", "interval", hours=1, id="ok", args=[0.05], next_run_time=_now()
    )
    rt.events.wait(RUN_EVENTS, "ok")
    wait_for(lambda: runs(rt, "ok") == 1, message="the run to be counted")
    row = DjangoJobExecution.objects.get(job_id="ok")
    assert (
        value(rt, "apscheduler_job_run_duration_seconds_count", job_id="ok", outcome="success") == 1
    )
    # The histogram sees the pure duration of the function, as the row does.
    total = value(rt, "apscheduler_job_run_duration_seconds_sum", job_id="ok", outcome="success")
    assert total == pytest.approx(float(row.duration), abs=1e-5)
    assert 0.05 <= total < 1
    assert value(rt, "apscheduler_job_start_delay_seconds_count", job_id="ok") == 1
    assert value(rt, "apscheduler_job_last_start_delay_seconds", job_id="ok") == pytest.approx(
        row.start_delay
    )
    assert value(rt, "apscheduler_job_last_success_timestamp_seconds", job_id="ok") == (
        pytest.approx(float(row.finished), abs=1e-5)
    )
    assert value(rt, "apscheduler_job_runs_in_progress", job_id="ok") == 0


@db
def test_a_failure_is_counted_by_error_type_and_stamped(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job("tests.jobs:fail", "interval", hours=1, id="bad", next_run_time=_now())
    rt.events.wait(RUN_EVENTS, "bad")
    wait_for(lambda: runs(rt, "bad", "error", "ValueError") == 1, message="the failure count")
    assert value(rt, "apscheduler_job_last_failure_timestamp_seconds", job_id="bad") is not None
    assert value(rt, "apscheduler_job_last_success_timestamp_seconds", job_id="bad") is None


@db
def test_series_exist_at_zero_when_a_job_is_added_and_go_when_it_is_removed(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job("tests.jobs:noop", "interval", hours=1, id="fresh")
    # Born at zero: the first failure or miss makes increase() > 0.
    assert runs(rt, "fresh") == 0
    for reason in ("misfire", "max_instances", "coalesced"):
        assert value(rt, "apscheduler_job_skipped_runs_total", job_id="fresh", reason=reason) == 0
    assert (
        value(rt, "apscheduler_job_run_duration_seconds_count", job_id="fresh", outcome="success")
        == 0
    )
    rt.scheduler.remove_job("fresh")
    assert runs(rt, "fresh") is None
    assert value(rt, "apscheduler_job_skipped_runs_total", job_id="fresh", reason="misfire") is None


@db
def test_a_misfire_is_counted_and_recorded(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        hours=1,
        id="late",
        coalesce=False,
        misfire_grace_time=1,
        next_run_time=_now() - timedelta(minutes=5),
    )
    rt.events.wait(events.EVENT_JOB_MISSED, "late")
    wait_for(
        lambda: (
            value(rt, "apscheduler_job_skipped_runs_total", job_id="late", reason="misfire") == 1
        ),
        message="the misfire count",
    )
    row = DjangoJobExecution.objects.get(job_id="late")
    assert row.status == DjangoJobExecution.MISSED
    assert runs(rt, "late") == 0


@db
def test_fire_times_dropped_by_coalescing_are_counted(make_runtime):
    rt = make_runtime()
    # Five fire times are due at once; coalesce=True runs the last one only.
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        seconds=10,
        id="coalesced",
        coalesce=True,
        next_run_time=_now() - timedelta(seconds=45),
    )
    rt.events.wait(RUN_EVENTS, "coalesced")
    wait_for(lambda: runs(rt, "coalesced") == 1, message="the coalesced run")
    assert (
        value(rt, "apscheduler_job_skipped_runs_total", job_id="coalesced", reason="coalesced") == 4
    )
    assert DjangoJobExecution.objects.filter(job_id="coalesced").count() == 1


@db
def test_max_instances_skips_are_counted_and_recorded(make_runtime):
    jobs.release.clear()
    rt = make_runtime()
    try:
        rt.scheduler.add_job(
            "tests.jobs:block",
            "interval",
            seconds=1,
            id="busy",
            max_instances=1,
            next_run_time=_now(),
        )
        rt.events.wait(events.EVENT_JOB_MAX_INSTANCES, "busy")
        wait_for(
            lambda: (
                (
                    value(
                        rt,
                        "apscheduler_job_skipped_runs_total",
                        job_id="busy",
                        reason="max_instances",
                    )
                    or 0
                )
                >= 1
            ),
            message="the skip count",
        )
        assert value(rt, "apscheduler_job_runs_in_progress", job_id="busy") == 1
        oldest = value(rt, "apscheduler_job_oldest_running_start_timestamp_seconds", job_id="busy")
        assert oldest is not None and oldest <= _now().timestamp()
        wait_for(lambda: DjangoJobExecution.objects.filter(
            job_id="busy", status=DjangoJobExecution.MAX_INSTANCES).exists(),
            message="a Max instances! row")  # fmt: skip
    finally:
        jobs.release.set()
    rt.events.wait(RUN_EVENTS, "busy")
    wait_for(
        lambda: (
            value(rt, "apscheduler_job_oldest_running_start_timestamp_seconds", job_id="busy")
            is None
        ),
        message="the running gauge to go",
    )


@db
def test_exemplars_carry_the_trace_id_of_sampled_runs_only(make_runtime):
    rt = make_runtime(tracer_provider=TracerProvider())
    rt.scheduler.add_job("tests.jobs:noop", "interval", hours=1, id="ex", next_run_time=_now())
    rt.events.wait(RUN_EVENTS, "ex")
    wait_for(lambda: runs(rt, "ex") == 1, message="the run")
    row = DjangoJobExecution.objects.get(job_id="ex")
    text = openmetrics(rt.registry).decode()
    exemplars = [
        s.exemplar
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.exemplar and s.labels.get("job_id") == "ex"
    ]
    # runs_total, a duration bucket and a start-delay bucket
    assert len(exemplars) == 3
    assert {e.labels["trace_id"] for e in exemplars} == {row.trace_id}

    unsampled = make_runtime(
        tracer_provider=TracerProvider(sampler=ALWAYS_OFF),
        registry=CollectorRegistry(),
        wait_leader=False,
    )
    unsampled.scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        hours=1,
        id="ex2",
        next_run_time=_now(),
        jobstore="django_apscheduler_obs.internal",
    )
    unsampled.events.wait(RUN_EVENTS, "ex2")
    wait_for(lambda: runs(unsampled, "ex2") == 1, message="the unsampled run")
    text = openmetrics(unsampled.registry).decode()
    assert not [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.exemplar and s.labels.get("job_id") == "ex2"
    ]


@db
def test_last_outcomes_are_seeded_from_the_history_at_start(make_runtime):
    DjangoJob.objects.create(id="old", job_state=b"")
    DjangoJobExecution.objects.create(
        job_id="old",
        run_time=_now() - timedelta(hours=2),
        status=DjangoJobExecution.SUCCESS,
        finished=Decimal("1700000000.5"),
    )
    DjangoJobExecution.objects.create(
        job_id="old",
        run_time=_now() - timedelta(hours=1),
        status=DjangoJobExecution.ERROR,
        finished=Decimal("1700003600.25"),
    )
    rt = make_runtime()
    assert value(rt, "apscheduler_job_last_success_timestamp_seconds", job_id="old") == (
        1700000000.5
    )
    assert value(rt, "apscheduler_job_last_failure_timestamp_seconds", job_id="old") == (
        1700003600.25
    )


@db
def test_collector_describes_jobs_from_their_trigger(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "cron",
        day_of_week="mon-fri",
        hour=9,
        id="weekday",
        misfire_grace_time=30,
    )
    rt.scheduler.add_job("tests.jobs:noop", "interval", minutes=5, id="every5")
    rt.catalog.invalidate()
    assert value(rt, "apscheduler_job_expected_interval_seconds", job_id="weekday") == 259200
    assert value(rt, "apscheduler_job_expected_interval_seconds", job_id="every5") == 300
    assert value(rt, "apscheduler_job_misfire_grace_seconds", job_id="weekday") == 30
    nxt = rt.scheduler.get_job("every5").next_run_time.timestamp()
    assert value(rt, "apscheduler_job_next_run_timestamp_seconds", job_id="every5") == (
        pytest.approx(nxt)
    )
    assert value(rt, "apscheduler_job_paused", job_id="every5") == 0
    info = [
        s
        for f in rt.registry.collect()
        if f.name == "apscheduler_job_info"
        for s in f.samples
        if s.labels["job_id"] == "weekday"
    ]
    assert info[0].labels["func"] == "tests.jobs:noop"
    assert info[0].labels["trigger"].startswith("cron[")

    rt.scheduler.pause_job("every5")
    rt.catalog.invalidate()
    assert value(rt, "apscheduler_job_paused", job_id="every5") == 1
    assert value(rt, "apscheduler_job_next_run_timestamp_seconds", job_id="every5") is None
    assert value(rt, "apscheduler_jobs", state="paused") == 1
    assert value(rt, "apscheduler_jobs", state="scheduled") == 1

    DjangoJob.objects.filter(id="weekday").update(restore_error="ModuleNotFoundError: gone")
    rt.catalog.invalidate()
    assert value(rt, "apscheduler_jobs", state="unrestorable") == 1


@db
def test_jobs_beyond_the_series_cap_are_counted_not_described(make_runtime, settings, monkeypatch):
    """Memory stays flat with many jobs: only jobs with their own series are unpickled."""
    settings.APSCHEDULER_MAX_JOB_SERIES = 3  # the heartbeat is one of them
    monkeypatch.setattr(JobCatalog, "PAGE", 2)  # the table is read in pages
    rt = make_runtime()
    for i in range(6):
        rt.scheduler.add_job("tests.jobs:noop", "interval", hours=1, id=f"j{i}")
    rt.scheduler.pause_job("j5")
    # A folded job whose state cannot be restored is counted from its stored error.
    DjangoJob.objects.filter(id="j4").update(restore_error="ModuleNotFoundError: gone")
    rt.catalog.invalidate()
    described = {v.id for v in rt.catalog.views()}
    assert len(described) == 3
    # Folded jobs are not held one by one: the catalog keeps one of their ids, for their series.
    folded = rt.catalog.job_ids() - described
    assert len(folded) == 1 and folded < {f"j{i}" for i in range(6)}
    assert value(rt, "apscheduler_jobs", state="paused") == 1
    assert value(rt, "apscheduler_jobs", state="unrestorable") == 1
    assert value(rt, "apscheduler_jobs", state="scheduled") == DjangoJob.objects.count() - 2
    info = {
        s.labels["job_id"]
        for f in rt.registry.collect()
        if f.name == "apscheduler_job_info"
        for s in f.samples
    }
    assert info == described and OTHER_JOB not in info


@db
def test_scheduler_and_lease_gauges(make_runtime):
    rt = make_runtime()
    assert value(rt, "apscheduler_scheduler_state", apscheduler_scheduler_state="running") == 1
    assert value(rt, "apscheduler_leader", group="default") == 1
    assert value(rt, "apscheduler_lease_epoch", group="default") == rt.lease.epoch
    assert value(rt, "apscheduler_executor_max_workers", executor="default") == 10
    wait_for(
        lambda: value(rt, "apscheduler_scheduler_heartbeat_timestamp_seconds"),
        message="the first heartbeat",
    )
    rt.scheduler.pause()
    assert value(rt, "apscheduler_scheduler_state", apscheduler_scheduler_state="paused") == 1


@db
def test_the_heartbeat_is_absent_until_it_happens(make_runtime):
    """A scheduler that never started has no heartbeat, not one from 1970."""
    rt = make_runtime(start=False)
    assert value(rt, "apscheduler_scheduler_heartbeat_timestamp_seconds") is None
    text = generate_latest(rt.registry).decode()
    assert "# TYPE apscheduler_scheduler_heartbeat_timestamp_seconds gauge" in text
    assert "\napscheduler_scheduler_heartbeat_timestamp_seconds " not in text
    before = time.time()
    rt.start()
    stamp = wait_for(
        lambda: value(rt, "apscheduler_scheduler_heartbeat_timestamp_seconds"),
        message="the first heartbeat",
    )
    assert before <= stamp <= time.time()


def _record(job_id: str, error: BaseException | None = None) -> RunRecord:
    info = JobInfo(job_id, job_id, "m:f", "interval[0:01:00]", "default", "default", 1, 1)
    now = _now()
    return RunRecord(
        info,
        now,
        Outcome.ERROR if error else Outcome.SUCCESS,
        started=now,
        finished=now,
        duration=0.1,
        start_delay=0.01,
        exception=error,
    )


@pytest.mark.once
def test_job_label_cardinality_is_capped(settings):
    settings.APSCHEDULER_MAX_JOB_SERIES = 2
    m = SchedulerMetrics(CollectorRegistry(), process=False)
    for job_id in ("a", "b", "c", "d"):
        m.record(_record(job_id))
    get = m.registry.get_sample_value
    assert (
        get("apscheduler_job_runs_total", {"job_id": "a", "outcome": "success", "error_type": ""})
        == 1
    )
    assert (
        get("apscheduler_job_runs_total", {"job_id": "c", "outcome": "success", "error_type": ""})
        is None
    )
    assert (
        get(
            "apscheduler_job_runs_total",
            {"job_id": OTHER_JOB, "outcome": "success", "error_type": ""},
        )
        == 2
    )


@pytest.mark.once
def test_a_slot_freed_by_a_removed_job_goes_to_the_next_job_and_runs_end_where_they_began(
    settings,
):
    settings.APSCHEDULER_MAX_JOB_SERIES = 1
    m = SchedulerMetrics(CollectorRegistry(), process=False)
    get = m.registry.get_sample_value
    m.add_job("a")
    running = _record("b").job
    m.run_started(running)  # b is folded: it runs under _other
    assert get("apscheduler_job_runs_in_progress", {"job_id": OTHER_JOB}) == 1
    m.remove_job("a")
    m.run_finished(running)  # ends under _other, though a slot is free now
    assert get("apscheduler_job_runs_in_progress", {"job_id": OTHER_JOB}) == 0
    assert get("apscheduler_job_runs_in_progress", {"job_id": "b"}) is None
    m.add_job("c")  # a's slot goes to the next job that asks
    assert m.label("c") == "c" and m.label("b") == OTHER_JOB
    assert m.known_jobs() == {"c"}


@pytest.mark.once
def test_error_types_are_capped_per_job(settings):
    settings.APSCHEDULER_MAX_ERROR_TYPES = 1
    m = SchedulerMetrics(CollectorRegistry(), process=False)
    m.record(_record("j", ValueError("x")))
    m.record(_record("j", KeyError("y")))
    get = m.registry.get_sample_value
    assert (
        get(
            "apscheduler_job_runs_total",
            {"job_id": "j", "outcome": "error", "error_type": "ValueError"},
        )
        == 1
    )
    assert (
        get(
            "apscheduler_job_runs_total",
            {"job_id": "j", "outcome": "error", "error_type": OTHER_ERROR},
        )
        == 1
    )


@pytest.mark.once
def test_error_type_is_the_class_name_never_the_message():
    class SecretError(Exception):
        pass

    record = _record("j", SecretError("password=hunter2"))
    assert record.error_type.endswith("SecretError")
    assert "hunter2" not in record.error_type


def _both_formats(registry) -> list[tuple[bytes, bytes]]:
    """(fast render, prometheus_client's own) in the text and the OpenMetrics format."""
    return [(render(registry, enc), enc(registry)) for enc in (generate_latest, openmetrics)]


@pytest.mark.once
@pytest.mark.parametrize("created", [True, False], ids=["created", "no-created"])
def test_the_cached_render_is_the_encoders_output_and_follows_every_change(settings, created):
    settings.APSCHEDULER_MAX_JOB_SERIES = 3
    if not created:
        prometheus_client.disable_created_metrics()
    try:
        m = SchedulerMetrics(CollectorRegistry(), process=False)
        for job_id in ("a", "b", "c", "d"):  # d is folded into _other
            m.add_job(job_id)
        sampled = _record("a")
        sampled.trace_id, sampled.span_id, sampled.sampled = "ab" * 16, "cd" * 8, True
        steps = [
            lambda: None,  # the first scrape fills the cache
            lambda: None,  # the second copies it
            lambda: m.record(sampled),  # exemplars (OpenMetrics only)
            lambda: m.record(_record("b", ValueError("x"))),  # a new child: error outcome
            lambda: m.skip("c", "coalesced", 3),
            lambda: m.record(_record("d")),  # _other
            lambda: m.run_started(sampled.job),
            lambda: m.run_finished(sampled.job),
            lambda: m.seed_last_outcomes([("c", "error", 1234.5)]),
            lambda: m.remove_job("b"),
            lambda: m.add_job("b"),  # back at zero, with new children
            lambda: m.remove_job("a"),
        ]
        previous: list[bytes] = []
        for i, step in enumerate(steps):
            step()
            pairs = _both_formats(m.registry)
            for fast, stock in pairs:
                assert fast == stock, f"step {i}"
            assert b"trace_id" in pairs[1][0] if 2 <= i < 11 else True
            if i >= 2:
                assert [fast for fast, _ in pairs] != previous, f"step {i} changed nothing"
            previous = [fast for fast, _ in pairs]
    finally:
        prometheus_client.enable_created_metrics()


@pytest.mark.once
def test_the_cached_render_keeps_only_the_children_that_exist(settings):
    m = SchedulerMetrics(CollectorRegistry(), process=False)
    for i in range(20):
        m.add_job(f"j{i}")
    render(m.registry)
    for i in range(15):
        m.remove_job(f"j{i}")
    assert render(m.registry) == generate_latest(m.registry)
    cached = {values for children in m.job_series._cache.values() for values in children}
    assert {values[0] for values in cached} == {f"j{i}" for i in range(15, 20)}


@pytest.mark.once
def test_the_render_falls_back_to_prometheus_client_if_its_internals_change(monkeypatch, caplog):
    m = SchedulerMetrics(CollectorRegistry(), process=False)
    m.add_job("a")
    m.record(_record("a"))

    def changed(*args, **kwargs):
        raise AttributeError("'Counter' object has no attribute '_metrics'")

    monkeypatch.setattr(m.job_series, "_render", changed)
    assert render(m.registry) == generate_latest(m.registry)
    m.record(_record("a"))
    assert render(m.registry) == generate_latest(m.registry)
    assert caplog.text.count("Cached metrics rendering failed") == 1
