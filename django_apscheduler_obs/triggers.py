"""What a trigger promises: its largest gap between fire times, and a description in words.

The expected interval is exported per job so that *one* alert rule ("no success for twice the
expected interval") fits every job: a Mon-Fri 09:00 cron job has a largest gap of 72 h
(Friday to Monday), so it is not alerted on over a weekend, while a daily job is after 48 h.
"""

from __future__ import annotations

import itertools
import pickle
import re
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
    largest = _cron_largest_gap if isinstance(trigger, CronTrigger) else _simulate
    if now is not None:
        return largest(trigger, now)
    try:
        key = pickle.dumps(trigger.__getstate__(), 4)
    except Exception:
        return largest(trigger, None)
    if key not in _cache:
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = largest(trigger, None)
    return _cache[key]


_cache: dict[bytes, float | None] = {}
DAY_HORIZON = timedelta(days=28 * 366)  # the calendar repeats (weekday x date) every 28 years
MAX_ACTIVE_DAYS = 1000  # ... and daily jobs show every weekly and monthly gap within 1000 days


def _allowed(trigger: CronTrigger, name: str, upper: int) -> list[int]:
    """Values of the second, minute or hour field that fire (independent of the date)."""
    field = next(f for f in trigger.fields if f.name == name)

    def at(v: int) -> datetime:
        pick = {name: v}
        return datetime(
            2001, 1, 1, pick.get("hour", 0), pick.get("minute", 0), pick.get("second", 0)
        )

    return [v for v in range(upper) if field.get_next_value(at(v)) == v]


def _cron_largest_gap(trigger: CronTrigger, now: datetime | None) -> float | None:
    """The largest gap of a cron trigger, exactly, without walking every fire time.

    Fire times are the active days x one time-of-day pattern (hours x minutes x seconds). A
    gap is either inside that pattern (consecutive seconds, minutes or hours), or from the
    last fire time of an active day to the first one of the next active day, found by walking
    active days only (so an every-minute Mon-Fri job gets its 2-day weekend gap, which a walk
    over its first 1000 fire times never reaches). DST can stretch a gap inside the day by an
    hour: in a zone with DST the in-day part gets one hour more (an upper bound is what an
    alert threshold needs).
    """
    jitter = float(trigger.jitter or 0)
    seconds = _allowed(trigger, "second", 60)
    minutes = _allowed(trigger, "minute", 60)
    hours = _allowed(trigger, "hour", 24)
    if not (seconds and minutes and hours):
        return None
    in_day = 0.0
    for values, unit, inner_first, inner_last in (
        (seconds, 1, 0, 0),
        (minutes, 60, seconds[0], seconds[-1]),
        (hours, 3600, minutes[0] * 60 + seconds[0], minutes[-1] * 60 + seconds[-1]),
    ):
        steps = [b - a for a, b in itertools.pairwise(values)]
        if steps:
            in_day = max(in_day, max(steps) * unit + inner_first - inner_last)
    if in_day and _has_dst(trigger, now):
        in_day += 3600

    def day_trigger(hour: int, minute: int, second: int) -> CronTrigger:
        fields = {f.name: str(f) for f in trigger.fields if f.name in _DATE_FIELDS}
        return CronTrigger(
            **fields,
            hour=hour,
            minute=minute,
            second=second,
            start_date=trigger.start_date,
            end_date=trigger.end_date,
            timezone=trigger.timezone,
        )

    first_of_day = day_trigger(hours[0], minutes[0], seconds[0])
    last_of_day = day_trigger(hours[-1], minutes[-1], seconds[-1])
    now = now or datetime.now(timezone.utc)
    end = now + DAY_HORIZON
    day = first_of_day.get_next_fire_time(None, now)
    between_days = 0.0
    count = 0
    while day is not None and day < end and count < MAX_ACTIVE_DAYS:
        nxt = first_of_day.get_next_fire_time(day, day + timedelta(microseconds=1))
        if nxt is not None and nxt <= day:
            # APScheduler 3 can answer the same instant again in the repeated hour at a DST
            # end (01:00 EST after 01:00 EDT): the day's next first fire is a day away.
            nxt = first_of_day.get_next_fire_time(None, day + timedelta(hours=1))
        if nxt is None:
            break
        last = last_of_day.get_next_fire_time(None, day)
        if last is not None and last < nxt:
            between_days = max(between_days, nxt.timestamp() - last.timestamp())
        day = nxt
        count += 1
    largest = max(in_day, between_days)
    return largest + jitter if largest else None


_DATE_FIELDS = ("year", "month", "day", "week", "day_of_week")


def _has_dst(trigger: CronTrigger, now: datetime | None) -> bool:
    tz = trigger.timezone
    start = now or datetime.now(timezone.utc)
    offsets = {(start + timedelta(days=d)).astimezone(tz).utcoffset() for d in range(0, 366, 30)}
    return len(offsets) > 1


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
        largest = max(largest, nxt.timestamp() - previous.timestamp())  # across DST too
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
        words = _cron_words(trigger)
        if words:
            return words
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


def _cron_words(trigger: CronTrigger) -> str | None:
    """Words for the usual shapes (daily, some weekdays, monthly, hourly at a fixed time);
    None for the rest, which are shown field by field."""
    f = {field.name: str(field) for field in trigger.fields}
    if f["year"] != "*" or f["month"] != "*" or f["week"] != "*":
        return None
    day, dow = f["day"], f["day_of_week"]
    if f["second"] == "0" and f["hour"] == "*" and day == dow == "*":
        step = re.fullmatch(r"\*(?:/(\d+))?", f["minute"])  # "*" or "*/5": aligned to the clock
        if step:
            return f"every {step.group(1)} min" if step.group(1) else "every minute"
    if not (f["minute"].isdigit() and f["second"].isdigit()):
        return None
    minute, second = int(f["minute"]), int(f["second"])
    sec = f":{second:02d}" if second else ""
    if f["hour"] == "*":
        return f"every hour at :{minute:02d}{sec}" if day == dow == "*" else None
    if not f["hour"].isdigit():
        return None
    at = f"at {int(f['hour']):02d}:{minute:02d}{sec} {trigger.timezone}"
    if day == "*" and dow == "*":
        return f"every day {at}"
    if day == "*" and re.fullmatch(r"[a-z]{3}([-,][a-z]{3})*", dow):
        return f"{re.sub(r'[a-z]{3}', lambda m: m.group().capitalize(), dow)} {at}"
    if day.isdigit() and dow == "*":
        return f"monthly on day {day} {at}"
    return None


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"
