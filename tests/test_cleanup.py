"""Retention: exactly the expired rows go, in batches sized to a time budget per statement."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError, ProgrammingError, connection, transaction
from django.utils import timezone as dj_timezone

from django_apscheduler_obs import cleanup
from django_apscheduler_obs.management.commands.apscheduler_prune import parse_duration
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from tests.conftest import wait_for

TABLE = DjangoJobExecution._meta.db_table


class BatchSpy:
    """Records every batch (rows asked for, rows deleted) and drives a fake statement clock:
    each batch "takes" ``cost(rows asked, batch number)`` seconds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[tuple[int, int]] = []
        self.now = 0.0
        self.cost = lambda n, i: 0.0
        original = cleanup._Batches.delete

        def delete(batches: cleanup._Batches, n: int) -> tuple[int, bool]:
            deleted, more = original(batches, n)
            self.now += self.cost(n, len(self.batches))
            self.batches.append((n, deleted))
            return deleted, more

        monkeypatch.setattr(cleanup._Batches, "delete", delete)
        monkeypatch.setattr(cleanup, "clock", lambda: self.now)

    @property
    def sizes(self) -> list[int]:
        return [n for n, _ in self.batches]

    @property
    def deletes(self) -> list[int]:
        return [d for _, d in self.batches]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> BatchSpy:
    return BatchSpy(monkeypatch)


@pytest.fixture
def reported() -> Iterator[list[int]]:
    seen: list[int] = []
    cleanup.on_deleted, previous = seen.append, cleanup.on_deleted
    try:
        yield seen
    finally:
        cleanup.on_deleted = previous


class DeleteStatements:
    """Counts the DELETE statements on the execution table (one per batch)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute, sql, params, many, context):
        if "DELETE FROM" in sql.upper() and TABLE in sql.lower():
            self.count += 1
        return execute(sql, params, many, context)


def make_rows(job_id: str, ages_s: list[float], status: str = "Executed") -> list[int]:
    now = dj_timezone.now()
    return [
        DjangoJobExecution.objects.create(
            job_id=job_id, run_time=now - timedelta(seconds=age), status=status
        ).id
        for age in ages_s
    ]


def bulk_rows(run_times: list[datetime], job_ids: list[str], status: str = "Executed") -> None:
    """One row per (run time, job) pair: many rows can share a run time (ties)."""
    DjangoJobExecution.objects.bulk_create(
        [
            DjangoJobExecution(job_id=job, run_time=rt, status=status)
            for rt in run_times
            for job in job_ids
        ],
        batch_size=500,
    )


def expected_batches(total: int, size: int) -> list[int]:
    """Fixed batches: full ones, the remainder, and one empty probe if it divides evenly."""
    return [size] * (total // size) + [total % size]


@pytest.mark.django_db
@pytest.mark.parametrize("batch_size", [1, 7, 10, 25, 1000])
def test_fixed_batch_size_deletes_exactly_the_expired_rows(batch_size, spy, reported):
    expired = make_rows("a", [7200 + i for i in range(25)])
    kept = make_rows("a", [60 * i for i in range(5)])
    statements = DeleteStatements()
    with connection.execute_wrapper(statements):
        deleted = cleanup.delete_executions(
            before=dj_timezone.now() - timedelta(hours=1), batch_size=batch_size
        )
    assert deleted == 25
    assert set(DjangoJobExecution.objects.values_list("id", flat=True)) == set(kept)
    assert not DjangoJobExecution.objects.filter(id__in=expired).exists()
    assert spy.deletes == expected_batches(25, batch_size)
    assert set(spy.sizes) == {batch_size}  # fixed: fast statements do not grow it
    assert statements.count == len(spy.batches)  # one DELETE statement per batch
    assert reported == [d for d in spy.deletes if d]


@pytest.mark.django_db
def test_batches_grow_while_statements_are_fast(settings, spy, reported):
    settings.APSCHEDULER_CLEANUP_BATCH_SIZE = 2
    bulk_rows([dj_timezone.now() - timedelta(days=2, seconds=i) for i in range(300)], ["a"])
    bulk_rows([dj_timezone.now()], ["a"])
    spy.cost = lambda n, i: 0.0001 * n  # 0.1 ms a row: the ideal batch is 750 rows
    assert cleanup.delete_executions(before=dj_timezone.now() - timedelta(days=1)) == 300
    assert spy.sizes == [2, 8, 32, 128, 512]  # at most 4x per statement
    assert spy.deletes == [2, 8, 32, 128, 130]
    assert reported == spy.deletes
    assert DjangoJobExecution.objects.count() == 1


@pytest.mark.django_db
def test_a_slow_statement_shrinks_the_batch(settings, spy, reported):
    settings.APSCHEDULER_CLEANUP_BATCH_SIZE = 100
    bulk_rows([dj_timezone.now() - timedelta(days=2, seconds=i) for i in range(1000)], ["a"])
    young = dj_timezone.now() - timedelta(hours=1)
    bulk_rows([young], ["a", "b"])
    # 0.5 ms a row (ideal: the target's worth), except that the third statement waits 0.2 s
    # on a lock.
    ideal = cleanup.TARGET_S / 0.0005
    spy.cost = lambda n, i: 0.0005 * n + (0.2 if i == 2 else 0.0)
    assert cleanup.delete_executions(before=dj_timezone.now() - timedelta(days=1)) == 1000
    sizes = spy.sizes
    assert sizes[0] == 100 and all(abs(s - ideal) <= 1 for s in sizes[1:3])
    assert sizes[3] <= ideal / 2  # half the budget taken: at least halved, and rate-limited
    assert sizes[4] > sizes[3] and max(sizes[4:]) <= ideal  # grows back to the target only
    assert sum(spy.deletes) == sum(reported) == 1000
    assert set(DjangoJobExecution.objects.values_list("run_time", flat=True)) == {young}


@pytest.mark.django_db
@pytest.mark.parametrize("batch_size", [None, 7])
def test_ties_and_filters_across_batches_keep_what_must_be_kept(settings, spy, batch_size):
    """Several jobs fire at the same times, so equal run times straddle batch boundaries."""
    settings.APSCHEDULER_CLEANUP_BATCH_SIZE = 3
    before = dj_timezone.now().replace(microsecond=0) - timedelta(hours=1)
    old = [before - timedelta(minutes=m) for m in range(12)]  # ``before`` itself included
    jobs = ["a", "b", "c", "d", "e"]
    bulk_rows(old, jobs)
    bulk_rows(old[:4], ["x"], DjangoJobExecution.SENT)  # claimed, never finished
    bulk_rows(old[:4], ["y"], DjangoJobExecution.ERROR)
    bulk_rows([before + timedelta(microseconds=1), before + timedelta(minutes=5)], jobs + ["x"])
    total = DjangoJobExecution.objects.count()

    def remaining() -> set[tuple[str, datetime]]:
        return set(DjangoJobExecution.objects.values_list("job_id", "run_time"))

    # Only job "b", then only errors: everything else stays, whatever the batch boundaries.
    gone = {("b", rt) for rt in old}
    assert cleanup.delete_executions(before=before, job_ids=["b"], batch_size=batch_size) == 12
    assert not remaining() & gone and len(remaining()) == total - 12
    assert cleanup.delete_executions(before=before, statuses=["Error!"], batch_size=batch_size)
    assert not any(job == "y" for job, _ in remaining())
    # Then every expired row, claimed or not (as 0.7 did), and nothing younger than ``before``.
    spy.batches.clear()
    deleted = cleanup.delete_executions(before=before, batch_size=batch_size)
    assert deleted == 4 * 12 + 4
    assert remaining() == {
        (job, before + delta)
        for job in jobs + ["x"]
        for delta in (timedelta(microseconds=1), timedelta(minutes=5))
    }
    assert sum(spy.deletes) == deleted and len(spy.batches) > 2
    if batch_size:  # PostgreSQL deletes the rows sharing the n-th run time with it
        ties = len(jobs) - 1 if connection.vendor == "postgresql" else 0
        assert max(spy.deletes) <= batch_size + ties


class FailingDeletes:
    """Raises ``error`` instead of running the DELETE statements numbered in ``fail``."""

    def __init__(self, error: Exception, fail: set[int]) -> None:
        self.error, self.fail, self.seen = error, fail, 0

    def __call__(self, execute, sql, params, many, context):
        if "DELETE FROM" in sql.upper() and TABLE in sql.lower():
            self.seen += 1
            if self.seen in self.fail:
                raise self.error
        return execute(sql, params, many, context)


@pytest.mark.django_db(transaction=True)
def test_a_transient_error_is_retried_with_a_smaller_batch(settings, spy, reported):
    settings.APSCHEDULER_CLEANUP_BATCH_SIZE = 8
    bulk_rows([dj_timezone.now() - timedelta(days=2, seconds=i) for i in range(100)], ["a"])
    spy.cost = lambda n, i: 0.075 / 8 * n  # at the target: the size stays 8
    failing = FailingDeletes(OperationalError("lock wait timeout"), {2, 3})
    with connection.execute_wrapper(failing):
        assert cleanup.delete_executions(before=dj_timezone.now() - timedelta(days=1)) == 100
    # Statements 2 and 3 fail: 8 -> 2 -> 1 row, which succeeds; then it grows back (4x).
    assert failing.seen == len(spy.batches) + 2
    assert spy.sizes[:4] == [8, 1, 4, 8]
    assert sum(reported) == 100 and DjangoJobExecution.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_errors_that_a_retry_cannot_cure_propagate_after_reporting(settings, spy, reported):
    settings.APSCHEDULER_CLEANUP_BATCH_SIZE = 10
    bulk_rows([dj_timezone.now() - timedelta(days=2, seconds=i) for i in range(30)], ["a"])
    spy.cost = lambda n, i: 0.075 / 10 * n
    before = dj_timezone.now() - timedelta(days=1)
    with (
        connection.execute_wrapper(FailingDeletes(ProgrammingError("no such column"), {2})),
        pytest.raises(ProgrammingError),
    ):
        cleanup.delete_executions(before=before)
    assert reported == [10]  # what was committed before the error is counted
    assert DjangoJobExecution.objects.count() == 20
    failing = FailingDeletes(OperationalError("server has gone away"), {1, 2, 3, 4})
    with connection.execute_wrapper(failing), pytest.raises(OperationalError):
        cleanup.delete_executions(before=before)  # gives up after RETRIES
    assert failing.seen == 1 + cleanup.RETRIES
    with (
        transaction.atomic(),
        connection.execute_wrapper(FailingDeletes(OperationalError("deadlock"), {1})),
        pytest.raises(OperationalError),
    ):
        cleanup.delete_executions(before=before)  # no retry inside a broken transaction
    assert cleanup.delete_executions(before=before) == 20


def test_batch_sizer():
    sizer = cleanup.BatchSizer(1000, target_s=0.075)
    assert sizer.update(1000, 0.001) == 4000  # fast: at most 4x
    quarter = cleanup.BatchSizer(1000, target_s=0.075).update(1000, 0.02)
    assert quarter == 2000  # a quarter of the target: 2x
    assert sizer.update(4000, 0.1) == 3000  # rows * target / seconds
    assert sizer.update(3000, 0.14) == 1500  # over half the budget: at least halved
    assert sizer.failed() == 375
    assert cleanup.BatchSizer(10**9).size == cleanup.MAX_BATCH
    sizer = cleanup.BatchSizer(cleanup.MAX_BATCH)
    assert sizer.update(cleanup.MAX_BATCH, 0.001) == cleanup.MAX_BATCH
    assert cleanup.BatchSizer(1).update(1, 10.0) == 1
    fixed = cleanup.BatchSizer(7, fixed=True)
    assert fixed.update(7, 0.0001) == fixed.update(7, 5.0) == fixed.failed() == 7
    with pytest.raises(ValueError, match="at least 1"):
        cleanup.BatchSizer(0)


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
def test_manager_method_uses_adaptive_batches(settings, spy):
    settings.APSCHEDULER_CLEANUP_BATCH_SIZE = 4
    make_rows("a", [100 + i for i in range(10)])
    make_rows("a", [1])
    DjangoJobExecution.objects.delete_old_job_executions(50)
    assert spy.batches == [(4, 4), (16, 6)]
    assert DjangoJobExecution.objects.count() == 1


@pytest.mark.django_db
def test_cleanup_job_applies_the_retention(settings, reported):
    settings.APSCHEDULER_EXECUTION_RETENTION = 3600
    make_rows("a", [3700, 4000])
    make_rows("a", [3500])
    assert cleanup.cleanup_job() == 2
    assert reported == [2]
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
def test_prune_command_job_status_dry_run_and_batch_size(spy):
    make_rows("a", [7200] * 1 + [7201, 7202, 7203])
    make_rows("a", [7204], "Error!")
    make_rows("b", [7200, 7201], "Error!")
    out = prune("--older-than", "1h", "--dry-run", "--status", "Error!")
    assert out.startswith("Would delete 3 execution(s)") and "status Error!" in out
    assert DjangoJobExecution.objects.count() == 7
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
