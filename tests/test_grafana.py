"""Offline checks of ``grafana/``: the generated files are current, promtool accepts the rules and
passes their unit tests, every dashboard query parses, and the dashboards follow what Grafana
provisioning needs (a ``${datasource}`` variable, unique ids and refIds, exemplars).

Grafana itself cannot be installed here, so these checks are what stands between a typo and an
empty panel. ``grafana_metric_names()`` feeds the contract test against a live /metrics.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.once  # no database involved

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "grafana"
RULES = GRAFANA / "alerts" / "apscheduler.rules.yaml"
RULE_TESTS = sorted((GRAFANA / "alerts" / "tests").glob("*.yaml"))
RUNBOOK = GRAFANA.parent / "docs" / "alerts.md"
DASHBOARDS = {
    "apscheduler-overview": GRAFANA / "dashboards" / "apscheduler-overview.json",
    "apscheduler-job": GRAFANA / "dashboards" / "apscheduler-job.json",
}
DS = {"type": "prometheus", "uid": "${datasource}"}
RUNBOOK_BASE = (
    "https://github.com/django-apscheduler-obs/django-apscheduler-obs/blob/main/docs/alerts.md#"
)

J = frozenset({"job_id"})
G = frozenset({"group"})
#: The metric catalogue of the package: sample name (histograms by family) -> its own labels
#: (Prometheus adds ``job`` and ``instance``).
CATALOGUE_LABELS: dict[str, frozenset[str]] = {
    "apscheduler_job_runs_total": J | {"outcome", "error_type"},
    "apscheduler_job_run_duration_seconds": J | {"outcome", "le"},
    "apscheduler_job_start_delay_seconds": J | {"le"},
    "apscheduler_job_last_run_duration_seconds": J,
    "apscheduler_job_last_start_delay_seconds": J,
    "apscheduler_job_skipped_runs_total": J | {"reason"},
    "apscheduler_job_runs_in_progress": J,
    "apscheduler_job_oldest_running_start_timestamp_seconds": J,
    "apscheduler_job_last_success_timestamp_seconds": J,
    "apscheduler_job_last_failure_timestamp_seconds": J,
    "apscheduler_job_registered_timestamp_seconds": J,
    "apscheduler_job_next_run_timestamp_seconds": J,
    "apscheduler_job_paused": J,
    "apscheduler_job_expected_interval_seconds": J,
    "apscheduler_job_misfire_grace_seconds": J,
    "apscheduler_job_max_runtime_seconds": J,
    "apscheduler_job_info": J
    | {"name", "func", "trigger", "executor", "jobstore", "max_instances", "coalesce"},
    "apscheduler_jobs": frozenset({"state"}),
    "apscheduler_scheduler_state": frozenset({"apscheduler_scheduler_state"}),
    "apscheduler_scheduler_heartbeat_timestamp_seconds": frozenset(),
    "apscheduler_scheduler_info": frozenset(
        {"version", "package_version", "scheduler_class", "timezone", "group", "identity"}
    ),
    "apscheduler_executor_max_workers": frozenset({"executor"}),
    "apscheduler_executor_busy_workers": frozenset({"executor"}),
    "apscheduler_history_write_errors_total": frozenset({"operation"}),
    "apscheduler_history_pending_writes": frozenset(),
    "apscheduler_history_dropped_writes_total": frozenset(),
    "apscheduler_cleanup_deleted_executions_total": frozenset(),
    "process_resident_memory_bytes": frozenset(),
    "process_cpu_seconds_total": frozenset(),
    "process_start_time_seconds": frozenset(),
    "apscheduler_leader": G,
    "apscheduler_lease_epoch": G,
    "apscheduler_lease_acquisitions_total": G,
    "apscheduler_lease_losses_total": G | {"reason"},
    "apscheduler_lease_renewals_total": G | {"result"},
    "apscheduler_lease_remaining_seconds": G,
    "apscheduler_failover_seconds": G | {"le"},
    "apscheduler_claims_total": G | {"result"},
    "apscheduler_stale_writes_rejected_total": G,
    "apscheduler_abandoned_runs_total": G,
    "apscheduler_clock_skew_seconds": G,
    "apscheduler_job_store_changes_total": G,
    "apscheduler_job_queue_wait_seconds": J | {"le"},
    "apscheduler_job_lost_runs_total": J,
    "apscheduler_remote_runs": frozenset({"state"}),
    "apscheduler_remote_oldest_queued_timestamp_seconds": frozenset(),
}
CATALOGUE = frozenset(CATALOGUE_LABELS)
SCRAPE_LABELS = frozenset({"job", "instance"})


def _load(name: str) -> ModuleType:
    """Import ``grafana/<name>.py`` by path: ``grafana/`` is not a package of the project."""
    module_name = f"_apscheduler_grafana_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, GRAFANA / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@cache
def metric_names_module() -> ModuleType:
    return _load("metric_names")


def grafana_metric_names() -> set[str]:
    """Metric names queried by the shipped alerts and dashboards, without Prometheus' ``up``.

    Sample names: counters keep ``_total``; histograms are given by family name (their
    ``_bucket``/``_count``/``_sum`` suffixes are folded).
    """
    return set(metric_names_module().metric_names_used())


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert [g["name"] for g in doc["groups"]] == ["apscheduler"]
    return list(doc["groups"][0]["rules"])


def load_dashboard(uid: str) -> dict[str, Any]:
    return json.loads(DASHBOARDS[uid].read_text(encoding="utf-8"))


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return list(metric_names_module().iter_panels(board["panels"]))


# -- generation ----------------------------------------------------------------------------------


def test_generated_files_are_current(tmp_path: Path) -> None:
    generate = GRAFANA / "generate.py"
    for out in (tmp_path / "a", tmp_path / "b"):
        result = run(sys.executable, generate, "--output-dir", out)
        assert result.returncode == 0, result.stderr
    outputs = _load("generate").OUTPUTS
    for rel in outputs:
        fresh = (tmp_path / "a" / rel).read_bytes()
        assert fresh == (tmp_path / "b" / rel).read_bytes(), f"{rel} is not deterministic"
        assert fresh == (GRAFANA / rel).read_bytes(), (
            f"grafana/{rel} is stale: run python grafana/generate.py and commit the result"
        )
        assert fresh.endswith(b"\n") and not fresh.endswith(b"\n\n")
    check = run(sys.executable, generate, "--check")
    assert check.returncode == 0, check.stderr


def test_check_mode_reports_stale_files(tmp_path: Path) -> None:
    generate = GRAFANA / "generate.py"
    assert run(sys.executable, generate, "--output-dir", tmp_path).returncode == 0
    (tmp_path / "dashboards" / "apscheduler-job.json").write_text("{}\n", encoding="utf-8")
    result = run(sys.executable, generate, "--output-dir", tmp_path, "--check")
    assert result.returncode == 1
    assert "apscheduler-job.json" in result.stderr


# -- alert rules ---------------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_promtool_test_rules(promtool: str) -> None:
    assert RULE_TESTS
    result = run(promtool, "test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["rule_files"] == ["../apscheduler.rules.yaml"], path
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in load_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_alert_metadata() -> None:
    runbook = RUNBOOK.read_text(encoding="utf-8")
    headings = set(re.findall(r"^## (\w+)$", runbook, re.M))
    rules = load_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Apscheduler[A-Z]\w+", name)
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert re.fullmatch(r"\d+[mh]", rule["for"]), name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "dashboard_url", "runbook_url"}
        assert annotations["runbook_url"] == RUNBOOK_BASE + name.lower()
        assert name in headings, f"{name} has no section in {RUNBOOK.name}"
        assert annotations["dashboard_url"].startswith("http://localhost:3000/d/apscheduler-")
        if name.startswith("ApschedulerJob"):
            assert "{{ $labels.job_id }}" in annotations["description"], name
            assert "var-job_id={{ $labels.job_id }}" in annotations["dashboard_url"], name
    assert headings == {rule["alert"] for rule in rules}, "runbook sections without an alert"


def test_every_alert_selector_uses_the_configured_selector() -> None:
    """The selector is configurable in one place only if every series selection carries it."""
    selector = _load("generate").CONFIG["selector"]
    names = metric_names_module().metric_names
    for rule in load_rules():
        expr = rule["expr"]
        selections = re.findall(r"\b([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr)
        assert {metric for metric, _ in selections} == names(expr) | (
            {"up"} & {metric for metric, _ in selections}
        ), rule["alert"]
        for metric, matchers in selections:
            assert matchers.startswith(selector), f"{rule['alert']}: {metric}{{{matchers}}}"


def test_joins_match_on_scrape_and_job_labels() -> None:
    """Joins name their labels, so an extra target label never silently breaks a match."""
    for rule in load_rules():
        for modifier in re.findall(r"\b(?:on|ignoring)\s*\(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in modifier.split(",") if label.strip()}
            assert labels <= {"job", "instance", "job_id"}, rule["alert"]
        assert "ignoring" not in rule["expr"], rule["alert"]


# -- dashboards ----------------------------------------------------------------------------------


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    mod = metric_names_module()
    exprs = [e for path in DASHBOARDS.values() for e in mod.dashboard_exprs(path)]
    assert len(exprs) > 60
    result, sources = check_exprs(promtool, tmp_path, [(e.source, e.expr) for e in exprs])
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + sources


def test_expression_check_catches_a_broken_query(promtool: str, tmp_path: Path) -> None:
    result, _ = check_exprs(
        promtool, tmp_path, [("broken", 'sum(rate(x{job=~"$job"}[5m]) by (job)')]
    )
    assert result.returncode != 0
    assert "dashboard_check:expr_000" in result.stdout + result.stderr


def check_exprs(
    promtool: str, tmp_path: Path, exprs: list[tuple[str, str]]
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Write the expressions as recording rules and let promtool parse them."""
    substitute = metric_names_module().substitute
    rules = [
        {"record": f"dashboard_check:expr_{i:03d}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard_exprs.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard_check", "rules": rules}]}))
    sources = "\n".join(f"expr_{i:03d}: {source}" for i, (source, _) in enumerate(exprs))
    return run(promtool, "check", "rules", path), sources


def test_substitution_of_grafana_variables() -> None:
    substitute = metric_names_module().substitute
    expr = (
        'rate(x{job=~"$job", instance=~"${instance:regex}", job_id=~"[[job_id]]"}'
        "[$__rate_interval])"
    )
    assert substitute(expr) == (
        'rate(x{job=~"apscheduler", instance=~"127.0.0.1:9100", job_id=~"demo_job"}[5m])'
    )
    assert substitute("x[$__range] offset $__interval") == "x[1d] offset 1m"
    with pytest.raises(KeyError):
        substitute('x{a=~"$unknown"}')


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_identity_and_variables(uid: str) -> None:
    board = load_dashboard(uid)
    assert board["uid"] == uid
    assert board["title"].startswith("APScheduler / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "job_id", "admin_url"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["query"] == "label_values(apscheduler_scheduler_info, job)"
    assert variables["job_id"]["query"].startswith('label_values(apscheduler_job_info{job=~"$job"')
    assert variables["job_id"]["query"].endswith(", job_id)")
    per_job = uid == "apscheduler-job"
    assert variables["job_id"]["multi"] is not per_job
    assert variables["job_id"]["includeAll"] is not per_job
    assert variables["admin_url"]["type"] == "textbox"
    assert variables["admin_url"]["query"] == "http://localhost:8000/admin"
    for name in ("job", "instance", "job_id"):
        assert variables[name]["datasource"] == DS


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_panel_ids_and_layout(uid: str) -> None:
    board = load_dashboard(uid)
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    occupied: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not cells & occupied, f"{panel['title']!r} overlaps another panel"
        occupied |= cells
        assert panel["title"], panel["id"]
        if panel["type"] != "row":
            assert panel.get("description"), panel["title"]


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_datasources_and_ref_ids(uid: str) -> None:
    board = load_dashboard(uid)
    for panel in panels(board):
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["datasource"] == DS, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert panel["targets"], panel["title"]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for tgt in panel["targets"]:
            assert tgt["datasource"] == DS, panel["title"]
            assert "irate(" not in tgt["expr"], panel["title"]
    for annotation in board["annotations"]["list"]:
        assert annotation["datasource"] == DS


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_no_hard_coded_uid(uid: str) -> None:
    board = load_dashboard(uid)

    def walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield f"{path}.{key}", value
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}[{i}]")

    for path, value in walk(board, ""):
        if path.endswith(".uid") and path != ".uid":
            assert value == "${datasource}", path
        if path.endswith(".datasource"):
            assert isinstance(value, dict), f"{path}: data source given by name"


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_exemplars_on_latency_panels(uid: str) -> None:
    board = load_dashboard(uid)
    latency = ("apscheduler_job_run_duration_seconds", "apscheduler_job_start_delay_seconds")
    seen_heatmaps: set[str] = set()
    for panel in panels(board):
        for tgt in panel.get("targets", []):
            if not any(metric + "_bucket" in tgt["expr"] for metric in latency):
                continue
            if tgt["instant"]:  # table cells cannot show exemplars
                continue
            assert tgt["exemplar"] is True, f"{panel['title']} {tgt['refId']}"
            if panel["type"] == "heatmap":
                assert tgt["format"] == "heatmap"
                assert panel["options"]["calculate"] is False
                seen_heatmaps.update(m for m in latency if m in tgt["expr"])
    assert seen_heatmaps == set(latency)


def test_overview_content() -> None:
    board = load_dashboard("apscheduler-overview")
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [
        "Health",
        "Jobs",
        "Activity",
        "Latency",
        "Workers",
        "Scheduler",
        "High availability",
    ]
    (jobs,) = [p for p in panels(board) if p["title"] == "Jobs" and p["type"] == "table"]
    links = [
        link["url"]
        for override in jobs["fieldConfig"]["overrides"]
        for prop in override["properties"]
        if prop["id"] == "links"
        for link in prop["value"]
    ]
    assert (
        "${admin_url}/django_apscheduler_obs/djangojobexecution/"
        "?job__id__exact=${__data.fields.job_id}"
    ) in links
    assert any(url.startswith("/d/apscheduler-job/") and "${__data.fields.job_id}" in url
               for url in links)  # fmt: skip
    exprs = " ".join(t["expr"] for p in panels(board) for t in p.get("targets", []))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (job_id, le) (rate(" in exprs


def test_job_dashboard_content() -> None:
    board = load_dashboard("apscheduler-job")
    exprs = [a["expr"] for a in board["annotations"]["list"]]
    assert any(
        e.startswith("changes(apscheduler_job_last_failure_timestamp_seconds{") and
        e.endswith("[2m]) > 0")
        for e in exprs
    )  # fmt: skip
    types = {p["type"] for p in panels(board)}
    assert {"state-timeline", "heatmap", "stat", "timeseries", "table"} <= types


# -- metric names --------------------------------------------------------------------------------


def test_metric_names_are_in_the_catalogue() -> None:
    names = grafana_metric_names()
    assert names - CATALOGUE == set(), "queried metrics the package does not export"
    # Everything but the Python runtime collectors is shown or alerted on somewhere.
    assert CATALOGUE - names == set()
    assert "up" not in names
    assert "up" in metric_names_module().metric_names_used(include_synthetic=True)


def test_label_matchers_exist_on_their_metric() -> None:
    """A matcher on a label the metric lacks selects nothing when specific (a job_id filter on
    apscheduler_leader would silently disable the standby exclusion once a job is picked)."""
    mod = metric_names_module()
    for item in mod.all_exprs():
        expr = mod.substitute(item.expr)
        for metric, matchers in re.findall(r"\b([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
            family = re.sub(r"_(bucket|count|sum)$", "", metric)
            if family == "up":
                continue
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            allowed = CATALOGUE_LABELS[family] | SCRAPE_LABELS
            assert labels <= allowed, f"{item.source}: {metric}{{{matchers}}}"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'histogram_quantile(0.95, sum by (le, job_id) (rate(a_seconds_bucket{x="y"}[5m])))',
            {"a_seconds"},
        ),
        (
            "time() - b_timestamp_seconds offset 5m > on(job, instance) c",
            {"b_timestamp_seconds", "c"},
        ),
        ('sum without (le) (increase(d_total{l=~"sum|max"}[1h])) or vector(0)', {"d_total"}),
        ("e_sum / e_count", {"e"}),
        ("count(f > bool 1e-9) and on() absent(up)", {"f", "up"}),
    ],
)
def test_metric_name_scanner(expr: str, expected: set[str]) -> None:
    assert metric_names_module().metric_names(expr) == expected
