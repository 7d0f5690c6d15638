"""The admin: job health at a glance and the execution history, without N+1 queries.

The job list is one query whatever the number of jobs (last status, last success and average
duration are subqueries on the ``(job, status, run_time)`` index). The execution list never
counts or DISTINCTs the whole table: its count is capped and its filters read the job table.
"""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from functools import cached_property
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db.models import Avg, OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from django_apscheduler_obs import signing, triggers, util
from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution

COUNT_CAP = 10_000  # the execution list says "10,000+" instead of counting a huge table


def _executions(job_ref: Any = None) -> QuerySet[DjangoJobExecution]:
    qs = DjangoJobExecution.objects.all()
    return qs.filter(job_id=job_ref) if job_ref is not None else qs


@admin.register(DjangoJob)
class DjangoJobAdmin(admin.ModelAdmin):
    search_fields = ["id"]
    list_display = [
        "id",
        "trigger",
        "local_run_time",
        "paused",
        "last_status",
        "last_success",
        "average_duration",
        "restorable",
    ]
    readonly_fields = [
        "id",
        "next_run_time",
        "trigger",
        "func",
        "version",
        "registered_at",
        "restore_error",
    ]
    exclude = ["job_state"]
    ordering = ["next_run_time", "id"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[DjangoJob]:
        ref = OuterRef("pk")
        latest = _executions(ref).order_by("-run_time")
        success = latest.filter(status=DjangoJobExecution.SUCCESS)
        return (
            super()
            .get_queryset(request)
            .annotate(
                _last_status=Subquery(latest.values("status")[:1]),
                _last_success=Subquery(success.values("finished")[:1]),
                _avg_duration=Subquery(
                    _executions(ref)
                    .filter(status=DjangoJobExecution.SUCCESS)
                    .order_by()
                    .values("job_id")
                    .annotate(avg=Avg("duration"))
                    .values("avg")[:1]
                ),
            )
        )

    @staticmethod
    def _job(obj: DjangoJob) -> Any:
        cache = obj.__dict__.setdefault("_restored", {})
        if "job" not in cache:
            try:
                cache["job"] = pickle.loads(signing.verify(bytes(obj.job_state)))  # noqa: S301
            except Exception:
                cache["job"] = None
        return cache["job"]

    @admin.display(description=_("trigger"))
    def trigger(self, obj: DjangoJob) -> str:
        state = self._job(obj)
        return triggers.describe(state["trigger"]) if state else "—"

    @admin.display(description=_("function"))
    def func(self, obj: DjangoJob) -> str:
        state = self._job(obj)
        return str(state["func"]) if state else "—"

    @admin.display(description=_("next run"), ordering="next_run_time")
    def local_run_time(self, obj: DjangoJob) -> str:
        if not obj.next_run_time:
            return "(paused)"
        text = util.get_local_dt_format(obj.next_run_time)
        if obj.next_run_time < timezone.now() - timedelta(seconds=60):
            return format_html('{} <strong style="color:#ba2121">{}</strong>', text, _("overdue"))
        return text

    @admin.display(description=_("paused"), boolean=True)
    def paused(self, obj: DjangoJob) -> bool:
        return obj.next_run_time is None

    @admin.display(description=_("last status"))
    def last_status(self, obj: DjangoJob) -> str:
        return getattr(obj, "_last_status", None) or "—"

    @admin.display(description=_("last success"))
    def last_success(self, obj: DjangoJob) -> str:
        ts = getattr(obj, "_last_success", None)
        if ts is None:
            return "—"
        return util.get_local_dt_format(datetime.fromtimestamp(float(ts), dt_timezone.utc))

    @admin.display(description=_("average duration (s)"))
    def average_duration(self, obj: DjangoJob) -> str:
        avg = getattr(obj, "_avg_duration", None)
        return "—" if avg is None else f"{float(avg):.3f}"

    @admin.display(description=_("restorable"), boolean=True)
    def restorable(self, obj: DjangoJob) -> bool:
        return not obj.restore_error


class CappedCountPaginator(Paginator):
    """Counts at most COUNT_CAP + 1 rows: a bounded statement on any table size."""

    @cached_property
    def count(self) -> int:
        return int(self.object_list.order_by()[: COUNT_CAP + 1].count())  # type: ignore[attr-defined]


class JobFilter(admin.SimpleListFilter):
    """Job choices come from the job table, not a DISTINCT over the history."""

    title = _("job")
    parameter_name = "job__id__exact"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(i, i) for i in DjangoJob.objects.order_by("id").values_list("id", flat=True)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(job_id=self.value()) if self.value() else queryset


@admin.register(DjangoJobExecution)
class DjangoJobExecutionAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "job_id",
        "html_status",
        "local_run_time",
        "start_delay_s",
        "duration_text",
        "trace",
    ]
    list_filter = [JobFilter, "status", ("run_time", admin.DateFieldListFilter)]
    readonly_fields = [f.name for f in DjangoJobExecution._meta.fields]
    show_full_result_count = False
    paginator = CappedCountPaginator
    list_per_page = 50

    def get_queryset(self, request: HttpRequest) -> QuerySet[DjangoJobExecution]:
        return super().get_queryset(request).defer("traceback")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("status"), ordering="status")
    def html_status(self, obj: DjangoJobExecution) -> str:
        colours = {
            DjangoJobExecution.SUCCESS: "green",
            DjangoJobExecution.SENT: "blue",
            DjangoJobExecution.ERROR: "red",
            DjangoJobExecution.MISSED: "orange",
            DjangoJobExecution.MAX_INSTANCES: "orange",
            DjangoJobExecution.ABANDONED: "red",
        }
        return format_html(
            '<span style="color:{}">{}</span>', colours.get(obj.status, "black"), obj.status
        )

    @admin.display(description=_("run time"), ordering="run_time")
    def local_run_time(self, obj: DjangoJobExecution) -> str:
        return util.get_local_dt_format(obj.run_time)

    @admin.display(description=_("start delay (s)"))
    def start_delay_s(self, obj: DjangoJobExecution) -> str:
        return "—" if obj.start_delay is None else f"{obj.start_delay:.3f}"

    @admin.display(description=_("duration (s)"))
    def duration_text(self, obj: DjangoJobExecution) -> str:
        return "—" if obj.duration is None else f"{float(obj.duration):.3f}"

    @admin.display(description=_("trace"))
    def trace(self, obj: DjangoJobExecution) -> str:
        if not obj.trace_id or not conf.TRACE_URL_TEMPLATE:
            return obj.trace_id[:8] if obj.trace_id else "—"
        url = conf.TRACE_URL_TEMPLATE.format(trace_id=obj.trace_id, span_id=obj.span_id)
        return format_html(
            '<a href="{}" target="_blank" rel="noopener">{}</a>', url, obj.trace_id[:8]
        )
