"""Property tests: declarations round-trip through the job store, signatures hold, and the
expected interval of a cron trigger bounds every real gap between its fire times."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from django_apscheduler_obs import signing, triggers
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import DjangoJob
from django_apscheduler_obs.registry import registry, sync_jobs

FUNC = "tests.jobs:accept_anything"
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ----------------------------------------------------------------------------

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
args_strategy = st.lists(json_like, max_size=3).map(tuple)
kwargs_strategy = st.dictionaries(
    st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True), json_like, max_size=3
)


def _cron_field(lo: int, hi: int) -> st.SearchStrategy[str]:
    value = st.integers(lo, hi)
    return st.one_of(
        st.just("*"),
        value.map(str),
        st.integers(1, max(1, (hi - lo) // 2)).map(lambda n: f"*/{n}"),
        st.tuples(value, value).map(lambda ab: f"{min(ab)}-{max(ab)}"),
        st.lists(value, min_size=1, max_size=3, unique=True).map(
            lambda vs: ",".join(map(str, sorted(vs)))
        ),
    )


DAYS_OF_WEEK = st.sampled_from(["*", "mon-fri", "sat,sun", "mon", "fri", "tue,thu", "0-4"])
cron_fields = st.fixed_dictionaries(
    {},
    optional={
        "second": _cron_field(0, 59),
        "minute": _cron_field(0, 59),
        "hour": _cron_field(0, 23),
        "day": _cron_field(1, 28),
        "month": _cron_field(1, 12),
        "day_of_week": DAYS_OF_WEEK,
    },
)
interval_fields = st.fixed_dictionaries(
    {},
    optional={
        "weeks": st.integers(0, 3),
        "days": st.integers(0, 6),
        "hours": st.integers(0, 23),
        "minutes": st.integers(0, 59),
        "seconds": st.integers(0, 59),
    },
).filter(lambda f: any(f.values()))
date_fields = st.builds(
    lambda s: {
        "run_date": datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=s)
    },
    st.integers(60, 10 * 365 * 86400),
)
TIMEZONES = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"])
declarations = st.one_of(
    st.tuples(st.just("interval"), interval_fields),
    st.tuples(st.just("cron"), cron_fields),
    st.tuples(st.just("date"), date_fields),
)


# -- declarations round-trip through the registry and the job store ------------------------


@pytest.fixture
def store():
    scheduler = BackgroundScheduler(timezone="UTC")
    jobstore = DjangoJobStore()
    scheduler.add_jobstore(jobstore, "default")
    scheduler.start(paused=True)
    yield scheduler, jobstore
    scheduler.shutdown(wait=False)


@pytest.mark.django_db
@PROPERTY
@given(
    declaration=declarations,
    tz=TIMEZONES,
    args=args_strategy,
    kwargs=kwargs_strategy,
)
def test_declaration_round_trips_through_the_job_store(store, declaration, tz, args, kwargs):
    scheduler, jobstore = store
    kind, fields = declaration
    job_id = f"prop-{uuid.uuid4().hex[:12]}"
    registry.reset()
    registry._discovered = True
    try:
        spec = registry.add(FUNC, kind, id=job_id, args=args, kwargs=kwargs, timezone=tz, **fields)
    except Exception as exc:  # a trigger that never fires is refused (cron "31 2"): fine
        assume(False)
        raise AssertionError from exc
    before = datetime.now(timezone.utc)
    report = sync_jobs(scheduler)
    after = datetime.now(timezone.utc)
    assert report["added"] == [job_id]
    # The sync asks the trigger at its own "now", somewhere in [before, after]: a trigger
    # that fires every second may move on by one fire time while the sync runs.
    earliest = spec.trigger.get_next_fire_time(None, before)
    latest = spec.trigger.get_next_fire_time(None, after)

    job = jobstore.lookup_job(job_id)
    assert job is not None
    assert job.func_ref == FUNC
    assert job.args == args and job.kwargs == kwargs
    assert type(job.trigger) is type(spec.trigger)
    if kind == "interval":  # its start is "now + interval" when declared: compare the rest
        state = {k: v for k, v in job.trigger.__getstate__().items() if k != "start_date"}
        spec_state = {k: v for k, v in spec.trigger.__getstate__().items() if k != "start_date"}
        assert state == spec_state
    else:
        assert job.trigger.__getstate__() == spec.trigger.__getstate__()
        assert earliest is not None and job.next_run_time is not None
        assert earliest <= job.next_run_time and (latest is None or job.next_run_time <= latest)
    # The indexed column agrees with the pickled state (what get_due_jobs selects on).
    row = DjangoJob.objects.get(id=job_id)
    assert row.next_run_time == job.next_run_time
    if kind != "date":  # an aware run_date keeps its own zone
        assert str(job.next_run_time.tzinfo) == tz
    # A second sync (a restart) changes nothing: same definition hash, same next run.
    registry.reset()
    registry._discovered = True
    registry.add(FUNC, kind, id=job_id, args=args, kwargs=kwargs, timezone=tz, **fields)
    assert sync_jobs(scheduler)["unchanged"] == [job_id]
    assert DjangoJob.objects.get(id=job_id).next_run_time == row.next_run_time
    assert jobstore.lookup_job(job_id).args == args


# -- signing -------------------------------------------------------------------------------


@pytest.mark.once
@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=512), data=st.data())
def test_signing_round_trips_and_no_tampered_payload_is_accepted(payload, data):
    signed = signing.sign(payload)
    assert signing.verify(signed) == payload
    assert signing.resign(signed) == signed
    if not signing.is_signed(payload):  # job states are pickles: they start with b"\x80"
        assert signing.resign(payload) == signed
    i = data.draw(st.integers(0, len(signed) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    tampered = signed[:i] + bytes([signed[i] ^ (1 << bit)]) + signed[i + 1 :]
    try:
        accepted = signing.verify(tampered)
    except signing.BadSignature:
        return
    # Only the "$" separator is not covered by the MAC; what is unpickled is still exactly
    # the signed payload.
    assert i == len(signing.PREFIX) + 64 and accepted == payload


@pytest.mark.once
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=64), old=st.text(min_size=1), new=st.text(min_size=1))
def test_a_rotated_key_verifies_through_the_fallbacks_only(settings, payload, old, new):  # noqa: F811
    assume(old != new)
    settings.SECRET_KEY = old
    signed = signing.sign(payload)
    settings.SECRET_KEY = new
    settings.SECRET_KEY_FALLBACKS = [old]
    assert signing.verify(signed) == payload
    settings.SECRET_KEY_FALLBACKS = []
    with pytest.raises(signing.BadSignature):
        signing.verify(signed)


# -- the expected interval bounds every real gap --------------------------------------------

# Coarse enough that a week of fire times stays cheap to walk (>= one per minute).
coarse_cron = st.fixed_dictionaries(
    {"second": st.just("0")},
    optional={
        "minute": _cron_field(0, 59),
        "hour": _cron_field(0, 23),
        "day": _cron_field(1, 28),
        "month": _cron_field(1, 12),
        "day_of_week": DAYS_OF_WEEK,
    },
)


@pytest.mark.once
@settings(max_examples=60, deadline=None)
@given(
    fields=coarse_cron,
    tz=TIMEZONES,
    offset_days=st.floats(0, 400),
)
def test_expected_interval_of_a_cron_trigger_bounds_every_actual_gap(fields, tz, offset_days):
    trigger = CronTrigger(timezone=tz, **fields)
    now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    expected = triggers.expected_interval(trigger, now)
    first = trigger.get_next_fire_time(None, now)
    assume(first is not None)
    assert expected is not None and expected > 0
    # Walk the real fire times over a sampled window (9 days: every weekday and a weekend),
    # the way the scheduler computes them (from the previous fire time).
    start = trigger.get_next_fire_time(None, now + timedelta(days=offset_days))
    assume(start is not None)
    previous = start
    end = start + max(timedelta(days=9), timedelta(seconds=2 * expected))
    steps = 0
    while previous < end and steps < 20_000:
        nxt = trigger.get_next_fire_time(previous, previous + timedelta(microseconds=1))
        if nxt is None:
            break
        gap = nxt.timestamp() - previous.timestamp()
        assert gap <= expected, (fields, tz, previous, nxt, gap, expected)
        previous = nxt
        steps += 1
