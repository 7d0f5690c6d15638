"""The execution-history sink: the fenced claim before a run, the final status after it.

Two data statements per run on the hot path: the claim (one ``INSERT … SELECT`` that also
checks the lease) and the final ``UPDATE``. A final status that cannot be written because the
database is down is buffered in memory (bounded) and written when the database returns.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.utils import timezone

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.models import DjangoJobExecution, SchedulerLease
from django_apscheduler_obs.runs import Outcome, RunRecord, TriggerSource
from django_apscheduler_obs.util import (
    get_django_internal_datetime,
    held_lease_sql,
    reset_connection,
)

if TYPE_CHECKING:
    from django_apscheduler_obs.sinks.metrics import SchedulerMetrics

logger = logging.getLogger(__name__)


class Claim(str, enum.Enum):
    CLAIMED = "claimed"  # this process owns the fire time: run it
    CONFLICT = "conflict"  # someone already claimed it (a replay or another leader): skip
    FENCED = "fenced"  # we are not the leader (any more): skip
    ERROR = "error"  # the database did not answer: skip, the fire time is replayed later


def _db_alias() -> str:
    return router.db_for_write(DjangoJobExecution)


# MySQL/MariaDB report bad *data* as OperationalError: wrong string value (1366), out of
# range (1264), bad datetime (1292), too long (1406). Retrying them would never succeed.
_MYSQL_DATA_ERRORS = {1264, 1292, 1366, 1406}


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry on a new connection may cure (server down, locked)."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    code = exc.args[0] if exc.args else None
    return not (isinstance(code, int) and code in _MYSQL_DATA_ERRORS)


def _ts(dt: datetime | None) -> Decimal | None:
    return None if dt is None else Decimal(f"{dt.timestamp():.6f}")


def _dec(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(f"{value:.6f}")


# What a claim inserts, in this order (here one fire time, in ``passes`` a whole pass).
CLAIM_COLUMNS = (
    "job_id",
    "run_time",
    "status",
    "owner",
    "epoch",
    "started",
    "trigger_source",
    "error_type",
    "trace_id",
    "span_id",
    "exception",
)
_FINAL_COLUMNS = (
    "status",
    "finished",
    "duration",
    "started",
    "start_delay",
    "exception",
    "traceback",
    "error_type",
    "trace_id",
    "span_id",
)


_final_update_sql: dict[str, str] = {}  # by database vendor


def _final_update_statement(conn: Any) -> str:
    sql = _final_update_sql.get(conn.vendor)
    if sql is None:
        ex, q = DjangoJobExecution._meta, conn.ops.quote_name
        sets = ", ".join(f"{q(ex.get_field(c).column)} = %s" for c in _FINAL_COLUMNS)  # type: ignore[union-attr]
        sql = _final_update_sql[conn.vendor] = (
            f"UPDATE {q(ex.db_table)} SET {sets} "
            f"WHERE {q('job_id')} = %s AND {q('run_time')} = %s AND {q('owner')} = %s"
        )
    return sql


def _final_update(job_id: str, run_time: datetime, owner: str, values: dict[str, Any]) -> int:
    """The final UPDATE of a run, as one statement built once: it runs for every run, and
    compiling it through the ORM cost about as much as executing it."""
    conn = connections[_db_alias()]
    fields = DjangoJobExecution._meta
    params = [
        fields.get_field(c).get_db_prep_save(values[c], conn)  # type: ignore[union-attr]
        for c in _FINAL_COLUMNS
    ]
    params += [job_id, conn.ops.adapt_datetimefield_value(run_time), owner]
    with conn.cursor() as cursor:
        cursor.execute(_final_update_statement(conn), params)
        return cursor.rowcount


class HistorySink:
    """Writes ``DjangoJobExecution`` rows; never raises into the run path."""

    def __init__(self, metrics: SchedulerMetrics | None = None) -> None:
        self.metrics = metrics
        self._pending: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._lock = threading.Lock()
        # One writer of the buffer at a time: ``close()`` and the flusher thread must not
        # both replay the same entry (a replay after its row was pruned would re-create it).
        self._flush_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopped = False

    # -- the claim ---------------------------------------------------------------------------

    def claim(
        self,
        job_id: str,
        run_time: datetime,
        fence: tuple[str, int] | None,
        *,
        group: str,
        status: str = DjangoJobExecution.SENT,
        started: datetime | None = None,
        trigger_source: TriggerSource = TriggerSource.SCHEDULE,
        exception: str | None = None,
    ) -> Claim:
        """Insert the execution row for ``(job_id, run_time)`` in one statement.

        With a fence, the row is inserted only if ``(owner, epoch)`` still holds the unexpired
        lease *in the database*, so a deposed leader cannot claim a run. ``FOR SHARE`` makes
        PostgreSQL/MariaDB re-read the newest lease row instead of the statement's snapshot.
        """
        alias = _db_alias()
        conn = connections[alias]
        ex = DjangoJobExecution._meta
        qn = conn.ops.quote_name
        cols = CLAIM_COLUMNS
        rt = conn.ops.adapt_datetimefield_value(get_django_internal_datetime(run_time))
        st = conn.ops.adapt_datetimefield_value(
            get_django_internal_datetime(started or timezone.now())
        )
        col_sql = ", ".join(qn(ex.get_field(c).column) for c in cols)  # type: ignore[union-attr,arg-type]
        # Autocommit on the hot path; a savepoint only if a caller's transaction is open, so
        # a conflict does not abort it.
        savepoint = transaction.atomic(using=alias) if conn.in_atomic_block else None
        try:
            with savepoint or contextlib.nullcontext(), conn.cursor() as cursor:
                if fence is None:
                    cursor.execute(
                        f"INSERT INTO {qn(ex.db_table)} ({col_sql}) "
                        "VALUES (%s, %s, %s, %s, NULL, %s, %s, '', '', '', %s)",
                        [job_id, rt, status, "", st, trigger_source.value, exception],
                    )
                else:
                    owner, epoch = fence
                    lease_table = qn(SchedulerLease._meta.db_table)
                    lock = {"postgresql": " FOR SHARE", "mysql": " LOCK IN SHARE MODE"}.get(
                        conn.vendor, ""
                    )
                    cursor.execute(
                        f"INSERT INTO {qn(ex.db_table)} ({col_sql}) "
                        f"SELECT %s, %s, %s, {qn('owner')}, {qn('epoch')}, %s, %s, '', '', '', %s "
                        f"FROM {lease_table} WHERE {held_lease_sql(conn)}{lock}",
                        [
                            job_id,
                            rt,
                            status,
                            st,
                            trigger_source.value,
                            exception,
                            group,
                            owner,
                            epoch,
                        ],
                    )
                inserted = cursor.rowcount
        except IntegrityError:
            return Claim.CONFLICT
        except DatabaseError:
            logger.warning(
                "Could not claim %s at %s: database error", job_id, run_time, exc_info=True
            )
            reset_connection(alias)
            self._count_error("claim")
            return Claim.ERROR
        return Claim.CLAIMED if inserted == 1 else Claim.FENCED

    # -- after the run -----------------------------------------------------------------------

    def record(self, record: RunRecord) -> None:
        """Write the final status of a claimed run (buffered if the database is down)."""
        status = {
            Outcome.SUCCESS: DjangoJobExecution.SUCCESS,
            Outcome.ERROR: DjangoJobExecution.ERROR,
            Outcome.MISSED: DjangoJobExecution.MISSED,
        }[record.outcome]
        values: dict[str, Any] = {
            "status": status,
            "finished": _ts(record.finished),
            "duration": _dec(record.duration),
            "started": get_django_internal_datetime(record.started) if record.started else None,
            "start_delay": record.start_delay,
            "exception": record.exception_text,
            "traceback": record.traceback,
            "error_type": record.error_type[:200],
            "trace_id": record.trace_id,
            "span_id": record.span_id,
        }
        job_id, run_time, owner = record.job.id, record.run_time, record.owner

        def write() -> None:
            rt = get_django_internal_datetime(run_time)
            if _final_update(job_id, rt, owner, values) == 0:
                # The claimed row is gone (pruned meanwhile, or its INSERT was lost in a
                # server crash): write the whole row, unless someone else owns it now.
                with contextlib.suppress(IntegrityError), transaction.atomic(using=_db_alias()):
                    DjangoJobExecution.objects.create(
                        job_id=job_id, run_time=rt, owner=owner, epoch=record.epoch, **values
                    )

        self._write("finish", write)

    def record_skip(self, job_id: str, run_time: datetime, status: str, message: str) -> None:
        """A fire time that did not run (max_instances; or missed while the DB was down)."""

        def write() -> None:
            # IntegrityError: already recorded (claimed, or a replay): keep that row.
            with contextlib.suppress(IntegrityError), transaction.atomic(using=_db_alias()):
                DjangoJobExecution.objects.create(
                    job_id=job_id,
                    run_time=get_django_internal_datetime(run_time),
                    status=status,
                    exception=message,
                    finished=_ts(timezone.now()),
                )

        self._write("skip", write)

    # -- the buffer --------------------------------------------------------------------------

    def _write(self, operation: str, write: Callable[[], None]) -> None:
        if self._pending:  # keep order: never overtake what is already waiting
            self._enqueue(operation, write)
            return
        try:
            write()
        except DatabaseError as exc:
            reset_connection(_db_alias())
            self._count_error(operation)
            if not is_transient(exc):
                logger.exception("Could not write execution history (%s); not retried", operation)
                return
            logger.warning(
                "Could not write execution history (%s); buffering it", operation, exc_info=True
            )
            self._enqueue(operation, write)

    def _enqueue(self, operation: str, write: Callable[[], None]) -> None:
        with self._lock:
            if len(self._pending) >= conf.HISTORY_BUFFER_SIZE:
                dropped_op, _ = self._pending.popleft()
                logger.error(
                    "Execution history buffer full (%d): dropped the oldest %s write",
                    conf.HISTORY_BUFFER_SIZE,
                    dropped_op,
                )
                if self.metrics:
                    self.metrics.history_dropped()
            self._pending.append((operation, write))
            if self.metrics:
                self.metrics.history_pending(len(self._pending))
            # The flusher clears ``_flusher`` under this lock when it leaves, so an entry
            # appended while it exits is never stranded without one.
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="apscheduler-history-flush", daemon=True
                )
                self._flusher.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, timeout: float = -1) -> bool:
        """Write what is buffered, oldest first; stop at the first failure. True if empty."""
        if not self._flush_lock.acquire(timeout=timeout):
            return not self._pending
        try:
            return self._flush()
        finally:
            self._flush_lock.release()

    def _flush(self) -> bool:
        while True:
            with self._lock:
                if not self._pending:
                    return True
                operation, write = self._pending[0]
            try:
                write()
            except Exception as exc:
                if isinstance(exc, DatabaseError):
                    reset_connection(_db_alias())
                if is_transient(exc):
                    return False
                # A poison entry must not block every write behind it.
                logger.exception("Dropped a buffered execution history write (%s)", operation)
            with self._lock:
                if self._pending and self._pending[0][1] is write:
                    self._pending.popleft()
                if self.metrics:
                    self.metrics.history_pending(len(self._pending))

    def _flush_loop(self) -> None:
        delay = 0.5
        try:
            while True:
                self.flush()
                with self._lock:
                    if not self._pending or self._stopped:
                        self._flusher = None
                        if not self._pending:
                            logger.info("Execution history buffer written to the database")
                        return
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, 5.0)
        finally:
            with self._lock:
                if self._flusher is threading.current_thread():
                    self._flusher = None
            connections[_db_alias()].close()  # this thread's own connection

    def close(self, timeout: float = 5.0) -> None:
        """On shutdown: one last attempt; what cannot be written is logged, not dropped."""
        with self._lock:
            self._stopped = True
            flusher = self._flusher
        self._wake.set()
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout)
        if not self.flush(timeout):
            logger.error(
                "%d execution history write(s) could not be saved before exit", len(self._pending)
            )

    def _count_error(self, operation: str) -> None:
        if self.metrics:
            self.metrics.history_write_error(operation)


# -- django-apscheduler 0.7 listener behaviour, for schedulers that use stock executors -----


def legacy_update_or_create(
    job_id: str,
    run_time: datetime,
    status: str,
    exception: str | None = None,
    traceback: str | None = None,
) -> DjangoJobExecution:
    """0.7's state machine on events: SUBMITTED creates, EXECUTED/ERROR/MISSED finish.

    Used only when a scheduler runs jobs through an executor that is not observed; the
    observed executors write rows themselves with true timings.
    """
    run_time = get_django_internal_datetime(run_time)
    now = timezone.now()
    try:
        execution = DjangoJobExecution.objects.get(job_id=job_id, run_time=run_time)
    except DjangoJobExecution.DoesNotExist:
        final = status != DjangoJobExecution.SENT
        try:
            with transaction.atomic():
                return DjangoJobExecution.objects.create(
                    job_id=job_id,
                    run_time=run_time,
                    status=status,
                    finished=_ts(now) if final else None,
                    duration=_dec((now - run_time).total_seconds()) if final else None,
                    exception=exception,
                    traceback=traceback,
                )
        except IntegrityError:
            execution = DjangoJobExecution.objects.get(job_id=job_id, run_time=run_time)
    if status == DjangoJobExecution.SENT:
        # EXECUTED may arrive before SUBMITTED (APScheduler dispatches SUBMITTED after its loop).
        return execution
    if execution.started is not None:
        # Claimed by an observed executor (a scheduler mixing observed and stock executors):
        # it records this run itself, with true timings; do not overwrite them.
        return execution
    execution.status = status
    execution.finished = _ts(now)
    execution.duration = _dec((now - run_time).total_seconds())
    if exception:
        execution.exception = exception[:1000]
    if traceback:
        execution.traceback = traceback
    execution.save()
    return execution
