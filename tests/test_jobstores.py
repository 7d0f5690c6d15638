"""The job-store contract of APScheduler 3 (its ``tests/test_jobstores.py``), run against the
memory store as the reference and against ``DjangoJobStore`` on the configured database, plus
what ``DjangoJobStore`` promises beyond it: unrestorable jobs are kept, flagged, logged once and
skipped; database errors never end the scheduler thread."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from apscheduler.events import EVENT_JOB_EXECUTED
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from django_apscheduler_obs import signing
from django_apscheduler_obs.jobstores import DjangoJobStore, DjangoMemoryJobStore
from django_apscheduler_obs.lease import Lease, bump_change_counter
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution, JobStoreVersion
from tests.conftest import EventLog, wait_for
from tests.dbfail import JOB_UPDATE, outage

TZ = ZoneInfo("Europe/Berlin")  # not UTC on purpose: stored times must survive the round trip


def dummy_job() -> str:
    return "dummy"


def dummy_job2() -> None:
    pass


def dummy_job3() -> None:
    pass


def dummy_varargs(*args: object) -> None:
    pass


class DummyClass:
    def dummy_method(self, a: int, b: int) -> int:
        return a + b

    @classmethod
    def dummy_classmethod(cls, a: int, b: int) -> int:
        return a + b


dummy_instance = DummyClass()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def scheduler() -> BackgroundScheduler:
    return BackgroundScheduler(timezone=TZ)


@pytest.fixture(params=["memory", "django_memory", "django", "django_leader"])
def jobstore(request: pytest.FixtureRequest, scheduler: BackgroundScheduler, db: None):
    kind = request.param
    if kind == "memory":
        store = MemoryJobStore()
    elif kind == "django_memory":
        store = DjangoMemoryJobStore()
    elif kind == "django":
        store = DjangoJobStore()
    else:
        lease = Lease("contract", ttl=60, renew_interval=5)
        assert lease.acquire()
        store = DjangoJobStore(lease=lease)
    store.start(scheduler, "default")
    return store


@pytest.fixture
def persistent_jobstore(scheduler: BackgroundScheduler, db: None) -> DjangoJobStore:
    store = DjangoJobStore()
    store.start(scheduler, "default")
    return store


def make_job(
    scheduler: BackgroundScheduler,
    func=dummy_job,
    run_date: datetime = datetime(2999, 1, 1),
    id: str | None = None,  # noqa: A002
    paused: bool = False,
    **kwargs,
) -> Job:
    run_date = run_date.replace(tzinfo=TZ) if run_date.tzinfo is None else run_date
    options = {
        "executor": "default",
        "args": (),
        "kwargs": {},
        "misfire_grace_time": 1,
        "coalesce": False,
        "name": "nämé",
        "max_instances": 1,
        **kwargs,
    }
    trigger = scheduler._create_trigger("date", {"run_date": run_date, "timezone": TZ})
    job = Job(scheduler, id=id, func=func, trigger=trigger, **options)
    job.next_run_time = None if paused else trigger.get_next_fire_time(None, run_date)
    return job


@pytest.fixture
def create_add_job(scheduler: BackgroundScheduler):
    def create(jobstore, func=dummy_job, run_date=datetime(2999, 1, 1), id=None, **kw):  # noqa: A002
        job = make_job(scheduler, func, run_date, id, **kw)
        if jobstore is not None:
            jobstore.add_job(job)
        return job

    return create


# -- APScheduler's contract ------------------------------------------------------------------


def test_add_callable_instance_method_job(jobstore, create_add_job):
    instance = DummyClass()
    initial_job = create_add_job(jobstore, instance.dummy_method, kwargs={"a": 1, "b": 2})
    job = jobstore.lookup_job(initial_job.id)
    assert job.func(*job.args, **job.kwargs) == 3


def test_add_callable_class_method_job(jobstore, create_add_job):
    initial_job = create_add_job(jobstore, DummyClass.dummy_classmethod, kwargs={"a": 1, "b": 2})
    job = jobstore.lookup_job(initial_job.id)
    assert job.func(*job.args, **job.kwargs) == 3


def test_add_textual_instance_method_job(jobstore, create_add_job):
    initial_job = create_add_job(
        jobstore, "tests.test_jobstores:dummy_instance.dummy_method", kwargs={"a": 1, "b": 2}
    )
    job = jobstore.lookup_job(initial_job.id)
    assert job.func(*job.args, **job.kwargs) == 3


def test_lookup_job(jobstore, create_add_job):
    initial_job = create_add_job(jobstore, id="téstïd")
    job = jobstore.lookup_job(initial_job.id)
    assert job == initial_job
    assert job.id == "téstïd"
    assert job.name == "nämé"
    assert job.next_run_time == initial_job.next_run_time
    assert job.func is dummy_job
    if not isinstance(jobstore, MemoryJobStore):
        assert job._jobstore_alias == "default"


def test_lookup_nonexistent_job(jobstore):
    assert jobstore.lookup_job("foo") is None


def test_get_all_jobs(jobstore, create_add_job):
    job1 = create_add_job(jobstore, dummy_job, datetime(2016, 5, 3))
    job2 = create_add_job(jobstore, dummy_job2, datetime(2013, 8, 14))
    job3 = create_add_job(jobstore, dummy_job2, datetime(2013, 7, 11), paused=True)
    job4 = create_add_job(jobstore, dummy_job3, datetime(2013, 7, 11))
    jobs = jobstore.get_all_jobs()
    # Sorted by next run time, paused jobs last (NULL sorts first on SQLite and MariaDB).
    assert [j.id for j in jobs] == [job4.id, job2.id, job1.id, job3.id]
    assert jobs[-1].next_run_time is None


def test_get_pending_jobs(jobstore, create_add_job):
    start_time = datetime(2014, 5, 3, tzinfo=TZ)
    job1 = create_add_job(jobstore, dummy_job, start_time)
    job2 = create_add_job(jobstore, dummy_job2, datetime(2013, 8, 14))
    create_add_job(jobstore, dummy_job3, datetime(2016, 4, 1))
    create_add_job(jobstore, dummy_job3, datetime(2013, 1, 1), paused=True)
    assert jobstore.get_due_jobs(start_time) == [job2, job1]
    assert jobstore.get_due_jobs(start_time - timedelta(microseconds=1)) == [job2]
    # The same instant in another time zone.
    assert jobstore.get_due_jobs(start_time.astimezone(timezone.utc)) == [job2, job1]


def test_get_pending_jobs_subsecond_difference(jobstore, create_add_job):
    job1 = create_add_job(jobstore, dummy_job, datetime(2014, 7, 7, 0, 0, 0, 401))
    job2 = create_add_job(jobstore, dummy_job2, datetime(2014, 7, 7, 0, 0, 0, 402))
    job3 = create_add_job(jobstore, dummy_job3, datetime(2014, 7, 7, 0, 0, 0, 400))
    jobs = jobstore.get_due_jobs(datetime(2014, 7, 7, 1, tzinfo=TZ))
    assert jobs == [job3, job1, job2]


def test_get_next_run_time(jobstore, create_add_job):
    create_add_job(jobstore, dummy_job, datetime(2016, 5, 3))
    create_add_job(jobstore, dummy_job2, datetime(2013, 8, 14))
    create_add_job(jobstore, dummy_job3, datetime(2013, 7, 11), paused=True)
    next_run = jobstore.get_next_run_time()
    assert next_run == datetime(2013, 8, 14, tzinfo=TZ)
    assert next_run.tzinfo is not None


def test_get_next_run_time_empty(jobstore):
    next_run = jobstore.get_next_run_time()
    if getattr(jobstore, "lease", None) is not None:
        # The leader re-reads the store at least every APSCHEDULER_MAX_SLEEP seconds.
        assert next_run is not None
    else:
        assert next_run is None


def test_add_job_conflicting_id(jobstore, create_add_job):
    create_add_job(jobstore, dummy_job, datetime(2016, 5, 3), id="blah")
    with pytest.raises(ConflictingIdError):
        create_add_job(jobstore, dummy_job2, datetime(2014, 2, 26), id="blah")
    assert [j.func for j in jobstore.get_all_jobs()] == [dummy_job]


def test_update_job(jobstore, create_add_job):
    job1 = create_add_job(jobstore, dummy_job, datetime(2016, 5, 3))
    job2 = create_add_job(jobstore, dummy_job2, datetime(2013, 8, 14))
    replacement = create_add_job(None, dummy_job, datetime(2016, 5, 4), id=job1.id, max_instances=6)
    assert replacement.max_instances == 6
    jobstore.update_job(replacement)
    jobs = jobstore.get_all_jobs()
    assert len(jobs) == 2
    assert jobs[0].id == job2.id
    assert jobs[1].id == job1.id
    assert jobs[1].max_instances == 6
    assert jobs[1].next_run_time == datetime(2016, 5, 4, tzinfo=TZ)


@pytest.mark.parametrize("next_run_time", [datetime(2013, 8, 13), None], ids=["earlier", "null"])
def test_update_job_next_runtime(jobstore, create_add_job, next_run_time):
    job1 = create_add_job(jobstore, dummy_job, datetime(2016, 5, 3))
    create_add_job(jobstore, dummy_job2, datetime(2013, 8, 14))
    job3 = create_add_job(jobstore, dummy_job3, datetime(2013, 7, 11))
    job1.next_run_time = next_run_time.replace(tzinfo=TZ) if next_run_time else None
    jobstore.update_job(job1)
    if next_run_time:
        assert jobstore.get_next_run_time() == job3.next_run_time
    else:
        assert jobstore.get_next_run_time() == job3.next_run_time
    jobs = jobstore.get_all_jobs()
    assert jobs[-1 if next_run_time is None else 1].id == job1.id


@pytest.mark.parametrize("next_run_time", [datetime(2013, 8, 13), None], ids=["earlier", "null"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["first", "middle", "last"])
def test_update_job_clear_next_runtime(jobstore, create_add_job, next_run_time, index):
    jobs = [
        create_add_job(jobstore, dummy_job, datetime(2013, 8, 14)),
        create_add_job(jobstore, dummy_job2, datetime(2016, 5, 3)),
        create_add_job(jobstore, dummy_job3, datetime(2017, 1, 1)),
    ]
    jobs[index].next_run_time = next_run_time.replace(tzinfo=TZ) if next_run_time else None
    jobstore.update_job(jobs[index])
    due_date = datetime(2020, 1, 1, tzinfo=TZ)
    due_jobs = jobstore.get_due_jobs(due_date)
    assert len(due_jobs) == (3 if next_run_time else 2)
    due_job_ids = [job.id for job in due_jobs]
    if next_run_time:
        if index == 0:
            assert due_job_ids == [jobs[0].id, jobs[1].id, jobs[2].id]
        elif index == 1:
            assert due_job_ids == [jobs[1].id, jobs[0].id, jobs[2].id]
        else:
            assert due_job_ids == [jobs[2].id, jobs[0].id, jobs[1].id]
    else:
        assert jobs[index].id not in due_job_ids


def test_update_job_nonexistent_job(jobstore, create_add_job):
    job = create_add_job(None, dummy_job, datetime(2016, 5, 3))
    with pytest.raises(JobLookupError):
        jobstore.update_job(job)


def test_one_job_fails_to_load(persistent_jobstore, create_add_job, monkeypatch):
    job1 = create_add_job(persistent_jobstore, dummy_job, datetime(2016, 5, 3))
    job2 = create_add_job(persistent_jobstore, dummy_job2, datetime(2013, 8, 14))
    job3 = create_add_job(persistent_jobstore, dummy_job3, datetime(2013, 7, 11))
    # Make the dummy_job3 function disappear
    monkeypatch.delitem(globals(), "dummy_job3")
    jobs = persistent_jobstore.get_all_jobs()
    assert jobs == [job2, job1]
    assert persistent_jobstore.get_next_run_time() == datetime(2013, 8, 14, tzinfo=TZ)
    # APScheduler's SQLAlchemy store deletes it; ours keeps it, flagged.
    row = DjangoJob.objects.get(id=job3.id)
    assert "dummy_job3" in row.restore_error


def test_remove_job(jobstore, create_add_job):
    job1 = create_add_job(jobstore, dummy_job, datetime(2016, 5, 3))
    job2 = create_add_job(jobstore, dummy_job2, datetime(2013, 8, 14))
    jobstore.remove_job(job1.id)
    assert jobstore.get_all_jobs() == [job2]
    jobstore.remove_job(job2.id)
    assert jobstore.get_all_jobs() == []


def test_remove_nonexistent_job(jobstore):
    with pytest.raises(JobLookupError):
        jobstore.remove_job("blah")


def test_remove_all_jobs(jobstore, create_add_job):
    create_add_job(jobstore, dummy_job, datetime(2016, 5, 3))
    create_add_job(jobstore, dummy_job2, datetime(2013, 8, 14))
    jobstore.remove_all_jobs()
    assert jobstore.get_all_jobs() == []
    assert jobstore.get_next_run_time() is None or getattr(jobstore, "lease", None)


def test_add_unserializable_job(jobstore, create_add_job):
    """A job whose function has no reference (a lambda) cannot be stored persistently."""
    if isinstance(jobstore, MemoryJobStore):
        pytest.skip("the memory store does not serialize")
    with pytest.raises(ValueError, match="cannot be serialized"):
        create_add_job(jobstore, lambda: None, id="lambda")
    assert not DjangoJob.objects.filter(id="lambda").exists()


def test_add_job_with_unpicklable_args(jobstore, create_add_job):
    if isinstance(jobstore, MemoryJobStore):
        pytest.skip("the memory store does not serialize")
    with pytest.raises((TypeError, pickle.PicklingError)):
        create_add_job(jobstore, dummy_varargs, args=(threading.Lock(),), id="lock")
    assert not DjangoJob.objects.filter(id="lock").exists()
    job = create_add_job(jobstore, dummy_varargs, id="lock")
    job.args = (threading.Lock(),)
    with pytest.raises((TypeError, pickle.PicklingError)):
        jobstore.update_job(job)
    assert jobstore.lookup_job("lock").args == ()


def test_repr(persistent_jobstore):
    assert (
        repr(persistent_jobstore) == f"<DjangoJobStore(pickle_protocol={pickle.HIGHEST_PROTOCOL})>"
    )
    assert repr(DjangoJobStore(pickle_protocol=2)) == "<DjangoJobStore(pickle_protocol=2)>"


def test_pickle_protocol_is_used(scheduler, create_add_job, db):
    store = DjangoJobStore(pickle_protocol=2)
    store.start(scheduler, "default")
    job = create_add_job(store)
    payload = signing.verify(bytes(DjangoJob.objects.get(id=job.id).job_state))
    assert payload[:2] == b"\x80\x02"


# -- unrestorable jobs: kept, flagged, logged once, skipped ---------------------------------


def _state(scheduler, func="tests.test_jobstores:dummy_job", **kw) -> dict:
    job = make_job(scheduler, dummy_job, datetime(2000, 1, 1), **kw)
    state = job.__getstate__()
    state["func"] = func
    return state


def _signed(state: dict) -> bytes:
    return signing.sign(pickle.dumps(state, pickle.HIGHEST_PROTOCOL))


BROKEN = {
    "missing_module": lambda sch: _signed(_state(sch, "tests.no_such_module:func")),
    "missing_function": lambda sch: _signed(_state(sch, "tests.test_jobstores:no_such_func")),
    "corrupt_pickle": lambda sch: signing.sign(b"\x80\x05this is not a pickle"),
    "bad_signature": lambda sch: (
        signing.PREFIX + b"0" * 64 + b"$" + pickle.dumps(_state(sch), pickle.HIGHEST_PROTOCOL)
    ),
    "unsigned": lambda sch: pickle.dumps(_state(sch), pickle.HIGHEST_PROTOCOL),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_unrestorable_job_is_kept_flagged_logged_once_and_skipped(
    persistent_jobstore, create_add_job, scheduler, kind, caplog
):
    store = persistent_jobstore
    good = create_add_job(store, dummy_job, datetime(2010, 1, 1))
    # The broken job is the earliest due, so a store that does not skip it would return it.
    DjangoJob.objects.create(
        id="broken",
        next_run_time=datetime(2000, 1, 1, tzinfo=TZ),
        job_state=BROKEN[kind](scheduler),
    )
    DjangoJobExecution.objects.create(
        job_id="broken", run_time=datetime(1999, 1, 1, tzinfo=TZ), status="Executed"
    )
    caplog.set_level(logging.ERROR, logger="django_apscheduler_obs.jobstores")
    now = datetime(2020, 1, 1, tzinfo=TZ)
    for _ in range(3):
        assert store.get_due_jobs(now) == [good]
        assert store.get_all_jobs() == [good]
        assert store.lookup_job("broken") is None
        assert store.get_next_run_time() == good.next_run_time
    row = DjangoJob.objects.get(id="broken")
    assert row.restore_error  # flagged, with the reason
    assert DjangoJobExecution.objects.filter(job_id="broken").count() == 1  # history kept
    logged = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "kept and skipped" in logged[0].getMessage()


def test_bad_signature_is_refused_before_unpickling(persistent_jobstore, scheduler, monkeypatch):
    loads = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda data: loads.append(data) or real_loads(data))
    DjangoJob.objects.create(
        id="tampered", next_run_time=None, job_state=BROKEN["bad_signature"](scheduler)
    )
    assert persistent_jobstore.lookup_job("tampered") is None
    assert loads == []
    assert "signature" in DjangoJob.objects.get(id="tampered").restore_error


def test_replacing_an_unrestorable_job_clears_the_flag(persistent_jobstore, scheduler, db):
    DjangoJob.objects.create(
        id="fixme", next_run_time=None, job_state=BROKEN["corrupt_pickle"](scheduler)
    )
    assert persistent_jobstore.lookup_job("fixme") is None
    assert DjangoJob.objects.get(id="fixme").restore_error
    job = make_job(scheduler, dummy_job2, datetime(2030, 1, 1), id="fixme")
    persistent_jobstore.update_job(job)
    assert DjangoJob.objects.get(id="fixme").restore_error == ""
    assert persistent_jobstore.lookup_job("fixme").func is dummy_job2


def _process_jobs_counter(sched: BackgroundScheduler) -> list[float]:
    calls: list[float] = []
    original = sched._process_jobs

    def counting() -> float | None:
        calls.append(time.monotonic())
        return original()

    sched._process_jobs = counting
    return calls


@pytest.mark.django_db(transaction=True)
def test_unrestorable_due_job_does_not_busy_loop_the_scheduler():
    """A flagged job's past next_run_time must not make the loop wake up at once, forever."""
    sched = BackgroundScheduler(timezone="UTC")
    store = DjangoJobStore()
    sched.add_jobstore(store, "default")
    DjangoJob.objects.create(
        id="broken",
        next_run_time=datetime(2000, 1, 1, tzinfo=timezone.utc),
        job_state=signing.sign(b"garbage"),
    )
    sched.start(paused=True)
    calls = _process_jobs_counter(sched)
    try:
        sched.resume()
        time.sleep(1.0)
        assert len(calls) <= 3, f"the loop ran {len(calls)} times in 1 s"
        assert sched._thread.is_alive()
        assert DjangoJob.objects.filter(id="broken").exists()
    finally:
        sched.shutdown(wait=False)
        connection.close()


# -- database errors never end the scheduler thread -------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_database_errors_in_update_do_not_kill_a_stock_scheduler():
    """The 0.7 way (BackgroundScheduler + DjangoJobStore() + stock executor): APScheduler does not
    catch errors of update_job; a locked database ended 0.7's scheduler thread."""
    sched = BackgroundScheduler(timezone="UTC", jobstore_retry_interval=0.2)
    sched.add_jobstore(DjangoJobStore(), "default")
    log = EventLog()
    sched.add_listener(log, EVENT_JOB_EXECUTED)
    sched.start()
    with outage(JOB_UPDATE) as o:
        o.down, o.remaining = True, 3
        try:
            sched.add_job(
                "tests.jobs:noop",
                "interval",
                seconds=0.3,
                id="flaky",
                next_run_time=datetime.now(timezone.utc),
            )
            log.wait(EVENT_JOB_EXECUTED, "flaky", count=5, timeout=15)
            assert o.failures == 3
            assert sched._thread.is_alive()
            wait_for(
                lambda: (
                    DjangoJobExecution.objects.filter(
                        job_id="flaky", status=DjangoJobExecution.SUCCESS
                    ).count()
                    >= 3
                ),
                message="recorded executions",
            )
        finally:
            sched.shutdown(wait=True)
            connection.close()


@pytest.mark.django_db(transaction=True)
def test_database_errors_in_due_jobs_and_next_run_time_do_not_kill_the_scheduler():
    sched = BackgroundScheduler(timezone="UTC", jobstore_retry_interval=0.2)
    sched.add_jobstore(DjangoJobStore(), "default")
    log = EventLog()
    sched.add_listener(log, EVENT_JOB_EXECUTED)
    sched.start()
    # Every read of the job table, however it is built (ORM, compiled, a UNION in brackets).
    with outage(r"^\(?SELECT\b.*\bdjango_apscheduler_obs_djangojob\b") as reads:
        reads.remaining, reads.down = 6, True
        try:
            sched.add_job("tests.jobs:noop", "interval", seconds=0.3, id="flaky2")
            log.wait(EVENT_JOB_EXECUTED, "flaky2", count=3, timeout=15)
            assert reads.failures == 6
            assert sched._thread.is_alive()
        finally:
            sched.shutdown(wait=True)
        connection.close()


# -- the leader's wake-up (change counter) ---------------------------------------------------


def _counter() -> int | None:
    return JobStoreVersion.objects.filter(name="default").values_list("version", flat=True).first()


@pytest.mark.django_db(transaction=True)
def test_a_write_outside_a_transaction_wakes_the_leader_after_it(persistent_jobstore, scheduler):
    before = _counter() or 0
    job = make_job(scheduler, id="wake")
    persistent_jobstore.add_job(job)
    assert _counter() == before + 1
    job._modify(name="renamed")
    persistent_jobstore.update_job(job)
    persistent_jobstore.remove_job("wake")
    assert _counter() == before + 3
    with pytest.raises(JobLookupError):
        persistent_jobstore.remove_job("wake")
    assert _counter() == before + 3  # nothing changed: nobody is woken


@pytest.mark.django_db(transaction=True)
def test_add_job_and_its_wake_up_are_one_statement_on_postgresql(persistent_jobstore, scheduler):
    if connection.vendor != "postgresql":
        pytest.skip("a data-modifying CTE: PostgreSQL only (elsewhere two statements)")
    before = _counter() or 0
    with CaptureQueriesContext(connection) as queries:
        persistent_jobstore.add_job(make_job(scheduler, "tests.jobs:sleep", id="one", args=(1,)))
    assert len(queries) == 1
    assert _counter() == before + 1
    assert persistent_jobstore.lookup_job("one").args == (1,)  # the row as the ORM writes it
    with CaptureQueriesContext(connection) as queries, pytest.raises(ConflictingIdError):
        persistent_jobstore.add_job(make_job(scheduler, id="one"))
    assert len(queries) == 1 and _counter() == before + 1  # a conflict wakes nobody
    JobStoreVersion.objects.all().delete()
    persistent_jobstore.add_job(make_job(scheduler, id="two"))
    assert _counter() == 1  # a missing counter row is created


@pytest.mark.django_db(transaction=True)
def test_a_write_inside_a_callers_transaction_wakes_the_leader_when_it_commits(
    persistent_jobstore, scheduler
):
    before = _counter() or 0
    with transaction.atomic():
        persistent_jobstore.add_job(make_job(scheduler, id="later"))
        assert (_counter() or 0) == before  # the counter row is not locked for the caller's time
    assert _counter() == before + 1
    with pytest.raises(RuntimeError), transaction.atomic():
        persistent_jobstore.add_job(make_job(scheduler, id="rolled-back"))
        raise RuntimeError
    assert _counter() == before + 1 and not DjangoJob.objects.filter(id="rolled-back").exists()


@pytest.mark.django_db(transaction=True)
def test_a_failed_wake_up_never_undoes_the_write(persistent_jobstore, scheduler, caplog):
    """A real error of the database (the counter's table is gone), which on PostgreSQL
    aborts the whole transaction unless the bump is a savepoint of it: after the store's own
    write, and when a caller bumps inside its transaction."""
    table = JobStoreVersion._meta.db_table
    q = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {q(table)} RENAME TO {q(table + '_away')}")
    try:
        persistent_jobstore.add_job(make_job(scheduler, id="kept"))
        with transaction.atomic():
            persistent_jobstore.add_job(make_job(scheduler, id="kept-in-a-transaction"))
            bump_change_counter()
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {q(table + '_away')} RENAME TO {q(table)}")
    assert set(DjangoJob.objects.values_list("id", flat=True)) == {"kept", "kept-in-a-transaction"}
    assert "Could not bump the job change counter" in caplog.text
