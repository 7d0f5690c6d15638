"""Retention: exactly the expired rows go, in batches no larger than the batch size."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone as dj_timezone

from django_apscheduler_obs import cleanup
from django_apscheduler_obs.management.commands.apscheduler_prune import parse_duration
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from tests.conftest import wait_for


class DeleteSpy:
    """Records every DELETE on the execution table and how many rows it touched."""

    def __init__(self) -> None:
        self.deletes: list[int] = []

    def __call__(self, execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if sql.lstrip().upper().startswith("DELETE") and "djangojobexecution" in sql.lower():
            self.deletes.append(context["cursor"].rowcount)
        return result


def make_rows(job_id: str, ages_s: list[float], status: str = "Executed") -> list[int]:
    now = dj_timezone.now()
    return [
        DjangoJobExecution.objects.create(
            job_id=job_id, run_time=now - timedelta(seconds=age), status=status
        ).id
        for age in ages_s
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("batch_size", [1, 7, 10, 25, 1000])
def test_deletes_exactly_the_expired_rows_in_batches(batch_size):
    expired = make_rows("a", [7200 + i for i in range(25)])
    kept = make_rows("a", [60 * i for i in range(5)])
    spy = DeleteSpy()
    with connection.execute_wrapper(spy):
        deleted = cleanup.delete_executions(
            before=dj_timezone.now() - timedelta(hours=1), batch_size=batch_size
        )
    assert deleted == 25
    assert set(DjangoJobExecution.objects.values_list("id", flat=True)) == set(kept)
    assert not DjangoJobExecution.objects.filter(id__in=expired).exists()
    assert sum(spy.deletes) == 25
    assert max(spy.deletes) <= batch_size
    assert len(spy.deletes) == -(-25 // batch_size)  # ceil: no extra statements


@pytest.mark.django_db
def test_filters_by_job_and_status_and_dry_run():
    make_rows("a", [7200, 7300], "Executed")
    make_rows("a", [7200.5], "Error!")
    make_rows("b", [7200, 7400], "Executed")
    make_rows("b", [10], "Executed")
    before = dj_timezone.now() - timedelta(hours=1)
    assert cleanup.delete_executions(before=before, dry_run=True) == 5
    assert DjangoJobExecution.objects.count() == 6
    assert cleanup.delete_executions(before=before, job_ids=["a"], statuses=["Error!"]) == 1
    assert cleanup.delete_executions(before=before, job_ids=["b"]) == 2
    assert cleanup.delete_executions(before=before, statuses=["Executed"]) == 2
    assert DjangoJobExecution.objects.count() == 1


@pytest.mark.django_db
def test_manager_method_uses_batches(settings):
    settings.APSCHEDULER_CLEANUP_BATCH_SIZE = 4
    make_rows("a", [100 + i for i in range(10)])
    make_rows("a", [1])
    spy = DeleteSpy()
    with connection.execute_wrapper(spy):
        DjangoJobExecution.objects.delete_old_job_executions(50)
    assert spy.deletes == [4, 4, 2]
    assert DjangoJobExecution.objects.count() == 1


@pytest.mark.django_db
def test_cleanup_job_applies_the_retention(settings):
    settings.APSCHEDULER_EXECUTION_RETENTION = 3600
    make_rows("a", [3700, 4000])
    make_rows("a", [3500])
    seen: list[int] = []
    cleanup.on_deleted, previous = seen.append, cleanup.on_deleted
    try:
        assert cleanup.cleanup_job() == 2
    finally:
        cleanup.on_deleted = previous
    assert seen == [2]
    settings.APSCHEDULER_EXECUTION_RETENTION = None
    make_rows("a", [10**6])
    assert cleanup.cleanup_job() == 0
    assert DjangoJobExecution.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_runtime_schedules_the_cleanup_job_and_it_prunes(make_runtime, settings):
    settings.APSCHEDULER_EXECUTION_RETENTION = 3600
    settings.APSCHEDULER_CLEANUP_INTERVAL = 1
    make_rows("old", [7200, 7201, 7202])
    young = make_rows("old", [5])
    rt = make_runtime()
    assert DjangoJob.objects.filter(id=cleanup.CLEANUP_JOB_ID).exists()
    wait_for(
        lambda: not DjangoJobExecution.objects.filter(job_id="old").exclude(id__in=young).exists(),
        timeout=15,
        message="expired rows pruned by the built-in job",
    )
    assert DjangoJobExecution.objects.filter(id__in=young).exists()
    wait_for(
        lambda: DjangoJobExecution.objects.filter(
            job_id=cleanup.CLEANUP_JOB_ID, status=DjangoJobExecution.SUCCESS
        ).exists(),
        message="the cleanup job's own execution row",
    )
    assert rt.metrics.cleanup_deleted._value.get() >= 3


@pytest.mark.django_db(transaction=True)
def test_no_cleanup_job_when_retention_is_none(make_runtime, settings):
    DjangoJob.objects.create(id=cleanup.CLEANUP_JOB_ID, job_state=b"", definition_hash="x" * 64)
    settings.APSCHEDULER_EXECUTION_RETENTION = None
    make_runtime()
    # Declared earlier, no longer declared: removed (its history stays).
    assert not DjangoJob.objects.filter(id=cleanup.CLEANUP_JOB_ID).exists()


# -- manage.py apscheduler_prune ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("3600s", 3600), ("90m", 5400), ("12h", 43200), ("7d", 604800),
     ("2w", 1209600), ("1.5h", 5400), (" 7d ", 604800)],
)  # fmt: skip
def test_parse_duration(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7y", "d", "-1d", "7 days", "abc"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def prune(*args: str) -> str:
    out = StringIO()
    call_command("apscheduler_prune", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_prune_command_older_than_days_and_seconds():
    make_rows("a", [8 * 86400, 9 * 86400])
    make_rows("a", [2 * 3600])
    make_rows("a", [60])
    assert prune("--older-than", "7d").startswith("Deleted 2 execution(s)")
    assert DjangoJobExecution.objects.count() == 2
    assert "Deleted 1 execution(s)" in prune("--older-than", "3600s")
    assert DjangoJobExecution.objects.count() == 1


@pytest.mark.django_db
def test_prune_command_job_status_dry_run_and_batch_size():
    make_rows("a", [7200] * 1 + [7201, 7202, 7203])
    make_rows("a", [7204], "Error!")
    make_rows("b", [7200, 7201], "Error!")
    out = prune("--older-than", "1h", "--dry-run", "--status", "Error!")
    assert out.startswith("Would delete 3 execution(s)") and "status Error!" in out
    assert DjangoJobExecution.objects.count() == 7
    spy = DeleteSpy()
    with connection.execute_wrapper(spy):
        out = prune("--older-than", "1h", "--job", "a", "--batch-size", "3")
    assert out.startswith("Deleted 5 execution(s)") and "job a" in out
    assert spy.deletes == [3, 2]
    assert set(DjangoJobExecution.objects.values_list("job_id", flat=True)) == {"b"}
    assert "Deleted 2" in prune("--older-than", "1h", "--job", "a", "--job", "b")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "7y"], "invalid duration"),
        (["--older-than", "1d", "--status", "Done"], "unknown --status 'Done'"),
        (["--older-than", "1d", "--batch-size", "0"], "--batch-size must be at least 1"),
        ([], "--older-than"),
        (["--older-than", "1d", "--batch-size", "x"], "invalid int value"),
    ],
)
def test_prune_command_refuses_bad_arguments(args, message):
    make_rows("a", [10**6])
    with pytest.raises(CommandError, match=message):
        prune(*args)
    assert DjangoJobExecution.objects.count() == 1


def test_cleanup_ids_are_stable():
    assert cleanup.CLEANUP_JOB_ID == "django_apscheduler_obs.cleanup"
