"""Test settings: SQLite by default, ``DATABASE_URL`` for PostgreSQL or MariaDB."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import dj_database_url

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_apscheduler_obs",
    "django_tasks_db",  # real Tasks backends with workers, for runs on workers:
    "django_rq",  # the database one and a Redis one (django-tasks-rq)
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

_sqlite_dir = Path(os.environ.get("TEST_SQLITE_DIR", tempfile.gettempdir()))
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{_sqlite_dir / 'dao-tests.sqlite3'}"),
        # 0: worker threads close their connection after each run, so no session outlives
        # a test (a live session blocks dropping the PostgreSQL test database).
        conn_max_age=0,
    )
}
# Several test runs may share one server (parallel work, CI): separate test databases.
_suffix = os.environ.get("TEST_DB_SUFFIX") or f"p{os.getpid()}"
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not :memory:, so executor and lease threads share it like a real deployment.
    DATABASES["default"]["TEST"] = {"NAME": str(_sqlite_dir / f"dao-test-{os.getpid()}.sqlite3")}
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_dao_{_suffix}"}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/static/"
# Workers close their connection after each run, so no session outlives a test.
APSCHEDULER_WORKER_CONN_MAX_AGE = 0
APSCHEDULER_AUTODISCOVER = False

# Django's Tasks framework (django.tasks on Django >= 6.0, the django-tasks backport before):
# "default" runs a task inside enqueue (a real engine, in-process); "held" keeps it; "db"
# queues it in the database for ``manage.py db_worker``.
try:
    import django.tasks  # noqa: F401

    _TASKS = "django.tasks"
except ImportError:
    _TASKS = "django_tasks"
TASKS = {
    "default": {"BACKEND": f"{_TASKS}.backends.immediate.ImmediateBackend"},
    # keeps what is enqueued, runs nothing: the test plays the worker
    "held": {"BACKEND": f"{_TASKS}.backends.dummy.DummyBackend", "QUEUES": []},
    "db": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []},  # any queue name
    "rq": {"BACKEND": "django_tasks_rq.RQBackend", "QUEUES": ["dao-rq"]},
}
# django-rq reads its queues once, at import: one fixed queue on its own Redis database.
RQ_QUEUES = {"dao-rq": {"HOST": "127.0.0.1", "PORT": 6379, "DB": 13}}
