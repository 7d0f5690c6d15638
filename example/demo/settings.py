"""Settings of the demo project. SQLite by default; ``DATABASE_URL`` for PostgreSQL/MariaDB.

``DEMO_FAST=1`` shortens every interval (used by the end-to-end tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_apscheduler_obs",
    "demo",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "demo.urls"
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
WSGI_APPLICATION = "demo.wsgi.application"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        conn_max_age=600,
    )
}
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

FAST = os.environ.get("DEMO_FAST") == "1"
APSCHEDULER_HEARTBEAT_INTERVAL = 2 if FAST else 30
APSCHEDULER_TRACE_URL_TEMPLATE = os.environ.get(
    "DEMO_TRACE_URL", "http://localhost:3000/explore?traceId={trace_id}"
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"otel": {"()": "django_apscheduler_obs.sinks.tracing.TraceContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)-7s %(name)s%(otelTraceContext)s %(message)s"}
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["otel"]}
    },
    "root": {"handlers": ["console"], "level": os.environ.get("DEMO_LOG_LEVEL", "INFO")},
    "loggers": {"apscheduler": {"level": "WARNING"}},
}
# A small pool on purpose: demo_missed keeps it busy enough that some runs start late.
APSCHEDULER_MAX_WORKERS = 4

# Runs on workers: ``demo_on_worker`` runs on the executor "workers". By default that is
# Django's Tasks framework with its immediate backend (the task runs in the scheduler's
# enqueue thread: nothing else to start). With DEMO_CELERY_BROKER set (e.g.
# redis://127.0.0.1:6379/0), it is Celery: start a worker with
# ``celery -A demo worker -l INFO`` from example/ (README, "Running jobs on workers").
try:
    import django.tasks  # noqa: F401

    _IMMEDIATE = "django.tasks.backends.immediate.ImmediateBackend"
except ImportError:  # Django 5.2: the django-tasks backport
    _IMMEDIATE = "django_tasks.backends.immediate.ImmediateBackend"
TASKS = {"default": {"BACKEND": _IMMEDIATE}}
CELERY_BROKER_URL = os.environ.get("DEMO_CELERY_BROKER", "")
APSCHEDULER_EXECUTORS = {
    "workers": (
        {"ENGINE": "celery", "APP": "demo.celery:app"}
        if CELERY_BROKER_URL
        else {"ENGINE": "tasks", "BACKEND": "default"}
    )
}
