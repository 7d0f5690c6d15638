"""Retention: delete old execution rows in batches sized to a time budget.

django-apscheduler 0.7 deletes expired history in one statement, which on a large table holds
locks for seconds while the scheduler wants to write. Here each statement deletes one batch,
and the batch size follows what statements cost: it grows while they are fast and shrinks
when one runs long, aiming at ``TARGET_S`` per statement (well under ``BUDGET_S``). Small
fixed batches would cost 10x 0.7's total time in per-statement overhead.

Each batch walks the ``run_time`` index from a cursor (the latest run time already deleted),
so no statement rescans the entries of rows deleted before it, with the cheapest statements
per vendor (measured on 1,000,000 rows):

* PostgreSQL: the n-th run time (``ORDER BY run_time LIMIT 1 OFFSET n-1``), then a plain
  range ``DELETE ... WHERE run_time <= it``, as 0.7's statement but bounded;
* MariaDB/MySQL: the n-th run time, then ``DELETE ... ORDER BY run_time LIMIT n``;
* SQLite and others: ``DELETE ... WHERE id IN (SELECT id ... ORDER BY run_time LIMIT n)``
  (SQLite removes index entries at once, so it needs no cursor).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connections, router
from django.utils import timezone

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.sinks.history import is_transient

logger = logging.getLogger(__name__)

CLEANUP_JOB_ID = "django_apscheduler_obs.cleanup"

# Set by the scheduler so the built-in job can count what it deleted.
on_deleted: Callable[[int], None] | None = None

TARGET_S = 0.1  # aimed-at seconds per statement
BUDGET_S = 0.25  # no statement should come near this: one that takes half of it is cut back
# Growth per statement: a small statement's time is mostly fixed overhead, so it says little
# about a large one; once one takes a quarter of the target, cost per row is known: 2x.
MAX_GROWTH = 4
MAX_BATCH = 1_000_000
RETRIES = 3  # transient errors (lock timeout, deadlock, lost connection) per batch

# Monotonic clock of the batch timing; tests replace it to simulate slow statements.
clock: Callable[[], float] = time.perf_counter


class BatchSizer:
    """The next batch size from the rows and seconds of the last statement.

    Proportional to the measured rate (rows * target / seconds), growing at most
    ``MAX_GROWTH`` (then 2) times per statement, as rows get dearer with a batch's size (cold
    pages, WAL); ``fixed`` keeps the first size (``--batch-size``).
    """

    def __init__(
        self,
        size: int,
        *,
        fixed: bool = False,
        target_s: float = TARGET_S,
        maximum: int = MAX_BATCH,
    ) -> None:
        if size < 1:
            raise ValueError("batch_size must be at least 1")
        self.size = min(size, maximum) if not fixed else size
        self.fixed = fixed
        self.target_s = target_s
        self.maximum = maximum

    def update(self, rows: int, seconds: float) -> int:
        if self.fixed or rows < 1:
            return self.size
        ideal = rows * self.target_s / max(seconds, 1e-6)
        if seconds > BUDGET_S / 2:  # approaching the budget: at least halve it
            ideal = min(ideal, self.size / 2)
        growth = MAX_GROWTH if seconds < self.target_s / 4 else 2
        size = min(ideal, self.size * growth, self.maximum)
        self.size = max(1, int(size))
        return self.size

    def failed(self) -> int:
        """After an error (a lock timeout is a statement that ran too long): a quarter."""
        if not self.fixed:
            self.size = max(1, self.size // 4)
        return self.size


class _Batches:
    """The vendor's batch statement over the filtered, expired rows."""

    def __init__(
        self, conn: Any, before: datetime, job_ids: list[str], statuses: list[str]
    ) -> None:
        self.conn = conn
        q = conn.ops.quote_name
        meta = DjangoJobExecution._meta
        self.table = q(meta.db_table)
        self.id, self.rt = q(meta.pk.column), q("run_time")
        where = [f"{self.rt} <= %s"]
        self.params: list[Any] = [conn.ops.adapt_datetimefield_value(before)]
        for column, values in (("job_id", job_ids), ("status", statuses)):
            if values:
                where.append(f"{q(column)} IN ({', '.join(['%s'] * len(values))})")
                self.params += values
        self.where = " AND ".join(where)
        self.cursor: Any = None  # run_time of the latest row deleted

    def _after_cursor(self, strict: bool) -> tuple[str, list[Any]]:
        if self.cursor is None:
            return self.where, list(self.params)
        op = ">" if strict else ">="
        return f"{self.rt} {op} %s AND {self.where}", [self.cursor, *self.params]

    def _nth_run_time(self, c: Any, where: str, params: list[Any], n: int) -> Any:
        """The run time of the n-th oldest matching row (an index scan), or None."""
        c.execute(
            f"SELECT {self.rt} FROM {self.table} WHERE {where} "
            f"ORDER BY {self.rt} LIMIT 1 OFFSET %s",
            [*params, n - 1],
        )
        return c.fetchone()

    def delete(self, n: int) -> tuple[int, bool]:
        """Delete a batch of about ``n`` rows, oldest first; returns how many went and whether
        more may be left."""
        with self.conn.cursor() as c:
            if self.conn.vendor == "postgresql":
                # The n-th run time (index scan), then a plain range DELETE up to it: half
                # the cost of DELETE ... ctid = ANY(ARRAY(SELECT ... LIMIT n)) RETURNING.
                # Rows sharing that run time (jobs firing together) go in the same batch.
                where, params = self._after_cursor(strict=True)
                row = self._nth_run_time(c, where, params, n)
                if row is None:
                    c.execute(f"DELETE FROM {self.table} WHERE {where}", params)
                    return int(c.rowcount), False
                c.execute(
                    f"DELETE FROM {self.table} WHERE {where} AND {self.rt} <= %s",
                    [*params, row[0]],
                )
                self.cursor = row[0]  # every matching row up to it is gone
                return int(c.rowcount), True
            if self.conn.vendor == "mysql":
                # The n-th run time from the index first, so the next batch starts there
                # instead of walking the delete-marked entries InnoDB has not purged yet.
                where, params = self._after_cursor(strict=False)
                row = self._nth_run_time(c, where, params, n)
                c.execute(
                    f"DELETE FROM {self.table} WHERE {where} ORDER BY {self.rt} LIMIT %s",
                    [*params, n],
                )
                if row is not None:
                    self.cursor = row[0]  # the n oldest are gone: the rest is at or after
                return int(c.rowcount), c.rowcount >= n
            c.execute(
                f"DELETE FROM {self.table} WHERE {self.id} IN (SELECT {self.id} FROM "
                f"{self.table} WHERE {self.where} ORDER BY {self.rt} LIMIT %s)",
                [*self.params, n],
            )
            return int(c.rowcount), c.rowcount >= n


def delete_executions(
    *,
    before: datetime,
    job_ids: Iterable[str] | None = None,
    statuses: Iterable[str] | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
) -> int:
    """Delete executions whose run time is at or before ``before`` (0.7's ``lte``); returns
    how many (with ``dry_run``, how many would go).

    Without ``batch_size`` the batches start at ``APSCHEDULER_CLEANUP_BATCH_SIZE`` and adapt
    to ``TARGET_S`` per statement; with it, every statement deletes at most that many rows
    (PostgreSQL: plus those sharing the batch's last run time). Any status goes, as in 0.7: a
    run still in progress writes its whole row again when it finishes (``HistorySink``).
    Each batch commits on its own (outside a transaction) and is reported to ``on_deleted``,
    so an error loses nothing already counted; transient errors are retried smaller.
    """
    sizer = BatchSizer(batch_size or conf.CLEANUP_BATCH_SIZE, fixed=batch_size is not None)
    job_ids, statuses = list(job_ids or ()), list(statuses or ())
    if dry_run:
        qs = DjangoJobExecution.objects.filter(run_time__lte=before)
        if job_ids:
            qs = qs.filter(job_id__in=job_ids)
        if statuses:
            qs = qs.filter(status__in=statuses)
        return qs.count()
    conn = connections[router.db_for_write(DjangoJobExecution)]
    batches = _Batches(conn, before, job_ids, statuses)
    total = failures = 0
    while True:
        n = sizer.size
        t0 = clock()
        try:
            deleted, more = batches.delete(n)
        except DatabaseError as exc:
            failures += 1
            if conn.in_atomic_block or not is_transient(exc) or failures > RETRIES:
                raise
            logger.warning(
                "Cleanup batch of %d failed (%s), retrying with %d", n, exc, sizer.failed()
            )
            conn.close_if_unusable_or_obsolete()
            continue
        seconds = clock() - t0
        failures = 0
        total += deleted
        if deleted and on_deleted is not None:
            on_deleted(deleted)
        if not more:
            return total
        sizer.update(deleted, seconds)
        logger.debug("Cleanup deleted %d in %.3f s; next batch %d", deleted, seconds, sizer.size)


def cleanup_job() -> int:
    """The built-in job ``django_apscheduler_obs.cleanup``: applies the retention setting."""
    retention = conf.EXECUTION_RETENTION
    if retention is None:
        return 0
    deleted = delete_executions(before=timezone.now() - timedelta(seconds=retention))
    logger.info("Deleted %d execution(s) older than %s s", deleted, retention)
    return deleted
