"""System checks of runs on workers: ``APSCHEDULER_EXECUTORS`` and the executors jobs name.

Wrong settings must fail ``manage.py check`` with a stable id, not a run at 3 a.m.
"""

from __future__ import annotations

import pytest
from django.core import checks

from django_apscheduler_obs.registry import registry

pytestmark = pytest.mark.once


def _ids(settings_overrides: dict, settings) -> list[str]:
    for name, value in settings_overrides.items():
        setattr(settings, name, value)
    messages = checks.run_checks(tags=[checks.Tags.compatibility])
    return [m.id for m in messages if m.id and m.id.startswith("django_apscheduler_obs")]


CELERY_OK = {"ENGINE": "celery", "APP": "tests.celery_app:redis_app", "QUEUE": "jobs"}
TASKS_OK = {"ENGINE": "tasks", "BACKEND": "db", "QUEUE": "jobs"}


def test_valid_executors_pass(settings):
    assert _ids({"APSCHEDULER_EXECUTORS": {"c": CELERY_OK, "t": TASKS_OK}}, settings) == []


@pytest.mark.parametrize(
    ("executors", "code"),
    [
        ([], "E015"),
        ({"default": CELERY_OK}, "E015"),
        ({"w": {"APP": "x"}}, "E015"),
        ({"w": {"ENGINE": "rq"}}, "E015"),
        ({"w": {**CELERY_OK, "QUEUES": "typo"}}, "E015"),
        ({"w": {"ENGINE": "celery"}}, "E017"),
        ({"w": {"ENGINE": "celery", "APP": "tests.nowhere:app"}}, "E017"),
        ({"w": {"ENGINE": "celery", "APP": "tests.jobs:noop"}}, "E017"),
        ({"w": {"ENGINE": "tasks", "BACKEND": "missing"}}, "E017"),
    ],
)
def test_bad_executor_settings_fail_check(settings, executors, code):
    assert f"django_apscheduler_obs.{code}" in _ids({"APSCHEDULER_EXECUTORS": executors}, settings)


def test_a_tasks_queue_the_backend_refuses(settings):
    settings.TASKS = {**settings.TASKS, "strict": {**settings.TASKS["db"], "QUEUES": ["a"]}}
    executors = {"w": {"ENGINE": "tasks", "BACKEND": "strict", "QUEUE": "b"}}
    assert _ids({"APSCHEDULER_EXECUTORS": executors}, settings) == ["django_apscheduler_obs.E017"]


def test_a_job_naming_an_unconfigured_executor_fails_check(settings):
    registry.add("tests.jobs:noop", "interval", minutes=1, id="typo", executor="celry")
    ids = _ids({"APSCHEDULER_EXECUTORS": {"celery": CELERY_OK}}, settings)
    assert ids == ["django_apscheduler_obs.E018"]
    declared = [{"id": "s", "func": "tests.jobs:noop", "trigger": "date", "executor": "nope"}]
    assert "django_apscheduler_obs.E018" in _ids({"APSCHEDULER_JOBS": declared}, settings)


def test_job_defaults_may_name_a_configured_executor(settings):
    overrides = {
        "APSCHEDULER_EXECUTORS": {"celery": CELERY_OK},
        "APSCHEDULER_JOB_DEFAULTS": {"executor": "celery"},
    }
    assert _ids(overrides, settings) == []
    assert _ids({"APSCHEDULER_JOB_DEFAULTS": {"executor": "nowhere"}}, settings) == [
        "django_apscheduler_obs.E001"
    ]
