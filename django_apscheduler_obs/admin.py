"""The admin as a monitoring console: job health at a glance, run-now, pause/resume, history.

Constant queries whatever the number of jobs or rows:

* job list: one query for the page's jobs (last success is a subquery on the
  ``(job, status, run_time)`` index), one bulk query for their recent executions (a UNION ALL
  of one ``LIMIT`` per job, each an index range scan), from which success ratio, p95 and the
  sparkline are computed in Python, plus the scheduler's lease and instances;
* execution list: never counts or DISTINCTs the whole table (capped count, job filter read
  from the job table).

Run-now writes a ``RunRequest`` row for the active scheduler (``runnow.py``); it never runs a
job in the web process. Pause/resume write through ``DjangoJobStore`` (``control.py``) so the
stored state and the ``next_run_time`` column agree, and the leader is woken by the change
counter.
"""

from __future__ import annotations

import functools
import html
import math
import pickle
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from functools import cached_property
from typing import Any, NamedTuple
from urllib.parse import quote

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import quote as admin_quote
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connections, router
from django.db.models import F, OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse
from django.utils import dateformat, formats, timezone
from django.utils.html import conditional_escape, escape, format_html
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from django_apscheduler_obs import control, runnow, signing, triggers, util
from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.lease import current_leader
from django_apscheduler_obs.models import (
    DjangoJob,
    DjangoJobExecution,
    RunRequest,
    SchedulerInstance,
)
from django_apscheduler_obs.runs import TriggerSource

COUNT_CAP = 10_000  # the execution list says "more than 10,000" instead of counting on
RECENT_RUNS = 100  # the window of success ratio, p95 and the detail sparkline
LIST_SPARK_RUNS = 30  # bars in the job list's sparkline
DETAIL_TABLE_RUNS = 25  # rows in the job page's execution table
OVERDUE_GRACE = 60  # seconds past its next run before a job is flagged overdue
INSTANCE_STALE = 30  # seconds without a heartbeat before a scheduler instance is "stale"
BULK_PARTS = 200  # jobs per UNION ALL statement (SQLite allows 500 compound terms)

EX = DjangoJobExecution
FAILED_STATUSES = (EX.ERROR, EX.ABANDONED, EX.LOST)
RUNNING_STATUSES = (EX.SENT, *EX.REMOTE_PENDING)
STATUS_CLASS = {
    EX.SUCCESS: "ok",
    EX.SENT: "info",
    EX.QUEUED: "info",
    EX.PICKED_UP: "info",
    EX.ERROR: "error",
    EX.ABANDONED: "error",
    EX.LOST: "error",
    EX.MISSED: "warn",
    EX.MAX_INSTANCES: "warn",
}
STATUS_FILL = {"ok": "#2e7d32", "info": "#1565c0", "error": "#c62828", "warn": "#ef6c00"}
REQUEST_CLASS = {
    RunRequest.QUEUED: "info",
    RunRequest.RUNNING: "info",
    RunRequest.DONE: "ok",
    RunRequest.FAILED: "error",
    RunRequest.REFUSED: "warn",
}


# -- statistics over recent runs ----------------------------------------------------------


class Run(NamedTuple):
    """One execution as the console shows it: a plain row, not a model instance.

    A job page reads up to 100 runs per job (10,000 rows at 100 jobs); building model
    instances for them cost more than the query. ``duration`` is a float (only displayed).
    """

    id: int
    job_id: str
    status: str
    run_time: datetime | None  # None past the rows a page shows (``recent_executions``)
    duration: float | None
    exception: str | None
    start_delay: float | None = None
    trigger_source: str = ""
    trace_id: str = ""
    span_id: str = ""

    @property
    def pk(self) -> int:
        return self.id


LIST_FIELDS = Run._fields[:6]  # what the job list shows; the job page reads all of them


def recent_executions(
    job_ids: Sequence[str],
    limit: int = RECENT_RUNS,
    *,
    detail: bool = False,
    complete: int | None = None,
) -> dict[str, list[Run]]:
    """The ``limit`` newest executions of each job, newest first: one query per 200 jobs.

    Each part is ``WHERE job_id = %s ORDER BY run_time DESC LIMIT n``, a backward range scan
    of the unique ``(job_id, run_time)`` index, so the cost does not grow with the table.
    Wrapping each part in a derived table is what lets SQLite accept LIMIT in a UNION. The
    part is compiled once and repeated with each job's id: compiling it per job through the
    ORM was most of the page's time with little history.

    Only the first ``complete`` runs of each job (all if None) carry ``run_time`` and
    ``exception``; later ones only what success ratio and p95 read. Converting 10,000 run
    times from the database was a fifth of the job list's time with a large history.
    """
    result: dict[str, list[Run]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return result
    fields = Run._fields if detail else LIST_FIELDS
    complete = limit if complete is None else complete
    alias = router.db_for_read(DjangoJobExecution)
    connection = connections[alias]
    qn = connection.ops.quote_name
    marker = "\x00dao-job-id\x00"  # stands for the job id in the compiled part's parameters
    compiler = (
        DjangoJobExecution.objects.using(alias)
        .filter(job_id=marker)
        .order_by("-run_time")
        .values_list(*fields)[:limit]
        .query.get_compiler(alias)
    )
    part_sql, part_params = compiler.as_sql()
    slot = [i for i, p in enumerate(part_params) if p == marker]
    assert len(slot) == 1, part_params  # noqa: S101 - one job id per part, by construction
    before, after = list(part_params[: slot[0]]), list(part_params[slot[0] + 1 :])
    converters = [
        (i, convs, expr)
        for i, (convs, expr) in compiler.get_converters(
            [s[0] for s in compiler.select[: compiler.col_count]]
        ).items()
        if fields[i] != "duration"  # a float is all the page needs; Decimal costs per row
    ]
    job, run_time, duration, exception = (
        fields.index(f) for f in ("job_id", "run_time", "duration", "exception")
    )
    ids = list(result)
    with connection.cursor() as cursor:
        for start in range(0, len(ids), BULK_PARTS):
            chunk = ids[start : start + BULK_PARTS]
            union = " UNION ALL ".join(
                f"SELECT * FROM ({part_sql}) {qn(f'r{i}')}" for i in range(len(chunk))
            )
            params: list[Any] = []
            for job_id in chunk:
                params += [*before, job_id, *after]
            # Newest first across the parts, so each job's first rows are its newest ones.
            cursor.execute(
                f"SELECT * FROM ({union}) {qn('u')} ORDER BY {qn('run_time')} DESC",  # noqa: S608
                params,
            )
            for raw in cursor.fetchall():
                runs = result[raw[job]]
                row = list(raw)
                if len(runs) < complete:
                    for i, convs, expr in converters:
                        for convert in convs:
                            row[i] = convert(row[i], expr, connection)
                else:
                    row[run_time] = row[exception] = None
                if row[duration] is not None:
                    row[duration] = float(row[duration])
                runs.append(Run(*row))
    return result


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class RunStats:
    """What the admin shows about a job's recent runs (newest first).

    ``runs`` are ``Run`` rows or ``DjangoJobExecution`` instances: only their attributes are read.
    """

    runs: Sequence[Any] = field(default_factory=list)

    @property
    def last(self) -> Any:
        return self.runs[0] if self.runs else None

    @cached_property
    def finished(self) -> list[Any]:
        return [r for r in self.runs if r.status not in RUNNING_STATUSES]

    @cached_property
    def successes(self) -> int:
        return sum(1 for r in self.finished if r.status == EX.SUCCESS)

    @property
    def success_ratio(self) -> float | None:
        return self.successes / len(self.finished) if self.finished else None

    @cached_property
    def p95(self) -> float | None:
        return percentile((float(r.duration) for r in self.finished if r.duration is not None), 95)


class LocalTimes:
    """``util.get_local_dt_format`` for the many datetimes of one page, with the same output.

    The job list formats up to 3,300 datetimes (30 sparkline titles per job), and
    ``date_format`` resolves the format, splits it and translates month and a.m./p.m. names
    again each time. Here the format is resolved and split once and the time zone read once;
    a piece that depends only on the date, the hour and minute, or the second is kept per value.
    Make one per page (the language and time zone are those of its request).
    """

    # What each format character depends on: 1 the date, 2 the hour and minute, 3 the second;
    # anything else (4) is computed each time. 0 is literal text.
    DEPENDS = {**dict.fromkeys("bdDEFjlLmMnNoStwWyYz", 1), **dict.fromkeys("aAfgGhHiP", 2)}
    DEPENDS["s"] = 3

    def __init__(self) -> None:
        self.tz = timezone.get_current_timezone() if settings.USE_TZ else None
        # What util.get_local_dt_format passes to dateformat.format, split as it splits it,
        # then cut into runs of pieces that depend on the same thing ("N j, Y, " on the date),
        # each with its texts by value: (kind, [(is a format character, text)], texts).
        fmt = str(formats.get_format(util.get_dt_format()))
        self.runs: list[tuple[int, list[tuple[bool, str]], dict[int, str]]] = []
        for i, piece in enumerate(dateformat.re_formatchars.split(fmt)):
            if i % 2:
                kind, part = self.DEPENDS.get(piece, 4), (True, piece)
            elif piece:
                kind, part = 0, (False, dateformat.re_escaped.sub(r"\1", piece))
            else:
                continue
            if self.runs and (kind == 0 or kind == self.runs[-1][0] != 4):
                self.runs[-1][1].append(part)  # text goes with what precedes it
            else:
                self.runs.append((kind, [part], {}))

    def __call__(self, dt: datetime | None) -> str:
        """``dt`` in the current time zone and the configured format; "—" for None."""
        if not dt:
            return "—"
        if self.tz is not None and dt.utcoffset() is not None:
            dt = dt.astimezone(self.tz)
        keys = (0, dt.toordinal(), dt.hour * 60 + dt.minute, dt.second, 0)  # by kind
        df: dateformat.DateFormat | None = None
        out: list[str] = []
        for kind, parts, texts in self.runs:
            text = texts.get(keys[kind]) if kind != 4 else None
            if text is None:
                if df is None:
                    df = dateformat.DateFormat(dt)
                text = "".join(str(getattr(df, t)()) if char else t for char, t in parts)
                if kind != 4:
                    texts[keys[kind]] = text
            out.append(text)
        return "".join(out)


def _local(dt: datetime | None) -> str:
    return util.get_local_dt_format(dt) if dt else "—"


def _seconds(value: Any) -> str:
    """A duration for people: ``<1 ms``, ``420 ms``, ``2.35 s``, ``4.2 min``, ``1.5 h``."""
    if value is None:
        return "—"
    value = float(value)
    if value < 0.001:
        return "<1 ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.2f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def badge(text: str, kind: str, title: str = "") -> SafeString:
    # An f-string over conditional_escape: what format_html does, for three badges a row.
    return mark_safe(  # noqa: S308 - every value is escaped
        f'<span class="dao-badge dao-{conditional_escape(kind)}" '
        f'title="{conditional_escape(title)}">{conditional_escape(text)}</span>'
    )


def status_badge(status: str, title: str = "") -> SafeString:
    return badge(status, STATUS_CLASS.get(status, "muted"), title)


def ratio_badge(stats: RunStats) -> str:
    ratio = stats.success_ratio
    if ratio is None:
        return "—"
    kind = "ok" if ratio >= 0.99 else "warn" if ratio >= 0.9 else "error"
    return badge(f"{ratio:.0%}", kind, f"{stats.successes} of the last {len(stats.finished)} runs")


def sparkline(
    runs: Sequence[Any], bar: int = 3, height: int = 22, times: LocalTimes | None = None
) -> SafeString:
    """Inline SVG, oldest run left: bar height = duration, colour = outcome.

    Built as one string with every text escaped: 3,000 bars on a job list page were too many
    for ``format_html`` and ``date_format`` per bar.
    """
    if not runs:
        return mark_safe('<span class="dao-muted-text">no runs</span>')
    times = times or LocalTimes()
    ordered = list(reversed(runs))
    durations = [float(r.duration) if r.duration is not None else None for r in ordered]
    top = max((d for d in durations if d is not None), default=0.0)
    step = bar + 1
    rects = []
    for i, (run, duration) in enumerate(zip(ordered, durations, strict=True)):
        h = max(2, round(duration / top * (height - 1))) if duration and top else 2
        if run.status in FAILED_STATUSES and duration is None:
            h = height - 1  # a failure without timing still shows up
        fill = STATUS_FILL.get(STATUS_CLASS.get(run.status, ""), "#9e9e9e")
        title = html.escape(f"{times(run.run_time)}: {run.status}, {_seconds(duration)}")
        rects.append(
            f'<rect x="{i * step}" y="{height - h}" width="{bar}" height="{h}" fill="{fill}">'
            f"<title>{title}</title></rect>"
        )
    width = len(ordered) * step
    label = escape(_("last %(n)d runs") % {"n": len(ordered)})
    return mark_safe(  # noqa: S308 - the titles and the label are escaped above
        f'<svg class="dao-spark" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{label}">'
        + "".join(rects)
        + "</svg>"
    )


def scheduler_status(group: str | None = None) -> dict[str, Any]:
    """The leader's live lease and the known scheduler instances of ``group`` (2 queries)."""
    group = group or conf.GROUP
    leader = current_leader(group)
    stale_before = timezone.now() - timedelta(seconds=INSTANCE_STALE)
    instances = []
    for inst in SchedulerInstance.objects.filter(group=group).order_by("-is_leader", "identity"):
        instances.append(
            {
                "identity": inst.identity,
                "is_leader": bool(leader and leader["owner"] == inst.identity),
                "last_seen": inst.last_seen,
                "stale": inst.last_seen < stale_before,
            }
        )
    return {
        "group": group,
        "leader": leader,
        "standbys": [i for i in instances if not i["is_leader"] and not i["stale"]],
        "stale": [i for i in instances if i["stale"]],
    }


# -- jobs -----------------------------------------------------------------------------------


@dataclass
class Page:
    """What every row of one job list page shares: its clock and its date formatter."""

    now: datetime = field(default_factory=timezone.now)
    times: LocalTimes = field(default_factory=LocalTimes)


class JobChangeList(ChangeList):
    """Adds the recent runs of the page's jobs with one bulk query."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        jobs = list(self.result_list)  # evaluated once; the template reuses this cache
        runs = recent_executions([job.pk for job in jobs], complete=LIST_SPARK_RUNS)
        page = Page()
        for job in jobs:
            job._dao_stats = RunStats(runs[job.pk])
            job._dao_page = page


@functools.lru_cache(maxsize=1024)
def job_texts(job_state: bytes) -> tuple[str, str]:
    """The function and the trigger in words of a stored state; dashes if it cannot be read.

    Cached by the state's bytes (what was verified and unpickled): verifying, unpickling and
    describing 100 states was a tenth of the job list's time. A state changes when its job
    runs, so old entries simply age out.
    """
    try:
        state = pickle.loads(signing.verify(job_state))  # noqa: S301 - signature checked
    except Exception:
        return "—", "—"
    return str(state["func"]), triggers.describe(state["trigger"])


class JobStateFilter(admin.SimpleListFilter):
    title = _("state")
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("scheduled", _("scheduled")),
            ("paused", _("paused")),
            ("overdue", _("overdue")),
            ("unrestorable", _("unrestorable")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "scheduled":
            return queryset.filter(next_run_time__isnull=False)
        if value == "paused":
            return queryset.filter(next_run_time__isnull=True)
        if value == "overdue":
            cutoff = timezone.now() - timedelta(seconds=OVERDUE_GRACE)
            return queryset.filter(next_run_time__lt=cutoff)
        if value == "unrestorable":
            return queryset.exclude(restore_error="")
        return queryset


@admin.register(DjangoJob)
class DjangoJobAdmin(admin.ModelAdmin):
    search_fields = ["id"]
    list_display = [
        "id",
        "func",
        "trigger",
        "local_run_time",
        "paused",
        "last_outcome",
        "last_success",
        "success_ratio",
        "p95_duration",
        "recent_runs",
    ]
    list_filter = [JobStateFilter]
    fields = readonly_fields = (
        "id",
        "func",
        "trigger",
        "local_run_time",
        "version",
        "registered_at",
        "definition_hash",
        "restore_error",
    )
    ordering = [F("next_run_time").asc(nulls_last=True), "id"]  # paused jobs last everywhere
    actions = ["run_now", "pause_jobs", "resume_jobs"]

    class Media:
        css = {"all": ["django_apscheduler_obs/admin.css"]}

    # -- queries --------------------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[DjangoJob]:
        success = EX.objects.filter(job_id=OuterRef("pk"), status=EX.SUCCESS).order_by("-run_time")
        return (
            super()
            .get_queryset(request)
            .annotate(_last_success=Subquery(success.values("finished")[:1]))
        )

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return JobChangeList

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs come from code (``@scheduled_job``) or ``scheduler.add_job``

    def save_model(self, request: HttpRequest, obj: DjangoJob, form: Any, change: bool) -> None:
        """Never write the row from the (all read-only) form: ``obj.save()`` would put back a
        stale next run time and state over the leader's newer ones, past the version check.
        Jobs change through run-now, pause and resume, which go through the job store."""

    # -- columns --------------------------------------------------------------------------

    @staticmethod
    def _stats(obj: DjangoJob) -> RunStats:
        return getattr(obj, "_dao_stats", None) or RunStats()

    @staticmethod
    def _page(obj: DjangoJob) -> Page:
        return getattr(obj, "_dao_page", None) or Page()

    @admin.display(description=_("trigger"))
    def trigger(self, obj: DjangoJob) -> str:
        return job_texts(bytes(obj.job_state))[1]

    @admin.display(description=_("function"))
    def func(self, obj: DjangoJob) -> str:
        text = job_texts(bytes(obj.job_state))[0]
        if obj.restore_error:  # kept and skipped by the scheduler until fixed or removed
            return format_html(
                "{} {}", text, badge(str(_("cannot load")), "error", obj.restore_error)
            )
        return text

    @admin.display(description=_("next run"), ordering="next_run_time")
    def local_run_time(self, obj: DjangoJob) -> str:
        if not obj.next_run_time:
            return badge(str(_("paused")), "muted")
        page = self._page(obj)
        text = page.times(obj.next_run_time)
        late = page.now - obj.next_run_time
        if late > timedelta(seconds=OVERDUE_GRACE):
            return format_html(
                "{} {}",
                text,
                badge(str(_("overdue")), "error", f"{_seconds(late.total_seconds())} late"),
            )
        return text

    @admin.display(description=_("paused"), boolean=True)
    def paused(self, obj: DjangoJob) -> bool:
        return obj.next_run_time is None

    @admin.display(description=_("last outcome"))
    def last_outcome(self, obj: DjangoJob) -> str:
        last = self._stats(obj).last
        if last is None:
            return "—"
        return status_badge(last.status, last.exception or self._page(obj).times(last.run_time))

    @admin.display(description=_("last success"))
    def last_success(self, obj: DjangoJob) -> str:
        ts = getattr(obj, "_last_success", None)
        if ts is None:
            return "—"
        return self._page(obj).times(datetime.fromtimestamp(float(ts), dt_timezone.utc))

    @admin.display(description=_("success"))
    def success_ratio(self, obj: DjangoJob) -> str:
        return ratio_badge(self._stats(obj))

    @admin.display(description=_("p95"))
    def p95_duration(self, obj: DjangoJob) -> str:
        return _seconds(self._stats(obj).p95)

    @admin.display(description=_("recent runs"))
    def recent_runs(self, obj: DjangoJob) -> str:
        runs = self._stats(obj).runs[:LIST_SPARK_RUNS]
        return sparkline(runs, bar=2, times=self._page(obj).times)

    # -- pages ----------------------------------------------------------------------------

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra = {"dao_scheduler": scheduler_status(), **(extra_context or {})}
        return super().changelist_view(request, extra)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        job_id = unquote(object_id)
        runs = recent_executions([job_id], detail=True)[job_id]
        stats = RunStats(runs)
        requests = list(RunRequest.objects.filter(job_id=job_id)[:10])
        horizon = timezone.now() - timedelta(seconds=float(conf.RUN_NOW_TIMEOUT) + 5)
        pending = any(
            r.status in RunRequest.PENDING_STATUSES and r.requested_at > horizon for r in requests
        )
        dao = {
            "stats": stats,
            "sparkline": sparkline(runs, bar=4, height=40),
            "ratio": ratio_badge(stats),
            "p95": _seconds(stats.p95),
            "executions": [_execution_row(r) for r in runs[:DETAIL_TABLE_RUNS]],
            "requests": [_request_row(r) for r in requests],
            # A new URL each time: a refresh to the same URL with a #fragment would only
            # scroll (browsers treat it as a same-document navigation) and never reload.
            "refresh_url": f"{request.path}?refresh={time.monotonic_ns()}#run-now"
            if pending
            else "",
            "scheduler": scheduler_status(),
            "executions_url": reverse("admin:django_apscheduler_obs_djangojobexecution_changelist")
            + f"?job__id__exact={quote(job_id)}",
            "grafana_url": (
                conf.GRAFANA_URL_TEMPLATE.format(job_id=quote(job_id, safe=""))
                if conf.GRAFANA_URL_TEMPLATE
                else ""
            ),
            "recent_runs": RECENT_RUNS,
        }
        extra = {
            "dao": dao,
            # Nothing here is edited by a form: jobs change through the buttons above.
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("<path:object_id>/run-now/", wrap(self.run_now_view), name=f"{name}_run_now"),
            path("<path:object_id>/pause/", wrap(self.pause_view), name=f"{name}_pause"),
            path("<path:object_id>/resume/", wrap(self.resume_view), name=f"{name}_resume"),
            *super().get_urls(),
        ]

    def _job_url(self, job_id: str) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[admin_quote(job_id)],
        )

    def _object_for_change(self, request: HttpRequest, object_id: str) -> DjangoJob:
        obj = self.get_object(request, unquote(object_id))
        if obj is None or not self.has_change_permission(request, obj):
            # Same answer for "no such job" and "not yours to change": nothing leaks.
            raise PermissionDenied
        return obj

    def run_now_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self._object_for_change(request, object_id)
        self._report_requests(request, [runnow.request_run(obj.pk, _username(request))])
        return HttpResponseRedirect(self._job_url(obj.pk) + "#run-now")

    def pause_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self._object_for_change(request, object_id)
        self._pause_resume(request, [obj.pk], pause=True)
        return HttpResponseRedirect(self._job_url(obj.pk))

    def resume_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        obj = self._object_for_change(request, object_id)
        self._pause_resume(request, [obj.pk], pause=False)
        return HttpResponseRedirect(self._job_url(obj.pk))

    # -- actions --------------------------------------------------------------------------

    @admin.action(
        description=_("Run selected jobs now (on the active scheduler)"), permissions=["change"]
    )
    def run_now(self, request: HttpRequest, queryset: QuerySet[DjangoJob]) -> None:
        username = _username(request)
        ids = list(queryset.order_by("id").values_list("id", flat=True))
        self._report_requests(request, [runnow.request_run(job_id, username) for job_id in ids])

    @admin.action(description=_("Pause selected jobs"), permissions=["change"])
    def pause_jobs(self, request: HttpRequest, queryset: QuerySet[DjangoJob]) -> None:
        self._pause_resume(request, list(queryset.values_list("id", flat=True)), pause=True)

    @admin.action(description=_("Resume selected jobs"), permissions=["change"])
    def resume_jobs(self, request: HttpRequest, queryset: QuerySet[DjangoJob]) -> None:
        self._pause_resume(request, list(queryset.values_list("id", flat=True)), pause=False)

    def _report_requests(self, request: HttpRequest, requests: list[RunRequest]) -> None:
        queued = [r for r in requests if r.status == RunRequest.QUEUED]
        refused = [r for r in requests if r.status != RunRequest.QUEUED]
        if queued:
            self.message_user(
                request,
                ngettext(
                    "Run-now queued for %(ids)s; the active scheduler runs it within a second.",
                    "Run-now queued for %(ids)s; the active scheduler runs them within a second.",
                    len(queued),
                )
                % {"ids": ", ".join(r.job_id for r in queued)},
                messages.SUCCESS,
            )
        for message in dict.fromkeys(r.message for r in refused):
            ids = ", ".join(r.job_id for r in refused if r.message == message)
            self.message_user(request, f"Not run ({ids}): {message}", messages.ERROR)

    def _pause_resume(self, request: HttpRequest, job_ids: list[str], *, pause: bool) -> None:
        done: list[str] = []
        removed: list[str] = []
        for job_id in job_ids:
            try:
                job = control.pause_job(job_id) if pause else control.resume_job(job_id)
            except Exception as exc:  # unrestorable state, job removed meanwhile
                self.message_user(
                    request,
                    f"Could not change {job_id}: {type(exc).__name__}: {exc}",
                    messages.ERROR,
                )
                continue
            if not pause and job.next_run_time is None:
                removed.append(job_id)
            else:
                done.append(job_id)
        if done:
            verb = _("Paused") if pause else _("Resumed")
            self.message_user(request, f"{verb}: {', '.join(done)}.", messages.SUCCESS)
        if removed:
            self.message_user(
                request,
                f"{', '.join(removed)}: no run time left (a past one-off date); removed, "
                "as APScheduler does.",
                messages.WARNING,
            )


def _username(request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    return user.get_username() if user is not None else ""


def _trace_link(trace_id: str, span_id: str) -> str:
    if not trace_id:
        return "—"
    if not conf.TRACE_URL_TEMPLATE:
        return trace_id[:8]
    url = conf.TRACE_URL_TEMPLATE.format(trace_id=trace_id, span_id=span_id)
    return format_html('<a href="{}" target="_blank" rel="noopener">{}</a>', url, trace_id[:8])


def _execution_url(pk: Any) -> str:
    return reverse("admin:django_apscheduler_obs_djangojobexecution_change", args=[pk])


def _execution_row(run: Run) -> dict[str, Any]:
    return {
        "url": _execution_url(run.pk),
        "id": run.pk,
        "status": status_badge(run.status),
        "run_time": _local(run.run_time),
        "start_delay": _seconds(run.start_delay),
        "duration": _seconds(run.duration),
        "source": run.trigger_source,
        "trace": _trace_link(run.trace_id, run.span_id),
        "exception": run.exception or "",
    }


def _request_row(req: RunRequest) -> dict[str, Any]:
    return {
        "id": req.pk,
        "status": badge(req.status, REQUEST_CLASS.get(req.status, "muted")),
        "status_text": req.status,
        "requested_by": req.requested_by or "—",
        "requested_at": _local(req.requested_at),
        "execution_url": _execution_url(req.execution_id) if req.execution_id else "",
        "execution_id": req.execution_id,
        "message": req.message,
    }


# -- executions -----------------------------------------------------------------------------


class CappedCountPaginator(Paginator):
    """Counts at most COUNT_CAP + 1 rows: a bounded statement on any table size.

    The admin's ``count_cap`` makes the pagination template say "more than 10,000".
    """

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


class TriggerSourceFilter(admin.SimpleListFilter):
    """Fixed choices: a field filter would run SELECT DISTINCT over the whole history."""

    title = _("trigger source")
    parameter_name = "trigger_source"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(s.value, s.value) for s in TriggerSource]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(trigger_source=self.value()) if self.value() else queryset


class LargeTableAdmin(admin.ModelAdmin):
    """For tables that grow without bound: no facet counts, a capped paginator count."""

    if hasattr(admin, "ShowFacets"):  # Django >= 5.0
        # "Show counts" would COUNT the whole history once per filter choice.
        show_facets = admin.ShowFacets.NEVER
    count_cap = COUNT_CAP
    count_cap_text = f"{COUNT_CAP:,}"
    paginator = CappedCountPaginator
    show_full_result_count = False


@admin.register(DjangoJobExecution)
class DjangoJobExecutionAdmin(LargeTableAdmin):
    list_display = [
        "id",
        "job_id",
        "html_status",
        "local_run_time",
        "start_delay_s",
        "duration_text",
        "trigger_source",
        "worker_text",
        "trace",
    ]
    list_filter = [
        JobFilter,
        "status",
        TriggerSourceFilter,
        ("run_time", admin.DateFieldListFilter),
    ]
    fields = readonly_fields = (
        "job_link",
        "html_status",
        "local_run_time",
        "local_started",
        "start_delay_s",
        "duration_text",
        "local_finished",
        "trigger_source",
        "owner",
        "epoch",
        "worker_text",
        "local_enqueued_at",
        "local_picked_up_at",
        "queue_wait_s",
        "trace",
        "error_type",
        "exception_text",
        "traceback_text",
    )
    list_per_page = 50

    class Media:
        css = {"all": ["django_apscheduler_obs/admin.css"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet[DjangoJobExecution]:
        qs = super().get_queryset(request)
        match = getattr(request, "resolver_match", None)
        if match is not None and match.url_name and match.url_name.endswith("_changelist"):
            qs = qs.defer("traceback")  # the list never shows it
        return qs

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("job"))
    def job_link(self, obj: DjangoJobExecution) -> str:
        url = reverse(
            "admin:django_apscheduler_obs_djangojob_change", args=[admin_quote(obj.job_id)]
        )
        return format_html('<a href="{}">{}</a>', url, obj.job_id)

    @admin.display(description=_("status"), ordering="status")
    def html_status(self, obj: DjangoJobExecution) -> str:
        return status_badge(obj.status)

    @admin.display(description=_("run time"), ordering="run_time")
    def local_run_time(self, obj: DjangoJobExecution) -> str:
        return util.get_local_dt_format(obj.run_time)

    @admin.display(description=_("started"))
    def local_started(self, obj: DjangoJobExecution) -> str:
        return _local(obj.started)

    @admin.display(description=_("finished"))
    def local_finished(self, obj: DjangoJobExecution) -> str:
        if obj.finished is None:
            return "—"
        return _local(datetime.fromtimestamp(float(obj.finished), dt_timezone.utc))

    @admin.display(description=_("start delay"))
    def start_delay_s(self, obj: DjangoJobExecution) -> str:
        return _seconds(obj.start_delay)

    @admin.display(description=_("duration"))
    def duration_text(self, obj: DjangoJobExecution) -> str:
        return _seconds(obj.duration)

    @admin.display(description=_("trace"))
    def trace(self, obj: DjangoJobExecution) -> str:
        return _trace_link(obj.trace_id, obj.span_id)

    @admin.display(description=_("worker"))
    def worker_text(self, obj: DjangoJobExecution) -> str:
        """The worker that ran it; "scheduler" for a run in the scheduler's own pool."""
        if obj.worker:
            return obj.worker
        remote = (*EX.REMOTE_PENDING, EX.LOST)
        return "—" if obj.status in remote else gettext("scheduler")

    @admin.display(description=_("enqueued"))
    def local_enqueued_at(self, obj: DjangoJobExecution) -> str:
        return _local(obj.enqueued_at)

    @admin.display(description=_("picked up"))
    def local_picked_up_at(self, obj: DjangoJobExecution) -> str:
        return _local(obj.picked_up_at)

    @admin.display(description=_("queue wait"))
    def queue_wait_s(self, obj: DjangoJobExecution) -> str:
        return _seconds(obj.queue_wait)

    @admin.display(description=_("exception"))
    def exception_text(self, obj: DjangoJobExecution) -> str:
        if not obj.exception:
            return "—"
        return format_html('<pre class="dao-pre">{}</pre>', obj.exception)

    @admin.display(description=_("traceback"))
    def traceback_text(self, obj: DjangoJobExecution) -> str:
        if not obj.traceback:
            return "—"
        return format_html('<pre class="dao-pre dao-traceback">{}</pre>', obj.traceback)


# -- run-now requests -----------------------------------------------------------------------


@admin.register(RunRequest)
class RunRequestAdmin(LargeTableAdmin):
    list_display = [
        "id",
        "job_id",
        "html_status",
        "requested_by",
        "local_requested_at",
        "execution_link",
        "message",
    ]
    list_filter = ["status"]
    search_fields = ["job_id", "requested_by"]
    fields = readonly_fields = (
        "job_id",
        "group",
        "html_status",
        "requested_by",
        "local_requested_at",
        "traceparent",
        "handled_by",
        "handled_at",
        "execution_link",
        "message",
    )

    class Media:
        css = {"all": ["django_apscheduler_obs/admin.css"]}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("status"), ordering="status")
    def html_status(self, obj: RunRequest) -> str:
        return badge(obj.status, REQUEST_CLASS.get(obj.status, "muted"))

    @admin.display(description=_("requested at"), ordering="requested_at")
    def local_requested_at(self, obj: RunRequest) -> str:
        return _local(obj.requested_at)

    @admin.display(description=_("execution"))
    def execution_link(self, obj: RunRequest) -> str:
        if not obj.execution_id:
            return "—"
        return format_html(
            '<a href="{}">#{}</a>', _execution_url(obj.execution_id), obj.execution_id
        )
