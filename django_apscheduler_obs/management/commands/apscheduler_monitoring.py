"""``manage.py apscheduler_monitoring --out DIR``: write the alert rules, their promtool tests
and the Grafana dashboards for your selector, thresholds and links.

    python manage.py apscheduler_monitoring --out monitoring/ \\
        --selector 'job="billing-scheduler"' --set late_threshold_seconds=300
    python manage.py apscheduler_monitoring --out monitoring/ ... --check   # CI: stale?

Without options it writes what the repository's ``grafana/`` holds. Needs no database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_apscheduler_obs.management.base import OneLineErrorCommand
from django_apscheduler_obs.monitoring import (
    ConfigError,
    build_config,
    check_dir,
    render_all,
    write_dir,
)

#: Flags that set one config key each (the rest goes through --set).
FLAGS = {
    "selector": "selector",
    "grafana_url": "grafana_url",
    "admin_url": "admin_url",
    "runbook_url": "runbook_url",
    "test_labels": "test_labels",
    "paused_for": "paused_for",
}


class Command(OneLineErrorCommand):
    help = "Writes the Prometheus alert rules, their promtool tests and the Grafana dashboards."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
        parser.add_argument(
            "--selector",
            metavar="MATCHERS",
            help="label matchers of the scheduler targets, e.g. 'job=\"billing-scheduler\"' "
            '(default job=~".*apscheduler.*")',
        )
        parser.add_argument("--grafana-url", metavar="URL", help="base URL of Grafana")
        parser.add_argument("--admin-url", metavar="URL", help="base URL of the Django admin")
        parser.add_argument("--runbook-url", metavar="URL", help="URL of the alert runbook")
        parser.add_argument(
            "--test-labels",
            metavar="MATCHERS",
            help='labels of the generated tests\' series, e.g. \'job="sched", env="prod"\' '
            "(needed when the selector has a regex or negative matcher)",
        )
        parser.add_argument(
            "--paused-for",
            metavar="DURATION",
            help="also alert on a job paused for longer than this, e.g. 24h (off by default)",
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            dest="set_values",
            metavar="NAME=VALUE",
            help="any other setting, e.g. late_threshold_seconds=300 (repeatable)",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="write nothing; exit 1 if DIR's files differ from what would be written",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        values: dict[str, str] = {}
        for item in options["set_values"]:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise CommandError(f"--set {item!r}: use NAME=VALUE")
            values[name.strip()] = value
        for option, key in FLAGS.items():
            if options[option] is not None:
                values[key] = options[option]
        try:
            cfg = build_config(values)
            files = render_all(cfg)
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        out = Path(options["out"])
        if options["check"]:
            stale = check_dir(out, files)
            if stale:
                raise CommandError(
                    f"{len(stale)} file(s) in {out} differ from the config: "
                    + ", ".join(str(path.relative_to(out)) for path in stale)
                )
            self.stdout.write(f"{len(files)} files in {out} are up to date.")
            return
        written = write_dir(out, files)
        self.stdout.write(f"Wrote {len(written)} files to {out}:")
        for path in written:
            self.stdout.write(f"  {path.relative_to(out)}")
        self.stdout.write(
            f"Check them with: promtool check rules {out / 'alerts' / 'apscheduler.rules.yaml'} "
            f"&& promtool test rules {out / 'alerts' / 'tests'}/*.yaml"
        )
