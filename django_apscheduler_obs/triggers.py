"""What a trigger promises: its largest gap between fire times, and a description in words.

The expected interval is exported per job so that *one* alert rule ("no success for twice the
expected interval") fits every job: a Mon-Fri 09:00 cron job has a largest gap of 72 h
(Friday to Monday), so it is not alerted on over a weekend, while a daily job is after 48 h.
"""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

MAX_FIRE_TIMES = 1000  # enough to see a weekly pattern even for every-10-minutes cron jobs
HORIZON = timedelta(days=400)  # a yearly cron job needs more than a year to show its gap


def expected_interval(trigger: BaseTrigger, now: datetime | None = None) -> float | None:
    """Largest gap (seconds) between consecutive fire times, plus jitter; None for one-offs."""
    if isinstance(trigger, DateTrigger):
        return None
    jitter = float(getattr(trigger, "jitter", None) or 0)
    if isinstance(trigger, IntervalTrigger):
        return trigger.interval.total_seconds() + jitter
    if now is not None:
        return _simulate(trigger, now)
    try:
        key = pickle.dumps(trigger.__getstate__(), 4)
    except Exception:
        return _simulate(trigger, None)
    if key not in _cache:
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = _simulate(trigger, None)
    return _cache[key]


_cache: dict[bytes, float | None] = {}


def _simulate(trigger: BaseTrigger, now: datetime | None) -> float | None:
    jitter = float(getattr(trigger, "jitter", None) or 0)
    if jitter:  # replay without randomness
        trigger = pickle.loads(pickle.dumps(trigger))
        trigger.jitter = None
    now = now or datetime.now(timezone.utc)
    end = now + HORIZON
    previous = trigger.get_next_fire_time(None, now)
    largest = 0.0
    count = 0
    while previous is not None and previous < end and count < MAX_FIRE_TIMES:
        nxt = trigger.get_next_fire_time(previous, previous + timedelta(microseconds=1))
        if nxt is None:
            break
        largest = max(largest, (nxt - previous).total_seconds())
        previous = nxt
        count += 1
    return largest + jitter if largest else None


def describe(trigger: BaseTrigger) -> str:
    """A short description for people (admin, status command)."""
    if isinstance(trigger, IntervalTrigger):
        return f"every {_duration(trigger.interval.total_seconds())}"
    if isinstance(trigger, DateTrigger):
        return f"once at {trigger.run_date:%Y-%m-%d %H:%M:%S %Z}"
    if isinstance(trigger, CronTrigger):
        # Fields after the first one set are implied (hour=9 means minute=0 second=0): show
        # them, so "hour=9" is not read as "every minute of 09:00".
        parts, started = [], False
        for f in trigger.fields:
            started = started or not f.is_default
            if started and str(f) != "*":
                parts.append(f"{f.name}={f}")
        text = " ".join(parts)
        return f"cron {text}" if text else "cron (every second)"
    return str(trigger)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"
