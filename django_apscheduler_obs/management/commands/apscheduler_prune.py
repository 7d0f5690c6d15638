"""``manage.py apscheduler_prune --older-than 7d``: delete old execution history in batches.

The built-in cleanup job applies ``APSCHEDULER_EXECUTION_RETENTION`` on a schedule; this
command is for one-off pruning (a backlog after retention was off, one noisy job, one status).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from django_apscheduler_obs.cleanup import delete_executions
from django_apscheduler_obs.management.base import OneLineErrorCommand
from django_apscheduler_obs.models import DjangoJobExecution

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(value: str) -> timedelta:
    """``"3600"``, ``"3600s"``, ``"90m"``, ``"12h"``, ``"7d"``, ``"2w"`` -> timedelta."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(
            f"invalid duration {value!r}: use a number with an optional unit s, m, h, d or w "
            "(e.g. 3600s, 12h, 7d)"
        )
    number, unit = match.groups()
    return timedelta(seconds=float(number) * UNITS[unit or "s"])


class Command(OneLineErrorCommand):
    help = "Deletes execution history older than --older-than, in batches."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            required=True,
            metavar="DURATION",
            help="age of the rows to delete, by scheduled run time: 3600s, 90m, 12h, 7d, 2w",
        )
        parser.add_argument(
            "--job", action="append", dest="jobs", metavar="ID", help="only this job (repeatable)"
        )
        parser.add_argument(
            "--status",
            action="append",
            dest="statuses",
            metavar="STATUS",
            help="only rows with this status, e.g. 'Executed' (repeatable)",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            metavar="N",
            help="rows per DELETE statement (default APSCHEDULER_CLEANUP_BATCH_SIZE)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            age = parse_duration(options["older_than"])
        except ValueError as exc:
            raise CommandError(f"--older-than: {exc}") from None
        batch_size = options["batch_size"]
        if batch_size is not None and batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        statuses = options["statuses"] or []
        known = [value for value, _ in DjangoJobExecution.STATUS_CHOICES]
        unknown = [s for s in statuses if s not in known]
        if unknown:
            raise CommandError(
                f"unknown --status {', '.join(map(repr, unknown))}; one of: "
                + ", ".join(map(repr, known))
            )
        before = timezone.now() - age
        count = delete_executions(
            before=before,
            job_ids=options["jobs"],
            statuses=statuses,
            batch_size=batch_size,
            dry_run=options["dry_run"],
        )
        scope = []
        if options["jobs"]:
            scope.append("job " + ", ".join(options["jobs"]))
        if statuses:
            scope.append("status " + ", ".join(statuses))
        where = f" ({'; '.join(scope)})" if scope else ""
        verb = "Would delete" if options["dry_run"] else "Deleted"
        self.stdout.write(
            f"{verb} {count} execution(s) run at or before {before:%Y-%m-%d %H:%M:%S %Z}{where}."
        )
