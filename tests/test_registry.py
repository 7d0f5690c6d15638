"""Declared jobs: ``@scheduled_job`` and ``APSCHEDULER_JOBS`` synced idempotently by id and hash."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from django_apscheduler_obs import scheduled_job, signing
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from django_apscheduler_obs.registry import JobDefinitionError, registry, sync_jobs

pytestmark = pytest.mark.django_db


def report_job(*args, **kwargs) -> None:
    pass


def other_job() -> None:
    pass


@pytest.fixture
def scheduler():
    schedulers = []

    def start() -> BackgroundScheduler:
        s = BackgroundScheduler(timezone="UTC")
        s.add_jobstore(DjangoJobStore(), "default")
        s.start(paused=True)
        schedulers.append(s)
        return s

    yield start
    for s in schedulers:
        s.shutdown(wait=False)


def restart(declare) -> None:
    """A new process: the registry is rebuilt from the same code, a moment later."""
    registry.reset()
    registry._discovered = True
    time.sleep(0.01)
    declare()


def next_runs() -> dict[str, datetime | None]:
    return dict(DjangoJob.objects.values_list("id", "next_run_time"))


def test_decorator_declares_and_returns_the_function(scheduler):
    decorated = scheduled_job("cron", hour=3)(report_job)
    assert decorated is report_job
    assert scheduled_job("interval", minutes=5, id="five", max_runtime=9)(other_job) is other_job
    assert registry.get("tests.test_registry.report_job").func is report_job
    assert registry.max_runtime("five") == 9
    report = sync_jobs(scheduler())
    assert sorted(report["added"]) == ["five", "tests.test_registry.report_job"]
    assert all(len(h) == 64 for h in DjangoJob.objects.values_list("definition_hash", flat=True))


def test_restart_keeps_interval_next_run_time_and_adds_nothing(scheduler, settings):
    settings.APSCHEDULER_JOBS = [
        {"func": "tests.test_registry:other_job", "trigger": "interval", "seconds": 30, "id": "s"}
    ]

    def declare():
        registry.add(report_job, "interval", minutes=10, id="interval10", args=(1,))
        registry.add(report_job, "cron", minute="*/5", id="cron5")
        registry.add(
            report_job,
            IntervalTrigger(hours=1, timezone="UTC"),
            id="instance",
        )
        registry._discovered = False  # read APSCHEDULER_JOBS again

    declare()
    sched = scheduler()
    first = sync_jobs(sched)
    assert sorted(first["added"]) == ["cron5", "instance", "interval10", "s"]
    before = next_runs()
    hashes = dict(DjangoJob.objects.values_list("id", "definition_hash"))
    versions = dict(DjangoJob.objects.values_list("id", "version"))
    for _ in range(2):
        restart(declare)
        again = sync_jobs(scheduler())
        assert sorted(again["unchanged"]) == ["cron5", "instance", "interval10", "s"], again
        assert not (again["added"] or again["updated"] or again["rescheduled"] or again["removed"])
    assert next_runs() == before
    assert dict(DjangoJob.objects.values_list("id", "definition_hash")) == hashes
    assert dict(DjangoJob.objects.values_list("id", "version")) == versions
    assert DjangoJob.objects.count() == 4


def test_changed_args_keep_the_next_run_and_changed_trigger_reschedules(scheduler):
    registry.add(report_job, "interval", minutes=10, id="j", args=(1,))
    sync_jobs(scheduler())
    before = next_runs()["j"]

    restart(lambda: registry.add(report_job, "interval", minutes=10, id="j", args=(2,)))
    report = sync_jobs(scheduler())
    assert report["updated"] == ["j"]
    assert next_runs()["j"] == before
    sched = scheduler()
    assert sched.get_job("j").args == (2,)

    restart(
        lambda: registry.add(report_job, "interval", minutes=10, id="j", args=(2,), coalesce=False)
    )
    assert sync_jobs(sched)["updated"] == ["j"]
    assert sched.get_job("j").coalesce is False
    assert next_runs()["j"] == before

    restart(lambda: registry.add(report_job, "interval", minutes=1, id="j", args=(2,)))
    report = sync_jobs(sched)
    assert report["rescheduled"] == ["j"]
    after = next_runs()["j"]
    assert after != before and after < before
    assert sched.get_job("j").trigger.interval == timedelta(minutes=1)
    # And it is stable again from there.
    restart(lambda: registry.add(report_job, "interval", minutes=1, id="j", args=(2,)))
    assert sync_jobs(sched)["unchanged"] == ["j"]
    assert next_runs()["j"] == after


def test_changed_function_keeps_the_next_run(scheduler):
    registry.add(report_job, "interval", minutes=10, id="j")
    sched = scheduler()
    sync_jobs(sched)
    before = next_runs()["j"]
    restart(lambda: registry.add(other_job, "interval", minutes=10, id="j"))
    assert sync_jobs(sched)["updated"] == ["j"]
    assert sched.get_job("j").func is other_job
    assert next_runs()["j"] == before


def test_undeclared_jobs_are_removed_with_history_kept(scheduler):
    registry.add(report_job, "interval", minutes=10, id="gone")
    registry.add(report_job, "interval", minutes=10, id="stays")
    sched = scheduler()
    sync_jobs(sched)
    sched.add_job(other_job, "interval", minutes=1, id="runtime-added")
    DjangoJobExecution.objects.create(
        job_id="gone", run_time=datetime(2024, 1, 1, tzinfo=timezone.utc), status="Executed"
    )
    restart(lambda: registry.add(report_job, "interval", minutes=10, id="stays"))
    report = sync_jobs(sched)
    assert report["removed"] == ["gone"]
    assert set(DjangoJob.objects.values_list("id", flat=True)) == {"stays", "runtime-added"}
    assert DjangoJobExecution.objects.filter(job_id="gone").count() == 1


def test_undeclared_jobs_are_kept_when_removal_is_off(scheduler, settings):
    settings.APSCHEDULER_REMOVE_UNDECLARED_JOBS = False
    registry.add(report_job, "interval", minutes=10, id="gone")
    sched = scheduler()
    sync_jobs(sched)
    restart(lambda: None)
    assert sync_jobs(sched)["removed"] == []
    assert DjangoJob.objects.filter(id="gone").exists()


def test_unrestorable_declared_job_is_repaired_keeping_its_next_run(scheduler):
    registry.add(report_job, "interval", minutes=10, id="broken")
    sched = scheduler()
    sync_jobs(sched)
    before = next_runs()["broken"]
    DjangoJob.objects.filter(id="broken").update(job_state=signing.sign(b"corrupt"))
    assert sched.get_job("broken") is None
    assert DjangoJob.objects.get(id="broken").restore_error
    restart(lambda: registry.add(report_job, "interval", minutes=10, id="broken"))
    sync_jobs(sched)
    row = DjangoJob.objects.get(id="broken")
    assert row.restore_error == ""
    assert sched.get_job("broken").func is report_job
    assert row.next_run_time == before


def test_string_triggers_use_the_scheduler_time_zone(settings):
    settings.TIME_ZONE = "Europe/Berlin"
    spec = registry.add(report_job, "cron", hour=3, id="three")
    assert spec.trigger.timezone == ZoneInfo("Europe/Berlin")
    settings.APSCHEDULER_TIMEZONE = "America/New_York"
    spec = registry.add(report_job, "cron", expression="0 3 * * *", id="expr")
    assert spec.trigger.timezone == ZoneInfo("America/New_York")
    spec = registry.add(report_job, "interval", hours=1, id="iv")
    assert spec.trigger.timezone == ZoneInfo("America/New_York")
    spec = registry.add(report_job, "cron", hour=3, timezone="UTC", id="explicit")
    assert str(spec.trigger.timezone) == "UTC"


# -- refusals name the job ------------------------------------------------------------------


def _nested():
    def inner():
        pass

    return inner


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (
            lambda: [
                registry.add(report_job, "interval", seconds=1, id="dup"),
                registry.add(other_job, "interval", seconds=1, id="dup"),
            ],
            "Job 'dup' is declared twice",
        ),
        (
            lambda: registry.add("tests.no_such_module:f", "interval", seconds=1, id="imp"),
            "Job 'imp': cannot import function 'tests.no_such_module:f'",
        ),
        (
            lambda: registry.add("tests.test_registry:missing", "interval", seconds=1, id="imp2"),
            "Job 'imp2': cannot import function",
        ),
        (
            lambda: registry.add(report_job, "cron", hour=25, id="cron"),
            "Job 'cron': invalid trigger",
        ),
        (
            lambda: registry.add(report_job, "cron", expression="61 * * * *", id="expr"),
            "Job 'expr': invalid trigger",
        ),
        (
            lambda: registry.add(report_job, "cron", expression="* * *", id="short"),
            "Job 'short': invalid trigger",
        ),
        (lambda: registry.add(report_job, "every", id="alias"), "Job 'alias': invalid trigger"),
        (
            lambda: registry.add(report_job, "interval", secnds=1, id="typo"),
            "Job 'typo': invalid trigger",
        ),
        (
            lambda: registry.add(
                report_job, "interval", seconds=1, id="pick", args=(threading.Lock(),)
            ),
            "Job 'pick': arguments cannot be stored",
        ),  # fmt: skip
        (
            lambda: registry.add(
                report_job, "interval", seconds=1, id="kw", kwargs={"f": lambda: 1}
            ),
            "Job 'kw': arguments cannot be stored",
        ),  # fmt: skip
        (
            lambda: registry.add(lambda: None, "interval", seconds=1, id="lam"),
            "Job 'lam': the function must be importable",
        ),
        (
            lambda: registry.add(_nested(), "interval", seconds=1, id="nested"),
            "Job 'nested': the function must be importable",
        ),
        (
            lambda: registry.add(report_job, "interval", seconds=1, id="rt", max_runtime=-1),
            "Job 'rt': max_runtime",
        ),
    ],
)
def test_invalid_declarations_are_refused_with_the_job_id(declare, message):
    with pytest.raises(JobDefinitionError) as info:
        declare()
    assert message in str(info.value)


def test_settings_entry_without_func_names_the_job(settings):
    settings.APSCHEDULER_JOBS = [{"trigger": "interval", "seconds": 1, "id": "nofunc"}]
    registry._discovered = False
    with pytest.raises(JobDefinitionError, match="'nofunc' needs 'func' and 'trigger'"):
        registry.discover()


def test_settings_and_decorator_with_the_same_id_are_refused(settings):
    registry.add(report_job, "interval", seconds=1, id="both")
    settings.APSCHEDULER_JOBS = [
        {"func": "tests.test_registry:other_job", "trigger": "interval", "seconds": 1, "id": "both"}
    ]
    registry._discovered = False
    with pytest.raises(JobDefinitionError, match="Job 'both' is declared twice"):
        registry.discover()


def test_default_id_and_options(scheduler):
    spec = registry.add(
        report_job, "interval", seconds=5, misfire_grace_time=7, max_instances=2, name="Report"
    )
    assert spec.id == "tests.test_registry.report_job"
    sched = scheduler()
    sync_jobs(sched)
    job = sched.get_job(spec.id)
    assert (job.misfire_grace_time, job.max_instances, job.name) == (7, 2, "Report")
