"""One pass of the scheduler loop: every due fire time claimed, every job advanced, one commit.

APScheduler's ``_process_jobs`` calls, for each due job, ``executor.submit_job(job, run_times)``
then ``jobstore.update_job(job)`` (or ``remove_job``), and asks ``get_next_run_time()`` once the
store's due jobs are done. During a pass over a ``DjangoJobStore``, the observed executor and
the store only *note* what they would write (``PassBatch``); when the pass asks for the next
run time, the batch is written at once::

    claims of every fire time (one INSERT) + advance of every job (one UPDATE)  -> one commit
    (on PostgreSQL both in one statement)
    then each job's runs go to the executor's pool, each with its claim

A burst of 1,000 jobs due in the same second costs one durable commit instead of 2,000, and
the guarantees are those of the per-fire-time path: a fire time runs only if its claim row was
committed under our unexpired epoch; the job advances only if it still has the version we read
(someone else's edit wins); if the commit fails, nothing was claimed and nothing advanced, so
every fire time of the pass is replayed and claimed on a later pass.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast

from apscheduler.job import Job
from django.db import DatabaseError, connections, router, transaction
from django.db.models import Field

from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, SchedulerLease
from django_apscheduler_obs.runs import TriggerSource
from django_apscheduler_obs.sinks.history import CLAIM_COLUMNS, Claim
from django_apscheduler_obs.util import (
    get_django_internal_datetime,
    held_lease_sql,
    reset_connection,
)

logger = logging.getLogger(__name__)

CHUNK = 500  # rows per statement: far under every vendor's parameter limit


@dataclass(frozen=True)
class ClaimRow:
    """One fire time to claim: the execution row the claim inserts."""

    job_id: str
    run_time: datetime  # aware
    status: str  # SENT, or MISSED when past its grace time
    started: datetime | None = None
    trigger_source: TriggerSource = TriggerSource.SCHEDULE
    exception: str | None = None


@dataclass(frozen=True)
class Advance:
    """A job's new state, written only if the row still has ``version``."""

    job_id: str
    next_run_time: datetime
    job_state: bytes
    version: int


@dataclass(frozen=True)
class PreClaim:
    """The outcome of claiming one fire time, and what the run needs to know about it."""

    result: Claim
    status: str  # DjangoJobExecution.SENT, or MISSED when past misfire_grace_time
    fence: tuple[str, int] | None = None  # (owner, epoch) the claim was made under
    message: str = ""  # why it was missed
    replay: bool = False  # ERROR: the job store keeps the fire time, so it is claimed again


@dataclass
class Submission:
    """A due job's runs, held back until the pass's claims are committed."""

    job: Job
    run_times: list[datetime]
    rows: list[ClaimRow]
    submit: Callable[[dict[datetime, PreClaim]], None]  # hands the runs to the pool
    release: Callable[[], None]  # gives back the max_instances slot if never submitted


@dataclass
class PassBatch:
    """What one pass over a store would write, in APScheduler's order."""

    submissions: list[Submission] = field(default_factory=list)
    advances: dict[str, Job] = field(default_factory=dict)
    removals: list[str] = field(default_factory=list)

    def claimed_job(self, job_id: str) -> bool:
        return any(s.job.id == job_id for s in self.submissions)

    def __bool__(self) -> bool:
        return bool(self.submissions or self.advances or self.removals)


def pass_batch(scheduler: Any, alias: str) -> PassBatch | None:
    """The batch of the pass under way over ``alias``, if that store batches its passes."""
    store = getattr(scheduler, "_jobstores", {}).get(alias)
    return getattr(store, "pass_batch", None)


def supported(conn: Any) -> bool:
    """Multi-row claims need ``RETURNING`` and ``UPDATE … FROM`` (SQLite 3.35+)."""
    if conn.vendor == "sqlite":
        return sqlite3.sqlite_version_info >= (3, 35)
    return conn.vendor in ("postgresql", "mysql")


@dataclass
class PassResult:
    claimed: set[tuple[str, datetime]]  # (job id, run time normalised to aware UTC)
    advanced: int  # job rows advanced
    lease_held: bool | None  # None: not asked (some claim went through, so it was)


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return cast(datetime, value.replace(tzinfo=timezone.utc))
    return cast(datetime, value.astimezone(timezone.utc))


def key(job_id: str, run_time: datetime) -> tuple[str, datetime]:
    return job_id, _utc(get_django_internal_datetime(run_time))


class _Sql:
    """The statements of a pass, for one connection's vendor."""

    def __init__(self, conn: Any, fence: tuple[str, int] | None, group: str) -> None:
        self.conn = conn
        self.vendor = conn.vendor
        self.q = conn.ops.quote_name
        self.fence = fence
        self.lease_params = [group, *fence] if fence is not None else []
        self.lease_table = self.q(SchedulerLease._meta.db_table)
        self.job_table = self.q(DjangoJob._meta.db_table)
        self.exec_table = self.q(DjangoJobExecution._meta.db_table)

    def _ts(self, value: datetime | None) -> Any:
        if value is None:
            return None
        return self.conn.ops.adapt_datetimefield_value(get_django_internal_datetime(value))

    def _source(self, name: str, columns: Sequence[str], casts: Sequence[str], n: int) -> str:
        """``n`` rows of parameters as a named relation (a CTE, or a derived table on MariaDB)."""
        if self.vendor == "mysql":
            # Untyped parameters are strings in the connection's character set: a pickle is
            # not valid UTF-8, so binary columns are marked as such.
            marks = ["_binary %s" if c == "::bytea" else "%s" for c in casts]
            first = ", ".join(f"{m} AS {c}" for m, c in zip(marks, columns, strict=True))
            rest = ", ".join(marks)
            rows = [f"SELECT {first}"] + [f"SELECT {rest}"] * (n - 1)
            return f"({' UNION ALL '.join(rows)}) {name}"
        cast_of = casts if self.vendor == "postgresql" else [""] * len(columns)
        row = "(" + ", ".join(f"%s{c}" for c in cast_of) + ")"
        return f"{name}({', '.join(columns)}) AS (VALUES {', '.join([row] * n)})"

    # -- claims ------------------------------------------------------------------------------

    def claim_parts(self, rows: Sequence[ClaimRow]) -> tuple[str, list[Any], str, list[Any]]:
        """(source relation, its parameters, ``INSERT … SELECT`` from it, its parameters):
        every row inserted unless its fire time is claimed already, returning those inserted."""
        q = self.q
        cols = ", ".join(q(c) for c in CLAIM_COLUMNS)
        src = self._source(
            "v",
            ("c_job", "c_rt", "c_status", "c_started", "c_source", "c_exc"),
            ("", "::timestamptz", "", "::timestamptz", "", "::text"),
            len(rows),
        )
        src_params: list[Any] = []
        for r in rows:
            src_params += [
                r.job_id,
                self._ts(r.run_time),
                r.status,
                self._ts(r.started),
                r.trigger_source.value,
                r.exception,
            ]
        if self.fence is not None:
            owner_epoch = f"{self.lease_table}.{q('owner')}, {self.lease_table}.{q('epoch')}"
            lease_from = f", {self.lease_table} WHERE {held_lease_sql(self.conn)}"
            lock = {
                "postgresql": f" FOR SHARE OF {self.lease_table}",
                "mysql": " LOCK IN SHARE MODE",
            }
            lease_from += lock.get(self.vendor, "")
            body_params = list(self.lease_params)
        else:
            owner_epoch, lease_from, body_params = "'', NULL", " WHERE 1 = 1", []
        select = (
            f"SELECT v.c_job, v.c_rt, v.c_status, {owner_epoch}, v.c_started, v.c_source, "
            "'', '', '', v.c_exc FROM "
        )
        returning = f" RETURNING {q('job_id')}, {q('run_time')}"
        if self.vendor == "mysql":  # the source is a derived table inside the statement
            body = f"INSERT IGNORE INTO {self.exec_table} ({cols}) {select}{src}{lease_from}"
            return "", [], body + returning, src_params + body_params
        body = (
            f"INSERT INTO {self.exec_table} ({cols}) {select}v{lease_from} ON CONFLICT DO NOTHING"
        )
        return src, src_params, body + returning, body_params

    def claim(self, rows: Sequence[ClaimRow]) -> tuple[str, list[Any]]:
        src, src_params, body, body_params = self.claim_parts(rows)
        return (f"WITH {src} {body}" if src else body), src_params + body_params

    # -- job advances ------------------------------------------------------------------------

    def _advance_params(self, advances: Sequence[Advance]) -> list[Any]:
        next_run = cast(Field, DjangoJob._meta.get_field("next_run_time"))
        state = cast(Field, DjangoJob._meta.get_field("job_state"))
        params: list[Any] = []
        for a in advances:
            params += [
                a.job_id,
                next_run.get_db_prep_save(get_django_internal_datetime(a.next_run_time), self.conn),
                state.get_db_prep_save(a.job_state, self.conn),
                a.version,
            ]
        return params

    def _held(self) -> tuple[str, list[Any]]:
        if self.fence is None:
            return "", []
        return (
            f" AND EXISTS (SELECT 1 FROM {self.lease_table} WHERE {held_lease_sql(self.conn)})",
            list(self.lease_params),
        )

    def advance_parts(self, advances: Sequence[Advance]) -> tuple[str, list[Any], str, list[Any]]:
        """(source relation, its parameters, one ``UPDATE`` of every job matched on the
        version the pass read, its parameters)."""
        q, t = self.q, self.job_table
        columns = ("a_id", "a_nrt", "a_state", "a_version")
        casts = ("", "::timestamptz", "::bytea", "::bigint")
        src = self._source("a", columns, casts, len(advances))
        src_params = self._advance_params(advances)
        held, held_params = self._held()
        if self.vendor == "mysql":
            body = (
                f"UPDATE {t} JOIN {src} ON {t}.{q('id')} = a.a_id "
                f"AND {t}.{q('version')} = a.a_version "
                f"SET {t}.{q('next_run_time')} = a.a_nrt, {t}.{q('job_state')} = a.a_state, "
                f"{t}.{q('version')} = {t}.{q('version')} + 1 WHERE 1 = 1{held}"
            )
            return "", [], body, src_params + held_params
        body = (
            f"UPDATE {t} SET {q('next_run_time')} = a.a_nrt, {q('job_state')} = a.a_state, "
            f"{q('version')} = {t}.{q('version')} + 1 FROM a "
            f"WHERE {t}.{q('id')} = a.a_id AND {t}.{q('version')} = a.a_version{held}"
        )
        if self.returns_advanced:
            body += f" RETURNING {t}.{q('id')}"
        return src, src_params, body, held_params

    @property
    def returns_advanced(self) -> bool:
        return self.vendor != "mysql"  # MariaDB has no UPDATE … RETURNING; its rowcount works

    def advance(self, advances: Sequence[Advance]) -> tuple[str, list[Any]]:
        src, src_params, body, body_params = self.advance_parts(advances)
        return (f"WITH {src} {body}" if src else body), src_params + body_params

    def claim_and_advance(
        self, rows: Sequence[ClaimRow], advances: Sequence[Advance]
    ) -> tuple[str, list[Any]]:
        """PostgreSQL: both in one statement (data-modifying CTEs), one round trip."""
        v, v_params, insert, insert_params = self.claim_parts(rows)
        a, a_params, update, update_params = self.advance_parts(advances)
        q = self.q
        sql = (
            f"WITH {v}, {a}, advanced AS ({update}), "
            f"claimed AS ({insert}) "
            f"SELECT 'c', {q('job_id')}, {q('run_time')} FROM claimed "
            f"UNION ALL SELECT 'a', {q('id')}, NULL FROM advanced"
        )
        return sql, v_params + a_params + update_params + insert_params


def write_pass(
    rows: Sequence[ClaimRow],
    advances: Sequence[Advance],
    fence: tuple[str, int] | None,
    *,
    group: str,
) -> PassResult:
    """Claim ``rows`` and advance ``advances`` in one transaction (one statement on PostgreSQL
    when they fit). Raises ``DatabaseError``: then nothing of the pass was written."""
    alias = router.db_for_write(DjangoJobExecution)
    conn = connections[alias]
    sql = _Sql(conn, fence, group)
    claimed: set[tuple[str, datetime]] = set()
    advanced = 0
    with transaction.atomic(using=alias), conn.cursor() as cursor:
        if conn.vendor == "postgresql" and 0 < len(rows) <= CHUNK and 0 < len(advances) <= CHUNK:
            cursor.execute(*sql.claim_and_advance(rows, advances))
            for kind, job_id, run_time in cursor.fetchall():
                if kind == "c":
                    claimed.add((job_id, _utc(run_time)))
                else:
                    advanced += 1
        else:
            for i in range(0, len(rows), CHUNK):
                cursor.execute(*sql.claim(rows[i : i + CHUNK]))
                claimed.update((job_id, _utc(rt)) for job_id, rt in cursor.fetchall())
            for i in range(0, len(advances), CHUNK):
                cursor.execute(*sql.advance(advances[i : i + CHUNK]))
                # sqlite3 reports no rowcount for a statement that starts with WITH.
                advanced += len(cursor.fetchall()) if sql.returns_advanced else cursor.rowcount
        lease_held: bool | None = None
        if fence is not None and len(claimed) < len(rows) and not claimed:
            # Nothing inserted: either every fire time was claimed already, or we lost the lease.
            cursor.execute(
                f"SELECT 1 FROM {sql.lease_table} WHERE {held_lease_sql(conn)}", sql.lease_params
            )
            lease_held = cursor.fetchone() is not None
    return PassResult(claimed, advanced, lease_held)


def db_error(exc: DatabaseError) -> None:
    logger.warning("Could not write the scheduler pass: database error", exc_info=exc)
    reset_connection(router.db_for_write(DjangoJobExecution))
