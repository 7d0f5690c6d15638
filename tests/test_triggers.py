"""The expected interval that lets one alert rule fit every job, weekends included."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from django_apscheduler_obs.triggers import describe, expected_interval

pytestmark = pytest.mark.once
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)  # a Monday


@pytest.mark.parametrize(
    ("trigger", "seconds"),
    [
        (IntervalTrigger(minutes=5), 300),
        (IntervalTrigger(seconds=10, jitter=3), 13),
        (CronTrigger(hour=3, timezone="UTC"), 86400),
        # Friday 09:00 to Monday 09:00 is the largest gap: no alert over a weekend.
        (CronTrigger(day_of_week="mon-fri", hour=9, timezone="UTC"), 259200),
        (CronTrigger(day_of_week="mon", hour=0, timezone="UTC"), 604800),
        (CronTrigger(minute="*/15", timezone="UTC"), 900),
        (CronTrigger(day=1, hour=0, timezone="UTC"), 31 * 86400),
        (
            OrTrigger([CronTrigger(hour=6, timezone="UTC"), CronTrigger(hour=18, timezone="UTC")]),
            43200,
        ),
    ],
)
def test_expected_interval_is_the_largest_gap(trigger, seconds):
    assert expected_interval(trigger, NOW) == seconds
    assert expected_interval(trigger) == seconds  # cached path


def test_a_first_fire_in_the_repeated_hour_of_a_dst_end_does_not_stop_the_walk():
    # New York's DST ends at 02:00 on Sunday 7 November 2027; 01:00 happens twice, and
    # APScheduler answers 01:00 EST again from 01:00 EST. The walk must go on to the next
    # weekend and then to next November: the largest gap is 30 November to 6 November.
    trigger = CronTrigger(
        month=11, day_of_week="sat,sun", hour=1, minute="*", timezone="America/New_York"
    )
    last = datetime(2027, 11, 28, 6, 59, tzinfo=timezone.utc)  # Sun 01:59 EST
    first = datetime(2028, 11, 4, 5, 0, tzinfo=timezone.utc)  # Sat 01:00 EDT
    assert expected_interval(trigger, NOW) == (first - last).total_seconds()


def test_one_off_jobs_have_no_interval():
    assert expected_interval(DateTrigger(datetime(2030, 1, 1, tzinfo=timezone.utc))) is None


def test_describe_in_words():
    assert describe(IntervalTrigger(minutes=5)) == "every 5 min"
    assert describe(IntervalTrigger(seconds=90)) == "every 90 s"
    assert describe(CronTrigger(day_of_week="mon-fri", hour=9, timezone="UTC")) == (
        "Mon-Fri at 09:00 UTC"
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"hour": 3}, "every day at 03:00 UTC"),
        ({"hour": 3, "timezone": "Europe/Paris"}, "every day at 03:00 Europe/Paris"),
        ({"day_of_week": "sat,sun", "hour": 10, "minute": 30}, "Sat,Sun at 10:30 UTC"),
        ({"day": 1, "hour": 0}, "monthly on day 1 at 00:00 UTC"),
        ({"minute": 15}, "every hour at :15"),
        ({"minute": 15, "second": 30}, "every hour at :15:30"),
        ({"minute": "*/5"}, "every 5 min"),
        ({"second": 0}, "every minute"),
        # the rest field by field, implied fields shown: "hour=9" is not every minute of 9 h
        ({"day_of_week": "0-4", "hour": 9}, "cron day_of_week=0-4 hour=9 minute=0 second=0"),
        ({"hour": "9-17", "minute": "*/5"}, "cron hour=9-17 minute=*/5 second=0"),
        ({"month": 1, "day": 1}, "cron month=1 day=1 hour=0 minute=0 second=0"),
        ({"day": 1, "day_of_week": "mon"}, "cron day=1 day_of_week=mon hour=0 minute=0 second=0"),
        ({"second": 30}, "cron second=30"),
    ],
)
def test_describe_cron_in_words_where_the_shape_is_usual(fields, words):
    assert describe(CronTrigger(**{"timezone": "UTC", **fields})) == words
