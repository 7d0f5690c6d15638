"""Everything for one config as ``{relative path: text}``, and writing or checking a directory.

The repository's ``grafana/`` is this output for the default config, so the committed files,
the management command and ``grafana/generate.py`` cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

from django_apscheduler_obs.monitoring.alert_tests import render_tests
from django_apscheduler_obs.monitoring.alerts import render_rules
from django_apscheduler_obs.monitoring.config import MonitoringConfig
from django_apscheduler_obs.monitoring.dashboards import (
    job_dashboard,
    overview_dashboard,
    render_dashboard,
)

RULES_FILE = "alerts/apscheduler.rules.yaml"
TESTS_DIR = "alerts/tests"
OVERVIEW_FILE = "dashboards/apscheduler-overview.json"
JOB_FILE = "dashboards/apscheduler-job.json"


def render_all(cfg: MonitoringConfig | None = None) -> dict[str, str]:
    """Relative output path (POSIX) -> file content, in a stable order."""
    cfg = cfg or MonitoringConfig()
    files = {RULES_FILE: render_rules(cfg)}
    for name, text in render_tests(cfg).items():
        files[f"{TESTS_DIR}/{name}"] = text
    files[OVERVIEW_FILE] = render_dashboard(overview_dashboard(cfg))
    files[JOB_FILE] = render_dashboard(job_dashboard(cfg))
    return files


def write_dir(out: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` under ``out`` (creating folders); returns the paths written."""
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check_dir(out: Path, files: dict[str, str]) -> list[Path]:
    """Paths under ``out`` that are missing or differ from ``files``; nothing is written."""
    return [
        out / rel
        for rel, text in files.items()
        if not (out / rel).is_file() or (out / rel).read_text(encoding="utf-8") != text
    ]
