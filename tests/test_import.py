"""``manage.py apscheduler_import`` on a database populated by django-apscheduler 0.7 itself.

django-apscheduler 0.7 is installed in the venv as ``django_apscheduler``. The test installs
its app for the duration of the test, creates its tables with its own migrations, and lets its
own ``DjangoJobStore`` and a ``BackgroundScheduler`` run jobs to produce real rows.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from apscheduler.executors.debug import DebugExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from django.conf import settings
from django.contrib import admin
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.migrations.recorder import MigrationRecorder
from django.test import override_settings

from django_apscheduler_obs import signing
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, JobStoreVersion
from tests.conftest import wait_for

EX = DjangoJobExecution


def run_import(*args: str) -> str:
    out = StringIO()
    call_command("apscheduler_import", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def legacy_app() -> Iterator[dict[str, Any]]:
    """django-apscheduler 0.7 installed, its tables migrated; removed again afterwards."""
    # Both apps migrate into one database: on PostgreSQL this works only because our unique
    # constraint is not named like 0.7's "unique_job_executions" (index names are per schema).
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "django_apscheduler"]):
        call_command("migrate", "django_apscheduler", verbosity=0)
        from django_apscheduler import jobstores, models

        try:
            yield {"models": models, "jobstores": jobstores}
        finally:
            # 0.7's migrations are irreversible (0005 is a RunPython without a reverse):
            # drop its tables and forget that they were applied.
            with connection.schema_editor() as editor:
                editor.delete_model(models.DjangoJobExecution)
                editor.delete_model(models.DjangoJob)
            MigrationRecorder(connection).migration_qs.filter(app="django_apscheduler").delete()
            # its admin registered itself on the shared site when the app was installed
            for model in (models.DjangoJob, models.DjangoJobExecution):
                if admin.site.is_registered(model):
                    admin.site.unregister(model)


def populate_with_07(legacy: dict[str, Any]) -> None:
    """Jobs and executions written by django-apscheduler 0.7's own code.

    Its job store and listener read a row, then write it, in one deferred transaction; on
    SQLite two such writers fail at once ("database is locked", no busy wait), and 0.7 gives
    up after one retry. So every 0.7 write here comes from one thread: the jobs run in the
    scheduler thread (``DebugExecutor``) and the paused job is added paused.
    """
    old = legacy["models"]
    scheduler = BackgroundScheduler(timezone="UTC", executors={"default": DebugExecutor()})
    scheduler.add_jobstore(legacy["jobstores"].DjangoJobStore(), "default")
    now = datetime.now(timezone.utc)
    scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        seconds=1,
        id="legacy_tick",
        next_run_time=now,
        misfire_grace_time=30,
    )
    scheduler.add_job(
        "tests.jobs:fail", "interval", minutes=30, id="legacy_fail", next_run_time=now
    )
    scheduler.add_job("tests.jobs:noop", "cron", hour=3, id="legacy_nightly", next_run_time=None)
    scheduler.start()
    try:
        wait_for(
            lambda: (
                old.DjangoJobExecution.objects.filter(
                    job_id="legacy_tick", status="Executed"
                ).count()
                >= 3
                and old.DjangoJobExecution.objects.filter(
                    job_id="legacy_fail", status="Error!"
                ).exists()
            ),
            timeout=30,
            message="django-apscheduler 0.7 to record runs",
        )
    finally:
        scheduler.shutdown(wait=True)
    # A job whose code is gone since 0.7 stored it.
    nightly = old.DjangoJob.objects.get(id="legacy_nightly")
    state = pickle.loads(bytes(nightly.job_state))  # noqa: S301
    state.update(id="legacy_gone", func="gone_module:vanished")
    old.DjangoJob.objects.create(
        id="legacy_gone", next_run_time=None, job_state=pickle.dumps(state)
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_import_from_django_apscheduler_07(legacy_app, make_runtime):
    old = legacy_app["models"]
    populate_with_07(legacy_app)
    old_jobs = {j.id: j for j in old.DjangoJob.objects.all()}
    old_runs = {(r.job_id, r.run_time): r for r in old.DjangoJobExecution.objects.all()}
    assert set(old_jobs) == {"legacy_tick", "legacy_fail", "legacy_nightly", "legacy_gone"}
    assert not signing.is_signed(bytes(old_jobs["legacy_tick"].job_state))  # 0.7 never signs
    n = len(old_runs)

    # dry run: counts, nothing written
    out = run_import("--dry-run")
    assert f"Would import 4 of 4 job(s) (0 already present) and {n} of {n} execution(s)" in out
    assert "Job 'legacy_gone' cannot be restored here (LookupError: " in out
    assert "gone_module:vanished: could not import module" in out
    assert "Dry run: nothing was written." in out
    assert not DjangoJob.objects.exists() and not EX.objects.exists()

    counter = JobStoreVersion.objects.filter(name="default").values_list("version", flat=True)
    before = counter.first() or 0
    out = run_import("--from-database", "default", "--batch-size", "2")
    assert f"Imported 4 of 4 job(s) (0 already present) and {n} of {n} execution(s)" in out
    assert (counter.first() or 0) == before + 1  # the running leader is told

    # jobs: same ids, next run, trigger; state signed so our store accepts it
    store = DjangoJobStore()
    for job_id, old_job in old_jobs.items():
        new = DjangoJob.objects.get(id=job_id)
        assert new.next_run_time == old_job.next_run_time
        assert signing.is_signed(bytes(new.job_state))
        assert signing.verify(bytes(new.job_state)) == bytes(old_job.job_state)
    for job_id in ("legacy_tick", "legacy_fail", "legacy_nightly"):
        job = store.lookup_job(job_id)
        assert job is not None and str(job.trigger) == str(
            pickle.loads(bytes(old_jobs[job_id].job_state))["trigger"]  # noqa: S301
        )
    assert store.lookup_job("legacy_nightly").next_run_time is None  # still paused
    assert "could not import module" in DjangoJob.objects.get(id="legacy_gone").restore_error

    # executions: statuses 1:1, texts and 0.7's duration as they were, no invented timings
    new_runs = {(r.job_id, r.run_time): r for r in EX.objects.all()}
    assert set(new_runs) == set(old_runs)
    for key, old_run in old_runs.items():
        new = new_runs[key]
        assert new.status == old_run.status
        assert (new.exception, new.traceback) == (old_run.exception, old_run.traceback)
        assert new.duration == old_run.duration and new.finished == old_run.finished
        assert new.started is None and new.start_delay is None
        assert new.trigger_source == "schedule" and new.owner == ""
    statuses = {r.status for r in new_runs.values()}
    assert {"Executed", "Error!"} <= statuses
    failed = next(r for r in new_runs.values() if r.status == "Error!")
    assert "boom" in failed.exception and "tests/jobs.py" in failed.traceback
    assert isinstance(failed.duration, Decimal)

    # idempotent
    out = run_import()
    assert (
        f"Imported 0 of 4 job(s) (4 already present) and 0 of {n} execution(s) ({n} already" in out
    )
    assert EX.objects.count() == n and DjangoJob.objects.count() == 4

    # and our scheduler runs the imported jobs
    rt = make_runtime()
    wait_for(
        lambda: EX.objects.filter(job_id="legacy_tick", owner=rt.lease.identity).exists(),
        message="our scheduler to run an imported job",
    )
    assert DjangoJob.objects.get(id="legacy_gone").restore_error  # kept, never run
    assert not EX.objects.filter(job_id="legacy_gone").exists()


@pytest.mark.django_db(transaction=True)
def test_new_rows_of_a_second_pass_are_imported(legacy_app):
    old = legacy_app["models"]
    old.DjangoJob.objects.create(id="a", next_run_time=None, job_state=pickle.dumps({}))
    old.DjangoJobExecution.objects.create(
        job_id="a", status="Executed", run_time=datetime(2024, 1, 1, tzinfo=timezone.utc)
    )
    assert "Imported 1 of 1 job(s) (0 already present) and 1 of 1 execution(s)" in run_import()
    old.DjangoJobExecution.objects.create(
        job_id="a", status="Missed!", run_time=datetime(2024, 1, 2, tzinfo=timezone.utc)
    )
    out = run_import()
    assert "Imported 0 of 1 job(s) (1 already present) and 1 of 2 execution(s) (1 already" in out
    assert list(EX.objects.order_by("run_time").values_list("status", flat=True)) == [
        "Executed",
        "Missed!",
    ]
    # an unreadable state is imported and flagged, not dropped
    assert DjangoJob.objects.get(id="a").restore_error


@pytest.mark.django_db
def test_without_07_tables_it_says_so():
    with pytest.raises(CommandError, match="No django-apscheduler 0.7 tables"):
        run_import()
    with pytest.raises(CommandError, match="Unknown database alias 'nope'"):
        run_import("--from-database", "nope")
