"""``restore.RestoredJobs`` through ``DjangoJobStore.get_due_jobs``: a due row is verified and
unpickled once per stored state, and nothing a user relies on changes (tampering refused,
edits seen, arguments fresh, removed code noticed, rotated keys honoured)."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_EXECUTED
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from django_apscheduler_obs import restore, signing
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import DjangoJob
from tests.conftest import EventLog

pytestmark = pytest.mark.django_db(transaction=True)

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
UNPICKLED: list[str] = []


def collect(*args: Any, **kwargs: Any) -> None:
    kwargs.setdefault("seen", []).append(1)  # a job changing its own arguments


class Trap:
    """Unpickling this records it: the stand-in for code an attacker wants run."""

    def __reduce__(self) -> Any:
        return (UNPICKLED.append, ("trap",))


@pytest.fixture
def store() -> Any:
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    store = DjangoJobStore()
    store.start(scheduler, "default")
    restores: list[str] = []
    real = store._load_state

    def counting(job_state: bytes, *args: Any) -> dict[str, Any]:
        restores.append("row")
        return real(job_state, *args)

    store._load_state = counting  # type: ignore[method-assign]
    store.restores = restores  # type: ignore[attr-defined]
    return store


def add(store: Any, job_id: str = "j", **options: Any) -> Job:
    job = Job(
        store._scheduler,
        id=job_id,
        func="tests.test_restore:collect",
        trigger=IntervalTrigger(seconds=60, start_date=T0),
        executor="default",
        args=options.pop("args", ()),
        kwargs=options.pop("kwargs", {}),
        name=job_id,
        misfire_grace_time=1,
        coalesce=True,
        max_instances=1,
        next_run_time=T0,
    )
    store.add_job(job)
    return job


def due(store: Any) -> list[Job]:
    return store.get_due_jobs(T0 + timedelta(seconds=1))


def test_a_row_read_again_unchanged_is_not_restored_again(store):
    add(store)
    first, second = due(store), due(store)
    assert len(store.restores) == 1
    assert [j.id for j in second] == ["j"]
    assert second[0].func is collect and second[0].trigger == first[0].trigger
    assert second[0] is not first[0] and second[0].kwargs is not first[0].kwargs
    assert second[0]._scheduler is store._scheduler and second[0]._jobstore_alias == "default"


def test_a_tampered_row_under_the_old_signature_is_never_unpickled(store):
    add(store)
    due(store)
    stored = bytes(DjangoJob.objects.get(id="j").job_state)
    sig = signing.signature(stored)
    assert sig is not None
    evil = signing.PREFIX + sig + b"$" + pickle.dumps(Trap())
    DjangoJob.objects.filter(id="j").update(job_state=evil)
    UNPICKLED.clear()
    [job] = due(store)
    assert UNPICKLED == [] and job.func is collect  # the verified job, not the row's pickle
    # Without the kept state (a new process), the same row is refused by its signature.
    fresh = DjangoJobStore()
    fresh.start(store._scheduler, "default")
    assert fresh.get_due_jobs(T0 + timedelta(seconds=1)) == []
    assert UNPICKLED == []
    assert "BadSignature" in DjangoJob.objects.get(id="j").restore_error


def test_an_edit_by_another_process_is_seen(store):
    add(store)
    due(store)
    other = DjangoJobStore()
    other.start(store._scheduler, "default")
    job = other.lookup_job("j")
    job._modify(name="renamed")
    other.update_job(job)
    [read] = due(store)
    assert read.name == "renamed"
    assert len(store.restores) == 2


@pytest.mark.parametrize(
    "options", [{"args": ([1],)}, {"kwargs": {"seen": [1]}}], ids=["args", "kwargs"]
)
def test_mutable_arguments_come_fresh_from_the_row_each_time(store, options):
    add(store, **options)
    [job] = due(store)
    (job.args[0] if job.args else job.kwargs["seen"]).append(2)
    [again] = due(store)
    assert (again.args, again.kwargs) == (options.get("args", ()), options.get("kwargs", {}))
    assert len(store.restores) == 2


def test_immutable_arguments_are_shared_but_kwargs_are_each_jobs_own(store):
    add(store, args=(1, "a", (T0, None)), kwargs={"day": T0.date()})
    for _ in range(3):  # the first from the row, the others from the kept state
        [job] = due(store)
        assert job.kwargs == {"day": T0.date()} and job.args == (1, "a", (T0, None))
        job.kwargs["day"] = None
    assert len(store.restores) == 1


def test_a_key_dropped_from_the_settings_stops_vouching_for_kept_jobs(store, settings):
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "a-new-key-" + "x" * 40
    add(store)  # signed with the new key
    due(store)
    state = bytes(DjangoJob.objects.get(id="j").job_state)
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = settings.SECRET_KEY_FALLBACKS[0], []
    assert due(store) == []  # verified again, against the keys in force: refused
    assert signing.signature(state) is not None
    assert DjangoJob.objects.get(id="j").restore_error.startswith("BadSignature")


def test_unsigned_state_is_not_kept(store, settings):
    settings.APSCHEDULER_SIGN_JOB_STATE = False
    add(store)
    due(store), due(store)
    assert len(store.restores) == 2


def test_the_kept_states_are_bounded_oldest_first(store):
    kept = restore.RestoredJobs(max_jobs=2)
    jobs = {i: add(store, f"b{i}") for i in range(3)}
    rows = {i: bytes(DjangoJob.objects.get(id=f"b{i}").job_state) for i in range(3)}
    kept.begin_pass(signing.current_keys())
    kept.put_state("b0", rows[0], jobs[0].__getstate__())
    kept.put_state("b1", rows[1], jobs[1].__getstate__())
    kept.begin_pass(signing.current_keys())
    assert kept.get("b1", rows[1]) is not None  # used again: now the newest
    kept.put_state("b2", rows[2], jobs[2].__getstate__())
    assert len(kept) == 2
    assert kept.get("b0", rows[0]) is None
    assert kept.get("b1", rows[1]) is not None and kept.get("b2", rows[2]) is not None


def test_a_pass_with_more_due_jobs_than_fit_keeps_serving_the_kept_ones(store):
    """Evicting the oldest on every miss would make each pass evict what the next needs."""
    kept = restore.RestoredJobs(max_jobs=2)
    jobs = {i: add(store, f"b{i}") for i in range(4)}
    rows = {i: bytes(DjangoJob.objects.get(id=f"b{i}").job_state) for i in range(4)}
    for _ in range(3):
        kept.begin_pass(signing.current_keys())
        served = []
        for i in range(4):
            if kept.get(f"b{i}", rows[i]) is not None:
                served.append(i)
            else:
                kept.put_state(f"b{i}", rows[i], jobs[i].__getstate__())
    assert served == [0, 1] and len(kept) == 2


def test_jobs_the_scheduler_loop_writes_are_read_back_without_unpickling(store):
    """A running scheduler: after the first pass restored the job, every later pass finds the
    state the previous pass wrote."""
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    loop_store = DjangoJobStore()
    restores: list[bytes] = []
    real = loop_store._load_state
    loop_store._load_state = lambda state, *a: restores.append(state) or real(state, *a)  # type: ignore[method-assign]
    scheduler.add_jobstore(loop_store, "default")
    log = EventLog()
    scheduler.add_listener(log, EVENT_JOB_EXECUTED)
    scheduler.start()
    try:
        scheduler.add_job("tests.jobs:noop", "interval", seconds=0.2, id="loop")
        log.wait(EVENT_JOB_EXECUTED, "loop", count=4)
    finally:
        scheduler.shutdown(wait=True)
    assert len(restores) == 1
    assert len(loop_store._restored) == 1
