"""Benchmark settings: both schedulers' apps in one project, the database from BENCH_DB.

``BENCH_DB`` is ``sqlite`` (a file in a temporary directory), ``postgres`` or ``mariadb``
(database ``dao_bench``, created by the harness). ``BENCH_CONN_MAX_AGE`` defaults to Django's
own default, 0.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SECRET_KEY = "benchmarks-only"
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
    "django_apscheduler",
    "benchmarks.apps.BenchmarksConfig",
]
# 0.7's tables are created from its models, under a renamed constraint (benchmarks/apps.py).
MIGRATION_MODULES = {"django_apscheduler": None}
if os.environ.get("BENCH_WORKERS"):  # python -m benchmarks.workers
    try:
        import django_celery_beat  # noqa: F401
    except ImportError:
        pass
    else:
        INSTALLED_APPS.append("django_celery_beat")
SILENCED_SYSTEM_CHECKS = ["models.E032"]  # the constraint name both apps share (see apps.py)
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "benchmarks.urls"
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
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

DB_KIND = os.environ.get("BENCH_DB", "sqlite")
DB_NAME = os.environ.get("BENCH_DB_NAME", "dao_bench")
_conn_max_age = os.environ.get("BENCH_CONN_MAX_AGE", "0")
CONN_MAX_AGE = None if _conn_max_age in ("none", "None", "") else int(_conn_max_age)
if DB_KIND == "sqlite":
    if not os.environ.get("BENCH_SQLITE_DIR"):
        os.environ["BENCH_SQLITE_DIR"] = tempfile.mkdtemp(prefix="dao-bench-")
        os.environ["BENCH_SQLITE_DIR_OWNED"] = "1"  # python -m benchmarks removes it at exit
    _dir = Path(os.environ["BENCH_SQLITE_DIR"])  # subprocesses (RSS) open the same file
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(_dir / "bench.sqlite3"),
            "CONN_MAX_AGE": CONN_MAX_AGE,
        }
    }
elif DB_KIND == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DB_NAME,
            "USER": "postgres",
            "HOST": "127.0.0.1",
            "PORT": os.environ.get("BENCH_DB_PORT") or "5432",
            "CONN_MAX_AGE": CONN_MAX_AGE,
        }
    }
elif DB_KIND == "mariadb":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "NAME": DB_NAME,
            "USER": "root",
            "HOST": "127.0.0.1",
            "PORT": os.environ.get("BENCH_DB_PORT") or "3306",
            "CONN_MAX_AGE": CONN_MAX_AGE,
            "OPTIONS": {"charset": "utf8mb4"},
        }
    }
else:
    raise ValueError(f"BENCH_DB must be sqlite, postgres or mariadb, not {DB_KIND!r}")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
APSCHEDULER_AUTODISCOVER = False
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        # Thousands of runs per second: per-run INFO lines would be the benchmark.
        "apscheduler": {"level": "WARNING"},
        "django_apscheduler_obs": {"level": "WARNING"},
        "django_apscheduler": {"level": "WARNING"},
    },
}
