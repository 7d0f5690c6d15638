"""Every setting is validated by a system check with a stable id."""

from __future__ import annotations

import pytest
from django.core import checks
from django.test import override_settings

from django_apscheduler_obs.checks import check_settings

pytestmark = pytest.mark.once


def ids(**overrides) -> list[str]:
    with override_settings(**overrides):
        return sorted({m.id for m in check_settings()})


def test_defaults_are_clean():
    assert check_settings() == []


def test_registered_with_django():
    messages = checks.run_checks(tags=[checks.Tags.compatibility])
    assert not [m for m in messages if m.id.startswith("django_apscheduler_obs")]
    with override_settings(APSCHEDULER_MAX_WORKERS=0):
        messages = checks.run_checks()
    assert "django_apscheduler_obs.E002" in {m.id for m in messages}


CASES = [
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": {"misfire": 1}}),
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": {"misfire_grace_time": 0}}),
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": {"misfire_grace_time": 1.5}}),
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": {"max_instances": 0}}),
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": {"coalesce": "yes"}}),
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": {"executor": "processpool"}}),
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": "coalesce"}),
    ("E001", {"APSCHEDULER_JOB_DEFAULTS": None}),
    ("E002", {"APSCHEDULER_MAX_WORKERS": 0}),
    ("E002", {"APSCHEDULER_MAX_WORKERS": "10"}),
    ("E002", {"APSCHEDULER_MAX_WORKERS": True}),
    ("E003", {"APSCHEDULER_EXECUTION_RETENTION": -1}),
    ("E003", {"APSCHEDULER_EXECUTION_RETENTION": "7d"}),
    ("E004", {"APSCHEDULER_CLEANUP_INTERVAL": 0}),
    ("E004", {"APSCHEDULER_CLEANUP_BATCH_SIZE": 0}),
    ("E004", {"APSCHEDULER_CLEANUP_BATCH_SIZE": 10.5}),
    ("E005", {"APSCHEDULER_LEASE_TTL": 10, "APSCHEDULER_LEASE_RENEW_INTERVAL": 5}),
    ("E006", {"APSCHEDULER_LEASE_TTL": 0}),
    ("E006", {"APSCHEDULER_LEASE_RENEW_INTERVAL": -1}),
    ("E006", {"APSCHEDULER_STANDBY_POLL_INTERVAL": "2"}),
    ("E006", {"APSCHEDULER_CHANGE_POLL_INTERVAL": 0}),
    ("E006", {"APSCHEDULER_MAX_SLEEP": None}),
    ("E006", {"APSCHEDULER_HEARTBEAT_INTERVAL": 0}),
    ("E006", {"APSCHEDULER_RUN_NOW_TIMEOUT": 0}),
    ("E006", {"APSCHEDULER_SHUTDOWN_TIMEOUT": -1}),
    ("E007", {"APSCHEDULER_TIMEZONE": "Mars/Olympus_Mons"}),
    ("E007", {"APSCHEDULER_TIMEZONE": "../../etc/passwd"}),
    ("E008", {"APSCHEDULER_DURATION_BUCKETS": []}),
    ("E008", {"APSCHEDULER_DURATION_BUCKETS": [1, 0.5]}),
    ("E008", {"APSCHEDULER_DELAY_BUCKETS": [0, 1]}),
    ("E008", {"APSCHEDULER_DELAY_BUCKETS": [1, 1]}),
    ("E008", {"APSCHEDULER_DELAY_BUCKETS": 5}),
    ("E009", {"APSCHEDULER_MAX_JOB_SERIES": 0}),
    ("E009", {"APSCHEDULER_MAX_ERROR_TYPES": -3}),
    ("E010", {"APSCHEDULER_JOBS": {"id": "x"}}),
    ("E010", {"APSCHEDULER_JOBS": [{"trigger": "interval", "id": "nofunc"}]}),
    ("E010", {"APSCHEDULER_JOBS": [{"func": "tests.jobs:noop", "trigger": "cron", "hour": 25}]}),
    ("E010", {"APSCHEDULER_JOBS": [{"func": "nope:f", "trigger": "interval", "seconds": 1}]}),
    (
        "E010",
        {
            "APSCHEDULER_JOBS": [
                {"func": "tests.jobs:noop", "trigger": "interval", "seconds": 1, "bogus_option": 1}
            ]
        },
    ),  # fmt: skip
    ("E011", {"APSCHEDULER_METRICS_BASIC_AUTH": ("user",)}),
    ("E011", {"APSCHEDULER_METRICS_BASIC_AUTH": ("user", "")}),
    ("E011", {"APSCHEDULER_METRICS_BASIC_AUTH": 5}),
    ("E012", {"APSCHEDULER_HISTORY_BUFFER_SIZE": 0}),
    ("E013", {"APSCHEDULER_GROUP": ""}),
    ("E013", {"APSCHEDULER_GROUP": "g" * 101}),
    ("E013", {"APSCHEDULER_GROUP": 5}),
    ("E014", {"APSCHEDULER_DATETIME_FORMAT": 5}),
    ("E014", {"APSCHEDULER_TRACE_URL_TEMPLATE": None}),
    ("E014", {"APSCHEDULER_GRAFANA_URL_TEMPLATE": 1}),
    ("E014", {"APSCHEDULER_SIGN_JOB_STATE": "yes"}),
    ("E014", {"APSCHEDULER_AUTODISCOVER": 1}),
    ("E014", {"APSCHEDULER_REMOVE_UNDECLARED_JOBS": "no"}),
    ("W001", {"APSCHEDULER_JOB_DEFAULTS": {"misfire_grace_time": 5}}),
]


@pytest.mark.parametrize(("code", "overrides"), CASES, ids=[f"{c}-{list(o)[0]}" for c, o in CASES])
def test_each_problem_has_its_stable_id(code, overrides):
    assert ids(**overrides) == [f"django_apscheduler_obs.{code}"]


def test_messages_name_the_setting_and_errors_are_errors():
    with override_settings(APSCHEDULER_MAX_WORKERS=0):
        (message,) = check_settings()
    assert isinstance(message, checks.Error)
    assert "APSCHEDULER_MAX_WORKERS" in message.msg
    with override_settings(APSCHEDULER_JOB_DEFAULTS={"misfire_grace_time": 5}):
        (warning,) = check_settings()
    assert isinstance(warning, checks.Warning) and not isinstance(warning, checks.Error)


def test_declared_job_errors_name_the_job():
    with override_settings(
        APSCHEDULER_JOBS=[{"func": "tests.jobs:noop", "trigger": "cron", "hour": 25, "id": "x25"}]
    ):
        (message,) = check_settings()
    assert "'x25'" in message.msg


def test_several_problems_are_all_reported():
    found = ids(
        APSCHEDULER_MAX_WORKERS=0,
        APSCHEDULER_TIMEZONE="Nowhere/Never",
        APSCHEDULER_GROUP="",
    )
    assert found == [
        "django_apscheduler_obs.E002",
        "django_apscheduler_obs.E007",
        "django_apscheduler_obs.E013",
    ]


def test_valid_non_default_values_are_clean():
    assert (
        ids(
            APSCHEDULER_JOB_DEFAULTS={"misfire_grace_time": None, "coalesce": False},
            APSCHEDULER_EXECUTION_RETENTION=None,
            APSCHEDULER_TIMEZONE="Europe/Berlin",
            APSCHEDULER_METRICS_BASIC_AUTH=("prom", "secret"),
            APSCHEDULER_DURATION_BUCKETS=[0.1, 1, 10],
            APSCHEDULER_SHUTDOWN_TIMEOUT=0,
            APSCHEDULER_JOBS=[
                {"func": "tests.jobs:noop", "trigger": "cron", "expression": "*/5 * * * *"}
            ],
        )
        == []
    )
