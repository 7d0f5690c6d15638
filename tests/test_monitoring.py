"""``manage.py apscheduler_monitoring``: the rules, tests and dashboards it writes for a user's
selector and thresholds pass promtool, really use the selector, and bad input fails in one line.
"""

from __future__ import annotations

import re
import shutil
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import CommandError, call_command

from django_apscheduler_obs.monitoring import MonitoringConfig, build_config, render_all
from tests.test_grafana import RUNBOOK, metric_names_module, run

pytestmark = pytest.mark.once  # no database involved

SELECTOR = 'job="billing-scheduler", env="prod"'
ARGS = ("--selector", SELECTOR, "--set", "late_threshold_seconds=300", "--paused-for", "6h")
RULES = Path("alerts/apscheduler.rules.yaml")


def write(out: Path, *args: str) -> str:
    stdout = StringIO()
    call_command("apscheduler_monitoring", "--out", str(out), *args, stdout=stdout)
    return stdout.getvalue()


def rules(out: Path) -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((out / RULES).read_text(encoding="utf-8"))
    return {rule["alert"]: rule for rule in doc["groups"][0]["rules"]}


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monitoring")
    printed = write(out, *ARGS)
    assert "alerts/apscheduler.rules.yaml" in printed
    assert "dashboards/apscheduler-overview.json" in printed
    return out


def test_written_rules_pass_promtool(custom: Path, promtool: str) -> None:
    check = run(promtool, "check", "rules", RULES, cwd=custom)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = sorted(p.relative_to(custom) for p in (custom / "alerts" / "tests").glob("*.yaml"))
    assert len(tests) == 4
    result = run(promtool, "test", "rules", *tests, cwd=custom)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 4


def test_tests_follow_the_selector(custom: Path, promtool: str, tmp_path: Path) -> None:
    """Rules for one selector with tests for another fail: the tests exercise the selector."""
    other = tmp_path / "other"
    write(other, "--selector", 'job="other-scheduler"', "--paused-for", "6h")
    shutil.copy(custom / RULES, other / RULES)
    result = run(promtool, "test", "rules", *(other / "alerts" / "tests").glob("*.yaml"), cwd=other)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_every_selection_carries_the_selector(custom: Path) -> None:
    names = metric_names_module().metric_names
    for name, rule in rules(custom).items():
        selections = re.findall(r"\b([a-zA-Z_:][\w:]*)\{([^}]*)\}", rule["expr"])
        assert {metric for metric, _ in selections} >= names(rule["expr"]), name
        for metric, matchers in selections:
            assert matchers.startswith(SELECTOR), f"{name}: {metric}{{{matchers}}}"
        assert ".*apscheduler.*" not in rule["expr"], name


def test_thresholds_and_series_labels(custom: Path) -> None:
    written = rules(custom)
    assert "> 300\n" in written["ApschedulerJobLate"]["expr"]
    assert written["ApschedulerJobPausedTooLong"]["for"] == "6h"
    jobs = (custom / "alerts" / "tests" / "jobs.yaml").read_text(encoding="utf-8")
    assert 'job="billing-scheduler", env="prod", instance="sched-1:9100"' in jobs
    assert "started 7m 30s after its scheduled time (threshold 300s)" in jobs
    assert 'job="apscheduler"' not in jobs
    runbook = RUNBOOK.read_text(encoding="utf-8")
    for name in written:
        assert re.search(rf"^##+ {name}$", runbook, re.M), name


def test_paused_rule_only_when_asked(tmp_path: Path) -> None:
    write(tmp_path)
    assert "ApschedulerJobPausedTooLong" not in rules(tmp_path)
    assert "ApschedulerJobPausedTooLong" not in (tmp_path / "alerts/tests/jobs.yaml").read_text()
    assert "ApschedulerUnrestorableJobs" in rules(tmp_path)


def test_default_output_is_the_repository_grafana_folder(tmp_path: Path) -> None:
    write(tmp_path)
    grafana = Path(__file__).resolve().parents[1] / "grafana"
    for rel, text in render_all().items():
        assert (tmp_path / rel).read_text(encoding="utf-8") == text
        assert (grafana / rel).read_text(encoding="utf-8") == text, f"grafana/{rel} is stale"


def test_check_mode(tmp_path: Path) -> None:
    write(tmp_path, *ARGS)
    assert "up to date" in write(tmp_path, *ARGS, "--check")
    late = tmp_path / RULES
    late.write_text(late.read_text(encoding="utf-8").replace("> 300", "> 301"), encoding="utf-8")
    before = late.read_text(encoding="utf-8")
    with pytest.raises(CommandError, match=r"1 file\(s\) .* differ.*apscheduler.rules.yaml"):
        write(tmp_path, *ARGS, "--check")
    assert late.read_text(encoding="utf-8") == before, "--check wrote something"
    with pytest.raises(CommandError, match="differ"):
        write(tmp_path, "--check")  # another config: every rule file differs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "nope=1"), "unknown setting 'nope'"),
        (("--set", "late_threshold_seconds=soon"), "late_threshold_seconds: 'soon' is not a num"),
        (("--set", "failure_rate_min_runs=2.5"), "failure_rate_min_runs: '2.5' is not an int"),
        (("--set", "overdue_for=5 minutes"), "overdue_for: '5 minutes' is not a Prometheus"),
        (("--paused-for", "1d2"), "paused_for: '1d2' is not a Prometheus duration"),
        (("--set", "failure_rate_threshold=1.5"), "failure_rate_threshold: 1.5 must be in"),
        (("--set", "late_threshold_seconds=0"), "late_threshold_seconds: 0 must be above 0"),
        (("--set", "claims_window=1m"), "claims_window: '1m' is too short"),
        (("--set", "late_threshold_seconds"), "use NAME=VALUE"),
        (("--selector", "job=billing"), "is not a list of label matchers"),
        (("--selector", ""), "is empty"),
        (("--selector", 'job=~"billing-.*"'), "test_labels: the selector has a regex"),
        (("--selector", 'job=~"billing-.*"', "--test-labels", 'job="cron"'), "is not selected"),
        (("--selector", 'instance="a:1"'), "selector: must not match on instance"),
        (("--selector", 'job=~"("'), "invalid regular expression"),
        (("--grafana-url", "grafana.local"), "grafana_url: 'grafana.local' is not an http"),
        (("--test-labels", 'env=~"p.*"'), "test_labels: use = matchers only"),
    ],
)
def test_bad_input_gives_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError) as info:
        write(tmp_path / "out", *args)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert not (tmp_path / "out").exists(), "nothing is written on bad input"


def test_regex_selector_with_test_labels(tmp_path: Path, promtool: str) -> None:
    write(tmp_path, "--selector", 'job=~"billing-.*"', "--test-labels", 'job="billing-cron"')
    tests = sorted(p.relative_to(tmp_path) for p in (tmp_path / "alerts" / "tests").glob("*"))
    result = run(promtool, "test", "rules", *tests, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    scheduler = (tmp_path / "alerts" / "tests" / "scheduler.yaml").read_text()
    assert 'up{job="billing-cron", instance="sched-1:9100"}' in scheduler
    assert 'up{job="node", instance="other:9100"}' in scheduler  # not selected


def test_thresholds_move_the_generated_tests(tmp_path: Path, promtool: str) -> None:
    """Unusual thresholds and "for" durations still give passing tests with both outcomes."""
    values = {
        "failure_rate_threshold": "0.9", "failure_rate_min_runs": "5", "failure_rate_for": "0m",
        "overdue_threshold_seconds": "90", "overdue_for": "0m", "stuck_min_seconds": "600",
        "no_success_interval_factor": "1", "no_success_slack_seconds": "0",
        "heartbeat_stale_seconds": "45", "heartbeat_stale_for": "0m", "target_down_for": "1m",
        "target_absent_for": "0m", "clock_skew_for": "1m", "no_leader_for": "0m",
        "unrestorable_for": "1h", "missed_runs_window": "10m", "history_errors_window": "10m",
        "paused_for": "24h",
    }  # fmt: skip
    args = [arg for name, value in values.items() for arg in ("--set", f"{name}={value}")]
    write(tmp_path, *args)
    tests = sorted(p.relative_to(tmp_path) for p in (tmp_path / "alerts" / "tests").glob("*"))
    result = run(promtool, "test", "rules", *tests, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    firing, quiet = set(), set()
    for path in tests:
        for case in yaml.safe_load((tmp_path / path).read_text())["tests"]:
            for check in case["alert_rule_test"]:
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(rules(tmp_path)), "every alert fires somewhere"
    assert quiet == firing, "every alert stays quiet somewhere"


def test_config_is_frozen_and_typed() -> None:
    cfg = MonitoringConfig()
    assert cfg.series_labels == {"job": "apscheduler"}
    assert build_config({"dashboard_tags": "a, b"}).dashboard_tags == ("a", "b")
    assert build_config({"selector": SELECTOR}).series_labels == {
        "job": "billing-scheduler",
        "env": "prod",
    }
    with pytest.raises(AttributeError):
        cfg.selector = "x"  # type: ignore[misc]
