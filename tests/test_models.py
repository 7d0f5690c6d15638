"""The models on the real database: constraints, column sizes (multi-byte too), precision."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from django.db import DatabaseError, DataError, IntegrityError, connection, transaction
from django.utils import timezone as dj_timezone

from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution

pytestmark = pytest.mark.django_db

RT = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def test_str():
    job = DjangoJob(id="j", next_run_time=None, job_state=b"")
    assert str(job) == "j (paused)"
    job.next_run_time = RT
    assert str(job).startswith("j (next run at: ")
    ex = DjangoJobExecution(id=7, job_id="j", status=DjangoJobExecution.SUCCESS, run_time=RT)
    assert str(ex) == "7: job 'j' (Executed)"


def test_every_status_is_a_choice():
    values = [v for v, _ in DjangoJobExecution.STATUS_CHOICES]
    for status in ("Started execution", "Executed", "Missed!", "Max instances!", "Error!"):
        assert status in values
    assert DjangoJobExecution.SENT not in DjangoJobExecution.FINAL_STATUSES
    running = {DjangoJobExecution.SENT, *DjangoJobExecution.REMOTE_PENDING}
    assert set(DjangoJobExecution.FINAL_STATUSES) == set(values) - running


def test_one_row_per_fire_time_is_enforced_by_the_database():
    DjangoJobExecution.objects.create(job_id="j", run_time=RT, status="Executed")
    with pytest.raises(IntegrityError), transaction.atomic():
        DjangoJobExecution.objects.create(job_id="j", run_time=RT, status="Error!")
    DjangoJobExecution.objects.create(
        job_id="j", run_time=RT + timedelta(microseconds=1), status="x"
    )
    DjangoJobExecution.objects.create(job_id="other", run_time=RT, status="Executed")
    assert DjangoJobExecution.objects.count() == 3


def test_history_outlives_its_job():
    job = DjangoJob.objects.create(id="once", job_state=b"x")
    DjangoJobExecution.objects.create(job=job, run_time=RT, status="Executed")
    job.delete()
    DjangoJob.objects.all().delete()
    assert DjangoJobExecution.objects.filter(job_id="once").count() == 1
    # ... and rows of jobs that never existed in this database (0.7 data, or pruned jobs).
    DjangoJobExecution.objects.create(job_id="never-existed", run_time=RT, status="Executed")


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"], ids=["ascii", "2-byte", "3-byte", "4-byte"])
def test_exception_column_holds_1000_characters_of_any_width(char):
    text = char * 1000
    ex = DjangoJobExecution.objects.create(
        job_id="j", run_time=RT, status="Error!", exception=text, traceback=char * 100_000
    )
    ex.refresh_from_db()
    assert ex.exception == text
    assert len(ex.traceback) == 100_000


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite does not enforce max_length")
def test_exception_column_refuses_1001_characters():
    with pytest.raises((DataError, DatabaseError)), transaction.atomic():
        DjangoJobExecution.objects.create(
            job_id="j", run_time=RT, status="Error!", exception="é" * 1001
        )


def test_timing_columns_keep_microseconds():
    ex = DjangoJobExecution.objects.create(
        job_id="j",
        run_time=RT,
        status="Executed",
        started=RT + timedelta(microseconds=250),
        start_delay=0.000250,
        duration=Decimal("12345.678901"),
        finished=Decimal(f"{(RT + timedelta(seconds=3)).timestamp():.6f}"),
    )
    ex.refresh_from_db()
    assert ex.run_time == RT
    assert ex.started == RT + timedelta(microseconds=250)
    assert ex.duration == Decimal("12345.678901")
    expected = Decimal(f"{(RT + timedelta(seconds=3)).timestamp():.6f}")
    if connection.vendor == "sqlite":  # NUMERIC affinity keeps 15-16 significant digits
        assert abs(ex.finished - expected) < Decimal("0.0001")
    else:
        assert ex.finished == expected
    assert ex.start_delay == pytest.approx(0.00025)


def test_ordering():
    for i in range(3):
        DjangoJobExecution.objects.create(
            job_id="j", run_time=RT + timedelta(seconds=i), status="x"
        )
    assert [e.run_time for e in DjangoJobExecution.objects.all()] == [
        RT + timedelta(seconds=i) for i in (2, 1, 0)
    ]
    DjangoJob.objects.create(id="b", next_run_time=RT + timedelta(days=1), job_state=b"")
    DjangoJob.objects.create(id="a", next_run_time=RT, job_state=b"")
    assert [j.id for j in DjangoJob.objects.exclude(next_run_time=None)] == ["a", "b"]


def test_job_defaults():
    before = dj_timezone.now()
    job = DjangoJob.objects.create(id="d", job_state=b"state")
    job.refresh_from_db()
    assert job.version == 1 and job.restore_error == "" and job.definition_hash == ""
    assert job.registered_at >= before - timedelta(seconds=1)
    assert bytes(job.job_state) == b"state"


def test_long_job_id_round_trips():
    job_id = "ü" * 255
    DjangoJob.objects.create(id=job_id, job_state=b"")
    DjangoJobExecution.objects.create(job_id=job_id, run_time=RT, status="Executed")
    assert DjangoJobExecution.objects.get(job_id=job_id).job_id == job_id


# -- migration 0004: the redundant job_id index ----------------------------------------------


def _indexes_on(columns: list[str]) -> list[str]:
    with connection.cursor() as c:
        found = connection.introspection.get_constraints(c, DjangoJobExecution._meta.db_table)
    return [n for n, i in found.items() if (i["index"] or i["unique"]) and i["columns"] == columns]


@pytest.mark.django_db(transaction=True)
def test_migration_0004_drops_only_the_redundant_job_index_and_reverses():
    from django.db.migrations.executor import MigrationExecutor

    app = "django_apscheduler_obs"
    DjangoJobExecution.objects.create(job_id="kept", status="Executed", run_time=RT)
    assert _indexes_on(["job_id"]) == []  # the current schema has no single-column index
    try:
        MigrationExecutor(connection).migrate([(app, "0003_sign_job_state")])
        assert len(_indexes_on(["job_id"])) == 1  # the index of 0001, restored by the reverse
        MigrationExecutor(connection).migrate([(app, "0004_drop_redundant_job_index")])
        assert _indexes_on(["job_id"]) == []
    finally:
        MigrationExecutor(connection).migrate(
            MigrationExecutor(connection).loader.graph.leaf_nodes(app)
        )
    # The indexes that lead with job_id and serve lookups by job are untouched; no row moved.
    assert _indexes_on(["job_id", "run_time"]) and _indexes_on(["job_id", "status", "run_time"])
    assert DjangoJobExecution.objects.filter(job_id="kept").count() == 1


# -- migration 0005: runs on workers ----------------------------------------------------------

REMOTE_COLUMNS = {
    "worker",
    "enqueued_at",
    "picked_up_at",
    "queue_wait",
    "worker_seen",
    "report_pending",
    "job_state",
}


def _execution_columns() -> set[str]:
    with connection.cursor() as c:
        table = DjangoJobExecution._meta.db_table
        return {col.name for col in connection.introspection.get_table_description(c, table)}


@pytest.mark.django_db(transaction=True)
def test_migration_0005_adds_nullable_remote_columns_and_reverses():
    from django.db.migrations.executor import MigrationExecutor

    app = "django_apscheduler_obs"
    assert _execution_columns() >= REMOTE_COLUMNS
    try:
        MigrationExecutor(connection).migrate([(app, "0004_drop_redundant_job_index")])
        assert not REMOTE_COLUMNS & _execution_columns()
        with connection.cursor() as c:  # a row written by the previous version
            c.execute(
                f"INSERT INTO {DjangoJobExecution._meta.db_table} "
                "(job_id, status, run_time, error_type, trace_id, span_id, owner, "
                "trigger_source) VALUES (%s, %s, %s, '', '', '', '', 'schedule')",
                ["old", "Executed", RT],
            )
    finally:
        MigrationExecutor(connection).migrate(
            MigrationExecutor(connection).loader.graph.leaf_nodes(app)
        )
    assert _execution_columns() >= REMOTE_COLUMNS
    old = DjangoJobExecution.objects.get(job_id="old")
    assert (old.worker, old.report_pending, old.job_state) == (None, None, None)
