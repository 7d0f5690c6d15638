"""The promtool unit tests of the alert rules, generated from the same config as the rules.

Every series carries the labels of ``cfg.series_labels`` (so it matches the user's selector),
and values, eval times and expected annotations follow the thresholds: a changed threshold
moves the firing and quiet evaluations with it instead of breaking hand-written tests. Each
alert fires in one case and stays quiet in another; the standby that must never alert, the
weekday cron job over a weekend and the short failover are kept as cases of their own.

Annotations are expanded here with the few Go template functions the rules use, so promtool
compares them with what Prometheus really renders.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import yaml

from django_apscheduler_obs.monitoring.alerts import GENERATED, alert_rules
from django_apscheduler_obs.monitoring.config import ConfigError, MonitoringConfig
from django_apscheduler_obs.monitoring.promql import format_duration, num, selects

S1, S2, S3 = "sched-1:9100", "sched-2:9100", "sched-3:9100"
OTHER_INSTANCE = "other:9100"


# -- Go template functions of Prometheus, for the expected annotations ------------------------


def humanize_duration(v: float) -> str:
    if v == 0:
        return "0s"
    sign, v = ("-", -v) if v < 0 else ("", v)
    if v >= 1:
        d = int(v)
        days, hours, minutes, seconds = d // 86400, d // 3600 % 24, d // 60 % 60, d % 60
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{v:.4g}s"
    prefix = ""
    for p in ("m", "u", "n"):
        if v >= 1:
            break
        prefix, v = p, v * 1000
    return f"{sign}{v:.4g}{prefix}s"


def humanize_percentage(v: float) -> str:
    return f"{v * 100:.4g}%"


def humanize_timestamp(v: float) -> str:
    return datetime.fromtimestamp(v, timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


_PIPES = {
    "humanizeDuration": humanize_duration,
    "humanizePercentage": humanize_percentage,
    "humanizeTimestamp": humanize_timestamp,
    'printf "%.0f"': lambda v: f"{v:.0f}",
    'printf "%.1f"': lambda v: f"{v:.1f}",
}


def expand(template: str, labels: dict[str, str], value: float | None) -> str:
    """The subset of Prometheus' alert templates the rules use."""

    def with_label(m: re.Match[str]) -> str:
        found = labels.get(m.group(1))
        return m.group(2).replace("{{ . }}", found) if found else ""

    text = re.sub(r"\{\{ with \$labels\.(\w+) \}\}(.*?)\{\{ end \}\}", with_label, template)
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)

    def pipe(m: re.Match[str]) -> str:
        assert value is not None, f"{template!r} needs a value"
        return str(_PIPES[m.group(1)](value))

    text = re.sub(r"\{\{ \$value \| (.+?) \}\}", pipe, text)
    assert "{{" not in text, f"unsupported template in {template!r}"
    return text


# -- the document model --------------------------------------------------------------------


@dataclass
class Alert:
    labels: dict[str, str]
    value: float | None = None


@dataclass
class Check:
    at: float  # seconds
    alertname: str
    alerts: list[Alert]
    comment: str = ""


@dataclass
class Case:
    name: str
    series: list[tuple[str, str, str]]  # (comment, series, values)
    checks: list[Check]
    comment: str = ""
    interval: str = "1m"


@dataclass
class TestFile:
    header: str
    cases: list[Case] = field(default_factory=list)


def runs(*parts: tuple[float | str, int]) -> str:
    """promtool values from (value, samples) runs: ``runs((0, 3), (1, 9))`` -> ``0 0 0 1x8``.

    Short leading runs are spelled out, as a reader counts them; ``_`` is a missing sample.
    """
    kept = [(value if isinstance(value, str) else num(value), n) for value, n in parts if n > 0]
    out = []
    for i, (text, count) in enumerate(kept):
        if text == "_":
            out.append(f"_x{count}")
        elif count == 1 or (count <= 5 and i < len(kept) - 1):
            out.extend([text] * count)
        else:
            out.append(f"{text}x{count - 1}")
    return " ".join(out)


def minutes(seconds: float) -> int:
    """A ``for`` or threshold in whole minutes, rounded up."""
    return math.ceil(seconds / 60)


def _scalar(value: str) -> str:
    text = yaml.safe_dump(value, width=1_000_000, allow_unicode=True)
    return text.removesuffix("\n...\n").removesuffix("\n")


def _comment(text: str, indent: int) -> list[str]:
    return [" " * indent + ("# " + line if line else "#") for line in text.splitlines()]


class _Writer:
    def __init__(self, cfg: MonitoringConfig) -> None:
        self.rules = {rule["alert"]: rule for rule in alert_rules(cfg)}

    def render(self, doc: TestFile) -> str:
        lines = _comment(doc.header, 0)
        lines += ["# yamllint disable rule:line-length", "rule_files:"]
        lines += ["  - ../apscheduler.rules.yaml", "", "evaluation_interval: 1m", "", "tests:"]
        for i, case in enumerate(doc.cases):
            if i:
                lines.append("")
            lines += _comment(case.comment, 2)
            lines += [f"  - name: {_scalar(case.name)}", f"    interval: {case.interval}"]
            lines.append("    input_series:")
            for comment, series, values in case.series:
                lines += _comment(comment, 6)
                quoted = series.replace("'", "''")
                lines += [f"      - series: '{quoted}'", f'        values: "{values}"']
            lines.append("    alert_rule_test:")
            for check in case.checks:
                lines += _comment(check.comment, 6)
                lines.append(f"      - eval_time: {format_duration(check.at)}")
                lines.append(f"        alertname: {check.alertname}")
                if not check.alerts:
                    lines.append("        exp_alerts: []")
                    continue
                lines.append("        exp_alerts:")
                rule = self.rules[check.alertname]
                for alert in check.alerts:
                    labels = {"severity": rule["labels"]["severity"], **alert.labels}
                    lines.append("          - exp_labels:")
                    lines += [f"              {k}: {_scalar(v)}" for k, v in labels.items()]
                    lines.append("            exp_annotations:")
                    for key, template in rule["annotations"].items():
                        text = expand(template, alert.labels, alert.value)
                        lines.append(f"              {key}: {_scalar(text)}")
        return "\n".join(lines) + "\n"


# -- the cases -----------------------------------------------------------------------------


class _Cases:
    """Builders shared by the three files: series names and the labels alerts keep."""

    def __init__(self, cfg: MonitoringConfig) -> None:
        self.cfg = cfg
        self.base = cfg.series_labels
        self.other = _unselected(cfg)
        self.alt = _alternative(cfg)

    def s(self, metric: str, instance: str | None = S1, base: dict[str, str] | None = None,
          **labels: str) -> str:  # fmt: skip
        """``metric{<test labels>, instance="…", <labels>}``."""
        all_labels = dict(self.base if base is None else base)
        if instance is not None:
            all_labels["instance"] = instance
        all_labels.update(labels)
        inner = ", ".join(f'{k}="{_escape(v)}"' for k, v in all_labels.items())
        return f"{metric}{{{inner}}}"

    def full(self, instance: str = S1, **labels: str) -> dict[str, str]:
        """Labels of an alert that keeps the series' labels (no aggregation)."""
        return {**self.base, "instance": instance, **labels}

    def keys(self, instance: str = S1, **labels: str) -> dict[str, str]:
        """Labels of an alert aggregated ``by (job, instance, …)``."""
        return {"job": self.base["job"], "instance": instance, **labels}

    def absent(self) -> dict[str, str]:
        """absent(x{selector}) keeps the selector's equality matchers as labels."""
        return {m.label: m.value for m in self.cfg.matchers if m.op == "="}

    def window_words(self, name: str) -> str:
        window = getattr(self.cfg, name)
        return "hour" if window == "1h" else window


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _unselected(cfg: MonitoringConfig) -> dict[str, str]:
    """Labels of another exporter's target that the selector does not select."""
    base = cfg.series_labels
    candidates = [{**base, "job": "node"}, {"job": "node"}]
    candidates += [{**base, m.label: "node"} for m in cfg.matchers]
    for labels in candidates:
        if not selects(cfg.matchers, labels):
            return labels
    raise ConfigError("selector: it selects every target, so no test can show it does not")


def _alternative(cfg: MonitoringConfig) -> dict[str, str]:
    """Another scheduler target the selector selects (a second job name for a regex)."""
    base = cfg.series_labels
    for m in cfg.matchers:
        if m.op == "=~":
            labels = {**base, m.label: "django-" + base.get(m.label, "")}
            if selects(cfg.matchers, labels):
                return labels
    return base


def _quiet_start(for_seconds: float) -> int:
    """Minute at which a condition starts so that a quiet check before it can fire exists."""
    return 0 if for_seconds >= 120 else 2


def ha_tests(c: _Cases) -> TestFile:
    cfg = c.cfg
    doc = TestFile(
        f"{GENERATED}; do not edit by hand.\n"
        "promtool unit tests of the leader-lease alerts. Every alert fires in one case and stays\n"
        'quiet in another. Two processes, sched-1 and sched-2, form the group "default".'
    )
    lead = "apscheduler_leader"

    f = minutes(cfg.seconds("multiple_leaders_for"))
    fire = max(5, 2 + f + 1)
    n = max(10, fire + 3)
    doc.cases.append(Case(
        "two leaders",
        [
            ("", c.s(lead, S1, group="default"), runs((1, n + 1))),
            ("", c.s(lead, S2, group="default"), runs((0, 2), (1, n - 1))),
            ("Another group with its own single leader.", c.s(lead, S3, group="reports"),
             runs((1, n + 1))),
        ],
        [
            Check(60, "ApschedulerMultipleActiveSchedulers", []),
            Check(fire * 60, "ApschedulerMultipleActiveSchedulers",
                  [Alert({"group": "default"}, 2)]),
        ],
        "ApschedulerMultipleActiveSchedulers: more than one leader in a group for "
        f"{cfg.multiple_leaders_for}.",
    ))  # fmt: skip

    no_leader = cfg.seconds("no_leader_for")
    f = minutes(no_leader)
    fire = 2 + f + 1
    n = max(10, fire + 6)
    doc.cases.append(Case(
        "no leader after failover fails",
        [
            ("", c.s(lead, S1, group="default"), runs((1, 2), (0, n - 1))),
            ("", c.s(lead, S2, group="default"), runs((0, n + 1))),
            ("", c.s(lead, S3, group="reports"), runs((1, n + 1))),
        ],
        [
            Check(120 if no_leader >= 60 else 60, "ApschedulerNoLeader", []),
            Check(fire * 60, "ApschedulerNoLeader", [Alert({"group": "default"})]),
        ],
        f"ApschedulerNoLeader: no process of a group leads for {cfg.no_leader_for}. A failover "
        "shorter than that\n(TTL + standby poll, 17 s by default) stays quiet.",
    ))  # fmt: skip
    if no_leader > 0:
        doc.cases.append(Case(
            "a quick failover raises no alert",
            [
                ("", c.s(lead, S1, group="default"), runs((1, 3), (0, 8))),
                ("", c.s(lead, S2, group="default"), runs((0, 4), (1, 7))),
            ],
            [Check(180, "ApschedulerNoLeader", []), Check(360, "ApschedulerNoLeader", [])],
        ))  # fmt: skip
    fire = max(5, f + 1)
    doc.cases.append(Case(
        "scheduler processes up but none exports the lease metric",
        [("", c.s("up", S1), runs((1, max(10, fire + 5) + 1)))],
        [Check(fire * 60, "ApschedulerNoLeader", [Alert(c.absent())])],
    ))  # fmt: skip
    doc.cases.append(Case(
        "all targets down",
        [("", c.s("up", S1), runs((0, 11)))],
        [Check(300, "ApschedulerNoLeader", [])],
        "When every scheduler target is down, TargetDown reports it; NoLeader stays quiet.",
    ))  # fmt: skip

    w = minutes(cfg.seconds("claims_window"))
    n = w + 20
    claims = "apscheduler_claims_total"
    doc.cases.append(Case(
        "claims fenced",
        [
            ("", c.s(claims, S1, group="default", result="claimed"), f"0+5x{n}"),
            ("", c.s(claims, S1, group="default", result="fenced"), runs((0, 3), (1, n + 1))),
            ("", c.s(claims, S1, group="default", result="conflict"), runs((0, 4), (1, n + 1))),
            ("", c.s(claims, S2, group="default", result="claimed"), f"0+5x{n}"),
            ("", c.s(claims, S2, group="default", result="fenced"), runs((0, n + 1))),
        ],
        [
            Check(120, "ApschedulerClaimsFenced", []),
            Check(300, "ApschedulerClaimsFenced", [Alert(c.keys(S1, group="default"), 2)]),
            Check((w + 15) * 60, "ApschedulerClaimsFenced", []),
        ],
        "ApschedulerClaimsFenced: a fenced or conflicting claim in the last "
        f"{c.window_words('claims_window')} (counters born at 0).",
    ))  # fmt: skip
    abandoned = "apscheduler_abandoned_runs_total"
    doc.cases.append(Case(
        "runs abandoned",
        [
            ("", c.s(abandoned, S2, group="default"), runs((0, 2), (2, 11))),
            ("", c.s(abandoned, S1, group="default"), runs((0, 13))),
        ],
        [
            Check(60, "ApschedulerRunsAbandoned", []),
            Check(300, "ApschedulerRunsAbandoned", [Alert(c.keys(S2, group="default"), 2)]),
        ],
        "ApschedulerRunsAbandoned: the new leader marked runs of a dead leader abandoned.",
    ))  # fmt: skip
    return doc


def jobs_tests(c: _Cases) -> TestFile:
    cfg = c.cfg
    doc = TestFile(
        f"{GENERATED}; do not edit by hand.\n"
        "promtool unit tests of the per-job alerts: `promtool test rules alerts/tests/*.yaml`.\n"
        "Every alert has a case where it fires and one where it stays quiet. Instance sched-1 is "
        "the\nleader; sched-2 is a standby whose per-job gauges are stale by design and must "
        "never alert."
    )
    lead = "apscheduler_leader"
    fail, ok = (
        "apscheduler_job_last_failure_timestamp_seconds",
        "apscheduler_job_last_success_timestamp_seconds",
    )
    failing = "ApschedulerJobFailing"

    def failed(job_id: str, at: float) -> Alert:
        return Alert(c.full(S1, job_id=job_id), at)

    doc.cases.append(Case(
        "job failing until its next success",
        [
            ("", c.s(lead, S1, group="default"), "1x20"),
            ("", c.s(lead, S2, group="default"), "0x20"),
            ("report: succeeded at 60 s, failed at 180 s, succeeded again at 600 s.",
             c.s(ok, S1, job_id="report"), "60x9 600x10"),
            ("", c.s(fail, S1, job_id="report"), "_x2 180x17"),
            ("never_ok: failed and never succeeded.", c.s(fail, S1, job_id="never_ok"), "30x20"),
            ("healthy: failed once, succeeded since.", c.s(fail, S1, job_id="healthy"),
             "100x20"),
            ("", c.s(ok, S1, job_id="healthy"), "200x20"),
            ("The standby was seeded when report was failing and never updated.",
             c.s(fail, S2, job_id="report"), "180x20"),
            ("", c.s(ok, S2, job_id="report"), "60x20"),
        ],
        [
            Check(60, failing, [failed("never_ok", 30)]),
            Check(300, failing, [failed("never_ok", 30), failed("report", 180)]),
            Check(720, failing, [failed("never_ok", 30)],
                  "The success at 600 s resolves report; never_ok still fails."),
        ],
        "ApschedulerJobFailing: state-based, fires on the failed run and resolves on the next "
        "success.",
    ))  # fmt: skip
    doc.cases.append(Case(
        "job failing stays quiet for healthy jobs and standbys",
        [
            ("", c.s(lead, S2, group="default"), "0x10"),
            ("", c.s(fail, S2, job_id="report"), "180x10"),
            ("", c.s(fail, S1, job_id="healthy"), "100x10"),
            ("", c.s(ok, S1, job_id="healthy"), "200x10"),
        ],
        [Check(300, failing, [])],
    ))  # fmt: skip

    # High failure rate: k errors per success is above the threshold, the others are not.
    threshold, min_runs = cfg.failure_rate_threshold, cfg.failure_rate_min_runs
    k = math.floor(threshold / (1 - threshold)) + 1
    f = minutes(cfg.seconds("failure_rate_for"))
    quiet = f - 5 if f >= 10 else f // 2
    fire = f + 5
    n = max(40, fire + 20)
    runs_total = "apscheduler_job_runs_total"
    ok_errors = 1 if threshold >= 1 / 10 else 0
    series = [
        (f"flaky: {k} errors and 1 success per minute, {round(100 * k / (k + 1))} %.",
         c.s(runs_total, S1, job_id="flaky", outcome="success", error_type=""), f"0+1x{n}"),
        ("", c.s(runs_total, S1, job_id="flaky", outcome="error", error_type="ValueError"),
         f"0+{k}x{n}"),
        (f"mostly_ok: {ok_errors} error per 9 successes.",
         c.s(runs_total, S1, job_id="mostly_ok", outcome="success", error_type=""), f"0+9x{n}"),
        ("", c.s(runs_total, S1, job_id="mostly_ok", outcome="error", error_type="KeyError"),
         f"0+{ok_errors}x{n}"),
    ]  # fmt: skip
    if min_runs > 1:
        few = min_runs - 1
        window = c.window_words("failure_rate_window")
        series += [
            (f"too_few: {few} runs in the {window}, all failed: 100 % but below the minimum of "
             f"{min_runs} runs." if few > 2 else
             f"too_few: {few} runs in the {window}, both failed: 100 % but below the minimum "
             f"of {min_runs} runs." if few == 2 else
             f"too_few: 1 run in the {window}, failed: 100 % but below the minimum of "
             f"{min_runs} runs.",
             c.s(runs_total, S1, job_id="too_few", outcome="success", error_type=""),
             f"0x{n}"),
            ("", c.s(runs_total, S1, job_id="too_few", outcome="error", error_type="OSError"),
             " ".join(str(i) for i in range(few)) + f" {few}x{n - few}"),
        ]  # fmt: skip
    doc.cases.append(Case(
        "high failure rate", series,
        [
            Check(quiet * 60, "ApschedulerJobHighFailureRate", [], "Pending, not firing yet."),
            Check(fire * 60, "ApschedulerJobHighFailureRate",
                  [Alert(c.keys(S1, job_id="flaky"), k / (k + 1))]),
        ],
        f"ApschedulerJobHighFailureRate: increase() ratio over {cfg.failure_rate_window}, at "
        f"least {min_runs} runs, for {cfg.failure_rate_for}.",
    ))  # fmt: skip

    skipped = "apscheduler_job_skipped_runs_total"
    w = minutes(cfg.seconds("missed_runs_window"))
    n = w + 20
    later = "An hour" if cfg.missed_runs_window == "1h" else cfg.missed_runs_window
    doc.cases.append(Case(
        "missed runs, first miss of a counter born at zero",
        [
            ("", c.s(skipped, S1, job_id="nightly", reason="misfire"), runs((0, 3), (1, n + 1))),
            ("", c.s(skipped, S1, job_id="nightly", reason="coalesced"), runs((0, n + 1))),
            ("", c.s(skipped, S1, job_id="catchup", reason="coalesced"), runs((0, 4), (3, n + 1))),
            ("A max_instances skip is not a missed run.",
             c.s(skipped, S1, job_id="overlap", reason="max_instances"), f"0 1 2 3 4 5x{n}"),
            ("A series born at 1 never shows an increase: this is why the package creates the\n"
             "skipped series of every job at 0 when the job is added.",
             c.s(skipped, S1, job_id="born_at_one", reason="misfire"), runs((1, n + 1))),
        ],
        [
            Check(120, "ApschedulerJobMissedRuns", []),
            Check(300, "ApschedulerJobMissedRuns", [
                Alert(c.keys(S1, job_id="catchup"), 3), Alert(c.keys(S1, job_id="nightly"), 1),
            ]),
            Check((w + 10) * 60, "ApschedulerJobMissedRuns", [],
                  f"{later} later the misses have left the window and the alert resolves."),
        ],
        "ApschedulerJobMissedRuns: the misfire counter is born at 0, so the very first miss "
        "counts.",
    ))  # fmt: skip
    doc.cases.append(Case(
        "max instances reached",
        [
            ("", c.s(skipped, S1, job_id="overlap", reason="max_instances"), "0 0 1 2x10"),
            ("", c.s(skipped, S1, job_id="calm", reason="max_instances"), "0x10"),
        ],
        [
            Check(60, "ApschedulerJobMaxInstancesReached", []),
            Check(300, "ApschedulerJobMaxInstancesReached",
                  [Alert(c.keys(S1, job_id="overlap"), 2)]),
        ],
        "ApschedulerJobMaxInstancesReached (info).",
    ))  # fmt: skip

    late_t = cfg.late_threshold_seconds
    late = late_t * 1.5
    delay = "apscheduler_job_last_start_delay_seconds"
    doc.cases.append(Case(
        "late start",
        [
            ("", c.s(lead, S1, group="default"), "1x10"),
            ("", c.s(lead, S2, group="default"), "0x10"),
            ("", c.s(delay, S1, job_id="busy"), f"{num(min(0.5, late_t / 2))} {num(late)}x10"),
            ("", c.s(delay, S1, job_id="punctual"), f"{num(min(0.2, late_t / 4))}x10"),
            ("", c.s(delay, S2, job_id="busy"), f"{num(late)}x10"),
        ],
        [
            Check(0, "ApschedulerJobLate", []),
            Check(180, "ApschedulerJobLate", [Alert(c.full(S1, job_id="busy"), late)]),
        ],
        f"ApschedulerJobLate: last start delay above {num(late_t)} s, leader only.",
    ))  # fmt: skip

    overdue_t = cfg.overdue_threshold_seconds
    t1 = math.floor((60 + overdue_t) / 60) + 1
    f = minutes(cfg.seconds("overdue_for"))
    quiet, fire = max(t1 + f - 3, t1 - 1), t1 + f + 1
    n = max(15, fire + 5)
    next_run = "apscheduler_job_next_run_timestamp_seconds"
    doc.cases.append(Case(
        "overdue",
        [
            ("", c.s(lead, S1, group="default"), f"1x{n}"),
            ("stuck_loop: was due at 60 s and never started.",
             c.s(next_run, S1, job_id="stuck_loop"), f"60x{n}"),
            ("on_time: its next run is always 30 s ahead.", c.s(next_run, S1, job_id="on_time"),
             f"30+60x{n}"),
            ("held: paused (a stale next run time must not alert).",
             c.s(next_run, S1, job_id="held"), f"60x{n}"),
            ("", c.s("apscheduler_job_paused", S1, job_id="held"), f"1x{n}"),
        ],
        [
            Check(quiet * 60, "ApschedulerJobOverdue", [],
                  f"Overdue since {t1}m: pending at {quiet}m, firing from {t1 + f}m."),
            Check(fire * 60, "ApschedulerJobOverdue",
                  [Alert(c.full(S1, job_id="stuck_loop"), fire * 60 - 60)]),
        ],
        f"ApschedulerJobOverdue: next run time more than {num(overdue_t)} s in the past, not "
        f"paused, for {cfg.overdue_for}.",
    ))  # fmt: skip

    floor_s = cfg.stuck_min_seconds
    sync_limit = max(120.0, floor_s)
    t_sync = math.floor(sync_limit / 60) + 1
    late_eval = max(10, t_sync)
    n = late_eval
    long_runtime = max(3600, (late_eval + 10) * 60)
    oldest = "apscheduler_job_oldest_running_start_timestamp_seconds"
    max_rt = "apscheduler_job_max_runtime_seconds"
    interval = "apscheduler_job_expected_interval_seconds"
    checks = [Check(60, "ApschedulerJobStuck", [])]
    if t_sync < late_eval:
        early = [Alert(c.full(S1, job_id="etl"), t_sync * 60)] if t_sync * 60 > 300 else []
        checks.append(Check(t_sync * 60, "ApschedulerJobStuck",
                            [*early, Alert(c.full(S1, job_id="sync"), t_sync * 60)]))  # fmt: skip
    checks.append(Check(late_eval * 60, "ApschedulerJobStuck", [
        Alert(c.full(S1, job_id="etl"), late_eval * 60),
        Alert(c.full(S1, job_id="sync"), late_eval * 60),
    ]))  # fmt: skip
    doc.cases.append(Case(
        "stuck runs",
        [
            ("etl: max_runtime 300 s, running since 0.", c.s(oldest, S1, job_id="etl"),
             f"0x{n}"),
            ("", c.s(max_rt, S1, job_id="etl"), f"300x{n}"),
            ("", c.s(interval, S1, job_id="etl"), f"86400x{n}"),
            (f"sync: no max_runtime; runs every {num(sync_limit)} s and has been running since "
             "0.", c.s(oldest, S1, job_id="sync"), f"0x{n}"),
            ("", c.s(interval, S1, job_id="sync"), f"{num(sync_limit)}x{n}"),
            (f"long_ok: max_runtime {long_runtime} s wins over its 60 s interval.",
             c.s(oldest, S1, job_id="long_ok"), f"0x{n}"),
            ("", c.s(max_rt, S1, job_id="long_ok"), f"{long_runtime}x{n}"),
            ("", c.s(interval, S1, job_id="long_ok"), f"60x{n}"),
            (f"fast: every 10 s, current run started {num(floor_s / 2)} s ago: below the "
             f"{num(floor_s)} s floor.", c.s(oldest, S1, job_id="fast"),
             f"-{num(floor_s / 2)}+60x{n}"),
            ("", c.s(interval, S1, job_id="fast"), f"10x{n}"),
        ],
        checks,
        "ApschedulerJobStuck: max_runtime if set, else the expected interval (at least "
        f"{num(floor_s)} s).",
    ))  # fmt: skip

    factor, slack = cfg.no_success_interval_factor, cfg.no_success_slack_seconds
    daily, weekday = 86400, 259200
    limit = factor * daily + slack
    fire_h = math.floor(limit / 3600) + 1
    quiet_h = fire_h - 2
    n = max(300, fire_h * 6 + 6)
    friday = datetime(2024, 1, 5, 9, 0)
    now = friday + timedelta(hours=fire_h)
    before = friday + timedelta(hours=quiet_h)
    reg = "apscheduler_job_registered_timestamp_seconds"
    nrs = "ApschedulerJobNoRecentSuccess"
    doc.cases.append(Case(
        "no recent success over a weekend",
        [
            ("", c.s(lead, S1, group="default"), f"1x{n}"),
            ("", c.s(lead, S2, group="default"), f"0x{n}"),
            ("", c.s(ok, S1, job_id="weekday_report"), f"0x{n}"),
            ("", c.s(interval, S1, job_id="weekday_report"), f"{weekday}x{n}"),
            ("", c.s(ok, S1, job_id="daily_backup"), f"0x{n}"),
            ("", c.s(interval, S1, job_id="daily_backup"), f"{daily}x{n}"),
            ("The standby has the same stale values; only the leader alerts.",
             c.s(ok, S2, job_id="daily_backup"), f"0x{n}"),
            ("", c.s(interval, S2, job_id="daily_backup"), f"{daily}x{n}"),
            ("A paused daily job is never alerted.", c.s(ok, S1, job_id="paused_daily"),
             f"0x{n}"),
            ("", c.s(interval, S1, job_id="paused_daily"), f"{daily}x{n}"),
            ("", c.s("apscheduler_job_paused", S1, job_id="paused_daily"), f"1x{n}"),
        ],
        [
            Check(quiet_h * 3600, nrs, [],
                  f"Friday 09:00 + {quiet_h} h ({before:%A %H:%M}): still within the daily "
                  "job's threshold."),
            Check(fire_h * 3600, nrs, [Alert(c.full(S1, job_id="daily_backup"), fire_h * 3600)]),
        ],
        f"ApschedulerJobNoRecentSuccess: the threshold is {num(factor)} x the trigger's largest "
        f"gap + {num(slack)} s.\nBoth jobs last succeeded on Friday 09:00 (t=0); it is now "
        f"{now:%A %H:%M} ({fire_h} h later). The\nMon-Fri 09:00 cron job (largest gap "
        f"{weekday} s, Fri -> Mon) is fine; the daily job\n({daily} s) is overdue: "
        f"{fire_h * 3600} s > {num(factor)} x {daily} + {num(slack)} = {num(limit)} s.",
        interval="10m",
    ))  # fmt: skip

    hourly = factor * 3600 + slack
    fire_h = math.floor(hourly / 3600) + 1
    n = max(200, fire_h * 60 + 20)
    doc.cases.append(Case(
        "no recent success of a job that never succeeded",
        [
            (f"hourly_new: registered at 0, never succeeded; threshold {num(factor)} x 3600 + "
             f"{num(slack)} = {num(hourly)} s.", c.s(reg, S1, job_id="hourly_new"), f"0x{n}"),
            ("", c.s(interval, S1, job_id="hourly_new"), f"3600x{n}"),
            ("hourly_ok: registered long ago, but succeeded recently.",
             c.s(reg, S1, job_id="hourly_ok"), f"0x{n}"),
            ("", c.s(ok, S1, job_id="hourly_ok"), f"0+60x{n}"),
            ("", c.s(interval, S1, job_id="hourly_ok"), f"3600x{n}"),
        ],
        [
            Check((fire_h - 1) * 3600, nrs, []),
            Check(fire_h * 3600, nrs, [Alert(c.full(S1, job_id="hourly_new"), fire_h * 3600)]),
        ],
    ))  # fmt: skip

    doc.cases.append(_unrestorable_case(c))
    if cfg.paused_for:
        doc.cases.append(_paused_case(c))
    return doc


def _unrestorable_case(c: _Cases) -> Case:
    cfg = c.cfg
    f = minutes(cfg.seconds("unrestorable_for"))
    quiet, fire = max(0, f), f + 2
    n = max(20, fire + 3)
    jobs, info = "apscheduler_jobs", "apscheduler_scheduler_info"
    lead = "apscheduler_leader"
    series = [
        ("", c.s(lead, S1, group="default"), f"1x{n}"),
        ("", c.s(lead, S2, group="default"), f"0x{n}"),
        ("", c.s(lead, S3, group="reports"), f"1x{n}"),
        ("", c.s(info, S1, group="default", identity="sched-1", version="3.11.0"), f"1x{n}"),
        ("", c.s(info, S2, group="default", identity="sched-2", version="3.11.0"), f"1x{n}"),
        ("", c.s(info, S3, group="reports", identity="sched-3", version="3.11.0"), f"1x{n}"),
        ("Both processes of group default read the same job table: two jobs whose function\n"
         "was removed in a deploy, from 1m on.", c.s(jobs, S1, state="unrestorable"),
         runs((0, 1), (2, n))),
        ("", c.s(jobs, S2, state="unrestorable"), runs((0, 1), (2, n))),
        ("", c.s(jobs, S1, state="scheduled"), f"5x{n}"),
    ]  # fmt: skip
    if f >= 2:
        short = f // 2
        series.append((
            f"A rolling deploy: an old process of group reports cannot restore a job that only\n"
            f"the new code defines, for {short}m (less than {cfg.unrestorable_for}).",
            c.s(jobs, S3, state="unrestorable"), runs((0, 1), (1, short), (0, n - short)),
        ))  # fmt: skip
    return Case(
        "unrestorable jobs, counted once per group",
        series,
        [
            Check(quiet * 60, "ApschedulerUnrestorableJobs", []),
            Check(fire * 60, "ApschedulerUnrestorableJobs",
                  [Alert({"job": c.base["job"], "group": "default"}, 2)]),
        ],
        "ApschedulerUnrestorableJobs: stored jobs that cannot be restored, one alert per group "
        f"(every\nprocess, leader or standby, counts them from the database), for "
        f"{cfg.unrestorable_for}.",
    )  # fmt: skip


def _paused_case(c: _Cases) -> Case:
    cfg = c.cfg
    paused_for = cfg.seconds("paused_for")
    step = 300  # checks 5m either side; samples stay 1m apart (within the 5m lookback)
    n = minutes(paused_for) + 10  # samples
    failover = n // 2
    lead, paused = "apscheduler_leader", "apscheduler_job_paused"
    return Case(
        "job paused for too long, across a failover",
        [
            (f"sched-1 leads until {format_duration(failover * 60)}, then sched-2 takes over.",
             c.s(lead, S1, group="default"), runs((1, failover), (0, n - failover))),
            ("", c.s(lead, S2, group="default"), runs((0, failover), (1, n - failover))),
            ("held: paused from the start; both processes know it.",
             c.s(paused, S1, job_id="held"), runs((1, n))),
            ("", c.s(paused, S2, job_id="held"), runs((1, n))),
            ("resumed: paused for a while, then resumed.", c.s(paused, S1, job_id="resumed"),
             runs((1, failover), (0, n - failover))),
            ("", c.s(paused, S2, job_id="resumed"), runs((1, failover), (0, n - failover))),
            ("stale_seed: the standby's gauge was seeded while paused; the leader's says active.",
             c.s(paused, S1, job_id="stale_seed"), runs((0, n))),
            ("", c.s(paused, S2, job_id="stale_seed"), runs((1, failover), (0, n - failover))),
        ],
        [
            Check(paused_for - step, "ApschedulerJobPausedTooLong", []),
            Check(paused_for + step, "ApschedulerJobPausedTooLong",
                  [Alert({"job": c.base["job"], "job_id": "held"})]),
        ],
        f"ApschedulerJobPausedTooLong (opt-in, paused_for {cfg.paused_for}): the leader's gauge "
        "counts, and a\nfailover half-way does not restart the clock.",
    )  # fmt: skip


def scheduler_tests(c: _Cases) -> TestFile:
    cfg = c.cfg
    doc = TestFile(
        f"{GENERATED}; do not edit by hand.\n"
        "promtool unit tests of the process-level alerts: scrape target, scheduler state, "
        "heartbeat,\nexecution history and clock skew. Every alert fires in one case and stays "
        "quiet in another."
    )
    down_for = cfg.seconds("target_down_for")
    s0 = _quiet_start(down_for)
    f = minutes(down_for)
    quiet, fire = s0 + f - 2, s0 + f + 1
    n = max(10, fire + 4)
    doc.cases.append(Case(
        "target down",
        [
            ("", c.s("up", S1), runs((1, s0), (0, n + 1 - s0))),
            ("", c.s("up", S2), f"1x{n}"),
            ("", c.s("up", OTHER_INSTANCE, base=c.other), f"0x{n}"),
        ],
        [
            Check(max(0, quiet) * 60, "ApschedulerTargetDown", []),
            Check(fire * 60, "ApschedulerTargetDown", [Alert(c.full(S1))]),
        ],
        f"ApschedulerTargetDown: up == 0 for {cfg.target_down_for}.",
    ))  # fmt: skip

    absent_for = cfg.seconds("target_absent_for")
    f = minutes(absent_for)
    fire = f + 1
    n = max(15, fire + 4)
    checks = [Check(f // 2 * 60, "ApschedulerTargetAbsent", [])] if absent_for > 0 else []
    doc.cases.append(Case(
        "target absent",
        [("", c.s("up", OTHER_INSTANCE, base=c.other), f"1x{n}")],
        [*checks, Check(fire * 60, "ApschedulerTargetAbsent", [Alert(c.absent())])],
        "ApschedulerTargetAbsent: no target matches the selector at all, for "
        f"{cfg.target_absent_for}.",
    ))  # fmt: skip
    doc.cases.append(Case(
        "target present, even when down",
        [("", c.s("up", S1, base=c.alt), f"0x{n}")],
        [Check(fire * 60, "ApschedulerTargetAbsent", [])],
    ))  # fmt: skip

    state = "apscheduler_scheduler_state"

    def st(instance: str, value: str) -> str:
        return c.s(state, instance, apscheduler_scheduler_state=value)

    not_running_for = minutes(cfg.seconds("scheduler_not_running_for"))
    quiet, fire = max(0, 1 + not_running_for - 2), 1 + not_running_for + 1
    n = max(11, fire + 4)
    doc.cases.append(Case(
        "scheduler not running",
        [
            ("", st(S1, "running"), runs((1, 1), (0, n))),
            ("", st(S1, "paused"), runs((0, 1), (1, n))),
            ("", st(S1, "stopped"), f"0x{n}"),
            ("A running standby.", st(S2, "running"), f"1x{n}"),
            ("", st(S2, "paused"), f"0x{n}"),
            ("", st(S2, "stopped"), f"0x{n}"),
            ("", c.s("apscheduler_leader", S2, group="default"), f"0x{n}"),
        ],
        [
            Check(quiet * 60, "ApschedulerSchedulerNotRunning", []),
            Check(fire * 60, "ApschedulerSchedulerNotRunning",
                  [Alert(c.full(S1, apscheduler_scheduler_state="paused"))]),
        ],
        "ApschedulerSchedulerNotRunning: the stateset's running member is 0 for "
        f"{cfg.scheduler_not_running_for}. Standbys run\ntheir scheduler too (state running, "
        "leader 0) and must not alert.",
    ))  # fmt: skip

    stale = cfg.heartbeat_stale_seconds
    t1 = math.floor(stale / 60) + 1
    f = minutes(cfg.seconds("heartbeat_stale_for"))
    quiet, fire = t1 + f - 1, t1 + f + 1
    n = max(10, fire + 3)
    hb, started = "apscheduler_scheduler_heartbeat_timestamp_seconds", "process_start_time_seconds"
    stale_alert = "ApschedulerHeartbeatStale"
    when = f"pending at {quiet}m, firing from {t1 + f}m" if f else f"firing from {t1}m"
    doc.cases.append(Case(
        "heartbeat stale",
        [
            ("", c.s("apscheduler_leader", S1, group="default"), f"1x{n}"),
            ("", c.s("apscheduler_leader", S2, group="default"), f"0x{n}"),
            ("Both schedulers run (the alert is about a running scheduler).",
             st(S1, "running"), f"1x{n}"),
            ("", st(S2, "running"), f"1x{n}"),
            ("The leader's loop hangs after its heartbeat at 0 s.", c.s(hb, S1), f"0x{n}"),
            ("The standby's canary keeps running.", c.s(hb, S2), f"0+60x{n}"),
        ],
        [
            Check(quiet * 60, stale_alert, [],
                  f"Stale from {t1}m on ({t1 * 60} s > {num(stale)} s): {when}."),
            Check(fire * 60, stale_alert, [Alert(c.full(S1), fire * 60)]),
        ],
        f"ApschedulerHeartbeatStale: the canary has not run for {num(stale)} s, for "
        f"{cfg.heartbeat_stale_for}. Every process,\nleader or standby, runs the canary through "
        "its own loop and executor.",
    ))  # fmt: skip
    doc.cases.append(Case(
        "heartbeat fresh",
        [
            ("", c.s("apscheduler_leader", S1, group="default"), f"1x{n}"),
            ("", st(S1, "running"), f"1x{n}"),
            ("Every 30 s, sampled every minute.", c.s(hb, S1), f"0+60x{n}"),
        ],
        [Check(n * 60, stale_alert, [])],
    ))  # fmt: skip
    never = max(fire, minutes(cfg.seconds("scheduler_not_running_for")) + 1)
    doc.cases.append(Case(
        "no heartbeat because the scheduler never started",
        [
            ("", st(S1, "running"), f"0x{never + 3}"),
            ("", st(S1, "paused"), f"0x{never + 3}"),
            ("", st(S1, "stopped"), f"1x{never + 3}"),
            ("", c.s(started, S1), f"0x{never + 3}"),
        ],
        [
            Check(never * 60, stale_alert, []),
            Check(never * 60, "ApschedulerSchedulerNotRunning",
                  [Alert(c.full(S1, apscheduler_scheduler_state="stopped"))]),
        ],
        "The heartbeat series is absent until the first heartbeat. A scheduler that never "
        "started\nis ApschedulerSchedulerNotRunning's to report; HeartbeatStale stays quiet.",
    ))  # fmt: skip
    recent = fire - 1 if stale > 60 else fire
    doc.cases.append(Case(
        "running scheduler without any heartbeat",
        [
            ("sched-1 started at 0 and its canary never ran.", st(S1, "running"),
             f"1x{n}"),
            ("", c.s(started, S1), f"0x{n}"),
            (f"sched-2 started at {recent}m: too recent to be stale.", st(S2, "running"),
             runs(("_", recent), (1, n + 1 - recent))),
            ("", c.s(started, S2), runs(("_", recent), (recent * 60, n + 1 - recent))),
        ],
        [
            Check(quiet * 60, stale_alert, []),
            Check(fire * 60, stale_alert, [Alert(c.full(S1), fire * 60)]),
        ],
        "Without any heartbeat the time counts from the process start "
        "(process_start_time_seconds).",
    ))  # fmt: skip

    w = minutes(cfg.seconds("history_errors_window"))
    n = w + 20
    errors = "apscheduler_history_write_errors_total"
    dropped = "apscheduler_history_dropped_writes_total"
    doc.cases.append(Case(
        "history write errors",
        [
            ("", c.s(errors, S1, operation="finish"), f"0 0 1 1 3x{n - 5}"),
            ("", c.s(errors, S1, operation="claim"), f"0x{n}"),
            ("", c.s(dropped, S1), f"0x{n}"),
            ("sched-2 loses writes because its buffer is full, without any failed write counted.",
             c.s(errors, S2, operation="finish"), f"0x{n}"),
            ("", c.s(dropped, S2), f"0 0 0 0 2x{n - 5}"),
            ("A healthy process.", c.s(errors, S3, operation="finish"), f"0x{n}"),
            ("", c.s(dropped, S3), f"0x{n}"),
        ],
        [
            Check(60, "ApschedulerExecutionHistoryWriteErrors", []),
            Check(360, "ApschedulerExecutionHistoryWriteErrors",
                  [Alert(c.keys(S1), 3), Alert(c.keys(S2), 2)]),
            Check((w + 15) * 60, "ApschedulerExecutionHistoryWriteErrors", [],
                  f"The errors have left the {cfg.history_errors_window} window."),
        ],
        "ApschedulerExecutionHistoryWriteErrors: failed or dropped history writes in "
        f"{cfg.history_errors_window}.",
    ))  # fmt: skip

    skew_for = cfg.seconds("clock_skew_for")
    threshold = cfg.clock_skew_threshold_seconds
    s0 = _quiet_start(skew_for)
    f = minutes(skew_for)
    quiet, fire = s0 + f - 2, s0 + f + 1
    n = max(10, fire + 4)
    skew = "apscheduler_clock_skew_seconds"
    far = threshold + 1.5
    series = [
        ("", c.s(skew, S1, group="default"), runs((0, s0), (-far, n + 1 - s0))),
        ("", c.s(skew, S2, group="default"), f"{num(threshold / 5)}x{n}"),
    ]
    if f >= 3:
        series.append((
            f"A short spike does not last {cfg.clock_skew_for}.", c.s(skew, S3, group="default"),
            f"0 {num(threshold + 1)} {num(threshold + 1)} 0x{n - 2}",
        ))  # fmt: skip
    doc.cases.append(Case(
        "clock skew", series,
        [
            Check(quiet * 60, "ApschedulerClockSkew", []),
            Check(fire * 60, "ApschedulerClockSkew", [Alert(c.full(S1, group="default"), far)]),
        ],
        f"ApschedulerClockSkew: |db clock - host clock| > {num(threshold)} s for "
        f"{cfg.clock_skew_for}.",
    ))  # fmt: skip
    return doc


def workers_tests(c: _Cases) -> TestFile:
    cfg = c.cfg
    doc = TestFile(
        f"{GENERATED}; do not edit by hand.\n"
        "promtool unit tests of the alerts on runs handed to worker engines (Celery, Django's "
        "Tasks\nframework). Every alert fires in one case and stays quiet in another."
    )
    threshold = cfg.worker_backlog_seconds
    first = math.floor(threshold / 60) + 1  # first minute at which the wait is over it
    f = minutes(cfg.seconds("worker_backlog_for"))
    fire = first + f
    n = fire + 4
    oldest = "apscheduler_remote_oldest_queued_timestamp_seconds"
    doc.cases.append(Case(
        "worker backlog",
        [
            ("sched-1: a run queued at 0 s that no worker takes.", c.s(oldest, S1), f"0x{n}"),
            ("sched-2: runs are taken within 30 s, minute after minute.", c.s(oldest, S2),
             f"-30+60x{n}"),
        ],
        [
            Check((fire - 1) * 60, "ApschedulerWorkerBacklog", [],
                  f"Over {num(threshold)} s since minute {first}, not yet for "
                  f"{cfg.worker_backlog_for}."),
            Check(fire * 60, "ApschedulerWorkerBacklog", [Alert(c.full(S1), fire * 60)]),
        ],
        f"ApschedulerWorkerBacklog: the oldest queued run has waited over {num(threshold)} s "
        f"for {cfg.worker_backlog_for}.",
    ))  # fmt: skip
    lost = "apscheduler_job_lost_runs_total"
    w = minutes(cfg.seconds("lost_runs_window"))
    doc.cases.append(Case(
        "runs lost",
        [
            ("", c.s(lost, S1, job_id="sync"), runs((0, 2), (2, w + 20))),
            ("", c.s(lost, S1, job_id="fine"), runs((0, w + 22))),
        ],
        [
            Check(60, "ApschedulerJobRunsLost", []),
            Check(300, "ApschedulerJobRunsLost", [Alert(c.keys(S1, job_id="sync"), 2)]),
            Check((w + 15) * 60, "ApschedulerJobRunsLost", [],
                  f"The lost runs have left the {cfg.lost_runs_window} window."),
        ],
        "ApschedulerJobRunsLost: runs never picked up (or never enqueued) in the last "
        f"{c.window_words('lost_runs_window')} (counters born at 0).",
    ))  # fmt: skip
    return doc


def render_tests(cfg: MonitoringConfig) -> dict[str, str]:
    """File name (under ``alerts/tests/``) -> promtool test file."""
    cases = _Cases(cfg)
    writer = _Writer(cfg)
    docs: Iterable[tuple[str, TestFile]] = (
        ("ha.yaml", ha_tests(cases)),
        ("jobs.yaml", jobs_tests(cases)),
        ("scheduler.yaml", scheduler_tests(cases)),
        ("workers.yaml", workers_tests(cases)),
    )
    return {name: writer.render(doc) for name, doc in docs}


def count_cases(files: dict[str, Any]) -> tuple[int, int]:
    """(test cases, alert evaluations) in rendered test files."""
    tests = [case for text in files.values() for case in yaml.safe_load(text)["tests"]]
    return len(tests), sum(len(case.get("alert_rule_test", [])) for case in tests)
