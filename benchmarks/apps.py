from __future__ import annotations

from django.apps import AppConfig


class BenchmarksConfig(AppConfig):
    name = "benchmarks"
    label = "benchmarks"

    def ready(self) -> None:
        # The benchmark creates 0.7's tables from its models (MIGRATION_MODULES = None, see
        # settings.py). Its constraint is renamed because this package once used the same name
        # ("unique_job_executions"; index names are per schema); harmless now that ours is
        # "dao_exec_unique_job_run_time". Same columns, same indexes, same code.
        from django_apscheduler.models import DjangoJobExecution

        for constraint in DjangoJobExecution._meta.constraints:
            if constraint.name == "unique_job_executions":
                constraint.name = "legacy_unique_job_executions"
