"""Every PromQL expression of the shipped alert rules and dashboards, and the metric names in them.

The contract test compares ``metric_names_used()`` with what a live scheduler serves on /metrics,
so a renamed metric breaks a test instead of silently emptying a panel or disarming an alert.
``tests/test_grafana.py`` uses the same extraction to run every dashboard query through promtool.

Names are *sample* names with ``_bucket``/``_count``/``_sum`` folded back into the histogram's
family name; counters keep their ``_total`` suffix (``prometheus_client.parser`` reports the
counter family without it, so compare against sample names, or add ``_total`` back).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES_FILE = HERE / "alerts" / "apscheduler.rules.yaml"
DASHBOARD_DIR = HERE / "dashboards"

#: Series that Prometheus makes up itself; no exporter serves them.
SYNTHETIC = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

#: Values for Grafana's variables when an expression is checked outside Grafana.
DEFAULT_VARIABLES: Mapping[str, str] = {
    "__rate_interval": "5m",
    "__range": "1d",
    "__interval": "1m",
    "job": "apscheduler",
    "instance": "127.0.0.1:9100",
    "job_id": "demo_job",
}

_KEYWORDS = frozenset(
    {
        # aggregations (followed by a grouping clause, not always by "(")
        "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
        "quantile", "count_values", "group", "limitk", "limit_ratio",
        # operators and modifiers
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
        "group_right", "bool", "offset", "atan2", "inf", "nan",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*[a-zA-Z_]\w*\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.S)
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


@dataclass(frozen=True)
class Expr:
    """One PromQL expression and where it comes from (for readable test failures)."""

    source: str
    expr: str


def rule_exprs(path: Path = RULES_FILE) -> list[Expr]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        Expr(f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Top-level panels and those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs(path: Path) -> list[Expr]:
    """Panel targets, annotation queries and the selectors of query variables."""
    board = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for panel in iter_panels(board.get("panels", [])):
        for tgt in panel.get("targets", []):
            if tgt.get("expr"):
                where = f"{path.name}: panel {panel['id']} {panel['title']!r} {tgt['refId']}"
                found.append(Expr(where, tgt["expr"]))
    for annotation in board.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append(Expr(f"{path.name}: annotation {annotation['name']!r}",
                              annotation["expr"]))  # fmt: skip
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query.get("query", "") if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(query) or _QUERY_RESULT.match(query)
        if match:
            found.append(Expr(f"{path.name}: variable {variable['name']!r}", match.group(1)))
    return found


def dashboard_files(directory: Path = DASHBOARD_DIR) -> list[Path]:
    return sorted(directory.glob("*.json"))


def all_exprs(directory: Path = HERE) -> list[Expr]:
    exprs = rule_exprs(directory / "alerts" / "apscheduler.rules.yaml")
    for path in dashboard_files(directory / "dashboards"):
        exprs.extend(dashboard_exprs(path))
    return exprs


def substitute(expr: str, values: Mapping[str, str] = DEFAULT_VARIABLES) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``); unknown ones raise."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in one expression, histogram suffixes folded into the family name.

    A small scanner rather than a PromQL parser: strings, label matchers, ranges and grouping
    clauses are dropped, and what remains that is neither a function call nor a keyword is a
    metric name. ``tests/test_grafana.py`` checks it against the catalogue.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = _GROUPING.sub(r"\1", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call or name in _KEYWORDS:
            continue
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


def metric_names_used(*, include_synthetic: bool = False, directory: Path = HERE) -> set[str]:
    """Every metric the shipped alerts and dashboards query (``up`` only if asked for)."""
    names: set[str] = set()
    for item in all_exprs(directory):
        names |= metric_names(substitute(item.expr))
    return names if include_synthetic else names - SYNTHETIC


if __name__ == "__main__":
    print("\n".join(sorted(metric_names_used(include_synthetic=True))))
