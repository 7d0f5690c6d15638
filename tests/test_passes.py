"""The statements of one scheduler pass (``passes.write_pass``) on the configured backend:
many fire times claimed in one ``INSERT``, many jobs advanced in one ``UPDATE``, one commit;
fenced by the lease and by each job's version exactly as the per-fire-time statements are.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from django.db import DatabaseError, connection
from django.test.utils import CaptureQueriesContext

from django_apscheduler_obs import passes
from django_apscheduler_obs.lease import Lease
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, SchedulerLease
from django_apscheduler_obs.passes import Advance, ClaimRow, write_pass

db = pytest.mark.django_db(transaction=True)

T0 = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
SENT, MISSED = DjangoJobExecution.SENT, DjangoJobExecution.MISSED
NEW_STATE = b"\x80\x05new\xff"  # like a pickle: not valid UTF-8


def _rows(n: int, *, at: datetime = T0) -> list[ClaimRow]:
    return [ClaimRow(f"job-{i}", at, SENT, started=at) for i in range(n)]


def _jobs(n: int) -> list[Advance]:
    for i in range(n):
        DjangoJob.objects.create(id=f"job-{i}", next_run_time=T0, job_state=b"old", version=1)
    return [Advance(f"job-{i}", T0 + timedelta(seconds=1), NEW_STATE, 1) for i in range(n)]


def _lease() -> tuple[Lease, tuple[str, int]]:
    lease = Lease(ttl=5.0)
    assert lease.acquire()
    return lease, (lease.identity, lease.epoch or 0)


@db
@pytest.mark.parametrize("n", [1, 3, passes.CHUNK + 7])
def test_claims_and_advances_every_row_in_one_commit(n):
    if not passes.supported(connection):
        pytest.skip("this SQLite has no RETURNING")
    _, fence = _lease()
    advances = _jobs(n)
    rows = _rows(n) + [ClaimRow("job-0", T0 - timedelta(seconds=1), MISSED, exception="late")]
    with CaptureQueriesContext(connection) as queries:
        result = write_pass(rows, advances, fence, group="default")
    assert result.claimed == {passes.key(r.job_id, r.run_time) for r in rows}
    assert result.advanced == n
    data = [
        q
        for q in queries.captured_queries
        if not q["sql"].startswith(("SAVEPOINT", "RELEASE", "BEGIN", "COMMIT"))
    ]
    chunks = -(-len(rows) // passes.CHUNK) + -(-n // passes.CHUNK)
    expected = 1 if connection.vendor == "postgresql" and len(rows) <= passes.CHUNK else chunks
    assert len(data) == expected, [q["sql"][:80] for q in data]
    assert (
        DjangoJobExecution.objects.filter(status=SENT, owner=fence[0], epoch=fence[1]).count() == n
    )
    missed = DjangoJobExecution.objects.get(status=MISSED)
    assert missed.exception == "late" and missed.started is None
    assert set(DjangoJob.objects.values_list("version", flat=True)) == {2}
    job = DjangoJob.objects.get(id="job-0")
    assert bytes(job.job_state) == NEW_STATE and job.next_run_time == T0 + timedelta(seconds=1)


@db
def test_fire_times_claimed_already_are_skipped_and_the_rest_inserted():
    if not passes.supported(connection):
        pytest.skip("this SQLite has no RETURNING")
    _, fence = _lease()
    DjangoJobExecution.objects.create(job_id="job-1", run_time=T0, status="Executed")
    result = write_pass(_rows(3), [], fence, group="default")
    assert result.claimed == {passes.key("job-0", T0), passes.key("job-2", T0)}
    assert DjangoJobExecution.objects.get(job_id="job-1").status == "Executed", "theirs is kept"

    again = write_pass(_rows(3), [], fence, group="default")
    assert again.claimed == set() and again.lease_held is True, "all conflicts, lease still ours"


@db
def test_a_lost_lease_claims_nothing_and_advances_nothing():
    if not passes.supported(connection):
        pytest.skip("this SQLite has no RETURNING")
    _, fence = _lease()
    advances = _jobs(2)
    SchedulerLease.objects.filter(name="default").update(
        expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc)
    )
    result = write_pass(_rows(2), advances, fence, group="default")
    assert (result.claimed, result.advanced, result.lease_held) == (set(), 0, False)
    assert not DjangoJobExecution.objects.exists()
    assert set(DjangoJob.objects.values_list("version", flat=True)) == {1}

    stale_epoch = (fence[0], fence[1] - 1)
    SchedulerLease.objects.filter(name="default").update(
        expires_at=datetime(2100, 1, 1, tzinfo=timezone.utc)
    )
    result = write_pass(_rows(2), advances, stale_epoch, group="default")
    assert (result.claimed, result.advanced) == (set(), 0), "a deposed epoch is fenced too"


@db
def test_a_job_edited_since_the_read_keeps_the_edit():
    if not passes.supported(connection):
        pytest.skip("this SQLite has no RETURNING")
    _, fence = _lease()
    advances = _jobs(3)
    DjangoJob.objects.filter(id="job-1").update(job_state=b"edited", version=5)
    result = write_pass(_rows(3), advances, fence, group="default")
    assert result.advanced == 2
    assert len(result.claimed) == 3, "the claims stand: the runs were due when read"
    assert bytes(DjangoJob.objects.get(id="job-1").job_state) == b"edited"


@db
def test_unfenced_pass_writes_rows_without_owner():
    if not passes.supported(connection):
        pytest.skip("this SQLite has no RETURNING")
    advances = _jobs(2)
    result = write_pass(_rows(2), advances, None, group="default")
    assert len(result.claimed) == 2 and result.advanced == 2
    assert set(DjangoJobExecution.objects.values_list("owner", "epoch")) == {("", None)}


@db
def test_a_failing_statement_writes_nothing_of_the_pass(monkeypatch):
    if not passes.supported(connection):
        pytest.skip("this SQLite has no RETURNING")
    _, fence = _lease()
    advances = _jobs(2)

    def broken(self, advances):
        return "", [], "UPDATE no_such_table SET x = 1", []

    monkeypatch.setattr(passes._Sql, "advance_parts", broken)
    with pytest.raises(DatabaseError):
        write_pass(_rows(2), advances, fence, group="default")
    assert not DjangoJobExecution.objects.exists(), "the claims were rolled back"
    assert set(DjangoJob.objects.values_list("version", flat=True)) == {1}
