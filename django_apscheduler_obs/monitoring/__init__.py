"""The shipped monitoring: Prometheus alert rules, their promtool unit tests and the Grafana
dashboards, rendered from one :class:`MonitoringConfig` (selector, thresholds, links).

``manage.py apscheduler_monitoring --out DIR`` writes them for a user's config; the repository's
``grafana/`` holds the output for the default config (``python grafana/generate.py``). This is
celery-mixin's ``config.libsonnet`` + ``make generate`` pattern, in plain Python.
"""

from __future__ import annotations

from django_apscheduler_obs.monitoring.config import ConfigError, MonitoringConfig, build_config
from django_apscheduler_obs.monitoring.render import check_dir, render_all, write_dir

__all__ = [
    "ConfigError",
    "MonitoringConfig",
    "build_config",
    "check_dir",
    "render_all",
    "write_dir",
]
