"""The Grafana dashboards (APScheduler / Overview and APScheduler / Job) as plain dicts.

Why plain dicts and not grafana-foundation-sdk: the SDK's PyPI versions are build-timestamp epochs
(a plain install resolves to the Grafana 10.1 types), so it has to be pinned to an odd version
such as ``1769699379!11.6.0``; it needs Python >= 3.11 while the package supports 3.10; and
its ``Dashboard.from_json`` is not a validator, so it would add no checking that
``tests/test_grafana.py`` does not already do (promtool on every expression, structural
checks). Dicts with sorted keys also give byte-stable JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from django_apscheduler_obs.monitoring.config import MonitoringConfig
from django_apscheduler_obs.monitoring.promql import leader_only, sel

JOB_KEYS = "job, instance, job_id"

DS = {"type": "prometheus", "uid": "${datasource}"}
F = 'job=~"$job", instance=~"$instance"'
OUTCOME_SUCCESS, OUTCOME_ERROR = 'outcome="success"', 'outcome="error"'
STATE_RUNNING, STATE_PAUSED, STATE_STOPPED = (
    f'apscheduler_scheduler_state="{state}"' for state in ("running", "paused", "stopped")
)
FJ = F + ', job_id=~"$job_id"'
UNRESTORABLE = 'state="unrestorable"'


def steps(*pairs: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


def value_map(*entries: tuple[int, str, str]) -> list[dict[str, Any]]:
    options = {
        str(value): {"color": color, "index": i, "text": text}
        for i, (value, text, color) in enumerate(entries)
    }
    return [{"options": options, "type": "value"}]


OUTCOME_MAP = value_map((0, "success", "green"), (1, "error", "red"))
LEADER_MAP = value_map((0, "standby", "blue"), (1, "leader", "green"))
STATE_MAP = value_map((0, "stopped", "red"), (1, "running", "green"), (2, "paused", "orange"))
PAUSED_MAP = value_map((0, "active", "green"), (1, "paused", "orange"))


def target(
    expr: str,
    ref: str,
    legend: str = "",
    *,
    instant: bool = False,
    fmt: str = "time_series",
    exemplar: bool = False,
) -> dict[str, Any]:
    return {
        "datasource": DS,
        "editorMode": "code",
        "exemplar": exemplar,
        "expr": expr,
        "format": fmt,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "refId": ref,
    }


def _panel(
    kind: str, title: str, description: str, targets: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "datasource": DS,
        "description": description,
        "targets": targets,
        "title": title,
        "type": kind,
    }


def stat(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    *,
    mappings: list[dict[str, Any]] | None = None,
    thresholds: dict[str, Any] | None = None,
    decimals: int | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "color": {"mode": "thresholds"},
        "mappings": mappings or [],
        "thresholds": thresholds or steps(("green", None)),
        "unit": unit,
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return _panel("stat", title, description, targets) | {
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
    }


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    *,
    bars: bool = False,
    stack: bool = False,
    overrides: list[dict[str, Any]] | None = None,
    legend_calcs: list[str] | None = None,
) -> dict[str, Any]:
    custom = {
        "axisSoftMin": 0,
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 80 if bars else 10,
        "lineInterpolation": "stepAfter" if not bars else "linear",
        "lineWidth": 1,
        "pointSize": 4,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    calcs = legend_calcs or []
    return _panel("timeseries", title, description, targets) | {
        "fieldConfig": {
            "defaults": {"color": {"mode": "palette-classic"}, "custom": custom, "unit": unit},
            "overrides": overrides or [],
        },
        "options": {
            "legend": {
                "calcs": calcs,
                "displayMode": "table" if calcs else "list",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def heatmap(title: str, description: str, expr: str, unit: str) -> dict[str, Any]:
    """A histogram heatmap with exemplars: a click on an exemplar opens the run's trace."""
    return _panel(
        "heatmap",
        title,
        description,
        [target(expr, "A", "{{le}}", fmt="heatmap", exemplar=True)],
    ) | {  # fmt: skip
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {
                "exponent": 0.5,
                "fill": "dark-orange",
                "mode": "scheme",
                "reverse": False,
                "scale": "exponential",
                "scheme": "Oranges",
                "steps": 64,
            },
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
        },
    }


def table(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    columns: dict[str, str],
    overrides: list[dict[str, Any]],
    hide: Iterable[str] = (),
) -> dict[str, Any]:
    """Instant queries merged on their common labels; ``columns`` maps field → header, in order."""
    exclude = {"Time": True} | dict.fromkeys(hide, True)
    order = {name: i for i, name in enumerate(columns)}
    renamed = [
        {"matcher": {"id": "byName", "options": name}, "properties": [
            {"id": "displayName", "value": header}
        ]}
        for name, header in columns.items() if name != header
    ]  # fmt: skip
    return _panel("table", title, description, targets) | {
        "fieldConfig": {
            "defaults": {
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "filterable": True},
                "thresholds": steps(("green", None)),
            },
            "overrides": renamed + overrides,
        },
        "options": {
            "cellHeight": "sm",
            "footer": {"show": False},
            "showHeader": True,
        },
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": exclude, "indexByName": order, "renameByName": {}},
            },
        ],
    }


def state_timeline(
    title: str, description: str, targets: list[dict[str, Any]], mappings: list[dict[str, Any]]
) -> dict[str, Any]:
    return _panel("state-timeline", title, description, targets) | {
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "custom": {"fillOpacity": 80, "lineWidth": 0},
                "mappings": mappings,
                "thresholds": steps(("green", None)),
            },
            "overrides": [],
        },
        "options": {
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "mergeValues": True,
            "rowHeight": 0.9,
            "showValue": "auto",
            "tooltip": {"mode": "single", "sort": "none"},
        },
    }


def override(name: str, **properties: Any) -> dict[str, Any]:
    props = [{"id": key.replace("__", "."), "value": value} for key, value in properties.items()]
    return {"matcher": {"id": "byName", "options": name}, "properties": props}


def override_regex(pattern: str, color: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byRegexp", "options": pattern},
        "properties": [{"id": "color", "value": {"fixedColor": color, "mode": "fixed"}}],
    }


class Layout:
    """Places panels left to right in rows 24 units wide. Ids follow build order, so they are
    stable as long as panels are only appended; a panel added later in the middle passes
    ``new=True`` and gets an id after all others, so bookmarked panel links keep working."""

    def __init__(self) -> None:
        self._placed: list[dict[str, Any]] = []
        self._new: list[dict[str, Any]] = []
        self.x = self.y = self.line_height = 0

    @property
    def panels(self) -> list[dict[str, Any]]:
        for i, panel in enumerate(self._new):
            panel["id"] = len(self._placed) - len(self._new) + i + 1
        return self._placed

    def _next_id(self) -> int:
        return len(self._placed) - len(self._new) + 1

    def _newline(self) -> None:
        self.y += self.line_height
        self.x = self.line_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self._placed.append({
            "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            "id": self._next_id(), "panels": [], "title": title, "type": "row",
        })  # fmt: skip
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int, *, new: bool = False) -> None:
        if self.x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        if new:
            self._new.append(panel)
        else:
            panel["id"] = self._next_id()
        self._placed.append(panel)
        self.x += w
        self.line_height = max(self.line_height, h)


# Expressions shared by both dashboards; ``f`` is the label filter of the dashboard.


def last_outcome(f: str) -> str:
    """1 when the last run failed, 0 when it succeeded, absent when the job never ran."""
    fail = (
        f"max by (job_id) ({leader_only(sel('apscheduler_job_last_failure_timestamp_seconds', f))})"  # noqa: E501
    )
    ok = (
        f"max by (job_id) ({leader_only(sel('apscheduler_job_last_success_timestamp_seconds', f))})"  # noqa: E501
    )
    return f"({fail} > bool {ok}) or ({fail} * 0 + 1) or ({ok} * 0)"


def since_last_success(f: str) -> str:
    success = leader_only(sel("apscheduler_job_last_success_timestamp_seconds", f))
    registered = leader_only(sel("apscheduler_job_registered_timestamp_seconds", f))
    return f"time() - max by (job_id) ({success} or {registered})"


def expected_interval(f: str) -> str:
    interval = sel("apscheduler_job_expected_interval_seconds", f)
    return f"max by (job_id) ({leader_only(interval)})"


def failing_now(f: str) -> str:
    fail = sel("apscheduler_job_last_failure_timestamp_seconds", f)
    ok = sel("apscheduler_job_last_success_timestamp_seconds", f)
    cond = f"(({fail} > on({JOB_KEYS}) {ok}) or ({fail} unless on({JOB_KEYS}) {ok}))"
    return f"count({leader_only(cond)}) or vector(0)"


def overdue_now(f: str, cfg: MonitoringConfig) -> str:
    nxt = sel("apscheduler_job_next_run_timestamp_seconds", f)
    paused = f"({sel('apscheduler_job_paused', f)} == 1)"
    cond = f"((time() - {nxt}) > {cfg.overdue_threshold_seconds} unless on({JOB_KEYS}) {paused})"
    return f"count({leader_only(cond)}) or vector(0)"


def quantile(q: float, metric: str, f: str, by: str = "job_id") -> str:
    return (
        f"histogram_quantile({q}, sum by ({by}, le) "
        f"(rate({sel(metric + '_bucket', f)}[$__rate_interval])))"
    )


def increase(metric: str, f: str, window: str = "$__rate_interval", extra: str = "") -> str:
    return f"increase({sel(metric, f, extra)}[{window}])"


def activity_panels(lay: Layout, f: str, *, per_job: bool) -> None:
    lay.row("Activity")
    by = "outcome" if per_job else "job_id, outcome"
    lay.add(timeseries(
        "Runs by outcome", "Finished runs per interval, success and error stacked.",
        [target(f"sum by ({by}) ({increase('apscheduler_job_runs_total', f)})", "A",
                "{{outcome}}" if per_job else "{{job_id}} {{outcome}}")],
        bars=True, stack=True,
        overrides=[override_regex(".*error$", "red"), override_regex(".*success$", "green")],
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Errors by error_type", "Failed runs by exception type (qualified name; rare types "
        "beyond the per-job cap are reported as _OTHER).",
        [target(f"sum by (job_id, error_type) "
                f"({increase('apscheduler_job_runs_total', f, extra=OUTCOME_ERROR)})",
                "A", "{{job_id}} {{error_type}}")],
        bars=True, stack=True,
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Skipped runs by reason", "misfire: started later than misfire_grace_time; "
        "max_instances: earlier runs still going; coalesced: fire times merged into one run.",
        [target(f"sum by (job_id, reason) ({increase('apscheduler_job_skipped_runs_total', f)})",
                "A", "{{job_id}} {{reason}}")],
        bars=True, stack=True,
    ), 8, 8)  # fmt: skip


def latency_panels(lay: Layout, f: str) -> None:
    lay.row("Latency")
    duration = "apscheduler_job_run_duration_seconds"
    delay = "apscheduler_job_start_delay_seconds"
    lay.add(heatmap(
        "Run duration", "True start to end of the job function. Exemplars link to the trace "
        "of a run.",
        f"sum by (le) ({increase(duration + '_bucket', f)})", "s",
    ), 12, 8)  # fmt: skip
    lay.add(timeseries(
        "Run duration p50 / p95 / p99", "Quantiles from the histogram over $__rate_interval "
        "(rate, not irate); gaps mean no run finished in the window.",
        [target(quantile(q, duration, f), ref, f"{{{{job_id}}}} p{int(q * 100)}", exemplar=True)
         for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))],
        "s",
    ), 12, 8)  # fmt: skip
    lay.add(heatmap(
        "Start delay", "True start minus scheduled fire time: pool saturation, a blocked "
        "loop or a failover shows here first.",
        f"sum by (le) ({increase(delay + '_bucket', f)})", "s",
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Start delay p95", "95th percentile of the start delay per job.",
        [target(quantile(0.95, delay, f), "A", "{{job_id}} p95", exemplar=True)], "s",
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Last run duration and start delay", "The last value of each, useful for jobs that "
        "run too rarely for a histogram quantile.",
        [target(f"max by (job_id) ({leader_only(sel('apscheduler_job_last_run_duration_seconds', f))})",  # noqa: E501
                "A", "{{job_id}} duration"),
         target(f"max by (job_id) ({leader_only(sel('apscheduler_job_last_start_delay_seconds', f))})",  # noqa: E501
                "B", "{{job_id}} start delay")],
        "s",
    ), 8, 8)  # fmt: skip


def worker_panels(lay: Layout, f: str, fp: str, *, per_job: bool) -> None:
    """Runs handed to worker engines (Celery, Django's Tasks framework); empty otherwise.
    ``f`` selects per-job series, ``fp`` per-process ones (no ``job_id`` label)."""
    lay.row("Workers")
    wait = "apscheduler_job_queue_wait_seconds"
    lay.add(timeseries(
        "Queue wait p50 / p95", "Enqueued by the scheduler to picked up by a worker, for "
        "jobs that run on workers. Rising: workers are saturated or too few.",
        [target(quantile(q, wait, f), ref, f"{{{{job_id}}}} p{int(q * 100)}", exemplar=True)
         for q, ref in ((0.5, "A"), (0.95, "B"))],
        "s",
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Lost runs", "Runs no worker picked up within the dispatch timeout, or that could not "
        "be enqueued (ApschedulerJobRunsLost).",
        [target(f"sum by (job_id) ({increase('apscheduler_job_lost_runs_total', f)})", "A",
                "{{job_id}}")],
        bars=True, overrides=[override_regex(".*", "red")],
    ), 8, 8)  # fmt: skip
    if per_job:
        return
    lay.add(timeseries(
        "Runs in worker engines", "Runs the leader handed over and that are not final yet: "
        "queued (waiting for a worker) and running on a worker.",
        [target(f"sum by (state) ({leader_only(sel('apscheduler_remote_runs', fp))})", "A",
                "{{state}}")],
        stack=True,
    ), 8, 8)  # fmt: skip


def variables(cfg: MonitoringConfig, *, multi_job_id: bool) -> list[dict[str, Any]]:
    def query(name: str, label: str, definition: str, *, multi: bool) -> dict[str, Any]:
        return {
            "allValue": ".*" if multi else None,
            "current": {},
            "datasource": DS,
            "definition": definition,
            "hide": 0,
            "includeAll": multi,
            "label": label,
            "multi": multi,
            "name": name,
            "options": [],
            "query": definition,
            "refresh": 2,
            "regex": "",
            "sort": 1,
            "type": "query",
        }

    return [
        {
            "current": {},
            "hide": 0,
            "includeAll": False,
            "label": "Data source",
            "multi": False,
            "name": "datasource",
            "options": [],
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "type": "datasource",
        },
        query("job", "Job", "label_values(apscheduler_scheduler_info, job)", multi=True),
        query("instance", "Instance",
              'label_values(apscheduler_scheduler_info{job=~"$job"}, instance)', multi=True),
        query("job_id", "Job id",
              'label_values(apscheduler_job_info{job=~"$job", instance=~"$instance"}, job_id)',
              multi=multi_job_id),
        {
            "current": {"text": cfg.admin_url, "value": cfg.admin_url},
            "description": "Base URL of the Django admin, for links to the execution history.",
            "hide": 0,
            "label": "Django admin URL",
            "name": "admin_url",
            "options": [{"selected": True, "text": cfg.admin_url, "value": cfg.admin_url}],
            "query": cfg.admin_url,
            "type": "textbox",
        },
    ]  # fmt: skip


def leadership_annotation(f: str) -> dict[str, Any]:
    return {
        "datasource": DS,
        "enable": True,
        "expr": f"changes({sel('apscheduler_lease_epoch', f)}[2m]) > 0",
        "hide": False,
        "iconColor": "blue",
        "name": "Leader changes",
        "step": "1m",
        "tagKeys": "group,instance",
        "textFormat": "Lease epoch moved on {{instance}}",
        "titleFormat": "Leader change",
    }


def dashboard(
    cfg: MonitoringConfig,
    *,
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    multi_job_id: bool,
) -> dict[str, Any]:
    return {
        "annotations": {"list": annotations},
        "description": description,
        "editable": True,
        "graphTooltip": 1,
        "links": [
            {
                "asDropdown": False,
                "icon": "external link",
                "includeVars": True,
                "keepTime": True,
                "tags": cfg.dashboard_tags,
                "targetBlank": False,
                "title": "APScheduler",
                "type": "dashboards",
            }
        ],  # fmt: skip
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": cfg.dashboard_tags,
        "templating": {"list": variables(cfg, multi_job_id=multi_job_id)},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
    }


def overview_dashboard(cfg: MonitoringConfig) -> dict[str, Any]:
    lay = Layout()
    f, fj = F, FJ
    runs, skipped = "apscheduler_job_runs_total", "apscheduler_job_skipped_runs_total"

    lay.row("Health")
    state_expr = (
        "max by (job, instance) ("
        f"({sel('apscheduler_scheduler_state', f, STATE_RUNNING)} == 1) * 1"  # noqa: E501
        f" or ({sel('apscheduler_scheduler_state', f, STATE_PAUSED)} == 1) * 2"  # noqa: E501
        f" or ({sel('apscheduler_scheduler_state', f, STATE_STOPPED)} == 1) * 0"  # noqa: E501
        ")"
    )
    lay.add(stat(
        "Scheduler state", "APScheduler state of each process; standbys run too, they only "
        "wait for the lease.",
        [target(state_expr, "A", "{{instance}}", instant=True)],
        mappings=STATE_MAP, thresholds=steps(("red", None), ("green", 1), ("orange", 2)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Leader", "Which process holds the lease of its group; only the leader runs jobs.",
        [target(f"max by (instance, group) ({sel('apscheduler_leader', f)})", "A",
                "{{instance}}", instant=True)],
        mappings=LEADER_MAP, thresholds=steps(("blue", None), ("green", 1)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Heartbeat age", "Time since the canary job last ran through the loop and the "
        f"executor of the leader; the alert fires above {cfg.heartbeat_stale_seconds}s.",
        [target(f"time() - max by (instance) ({leader_only(sel('apscheduler_scheduler_heartbeat_timestamp_seconds', f))})",  # noqa: E501
                "A", "{{instance}}", instant=True)],
        "s", thresholds=steps(("green", None), ("orange", 60),
                              ("red", cfg.heartbeat_stale_seconds)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Jobs", "Jobs in the job store by state; unrestorable jobs could not be unpickled "
        "and are kept (not deleted) for you to fix.",
        [target(f"max by (state) ({sel('apscheduler_jobs', f)})", "A", "{{state}}",
                instant=True)],
    ), 6, 4)  # fmt: skip
    lay.add(stat(
        "Runs in progress", "Runs executing now, all jobs.",
        [target(f"sum({sel('apscheduler_job_runs_in_progress', fj)})", "A", "in progress",
                instant=True)],
    ), 3, 4)  # fmt: skip
    lay.add(stat(
        "Jobs failing now", "Jobs whose last run failed (the ApschedulerJobFailing condition).",
        [target(failing_now(fj), "A", "failing", instant=True)],
        thresholds=steps(("green", None), ("red", 1)),
    ), 3, 4)  # fmt: skip
    lay.add(stat(
        "Runs (24h)", "Finished runs in the last 24 hours.",
        [target(f"sum({increase(runs, fj, '24h')})", "A", "runs", instant=True)],
        decimals=0,
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Success ratio (24h)", "Successful runs / finished runs over the last 24 hours.",
        [target(f"sum({increase(runs, fj, '24h', OUTCOME_SUCCESS)}) "
                f"/ sum({increase(runs, fj, '24h')})", "A", "success", instant=True)],
        "percentunit",
        thresholds=steps(("red", None), ("orange", 0.9), ("green", 0.99)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Skipped runs (24h)", "Fire times that did not run, by reason.",
        [target(f"sum by (reason) ({increase(skipped, fj, '24h')})", "A", "{{reason}}",
                instant=True)],
        thresholds=steps(("green", None), ("orange", 1)), decimals=0,
    ), 5, 4)  # fmt: skip
    lay.add(stat(
        "Jobs overdue now", f"Jobs more than {cfg.overdue_threshold_seconds}s past their "
        "next run time (paused jobs excluded).",
        [target(overdue_now(fj, cfg), "A", "overdue", instant=True)],
        thresholds=steps(("green", None), ("orange", 1)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Unrestorable jobs", "Stored jobs whose function or trigger no longer imports (after a "
        "deploy): they never run. The admin's job list shows them with restore_error; "
        "ApschedulerUnrestorableJobs fires while this is above 0.",
        [target(f"max({sel('apscheduler_jobs', f, UNRESTORABLE)}) or vector(0)",
                "A", "unrestorable", instant=True)],
        thresholds=steps(("green", None), ("red", 1)), decimals=0,
    ), 3, 4, new=True)  # fmt: skip
    lay.add(stat(
        "Uptime", "Time since each scheduler process started.",
        [target(f"time() - {sel('process_start_time_seconds', f)}", "A", "{{instance}}",
                instant=True)],
        "s",
    ), 4, 4)  # fmt: skip

    lay.row("Jobs")
    job_gauge = {
        name: f"max by (job_id) ({leader_only(sel(name, fj))})"
        for name in (
            "apscheduler_job_next_run_timestamp_seconds",
            "apscheduler_job_last_run_duration_seconds",
            "apscheduler_job_last_start_delay_seconds",
        )
    }
    dashboard_link = (
        f"/d/{cfg.job_uid}/apscheduler-job?${{datasource:queryparam}}&${{job:queryparam}}"
        "&${instance:queryparam}&var-job_id=${__data.fields.job_id}&${__url_time_range}"
    )
    admin_link = (
        "${admin_url}/django_apscheduler_obs/djangojobexecution/"
        "?job__id__exact=${__data.fields.job_id}"
    )
    ratio_colors = steps(
        ("green", None), ("orange", cfg.table_ratio_amber), ("red", cfg.table_ratio_red)
    )
    lay.add(table(
        "Jobs", "One row per job. The ratio column is the time since the last success divided "
        "by the largest gap of the trigger: 1 is on time, above "
        f"{cfg.table_ratio_red} the ApschedulerJobNoRecentSuccess alert is near. Click a "
        "job id for its dashboard or its execution history in the Django admin.",
        [
            target(f"max by (job_id, trigger) ({sel('apscheduler_job_info', fj)})", "A",
                   instant=True, fmt="table"),
            target(f"{job_gauge['apscheduler_job_next_run_timestamp_seconds']} - time()", "B",
                   instant=True, fmt="table"),
            target(since_last_success(fj), "C", instant=True, fmt="table"),
            target(f"({since_last_success(fj)}) / {expected_interval(fj)}", "D", instant=True,
                   fmt="table"),
            target(last_outcome(fj), "E", instant=True, fmt="table"),
            target(job_gauge["apscheduler_job_last_run_duration_seconds"], "F", instant=True,
                   fmt="table"),
            target(f"histogram_quantile(0.95, sum by (job_id, le) "
                   f"(rate({sel('apscheduler_job_run_duration_seconds_bucket', fj)}[7d])))",
                   "G", instant=True, fmt="table"),
            target(f"sum by (job_id) ({increase(runs, fj, '7d', OUTCOME_SUCCESS)}) "
                   f"/ sum by (job_id) ({increase(runs, fj, '7d')})", "H", instant=True,
                   fmt="table"),
            target(f"sum by (job_id) ({increase(skipped, fj, '7d')})", "I", instant=True,
                   fmt="table"),
            target(job_gauge["apscheduler_job_last_start_delay_seconds"], "J", instant=True,
                   fmt="table"),
        ],
        columns={
            "job_id": "job_id", "trigger": "Trigger", "Value #B": "Next run in",
            "Value #C": "Since last success", "Value #D": "Since success / interval",
            "Value #E": "Last outcome", "Value #F": "Last duration",
            "Value #G": "p95 duration (7d)", "Value #H": "Success (7d)",
            "Value #I": "Skipped (7d)", "Value #J": "Last start delay",
        },
        hide=("Value #A",),
        overrides=[
            override("job_id", links=[
                {"targetBlank": False, "title": "Job dashboard", "url": dashboard_link},
                {"targetBlank": True, "title": "Execution history (Django admin)",
                 "url": admin_link},
            ]),
            override("Value #B", unit="s"),
            override("Value #C", unit="s"),
            override("Value #D", unit="none", decimals=2, thresholds=ratio_colors,
                     custom__cellOptions={"type": "color-background"}),
            override("Value #E", mappings=OUTCOME_MAP,
                     custom__cellOptions={"type": "color-text"}),
            override("Value #F", unit="s"),
            override("Value #G", unit="s"),
            override("Value #H", unit="percentunit",
                     thresholds=steps(("red", None), ("orange", 0.9), ("green", 0.99)),
                     custom__cellOptions={"type": "color-text"}),
            override("Value #I", unit="short", decimals=0),
            override("Value #J", unit="s"),
        ],
    ), 24, 10)  # fmt: skip

    activity_panels(lay, fj, per_job=False)
    latency_panels(lay, fj)

    worker_panels(lay, fj, f, per_job=False)

    lay.row("Scheduler")
    lay.add(timeseries(
        "Runs in progress by job", "Runs executing now; a flat line above 0 is a stuck run.",
        [target(f"sum by (job_id) ({sel('apscheduler_job_runs_in_progress', fj)})", "A",
                "{{job_id}}")],
        stack=True,
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Executor workers", "Busy vs maximum workers per executor; a full pool turns into "
        "start delay and misfires.",
        [target(f"sum by (instance, executor) ({sel('apscheduler_executor_busy_workers', f)})",
                "A", "{{instance}} {{executor}} busy"),
         target(f"sum by (instance, executor) ({sel('apscheduler_executor_max_workers', f)})",
                "B", "{{instance}} {{executor}} max")],
        overrides=[override_regex(".* max$", "red")],
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Execution history writes", "Failed history writes (retried from the buffer), writes "
        "waiting in memory, and writes dropped because the buffer was full.",
        [target(f"sum by (instance, operation) "
                f"({increase('apscheduler_history_write_errors_total', f)})", "A",
                "{{instance}} {{operation}} errors"),
         target(f"sum by (instance) ({sel('apscheduler_history_pending_writes', f)})", "B",
                "{{instance}} pending"),
         target(f"sum by (instance) "
                f"({increase('apscheduler_history_dropped_writes_total', f)})", "C",
                "{{instance}} dropped")],
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Resident memory", "process_resident_memory_bytes of each scheduler process.",
        [target(sel("process_resident_memory_bytes", f), "A", "{{instance}}")], "bytes",
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "CPU", "CPU time per second of each scheduler process (1 = one core).",
        [target(f"rate({sel('process_cpu_seconds_total', f)}[$__rate_interval])", "A",
                "{{instance}}")],
        "percentunit",
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Cleanup: deleted executions", "Execution-history rows deleted by the retention job.",
        [target(f"sum by (instance) "
                f"({increase('apscheduler_cleanup_deleted_executions_total', f)})", "A",
                "{{instance}}")],
        bars=True,
    ), 8, 8)  # fmt: skip

    lay.row("High availability")
    lay.add(state_timeline(
        "Leader per instance", "1 while a process holds its group's lease. Exactly one "
        "process per group should be leader.",
        [target(f"max by (instance, group) ({sel('apscheduler_leader', f)})", "A",
                "{{instance}} ({{group}})")],
        LEADER_MAP,
    ), 12, 6)  # fmt: skip
    lay.add(timeseries(
        "Lease epoch", "Fencing token; it goes up by one on every change of leader.",
        [target(f"max by (group) ({sel('apscheduler_lease_epoch', f)})", "A", "{{group}}")],
    ), 6, 6)  # fmt: skip
    lay.add(stat(
        "Failover time p95", "Previous leader's last renewal to the new leader's acquisition, "
        "over the dashboard range (bound: lease TTL + standby poll).",
        [target(f"histogram_quantile(0.95, sum by (group, le) "
                f"({increase('apscheduler_failover_seconds_bucket', f, '$__range')}))", "A",
                "{{group}}", instant=True)],
        "s",
    ), 6, 6)  # fmt: skip
    lay.add(timeseries(
        "Leadership changes", "Acquisitions, and losses by reason (expired, taken_over, "
        "db_error, released).",
        [target(f"sum by (instance) "
                f"({increase('apscheduler_lease_acquisitions_total', f)})", "A",
                "{{instance}} acquired"),
         target(f"sum by (instance, reason) "
                f"({increase('apscheduler_lease_losses_total', f)})", "B",
                "{{instance}} lost: {{reason}}")],
        bars=True,
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Claims by result", "Fenced claims of fire times: conflict or fenced means the "
        "database stopped a duplicate or stale run.",
        [target(f"sum by (result) ({increase('apscheduler_claims_total', f)})", "A",
                "{{result}}")],
        bars=True, stack=True,
        overrides=[override_regex("fenced|conflict|error", "red")],
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Lease renewals by result", "ok, lost (the lease was gone) and error (database "
        "error) renewals of the leader.",
        [target(f"sum by (instance, result) "
                f"({increase('apscheduler_lease_renewals_total', f)})", "A",
                "{{instance}} {{result}}")],
        bars=True, stack=True,
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Lease remaining", "Time left on the leader's lease; it should saw-tooth between "
        "TTL and TTL minus the renew interval.",
        [target(sel("apscheduler_lease_remaining_seconds", f), "A", "{{instance}}")], "s",
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Clock skew", "Database clock minus host clock; jobs fire early or late on a skewed "
        f"host (alert above {cfg.clock_skew_threshold_seconds}s).",
        [target(sel("apscheduler_clock_skew_seconds", f), "A", "{{instance}}")], "s",
    ), 8, 8)  # fmt: skip
    lay.add(timeseries(
        "Safety net and job-store changes", "Stale job-state writes rejected, runs of "
        "earlier leaders marked abandoned, and job changes from other processes that woke "
        "the leader.",
        [target(f"sum by (instance) ({increase('apscheduler_stale_writes_rejected_total', f)})",
                "A", "{{instance}} stale writes rejected"),
         target(f"sum by (instance) ({increase('apscheduler_abandoned_runs_total', f)})", "B",
                "{{instance}} abandoned runs"),
         target(f"sum by (instance) ({increase('apscheduler_job_store_changes_total', f)})",
                "C", "{{instance}} job store changes")],
        bars=True,
    ), 8, 8)  # fmt: skip
    info_labels = "instance, identity, group, version, package_version, scheduler_class, timezone"
    lay.add(table(
        "Processes", "Every scheduler process of the selected jobs and instances.",
        [
            target(f"max by ({info_labels}) ({sel('apscheduler_scheduler_info', f)})", "A",
                   instant=True, fmt="table"),
            target(f"max by (instance) ({sel('apscheduler_leader', f)})", "B", instant=True,
                   fmt="table"),
            target(f"time() - max by (instance) ({sel('process_start_time_seconds', f)})", "C",
                   instant=True, fmt="table"),
        ],
        columns={
            "instance": "Instance", "identity": "Identity", "group": "Group",
            "Value #B": "Role", "Value #C": "Uptime", "version": "APScheduler",
            "package_version": "django-apscheduler-obs", "scheduler_class": "Scheduler",
            "timezone": "Time zone",
        },
        hide=("Value #A",),
        overrides=[
            override("Value #B", mappings=LEADER_MAP,
                     custom__cellOptions={"type": "color-text"}),
            override("Value #C", unit="s"),
        ],
    ), 24, 6)  # fmt: skip

    return dashboard(
        cfg, uid=cfg.overview_uid, title="APScheduler / Overview",
        description="Jobs, runs, latency and leader election of django-apscheduler-obs "
        "schedulers. Generated by manage.py apscheduler_monitoring.",
        panels=lay.panels, annotations=[leadership_annotation(f)], multi_job_id=True,
    )  # fmt: skip


def job_dashboard(cfg: MonitoringConfig) -> dict[str, Any]:
    lay = Layout()
    f, fj = F, FJ
    runs, skipped = "apscheduler_job_runs_total", "apscheduler_job_skipped_runs_total"

    def gauge(name: str) -> str:
        return f"max by (job_id) ({leader_only(sel(name, fj))})"

    lay.row("Status")
    lay.add(stat(
        "Last outcome", "Outcome of the last finished run; ApschedulerJobFailing fires while "
        "it is error.",
        [target(last_outcome(fj), "A", "{{job_id}}", instant=True)],
        mappings=OUTCOME_MAP, thresholds=steps(("green", None), ("red", 1)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Since last success", "Time since the last successful run (or since the job was "
        "registered, if it never succeeded).",
        [target(since_last_success(fj), "A", "{{job_id}}", instant=True)], "s",
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Expected interval", "Largest gap between consecutive fire times of the trigger "
        "(a Mon-Fri 09:00 cron gives 3 days); absent for one-off date jobs.",
        [target(expected_interval(fj), "A", "{{job_id}}", instant=True)], "s",
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Next run in", "Time until the next fire time; negative means overdue. Absent while "
        "paused.",
        [target(f"{gauge('apscheduler_job_next_run_timestamp_seconds')} - time()", "A",
                "{{job_id}}", instant=True)],
        "s", thresholds=steps(("red", None), ("green", -cfg.overdue_threshold_seconds)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Paused", "Whether the job is paused (no next run time).",
        [target(gauge("apscheduler_job_paused"), "A", "{{job_id}}", instant=True)],
        mappings=PAUSED_MAP, thresholds=steps(("green", None), ("orange", 1)),
    ), 2, 4)  # fmt: skip
    lay.add(stat(
        "Runs in progress", "Runs of this job executing now.",
        [target(f"sum by (job_id) ({sel('apscheduler_job_runs_in_progress', fj)})", "A",
                "{{job_id}}", instant=True)],
    ), 3, 4)  # fmt: skip
    lay.add(stat(
        "Running for", "Age of the oldest run still going; empty when nothing runs.",
        [target(f"time() - min by (job_id) "
                f"({sel('apscheduler_job_oldest_running_start_timestamp_seconds', fj)})", "A",
                "{{job_id}}", instant=True)],
        "s",
    ), 3, 4)  # fmt: skip
    lay.add(stat(
        "Runs (24h)", "Finished runs of this job in the last 24 hours.",
        [target(f"sum by (job_id) ({increase(runs, fj, '24h')})", "A", "{{job_id}}",
                instant=True)],
        decimals=0,
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Success ratio (24h)", "Successful runs / finished runs over the last 24 hours.",
        [target(f"sum by (job_id) ({increase(runs, fj, '24h', OUTCOME_SUCCESS)}) "
                f"/ sum by (job_id) ({increase(runs, fj, '24h')})", "A", "{{job_id}}",
                instant=True)],
        "percentunit", thresholds=steps(("red", None), ("orange", 0.9), ("green", 0.99)),
    ), 4, 4)  # fmt: skip
    lay.add(stat(
        "Skipped (24h)", "Fire times of this job that did not run, by reason.",
        [target(f"sum by (reason) ({increase(skipped, fj, '24h')})", "A", "{{reason}}",
                instant=True)],
        thresholds=steps(("green", None), ("orange", 1)), decimals=0,
    ), 6, 4)  # fmt: skip
    lay.add(stat(
        "Last duration", "Duration of the last finished run.",
        [target(gauge("apscheduler_job_last_run_duration_seconds"), "A", "{{job_id}}",
                instant=True)],
        "s",
    ), 3, 4)  # fmt: skip
    lay.add(stat(
        "Last start delay", "Start delay of the last run; ApschedulerJobLate fires above "
        f"{cfg.late_threshold_seconds}s.",
        [target(gauge("apscheduler_job_last_start_delay_seconds"), "A", "{{job_id}}",
                instant=True)],
        "s", thresholds=steps(("green", None), ("red", cfg.late_threshold_seconds)),
    ), 3, 4)  # fmt: skip
    lay.add(stat(
        "Misfire grace", "misfire_grace_time: a run starting later than this is skipped as "
        "misfire. Absent when unlimited.",
        [target(gauge("apscheduler_job_misfire_grace_seconds"), "A", "{{job_id}}",
                instant=True)],
        "s",
    ), 2, 4)  # fmt: skip
    lay.add(stat(
        "Max runtime", "A run longer than this is reported stuck. Absent unless configured.",
        [target(gauge("apscheduler_job_max_runtime_seconds"), "A", "{{job_id}}",
                instant=True)],
        "s",
    ), 2, 4)  # fmt: skip
    lay.add(table(
        "Definition", "The job as registered: function, trigger, executor, job store, "
        "max_instances and coalesce.",
        [target(f"max by (job_id, name, func, trigger, executor, jobstore, max_instances, "
                f"coalesce) ({sel('apscheduler_job_info', fj)})", "A", instant=True,
                fmt="table")],
        columns={
            "job_id": "job_id", "name": "Name", "func": "Function", "trigger": "Trigger",
            "executor": "Executor", "jobstore": "Job store", "max_instances": "Max instances",
            "coalesce": "Coalesce",
        },
        hide=("Value #A", "Value"),
        overrides=[],
    ), 24, 4)  # fmt: skip

    lay.row("Outcome")
    lay.add(state_timeline(
        "Last outcome over time", "success or error of the last finished run at each point "
        "in time; red stretches are time spent failing.",
        [target(last_outcome(fj), "A", "{{job_id}}")], OUTCOME_MAP,
    ), 24, 4)  # fmt: skip

    activity_panels(lay, fj, per_job=True)
    latency_panels(lay, fj)
    worker_panels(lay, fj, f, per_job=True)

    lay.row("Schedule")
    factor, slack = cfg.no_success_interval_factor, cfg.no_success_slack_seconds
    lay.add(timeseries(
        "Time since last success", "Against the ApschedulerJobNoRecentSuccess threshold "
        f"(expected interval x {factor} + {slack}s).",
        [target(since_last_success(fj), "A", "{{job_id}} since last success"),
         target(f"{expected_interval(fj)} * {factor} + {slack}", "B",
                "{{job_id}} alert threshold")],
        "s", overrides=[override_regex(".*alert threshold$", "red")],
    ), 12, 8)  # fmt: skip
    lay.add(timeseries(
        "Runs in progress", "Runs of this job executing now.",
        [target(f"sum by (job_id) ({sel('apscheduler_job_runs_in_progress', fj)})", "A",
                "{{job_id}}")],
    ), 12, 8)  # fmt: skip

    failures = {
        "datasource": DS,
        "enable": True,
        "expr": f"changes({sel('apscheduler_job_last_failure_timestamp_seconds', fj)}[2m]) > 0",
        "hide": False,
        "iconColor": "red",
        "name": "Failures",
        "step": "1m",
        "tagKeys": "job_id,instance",
        "textFormat": "{{job_id}} failed on {{instance}}",
        "titleFormat": "Run failed",
    }
    return dashboard(
        cfg, uid=cfg.job_uid, title="APScheduler / Job",
        description="One APScheduler job: outcome, activity, latency with exemplars, and "
        "schedule. Generated by manage.py apscheduler_monitoring.",
        panels=lay.panels, annotations=[failures, leadership_annotation(f)],
        multi_job_id=False,
    )  # fmt: skip


def render_dashboard(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
