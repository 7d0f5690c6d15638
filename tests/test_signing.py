"""Signed job state: a tampered row is refused before unpickling and flagged; keys rotate."""

from __future__ import annotations

import pickle
from datetime import datetime, timezone

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from django_apscheduler_obs import signing
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import DjangoJob

PAYLOAD = pickle.dumps({"version": 1, "args": (1, 2)})


def test_round_trip_and_format(settings):
    state = signing.sign(PAYLOAD)
    assert state.startswith(signing.PREFIX)
    assert signing.is_signed(state)
    assert signing.verify(state) == PAYLOAD
    assert state.endswith(b"$" + PAYLOAD)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s[:-1] + bytes([s[-1] ^ 1]),  # payload bit flip
        lambda s: s[: len(signing.PREFIX)] + b"f" * 64 + s[len(signing.PREFIX) + 64 :],  # sig
        lambda s: s + b".",  # appended byte
        lambda s: s[len(signing.PREFIX) + 65 :],  # signature stripped (looks like 0.7 state)
        lambda s: signing.PREFIX + b"$" + s[len(signing.PREFIX) + 65 :],  # empty signature
    ],
    ids=["payload", "signature", "appended", "stripped", "empty"],
)
def test_tampered_state_is_refused(tamper):
    state = signing.sign(PAYLOAD)
    with pytest.raises(signing.BadSignature):
        signing.verify(tamper(state))


def test_key_rotation_with_fallbacks(settings):
    settings.SECRET_KEY = "old-key"
    old_state = signing.sign(PAYLOAD)
    settings.SECRET_KEY = "new-key"
    settings.SECRET_KEY_FALLBACKS = ["older-key", "old-key"]
    assert signing.verify(old_state) == PAYLOAD
    new_state = signing.resign(old_state)
    assert new_state != old_state
    settings.SECRET_KEY_FALLBACKS = []
    assert signing.verify(new_state) == PAYLOAD
    with pytest.raises(signing.BadSignature, match="does not match"):
        signing.verify(old_state)


def test_resign_upgrades_unsigned_0_7_state_and_refuses_bad_ones():
    assert signing.verify(signing.resign(PAYLOAD)) == PAYLOAD
    with pytest.raises(signing.BadSignature):
        signing.resign(signing.PREFIX + b"0" * 64 + b"$" + PAYLOAD)


def test_signing_can_be_switched_off(settings):
    settings.APSCHEDULER_SIGN_JOB_STATE = False
    assert signing.sign(PAYLOAD) == PAYLOAD
    assert signing.verify(PAYLOAD) == PAYLOAD
    settings.APSCHEDULER_SIGN_JOB_STATE = True
    signed = signing.sign(PAYLOAD)
    settings.APSCHEDULER_SIGN_JOB_STATE = False
    assert signing.verify(signed) == PAYLOAD  # rows written while it was on stay readable


# -- through the job store, on the database -------------------------------------------------


def target(x: int = 0) -> int:
    return x


@pytest.fixture
def store(db):
    s = DjangoJobStore()
    s.start(BackgroundScheduler(timezone="UTC"), "default")
    return s


def add(store: DjangoJobStore, job_id: str, arg: int = 1):
    sched = store._scheduler
    from apscheduler.job import Job

    trigger = sched._create_trigger("interval", {"seconds": 60, "timezone": "UTC"})
    job = Job(
        sched, id=job_id, func=target, trigger=trigger, executor="default", args=(arg,),
        kwargs={}, name=job_id, misfire_grace_time=1, coalesce=True, max_instances=1,
        next_run_time=datetime(2020, 1, 1, tzinfo=timezone.utc),
    )  # fmt: skip
    store.add_job(job)
    return job


def test_stored_state_is_signed(store):
    add(store, "s")
    state = bytes(DjangoJob.objects.get(id="s").job_state)
    assert signing.is_signed(state)
    signing.verify(state)


def test_tampered_row_is_refused_and_flagged(store, monkeypatch):
    add(store, "t", arg=1)
    add(store, "ok", arg=2)
    row = DjangoJob.objects.get(id="t")
    state = bytes(row.job_state)
    payload = pickle.loads(signing.verify(state))
    payload["args"] = (666,)
    forged = state[: len(signing.PREFIX) + 65] + pickle.dumps(payload)
    DjangoJob.objects.filter(id="t").update(job_state=forged)
    loaded = []
    real = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda b, **kw: loaded.append(b) or real(b, **kw))
    due = store.get_due_jobs(datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert [j.id for j in due] == ["ok"]
    assert all(b"666" not in b for b in loaded)  # never unpickled
    row = DjangoJob.objects.get(id="t")
    assert "BadSignature" in row.restore_error
    assert store.get_next_run_time() is not None


def test_rotation_through_the_store(store, settings):
    settings.SECRET_KEY = "key-1"
    job = add(store, "r")
    settings.SECRET_KEY = "key-2"
    settings.SECRET_KEY_FALLBACKS = ["key-1"]
    assert store.lookup_job("r").args == (1,)
    # The next write signs with the current key...
    job.args = (5,)
    store.update_job(job)
    settings.SECRET_KEY_FALLBACKS = []
    # ...so dropping the old key later loses nothing.
    assert store.lookup_job("r").args == (5,)
    add(store, "stale")
    DjangoJob.objects.filter(id="stale").update(
        job_state=signing.PREFIX + signing._signature(PAYLOAD, "key-0") + b"$" + PAYLOAD
    )
    assert store.lookup_job("stale") is None
    assert "does not match" in DjangoJob.objects.get(id="stale").restore_error


def test_unsigned_rows_are_refused_while_signing_is_on(store):
    add(store, "u")
    state = bytes(DjangoJob.objects.get(id="u").job_state)
    DjangoJob.objects.filter(id="u").update(job_state=signing.verify(state))
    assert store.lookup_job("u") is None
    assert "not signed" in DjangoJob.objects.get(id="u").restore_error
