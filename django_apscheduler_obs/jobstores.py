"""``DjangoJobStore``: APScheduler jobs stored with the Django ORM.

Compatible with django-apscheduler 0.7's store, with three changes that keep data and the
scheduler alive:

* a job whose state cannot be restored (its module is gone, the pickle is corrupt) is kept,
  flagged in ``restore_error``, logged once and skipped, never deleted with its history;
* database errors on the scheduler's own path never escape into APScheduler's loop (an
  exception there ends the scheduler thread); the fire time is replayed on the next pass and
  the claim makes the replay idempotent;
* with a ``Lease``, only the leader sees due jobs, and the leader's writes of a job's state are
  fenced by its epoch and the job's version, so a deposed leader cannot overwrite anything.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, cast

from apscheduler import events
from apscheduler.events import JobExecutionEvent, JobSubmissionEvent
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.base import BaseScheduler
from django import db
from django.db import DatabaseError, IntegrityError, router, transaction
from django.db.models import BooleanField, Exists, ExpressionWrapper, F, Field, Q, Subquery, Value
from django.db.models.sql import InsertQuery

from django_apscheduler_obs import passes, restore, signing
from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.lease import Lease, bump_change_counter, freeze_point
from django_apscheduler_obs.models import (
    DjangoJob,
    DjangoJobExecution,
    JobStoreVersion,
    SchedulerLease,
)
from django_apscheduler_obs.sinks.history import Claim
from django_apscheduler_obs.util import (
    DbNow,
    get_apscheduler_datetime,
    get_django_internal_datetime,
    held_lease_sql,
    recycle_worker_connections,
    reset_connection,
    retry_on_db_operational_error,
)

logger = logging.getLogger(__name__)

_loop = threading.local()


@contextlib.contextmanager
def scheduler_loop() -> Iterator[None]:
    """Marks the scheduler's own pass over due jobs: its writes are the fenced kind."""
    previous = getattr(_loop, "active", False)
    _loop.active = True
    try:
        yield
    finally:
        _loop.active = previous


def in_scheduler_loop() -> bool:
    return getattr(_loop, "active", False)


def request_replay(job_id: str) -> bool:
    """Ask the job store not to advance ``job_id`` in this pass (its claim failed on a
    database error), so the same fire time is due again on a later pass. True if honoured:
    only the scheduler loop's own writes can be held back."""
    if not in_scheduler_loop():
        return False
    replays = getattr(_loop, "replays", None)
    if replays is None:
        replays = _loop.replays = set()
    replays.add(job_id)
    return True


def _replay_requested(job_id: str) -> bool:
    return job_id in (getattr(_loop, "replays", None) or ())


def guard_scheduler_loop(scheduler: BaseScheduler) -> None:
    """Make any scheduler's loop survive job store errors, as ``ObservedScheduler`` does.

    APScheduler catches errors of ``get_due_jobs`` only; an exception from ``update_job`` or
    ``remove_job`` in ``_process_jobs`` ends the scheduler thread for good (django-apscheduler
    0.7 loses its scheduler to ``database is locked`` this way). A scheduler built the 0.7 way
    (``BlockingScheduler`` + ``DjangoJobStore()``) gets the same protection: its pass runs as
    the scheduler loop (writes never raise) and anything else is logged and retried.
    """
    if getattr(scheduler, "_django_apscheduler_obs_guarded", False):
        return
    scheduler._django_apscheduler_obs_guarded = True
    process_jobs = scheduler._process_jobs

    def guarded_process_jobs() -> float | None:
        with scheduler_loop():
            try:
                return process_jobs()
            except Exception:
                retry = float(getattr(scheduler, "jobstore_retry_interval", 10))
                logger.exception("Error in the scheduler loop; retrying in %ss", retry)
                reset_connection()
                return retry
            finally:
                # Like the end of a request, but the loop keeps its connection between passes
                # (APSCHEDULER_WORKER_CONN_MAX_AGE); a broken one is dropped.
                recycle_worker_connections()

    scheduler._process_jobs = guarded_process_jobs


class DjangoResultStoreMixin:
    """Records executions of schedulers that run jobs through stock executors (0.7 API).

    django-apscheduler 0.7 wrote the history from events in this mixin; it is kept for code
    that subclasses or calls it. With the observed executors (``runapscheduler``,
    ``build_scheduler``) the executor writes the rows itself, with true timings, and these
    listeners are not registered.
    """

    lock: Any = None

    def start(self, scheduler: BaseScheduler, alias: str) -> None:
        super().start(scheduler, alias)  # type: ignore[misc]
        guard_scheduler_loop(scheduler)
        DjangoResultStoreMixin.lock = scheduler._create_lock()
        from django_apscheduler_obs.executors import ObservedExecutorMixin

        executors = scheduler._executors.values()
        if not all(isinstance(e, ObservedExecutorMixin) for e in executors):
            # A scheduler built the 0.7 way (stock executors): keep 0.7's history listeners.
            self.register_event_listeners()

    @classmethod
    def _record(cls, event: Any, run_time: datetime, *args: Any) -> int | None:
        from django_apscheduler_obs.sinks.history import legacy_update_or_create

        try:
            with cls.lock if cls.lock is not None else contextlib.nullcontext():
                return legacy_update_or_create(event.job_id, run_time, *args).id
        except DatabaseError:
            logger.warning("Could not record an execution of job %r", event.job_id, exc_info=True)
            reset_connection()
            return None
        finally:
            # Events arrive on executor threads, which never close their connections.
            db.close_old_connections()

    @classmethod
    def handle_submission_event(cls, event: JobSubmissionEvent) -> int | None:
        """SUBMITTED creates the row; MAX_INSTANCES records the skipped fire time."""
        if event.code == events.EVENT_JOB_SUBMITTED:
            return cls._record(event, event.scheduled_run_times[0], DjangoJobExecution.SENT)
        if event.code == events.EVENT_JOB_MAX_INSTANCES:
            msg = (
                f"Execution of job '{event.job_id}' skipped: maximum number of running "
                "instances reached!"
            )
            return cls._record(
                event, event.scheduled_run_times[0], DjangoJobExecution.MAX_INSTANCES, msg
            )
        raise NotImplementedError(f"Don't know how to handle JobSubmissionEvent '{event.code}'.")

    @classmethod
    def handle_execution_event(cls, event: JobExecutionEvent) -> int | None:
        if event.code != events.EVENT_JOB_EXECUTED:
            raise NotImplementedError(
                f"Don't know how to handle JobExecutionEvent '{event.code}'. Expected "
                f"'{events.EVENT_JOB_EXECUTED}'."
            )
        return cls._record(event, event.scheduled_run_time, DjangoJobExecution.SUCCESS)

    @classmethod
    def handle_error_event(cls, event: JobExecutionEvent) -> int | None:
        if event.code == events.EVENT_JOB_ERROR:
            if event.exception:
                text = str(event.exception) or type(event.exception).__name__
                exception, tb = _truncate(text), str(event.traceback)
            else:
                exception, tb = f"Job '{event.job_id}' raised an error!", None
            return cls._record(
                event, event.scheduled_run_time, DjangoJobExecution.ERROR, exception, tb
            )
        if event.code == events.EVENT_JOB_MISSED:
            return cls._record(
                event,
                event.scheduled_run_time,
                DjangoJobExecution.MISSED,
                f"Run time of job '{event.job_id}' was missed!",
            )
        raise NotImplementedError(f"Don't know how to handle JobExecutionEvent '{event.code}'.")

    def register_event_listeners(self) -> None:
        scheduler = self._scheduler  # type: ignore[attr-defined]
        if getattr(scheduler, "_django_apscheduler_obs_listeners", False):
            return  # two Django stores on one scheduler: one set of listeners
        scheduler._django_apscheduler_obs_listeners = True
        scheduler.add_listener(
            self.handle_submission_event,
            events.EVENT_JOB_SUBMITTED | events.EVENT_JOB_MAX_INSTANCES,
        )
        scheduler.add_listener(self.handle_execution_event, events.EVENT_JOB_EXECUTED)
        scheduler.add_listener(
            self.handle_error_event, events.EVENT_JOB_ERROR | events.EVENT_JOB_MISSED
        )


def _truncate(text: str) -> str:
    from django_apscheduler_obs.runs import EXCEPTION_MAX_LENGTH

    if len(text) > EXCEPTION_MAX_LENGTH:
        text = text[: EXCEPTION_MAX_LENGTH - 1] + "…"
    return text


@dataclass
class _Pass:
    """What one pass of the scheduler loop learned: the earliest future fire time, and the
    next run time of each due job (updated as the pass advances it)."""

    future: datetime | None = None
    due: dict[str, datetime | None] = field(default_factory=dict)

    def next_run_time(self) -> datetime | None:
        times = [t for t in (self.future, *self.due.values()) if t is not None]
        return min(times) if times else None


class _AnnouncedInsert:
    """PostgreSQL: a new job's row and the change-counter bump as one statement.

    Outside a transaction the plain path sends two (the row commits, then the bump), each
    with its own round trip and WAL flush: ``add_job`` took 1.44 ms against django-apscheduler
    0.7's 0.85 ms, which has no wake-up to send. A data-modifying CTE makes both one
    statement and one commit; the bump happens only if the row was inserted.
    """

    _compiled: dict[str, _AnnouncedInsert] = {}

    @classmethod
    def of(cls, conn: Any) -> _AnnouncedInsert:
        statement = cls._compiled.get(conn.alias)
        if statement is None:
            statement = cls._compiled[conn.alias] = cls(conn)
        return statement

    def __init__(self, conn: Any) -> None:
        self.fields = list(DjangoJob._meta.local_concrete_fields)
        query = InsertQuery(DjangoJob)
        query.insert_values(self.fields, [DjangoJob(id="", job_state=b"")])
        ((insert, _),) = query.get_compiler(connection=conn).as_sql()
        q = conn.ops.quote_name
        counter = q(JobStoreVersion._meta.db_table)
        self.sql = (
            f"WITH added AS ({insert} RETURNING 1) "
            f"INSERT INTO {counter} ({q('name')}, {q('version')}) SELECT %s, 1 FROM added "
            f"ON CONFLICT ({q('name')}) DO UPDATE SET {q('version')} = {counter}.{q('version')} + 1"
        )

    def execute(self, conn: Any, row: DjangoJob, group: str) -> None:
        params = [f.get_db_prep_save(f.pre_save(row, True), connection=conn) for f in self.fields]
        with conn.cursor() as cursor:
            cursor.execute(self.sql, [*params, group])


class _DueStatement:
    """The read of a pass, compiled once per database: due rows with a flag, plus the row of
    the earliest future fire time.

    Building it through the ORM on every wakeup cost more than running it (a nothing-due
    pass: 0.65 ms against django-apscheduler 0.7's 0.24 ms at 10,000 jobs). Only the time
    of the future row is converted from the database's form; the due rows' times are not
    needed.
    """

    _compiled: dict[tuple[str, str], _DueStatement] = {}

    @classmethod
    def of(cls, conn: Any) -> _DueStatement:
        key = (conn.alias, conn.vendor)
        statement = cls._compiled.get(key)
        if statement is None:
            statement = cls._compiled[key] = cls(conn)
        return statement

    def __init__(self, conn: Any) -> None:
        # Compiled for two different "now"s: the parameters that differ are where now goes.
        self.field = cast(Field, DjangoJob._meta.get_field("next_run_time"))
        (self.sql, self.params), (sql, other) = (
            self._compile(conn, datetime(2000, 1, day, tzinfo=dt_timezone.utc)) for day in (1, 2)
        )
        assert sql == self.sql, "the statement must not depend on the time"  # noqa: S101
        self.slots = [i for i, (a, b) in enumerate(zip(self.params, other, strict=True)) if a != b]
        self.column = self.field.get_col(DjangoJob._meta.db_table)
        self.converters = [
            *conn.ops.get_db_converters(self.column),
            *self.column.get_db_converters(conn),
        ]

    @staticmethod
    def _compile(conn: Any, now: datetime) -> tuple[str, list[Any]]:
        fields = ("id", "job_state", "version", "due", "next_run_time")
        rows = DjangoJob.objects.using(conn.alias).filter(restore_error="")
        if conn.vendor == "sqlite":
            # SQLite cannot LIMIT inside a compound SELECT; it plans this OR as two index
            # searches (MULTI-INDEX OR) as long as there is no ORDER BY on it.
            earliest_future = (
                rows.filter(next_run_time__gt=now).order_by("next_run_time").values("next_run_time")
            )[:1]
            query = (
                rows.filter(Q(next_run_time__lte=now) | Q(next_run_time=Subquery(earliest_future)))
                .annotate(
                    due=ExpressionWrapper(Q(next_run_time__lte=now), output_field=BooleanField())
                )
                .order_by()
                .values_list(*fields)
            )
        else:
            # Two index range reads in one statement. The same OR as on SQLite scans the whole
            # table on MariaDB (90 ms per wakeup at 100,000 jobs, measured).
            due = (
                rows.filter(next_run_time__lte=now)
                .annotate(due=Value(True))
                .order_by()
                .values_list(*fields)
            )
            following = (
                rows.filter(next_run_time__gt=now)
                .annotate(due=Value(False))
                .order_by("next_run_time")
                .values_list(*fields)[:1]
            )
            query = due.union(following, all=True)
        sql, params = query.query.get_compiler(conn.alias).as_sql()
        return sql, list(params)

    @retry_on_db_operational_error
    def rows(self, conn: Any, now: datetime) -> list[Any]:
        """``(id, job_state, version, due, next_run_time)``: due rows in fire-time order,
        then the future one (its time converted)."""
        params = list(self.params)
        value = self.field.get_db_prep_value(now, conn, prepared=False)
        for slot in self.slots:
            params[slot] = value
        with conn.cursor() as cursor:
            cursor.execute(self.sql, params)
            fetched = cursor.fetchall()
        due = sorted((row for row in fetched if row[3]), key=lambda row: row[4])
        for row in fetched:
            if not row[3]:
                value = row[4]
                for convert in self.converters:
                    value = convert(value, self.column, conn)
                due.append((*row[:4], value))
        return due


_LOOP_UPDATE_SQL: dict[tuple[str, bool, bool, bool], str] = {}


def _loop_update_sql(conn: Any, versioned: bool, fenced: bool) -> str:
    """The scheduler loop's job UPDATE: versioned, fenced, and on PostgreSQL not waiting
    for its WAL flush.

    The claim of the fire time was committed durably just before; if a crash of the server
    loses this write, the job's old next run time comes back, the fire time is replayed, and
    its claim conflicts: nothing runs twice. Waiting for a second flush per fire time was
    half of the loop's time on PostgreSQL. ``set_config(..., true)`` lasts for this
    statement's own transaction only (autocommit; not inside a caller's transaction).
    """
    async_commit = conn.vendor == "postgresql" and not conn.in_atomic_block
    key = (conn.vendor, versioned, fenced, async_commit)
    sql = _LOOP_UPDATE_SQL.get(key)
    if sql is None:
        q = conn.ops.quote_name
        version = q("version")
        sql = (
            f"UPDATE {q(DjangoJob._meta.db_table)} SET {q('next_run_time')} = %s, "
            f"{q('job_state')} = %s, {version} = {version} + 1 WHERE {q('id')} = %s"
        )
        if versioned:
            sql += f" AND {version} = %s"
        if fenced:  # the same condition as the fenced claim: our epoch, unexpired
            sql += (
                f" AND EXISTS (SELECT 1 FROM {q(SchedulerLease._meta.db_table)} "
                f"WHERE {held_lease_sql(conn)})"
            )
        if async_commit:
            sql = (
                "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)) "
                f"{sql} AND EXISTS (SELECT 1 FROM async_commit)"
            )
        _LOOP_UPDATE_SQL[key] = sql
    return sql


class DjangoJobStore(DjangoResultStoreMixin, BaseJobStore):
    """Stores jobs in the Django database.

    :param pickle_protocol: pickle protocol level used to serialize job state
    :param lease: the scheduler's lease; without one every process sees every due job
        (django-apscheduler 0.7's behaviour: run only one scheduler then)
    """

    def __init__(
        self, pickle_protocol: int = pickle.HIGHEST_PROTOCOL, *, lease: Lease | None = None
    ) -> None:
        super().__init__()
        self.pickle_protocol = pickle_protocol
        self.lease = lease
        self.on_stale_write: Callable[[], None] | None = None
        self.on_write_error: Callable[[str], None] | None = None
        # The writes of the pass under way (scheduler loop only): see passes.py.
        self.pass_batch: passes.PassBatch | None = None
        self._versions: dict[str, int] = {}
        self._pass: _Pass | None = None
        self._restore_logged: set[str] = set()
        self._restored = restore.RestoredJobs()

    # -- reads ----------------------------------------------------------------------------

    def _leading(self) -> bool:
        return self.lease is None or self.lease.is_leader()

    @retry_on_db_operational_error
    def lookup_job(self, job_id: str) -> Job | None:
        row = DjangoJob.objects.filter(id=job_id).values_list("job_state", flat=True).first()
        if row is None:
            return None
        return self._restore(job_id, bytes(row))

    def get_due_jobs(self, now: datetime) -> list[Job]:
        """Due jobs, and in the same statement the rows of the earliest future fire time.

        APScheduler asks ``get_next_run_time()`` right after this pass; the answer is known
        from this read plus the next run times the pass writes, so the pass costs one read.
        A due row whose stored state this process has already verified and restored is
        served from ``restore.RestoredJobs``.
        """
        _loop.replays = set()  # a new pass over this store
        self._pass = None
        self.abort_pass()
        if not self._leading():
            return []
        now_db = get_django_internal_datetime(now)
        conn = db.connections[router.db_for_read(DjangoJob)]
        if in_scheduler_loop() and passes.supported(conn):
            self.pass_batch = passes.PassBatch()
        rows = _DueStatement.of(conn).rows(conn, now_db)
        keys = signing.current_keys()
        self._restored.begin_pass(keys)
        verify = signing.verifier_for(keys)
        jobs, pass_ = [], _Pass()
        for job_id, job_state, version, due, next_run_time in rows:
            if not due:  # the earliest future row: only its time is wanted
                pass_.future = next_run_time
                continue
            stored = bytes(job_state)
            job = self._restored.get(job_id, stored)
            if job is None:
                try:
                    state = self._load_state(stored, verify)
                    job = self._job(state)
                except Exception as exc:
                    self._flag_unrestorable(job_id, exc)
                    continue
                self._restored.put_state(job_id, stored, state)
            else:
                job._scheduler = self._scheduler
                job._jobstore_alias = self._alias
            self._versions[job_id] = version
            # Due at or before now until the pass advances it: its exact past time does not
            # change the answer of next_run_time(), and converting it costs per row.
            pass_.due[job_id] = now_db
            jobs.append(job)
        self._pass = pass_ if in_scheduler_loop() else None
        return jobs

    def get_next_run_time(self) -> datetime | None:
        if self.pass_batch is not None and in_scheduler_loop():
            self._write_pass()
        if not self._leading():
            return None  # a standby sleeps until the lease thread wakes it
        pass_, self._pass = self._pass, None
        try:
            if pass_ is not None and in_scheduler_loop():
                value = pass_.next_run_time()
            else:
                value = (
                    DjangoJob.objects.filter(next_run_time__isnull=False, restore_error="")
                    .order_by("next_run_time")
                    .values_list("next_run_time", flat=True)
                    .first()
                )
        except DatabaseError:
            logger.warning("Could not read the next run time; retrying in 1 s", exc_info=True)
            reset_connection()
            return self._now() + timedelta(seconds=1)
        next_run = get_apscheduler_datetime(value, self._scheduler) if value else None
        if next_run is not None and getattr(_loop, "replays", None):
            # A claim just failed on a database error and its fire time is still due: retry
            # in a second, not in a busy loop.
            next_run = max(next_run, self._now() + timedelta(seconds=1))
        if self.lease is not None:
            # Jobs edited by other processes are seen at least this often (change poll aside).
            cap = self._now() + timedelta(seconds=conf.MAX_SLEEP)
            next_run = min(next_run, cap) if next_run else cap
        return next_run

    def get_all_jobs(self) -> list[Job]:
        jobs = self._get_jobs()
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    # -- writes ---------------------------------------------------------------------------

    @retry_on_db_operational_error
    def add_job(self, job: Job) -> None:
        row = DjangoJob(
            id=job.id,
            next_run_time=get_django_internal_datetime(job.next_run_time),
            job_state=self._dumps(job),
        )
        alias = router.db_for_write(DjangoJob)
        conn = db.connections[alias]
        if conn.vendor == "postgresql" and not conn.in_atomic_block:
            try:
                _AnnouncedInsert.of(conn).execute(conn, row, self._group)
                return
            except IntegrityError:
                raise ConflictingIdError(job.id) from None
            except DatabaseError:
                # Nothing was written (one statement). The counter part may be what failed:
                # the plain path writes the job and only warns about the wake-up.
                logger.debug("One-statement add of %r failed; adding it plainly", job.id)
        try:
            # bulk_create sends no post_save: the one change-counter bump names our group
            # (the signal's receiver only knows the default one).
            self._announced(lambda alias: len(DjangoJob.objects.using(alias).bulk_create([row])))
        except IntegrityError:
            raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        if in_scheduler_loop():
            if self.pass_batch is not None:  # written with the pass's claims
                self.pass_batch.advances[job.id] = job
                return
            self._update_from_loop(job)
            return
        if self._plain_update(job) == 0:
            raise JobLookupError(job.id)

    @retry_on_db_operational_error
    def _plain_update(self, job: Job) -> int:
        return self._announced(
            lambda alias: (
                DjangoJob.objects.using(alias)
                .filter(id=job.id)
                .update(
                    next_run_time=get_django_internal_datetime(job.next_run_time),
                    job_state=self._dumps(job),
                    version=F("version") + 1,
                    restore_error="",
                )
            )
        )

    def _announced(self, write: Callable[[str], int]) -> int:
        """Run ``write`` (it returns the rows it changed) and, if it changed any, wake the
        leader once the write is committed.

        Outside a transaction the write commits by itself and the bump follows: two
        statements, nothing else (a transaction around both cost three more round trips on
        MariaDB, for the autocommit switches and the commit). Inside a caller's transaction
        the write is a savepoint (a conflict does not abort the caller's transaction) and the
        bump waits for the caller's commit: holding the counter's row lock until then would
        make every other writer of jobs wait for the caller.
        """
        alias = router.db_for_write(DjangoJob)
        if not db.connections[alias].in_atomic_block:
            n = write(alias)
            if n:
                bump_change_counter(self._group)
            return n
        with transaction.atomic(using=alias):
            n = write(alias)
        if n:
            transaction.on_commit(lambda: bump_change_counter(self._group), using=alias)
        return n

    def _update_from_loop(self, job: Job) -> None:
        """The leader advancing a job after submitting it: fenced, versioned, never raises.

        0 rows means we lost the lease or someone edited the job meanwhile (their edit wins).
        """
        if _replay_requested(job.id):
            logger.warning("Job %r not advanced: its claim failed; it is retried", job.id)
            return
        version = self._versions.get(job.id)
        fence = None
        if self.lease is not None:
            fence = self.lease.fence()
            if fence is None:
                self._stale()
                return
            freeze_point("update")  # TEST-ONLY hook: off unless APSCHEDULER_TEST_HOOKS
        state = job.__getstate__()  # pickled here, and kept as written (restore.py)
        stored = self._dumps_state(state)
        try:
            n = self._loop_update(job, stored, version, fence)
        except DatabaseError:
            logger.warning(
                "Could not save job %r after submitting it; it is replayed (and "
                "deduplicated by its claim) on the next pass",
                job.id,
                exc_info=True,
            )
            reset_connection()
            return
        if n == 0:
            self._stale()
            return
        if version is not None:
            self._versions[job.id] = version + 1
        self._restored.put_state(job.id, stored, state)
        if self._pass is not None and job.id in self._pass.due:
            self._pass.due[job.id] = get_django_internal_datetime(job.next_run_time)

    def _loop_update(
        self, job: Job, job_state: bytes, version: int | None, fence: tuple[str, int] | None
    ) -> int:
        """One UPDATE, versioned and fenced, as a statement built once: it runs for every
        fire time, and building it through the ORM (an ``Exists`` subquery resolved and
        copied on each call) was most of the scheduler thread's CPU."""
        conn = db.connections[router.db_for_write(DjangoJob)]
        next_run = cast(Field, DjangoJob._meta.get_field("next_run_time"))
        state = cast(Field, DjangoJob._meta.get_field("job_state"))
        params = [
            next_run.get_db_prep_save(get_django_internal_datetime(job.next_run_time), conn),
            state.get_db_prep_save(job_state, conn),
            job.id,
        ]
        if version is not None:
            params.append(version)
        if fence is not None:
            params += [self._group, *fence]
        with conn.cursor() as cursor:
            cursor.execute(_loop_update_sql(conn, version is not None, fence is not None), params)
            return int(cursor.rowcount)

    def _write_pass(self) -> None:
        """Claim every fire time of the pass and advance its jobs in one commit, then hand
        each job's runs to its executor with their claims (passes.py)."""
        batch, self.pass_batch = self.pass_batch, None
        if batch is None:
            return
        advances, unversioned, states = [], [], {}
        for job in batch.advances.values():
            version = self._versions.get(job.id)
            if version is None:
                unversioned.append(job)
            else:
                states[job.id] = state = job.__getstate__()  # kept as written (restore.py)
                advances.append(
                    passes.Advance(job.id, job.next_run_time, self._dumps_state(state), version)
                )
        # A claimed row shows its claim's time as its start until the run writes its true
        # start: the time of this write, not when APScheduler handed the job over.
        claimed_at = datetime.now(dt_timezone.utc)
        rows = [
            replace(row, started=claimed_at) if row.started is not None else row
            for sub in batch.submissions
            for row in sub.rows
        ]
        fence = None
        outcome: Claim | None = None
        result: passes.PassResult | None = None
        if self.lease is not None:
            fence = self.lease.fence()
            if fence is None:
                outcome = Claim.FENCED  # we know locally that we lost the lease: no statement
            else:
                freeze_point("claim")  # TEST-ONLY hooks: off unless APSCHEDULER_TEST_HOOKS
                freeze_point("update")
        if outcome is None and (rows or advances):
            try:
                result = passes.write_pass(rows, advances, fence, group=self._group)
            except DatabaseError as exc:
                passes.db_error(exc)
                if self.on_write_error is not None:
                    self.on_write_error("claim")
                outcome = Claim.ERROR  # nothing of the pass was written: all replayed
        if result is not None and result.lease_held is False and fence is not None:
            outcome = Claim.FENCED
            if self.lease is not None:  # stop acting on this epoch now, not at its deadline
                self.lease.fenced_by_database(fence[1])
        if outcome is not Claim.ERROR:
            advanced = result.advanced if result is not None else 0
            for _ in range(len(advances) - advanced):
                self._stale()
            if advanced == len(advances):
                for adv in advances:
                    self._versions[adv.job_id] = adv.version + 1
                    self._restored.put_state(adv.job_id, adv.job_state, states[adv.job_id])
                    if self._pass is not None and adv.job_id in self._pass.due:
                        self._pass.due[adv.job_id] = get_django_internal_datetime(adv.next_run_time)
        for sub in batch.submissions:
            claims = {}
            for row in sub.rows:
                if outcome is not None:
                    claim = outcome
                elif result is not None and passes.key(row.job_id, row.run_time) in result.claimed:
                    claim = Claim.CLAIMED
                else:
                    claim = Claim.CONFLICT
                replay = claim is Claim.ERROR and request_replay(row.job_id)
                claims[row.run_time] = passes.PreClaim(
                    claim, row.status, fence, row.exception or "", replay
                )
            try:
                sub.submit(claims)
            except Exception:
                logger.exception("Could not hand job %r to its executor", sub.job.id)
                sub.release()
        for job in unversioned:
            self._update_from_loop(job)
        for job_id in batch.removals:
            self._remove_from_loop(job_id)

    def abort_pass(self) -> None:
        """A pass that ended without asking for the next run time wrote nothing: give the
        executors back the slots of the runs it held (they are replayed next pass)."""
        batch, self.pass_batch = self.pass_batch, None
        if batch is not None:
            for sub in batch.submissions:
                sub.release()

    def remove_job(self, job_id: str) -> None:
        if in_scheduler_loop():
            if self.pass_batch is not None:  # after the pass's claims: its last one first
                self.pass_batch.removals.append(job_id)
                return
            self._remove_from_loop(job_id)
            return
        self._restored.forget(job_id)
        if not self._delete(job_id):
            raise JobLookupError(job_id)
        self._versions.pop(job_id, None)

    def _remove_from_loop(self, job_id: str) -> None:
        """Delete a one-off job after its last run, fenced like an update."""
        if _replay_requested(job_id):  # its last fire time is not claimed yet
            return
        qs = DjangoJob.objects.filter(id=job_id)
        if self.lease is not None:
            fence = self.lease.fence()
            if fence is None:
                self._stale()
                return
            qs = qs.filter(Exists(self._fence_qs(*fence)))
        try:
            deleted = qs._raw_delete(qs.db)  # no signal: the leader needs no wakeup
        except DatabaseError:
            logger.warning("Could not remove finished job %r", job_id, exc_info=True)
            reset_connection()
            return
        self._versions.pop(job_id, None)
        self._restored.forget(job_id)
        if deleted and self._pass is not None:
            self._pass.due.pop(job_id, None)

    @retry_on_db_operational_error
    def _delete(self, job_id: str) -> int:
        def delete(alias: str) -> int:
            qs = DjangoJob.objects.using(alias).filter(id=job_id)
            return int(qs._raw_delete(alias))  # one bump (with our group) instead of a signal

        return self._announced(delete)

    @retry_on_db_operational_error
    def remove_all_jobs(self) -> None:
        # Unlike 0.7, the execution history is kept: cleanup prunes it by age.
        qs = DjangoJob.objects.all()
        qs._raw_delete(qs.db)  # one bump below, not one signal per job
        self._versions.clear()
        self._restored.clear()
        transaction.on_commit(lambda: bump_change_counter(self._group))

    def shutdown(self) -> None:
        db.connection.close()

    # -- helpers --------------------------------------------------------------------------

    @property
    def _group(self) -> str:
        return self.lease.group if self.lease is not None else conf.GROUP

    def _now(self) -> datetime:
        return datetime.now(self._scheduler.timezone if self._scheduler else None)

    def _fence_qs(self, owner: str, epoch: int) -> Any:
        return SchedulerLease.objects.filter(
            name=self._group, owner=owner, epoch=epoch, expires_at__gt=DbNow()
        ).values("name")

    def _stale(self) -> None:
        if self.on_stale_write is not None:
            self.on_stale_write()

    def _dumps(self, job: Job) -> bytes:
        return self._dumps_state(job.__getstate__())

    def _dumps_state(self, state: dict[str, Any]) -> bytes:
        return signing.sign(pickle.dumps(state, self.pickle_protocol))

    def _reconstitute_job(
        self, job_state: bytes, verify: Callable[[bytes], bytes] = signing.verify
    ) -> Job:
        return self._job(self._load_state(job_state, verify))

    def _load_state(self, job_state: bytes, verify: Callable[[bytes], bytes]) -> dict[str, Any]:
        """``Job.__getstate__()`` of a stored state, once its signature is checked."""
        return cast(dict[str, Any], pickle.loads(verify(job_state)))  # noqa: S301 - signed by us

    def _job(self, state: dict[str, Any]) -> Job:
        job = Job.__new__(Job)
        job.__setstate__(state)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job

    def _restore(
        self, job_id: str, job_state: bytes, verify: Callable[[bytes], bytes] = signing.verify
    ) -> Job | None:
        try:
            return self._reconstitute_job(job_state, verify)
        except Exception as exc:
            self._flag_unrestorable(job_id, exc)
            return None

    def _flag_unrestorable(self, job_id: str, exc: Exception) -> None:
        """Keep the job and its history; say so once, where people look."""
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        if job_id not in self._restore_logged:
            self._restore_logged.add(job_id)
            logger.error(
                "Unable to restore job %r (%s). It is kept and skipped; fix the code "
                "or remove the job.",
                job_id,
                reason,
            )
        try:
            DjangoJob.objects.filter(id=job_id, restore_error="").update(restore_error=reason)
        except DatabaseError:
            reset_connection()

    @retry_on_db_operational_error
    def _rows(self, *conditions: Any, **filters: Any) -> Any:
        return (
            DjangoJob.objects.filter(*conditions, restore_error="", **filters)
            .order_by("next_run_time")
            .values_list("id", "job_state", "version", "next_run_time")
        )

    def _get_jobs(self, **filters: Any) -> list[Job]:
        jobs, verify = [], signing.verifier()
        # Versions are remembered by get_due_jobs only: a listing from another thread must not
        # move the version the leader's next fenced write will check.
        for job_id, job_state, _, _ in self._rows(**filters):
            job = self._restore(job_id, bytes(job_state), verify)
            if job is not None:
                jobs.append(job)
        return jobs

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__}(pickle_protocol={self.pickle_protocol})>"


class DjangoMemoryJobStore(DjangoResultStoreMixin, MemoryJobStore):
    """A ``MemoryJobStore`` whose runs are recorded in the Django database (0.7 API)."""


def register_events(scheduler: BaseScheduler, result_storage: Any = None) -> None:
    """Deprecated since django-apscheduler 0.4: listeners are registered automatically."""
    warnings.warn(
        "'register_events' is deprecated since version 0.4.0. Please remove all references "
        "from your code.",
        DeprecationWarning,
        stacklevel=2,
    )


def register_job(scheduler: BaseScheduler, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """Deprecated 0.7 decorator: ``@register_job(scheduler, "interval", seconds=1)``.

    Prefer ``django_apscheduler_obs.registry.scheduled_job`` (no scheduler object needed).
    """

    def wrapper_register_job(func: Callable[..., Any]) -> Callable[..., Any]:
        warnings.warn(
            "The 'register_job' decorator is deprecated since version 0.5.0. Please use "
            "APScheduler's add_job() method or @scheduled_job decorator instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        kwargs.setdefault("id", f"{func.__module__}.{func.__name__}")
        scheduler.add_job(func, *args, **kwargs)
        return func

    return wrapper_register_job
