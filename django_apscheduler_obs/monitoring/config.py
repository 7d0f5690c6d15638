"""The one place that holds the target selector, thresholds and links of the shipped monitoring.

A frozen dataclass validated on creation, so every config that reaches the renderers is usable:
a bad value fails with one line naming the key, before any file is written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, get_type_hints

from django_apscheduler_obs.monitoring.promql import (
    Matcher,
    parse_duration,
    parse_matchers,
    selects,
)

DEFAULT_SELECTOR = 'job=~".*apscheduler.*"'
#: Labels of the promtool tests' series for the default selector (a regex gives no values).
DEFAULT_TEST_LABELS = 'job="apscheduler"'
#: Labels the alerts and tests set themselves: a selector or test label on them would clash.
RESERVED_LABELS = frozenset(
    {
        "instance", "job_id", "group", "state", "outcome", "error_type", "reason", "result",
        "operation", "executor", "le", "apscheduler_scheduler_state", "severity", "alertname",
    }
)  # fmt: skip
#: Windows of increase(): shorter ones hold too few scrapes to count reliably.
MIN_WINDOW_SECONDS = 600


class ConfigError(ValueError):
    """A bad monitoring setting; the message is one line that names it."""


@dataclass(frozen=True)
class MonitoringConfig:
    """Selector, thresholds and links of the alert rules, their tests and the dashboards.

    Durations are Prometheus durations (``90s``, ``5m``, ``1h``); ``*_seconds`` are numbers.
    """

    # Inserted between {} in every alert query, like celery-mixin's celerySelector. It must
    # select the scrape job(s) of the scheduler processes (leader and standbys).
    selector: str = DEFAULT_SELECTOR
    # Equality matchers giving the labels of the generated tests' series, e.g. job="sched",
    # env="prod". Empty: taken from the selector's = matchers (required when it has others).
    test_labels: str = ""
    # Links put into alert annotations and dashboards.
    grafana_url: str = "http://localhost:3000"
    runbook_url: str = (
        "https://github.com/django-apscheduler-obs/django-apscheduler-obs/blob/main/docs/alerts.md"
    )
    admin_url: str = "http://localhost:8000/admin"
    overview_uid: str = "apscheduler-overview"
    job_uid: str = "apscheduler-job"
    dashboard_tags: tuple[str, ...] = ("apscheduler", "django-apscheduler-obs")
    # Labels that identify one leader-election group across processes. Add e.g. "namespace"
    # when several deployments share a group name but not a database.
    ha_group_by: str = "group"
    # -- thresholds (each is used by one alert; the table colours follow the alert) ----------
    failure_rate_window: str = "1h"
    failure_rate_threshold: float = 0.5
    failure_rate_min_runs: int = 3
    failure_rate_for: str = "15m"
    missed_runs_window: str = "1h"
    max_instances_window: str = "1h"
    late_threshold_seconds: float = 60
    overdue_threshold_seconds: float = 120
    overdue_for: str = "5m"
    # A job without max_runtime is "stuck" after one expected interval, but never sooner than
    # this: scrape intervals make shorter limits flap.
    stuck_min_seconds: float = 60
    no_success_interval_factor: float = 2
    no_success_slack_seconds: float = 300
    # Unrestorable jobs (function gone after a deploy); the "for" rides out a rolling deploy,
    # during which old processes cannot restore jobs that only the new code defines.
    unrestorable_for: str = "15m"
    # Opt-in: alert on a job paused for longer than this (None: paused jobs stay quiet).
    paused_for: str | None = None
    target_down_for: str = "5m"
    target_absent_for: str = "10m"
    scheduler_not_running_for: str = "5m"
    heartbeat_stale_seconds: float = 180
    heartbeat_stale_for: str = "2m"
    # Lease TTL + standby poll is 17 s by default; one minute is well past a healthy failover.
    multiple_leaders_for: str = "1m"
    no_leader_for: str = "1m"
    claims_window: str = "1h"
    history_errors_window: str = "15m"
    clock_skew_threshold_seconds: float = 2
    clock_skew_for: str = "5m"
    abandoned_window: str = "1h"
    # Runs on workers: a run waiting in the engine this long is a backlog (well before the
    # scheduler's dispatch timeout, 300 s by default, marks it lost).
    worker_backlog_seconds: float = 120
    worker_backlog_for: str = "2m"
    lost_runs_window: str = "1h"
    # Jobs table: colour of "time since last success / expected interval".
    table_ratio_amber: float = 1.5
    table_ratio_red: float = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.init:
                _check(f.name, getattr(self, f.name))
        if self.table_ratio_amber >= self.table_ratio_red:
            raise ConfigError("table_ratio_amber must be below table_ratio_red")
        self.series_labels  # noqa: B018 -- derived now, so a bad combination fails at creation

    @cached_property
    def matchers(self) -> tuple[Matcher, ...]:
        return parse_matchers(self.selector)

    @cached_property
    def series_labels(self) -> dict[str, str]:
        """Labels of every series in the generated tests; they match ``selector``."""
        return _derive_test_labels(self.matchers, self.test_labels)

    def seconds(self, name: str) -> float:
        """A duration or number setting in seconds."""
        value = getattr(self, name)
        return parse_duration(value) if isinstance(value, str) else float(value)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def _is_duration(name: str) -> bool:
    return name.endswith(("_window", "_for"))


def _check(name: str, value: Any) -> None:
    """One line per bad value, naming the key."""
    _check_type(name, value)
    if _is_duration(name):
        if value is None and name == "paused_for":
            return
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        if name.endswith("_window") and seconds < MIN_WINDOW_SECONDS:
            raise ConfigError(f"{name}: {value!r} is too short, use at least 10m")
        if name == "paused_for" and seconds < 60:
            raise ConfigError(f"{name}: {value!r} is too short, use at least 1m")
        return
    if name == "selector":
        try:
            matchers = parse_matchers(value)
        except ValueError as exc:
            raise ConfigError(f"selector {value!r} {exc}") from None
        clash = sorted({m.label for m in matchers} & RESERVED_LABELS)
        if clash:
            raise ConfigError(
                f"selector: must not match on {', '.join(clash)} (the alerts set or join on it)"
            )
        return
    if name == "ha_group_by":
        labels = [part.strip() for part in value.split(",")]
        if not all(re.fullmatch(r"[a-zA-Z_]\w*", label) for label in labels):
            raise ConfigError(f"ha_group_by: {value!r} is not a comma-separated list of labels")
        if "group" not in labels:
            raise ConfigError("ha_group_by: must contain group (the lease metrics' label)")
        return
    if name.endswith("_url"):
        if not re.fullmatch(r"https?://\S+", value) or value.endswith("/"):
            raise ConfigError(f"{name}: {value!r} is not an http(s) URL without a trailing /")
        return
    if name.endswith("_uid") and not re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", value):
        raise ConfigError(f"{name}: {value!r} is not a Grafana uid (letters, digits, - and _)")
    if isinstance(value, (int, float)):
        if name in _RANGES:
            low, high = _RANGES[name]
            bad = value < low or (high is not None and value >= high)
            bound = f"in [{low:g}, {high:g})" if high is not None else f"at least {low:g}"
        else:
            bad, bound = value <= 0, "above 0"
        if bad:
            raise ConfigError(f"{name}: {value!r} must be {bound}")


#: Number settings bounded otherwise than "above 0": (lowest allowed, upper bound exclusive).
_RANGES: dict[str, tuple[float, float | None]] = {
    "failure_rate_threshold": (0.0, 1.0),
    "failure_rate_min_runs": (1.0, None),
    "no_success_interval_factor": (1.0, None),
    "no_success_slack_seconds": (0.0, None),
}


def _check_type(name: str, value: Any) -> None:
    kind = _field_type(name)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == tuple[str, ...]:
        ok = isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)
    elif name == "paused_for":
        ok = value is None or isinstance(value, str)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{name}: {value!r} is not a {getattr(kind, '__name__', kind)}")


def _derive_test_labels(matchers: tuple[Matcher, ...], test_labels: str) -> dict[str, str]:
    """The selector's ``=`` matchers, completed (or replaced) by ``test_labels``.

    A regex or negative matcher has no value to copy, so then the user names example labels;
    the default selector uses ``job="apscheduler"``, as the committed tests always did.
    """
    labels = {"job": "apscheduler"}
    labels.update({m.label: m.value for m in matchers if m.op == "="})
    given = test_labels
    if not given and any(m.op != "=" for m in matchers):
        if matchers != parse_matchers(DEFAULT_SELECTOR):
            raise ConfigError(
                "test_labels: the selector has a regex or negative matcher, so give example "
                "labels of a scheduler target that it selects, e.g. --test-labels 'job=\"sched\"'"
            )
        given = DEFAULT_TEST_LABELS
    if given:
        try:
            extra = parse_matchers(given)
        except ValueError as exc:
            raise ConfigError(f"test_labels {given!r} {exc}") from None
        if any(m.op != "=" for m in extra):
            raise ConfigError('test_labels: use = matchers only, e.g. job="sched", env="prod"')
        clash = sorted({m.label for m in extra} & RESERVED_LABELS)
        if clash:
            raise ConfigError(f"test_labels: must not set {', '.join(clash)}")
        labels.update({m.label: m.value for m in extra})
    if not selects(matchers, labels):
        shown = ", ".join(f'{k}="{v}"' for k, v in labels.items())
        raise ConfigError(f"test_labels: {{{shown}}} is not selected by the selector")
    return labels


@cache
def _field_types() -> dict[str, Any]:
    return get_type_hints(MonitoringConfig)


def _field_type(name: str) -> Any:
    return _field_types()[name]


def parse_value(name: str, text: str) -> Any:
    """A ``--set NAME=VALUE`` string as the type of the (known) setting ``name``."""
    kind = _field_type(name)
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not an integer") from None
    if kind is float:
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not a number") from None
        return int(number) if number.is_integer() else number
    if kind == tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if name == "paused_for" and text.strip().lower() in ("", "none", "off"):
        return None
    return text


def build_config(values: Mapping[str, Any] | None = None) -> MonitoringConfig:
    """The default config with ``values`` (already typed, or strings for ``--set``) applied."""
    known = {f.name for f in dataclasses.fields(MonitoringConfig) if f.init}
    typed = {}
    for name, value in (values or {}).items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(known))}")
        typed[name] = parse_value(name, value) if isinstance(value, str) else value
    return MonitoringConfig(**typed)
