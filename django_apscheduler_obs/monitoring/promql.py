"""PromQL building blocks: label matchers, selections, the standby exclusion, durations.

The selector is parsed (not just pasted) so that bad input fails with one clear line before any
file is written, and so that the generated promtool tests can label their series to match it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Prometheus duration units in seconds (``model.ParseDuration``).
_UNITS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_DURATION = re.compile(r"^(?:\d+(?:y|w|d|h|ms|m|s))+$")
_DURATION_PART = re.compile(r"(\d+)(y|w|d|h|ms|m|s)")
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_MATCHER = re.compile(
    rf"\s*({_LABEL})\s*(=~|!~|!=|=)\s*"
    r"(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`)\s*(?:,|$)"
)


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration (``90s``, ``5m``, ``1h30m``); ValueError if invalid."""
    if not _DURATION.match(text):
        raise ValueError(f"{text!r} is not a Prometheus duration (e.g. 90s, 5m, 1h30m, 2d)")
    return float(sum(int(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(text)))


def format_duration(seconds: float) -> str:
    """Whole seconds as one unit, the way the tests write eval times: ``49h``, ``75m``, ``90s``."""
    whole = int(round(seconds))
    if whole == 0:
        return "0m"
    for unit, size in (("h", 3600), ("m", 60)):
        if whole and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def num(value: float) -> str:
    """A threshold as PromQL and humans write it: ``60`` not ``60.0``, ``0.5`` stays."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class Matcher:
    """One label matcher of the selector, e.g. ``job=~".*apscheduler.*"``."""

    label: str
    op: str
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a series with ``labels`` is selected (a missing label is the empty string)."""
        actual = labels.get(self.label, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = re.fullmatch(self.value, actual) is not None  # RE2 is close enough to re here
        return found if self.op == "=~" else not found


def _unquote(quoted: str) -> str:
    if quoted.startswith("`"):
        return quoted[1:-1]
    body = quoted[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def parse_matchers(text: str) -> tuple[Matcher, ...]:
    """``job="a", env=~"p.*"`` -> matchers; ValueError naming the part that does not parse."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    if not body.strip():
        raise ValueError('is empty: give at least one label matcher, e.g. job="scheduler"')
    matchers = []
    pos = 0
    while pos < len(body):
        match = _MATCHER.match(body, pos)
        if match is None:
            raise ValueError(
                f'is not a list of label matchers (label="value", =~, != or !~, separated by '
                f"commas): cannot parse {body[pos:].strip()!r}"
            )
        label, op, quoted = match.groups()
        value = _unquote(quoted)
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"has an invalid regular expression {value!r}: {exc}") from None
        matchers.append(Matcher(label, op, value))
        pos = match.end()
    return tuple(matchers)


def selects(matchers: tuple[Matcher, ...], labels: dict[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


def sel(metric: str, labels: str, extra: str = "") -> str:
    """``metric{labels, extra}``."""
    inner = ", ".join(part for part in (labels, extra) if part)
    return f"{metric}{{{inner}}}"


def standbys(labels: str) -> str:
    """Processes that report ``apscheduler_leader == 0``.

    Only the leader runs jobs, so a standby's per-job gauges (seeded at start, never updated)
    and its heartbeat are stale by design. Queries subtract standbys with ``unless`` instead of
    keeping leaders with ``and``, so a process without the lease metric is never hidden.
    """
    return f"(max by (job, instance) ({sel('apscheduler_leader', labels)}) == 0)"


def leader_only(expr: str, labels: str = 'job=~"$job", instance=~"$instance"') -> str:
    """``expr`` without standbys. ``labels`` select processes: never filter on ``job_id`` here,
    ``apscheduler_leader`` has no such label."""
    return f"({expr} unless on(job, instance) {standbys(labels)})"
