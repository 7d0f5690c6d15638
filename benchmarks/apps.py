from __future__ import annotations

from django.apps import AppConfig


class BenchmarksConfig(AppConfig):
    name = "benchmarks"
    label = "benchmarks"

    def ready(self) -> None:
        # django-apscheduler 0.7 and this package both name their unique constraint
        # "unique_job_executions". PostgreSQL and SQLite keep index names per schema, so the
        # two apps cannot be migrated into one database as shipped. The benchmark creates 0.7's
        # tables from its models (MIGRATION_MODULES = None, see settings.py) under a renamed
        # constraint: same columns, same indexes, same code, one different name.
        from django_apscheduler.models import DjangoJobExecution

        for constraint in DjangoJobExecution._meta.constraints:
            if constraint.name == "unique_job_executions":
                constraint.name = "legacy_unique_job_executions"
