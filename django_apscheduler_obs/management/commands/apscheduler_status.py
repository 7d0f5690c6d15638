"""``manage.py apscheduler_status``: jobs, leader and standbys; non-zero when unhealthy.

Reads the database only (no scheduler needed), so it works as a container health check of
the scheduler *and* from any web container::

    python manage.py apscheduler_status            # a table; exit 1 if a job fails or is late
    python manage.py apscheduler_status --json     # the same for machines
    python manage.py apscheduler_status --grace 300 --require-leader

A job is a problem when its last finished run failed (``Error!`` or ``Abandoned``), when its
next run is more than ``--grace`` seconds in the past (overdue: nothing ran it), or when its
stored state cannot be restored. Paused jobs are never overdue.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.lease import current_leader
from django_apscheduler_obs.models import (
    DjangoJob,
    DjangoJobExecution,
    SchedulerInstance,
    SchedulerLease,
)

EX = DjangoJobExecution
FAILING = (EX.ERROR, EX.ABANDONED, EX.LOST)
INSTANCE_STALE = 30  # seconds without a heartbeat


def _non_negative(value: str) -> float:
    import argparse

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return number


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(dt_timezone.utc).isoformat() if dt else None


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(float(value), dt_timezone.utc) if value is not None else None


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def collect(grace: float, group: str | None = None) -> dict[str, Any]:
    """Everything the command prints, as plain data (three queries)."""
    group = group or conf.GROUP
    now = timezone.now()
    newest = EX.objects.filter(job_id=OuterRef("pk")).order_by("-run_time")
    final = newest.filter(status__in=EX.FINAL_STATUSES)
    success = newest.filter(status=EX.SUCCESS)
    rows = (
        DjangoJob.objects.order_by("id")
        .annotate(
            last_status=Subquery(final.values("status")[:1]),
            last_run=Subquery(final.values("run_time")[:1]),
            last_error=Subquery(final.values("exception")[:1]),
            last_success=Subquery(success.values("finished")[:1]),
            newest_status=Subquery(newest.values("status")[:1]),
        )
        .values(
            "id",
            "next_run_time",
            "restore_error",
            "last_status",
            "last_run",
            "last_error",
            "last_success",
            "newest_status",
        )
    )
    jobs = []
    problems = []
    for row in rows:
        late = (now - row["next_run_time"]).total_seconds() if row["next_run_time"] else None
        overdue = late is not None and late > grace
        failing = row["last_status"] in FAILING
        restorable = not row["restore_error"]
        job = {
            "id": row["id"],
            "next_run_time": _iso(row["next_run_time"]),
            "paused": row["next_run_time"] is None,
            "running": row["newest_status"] in (EX.SENT, EX.PICKED_UP),
            "queued": row["newest_status"] == EX.QUEUED,
            "last_outcome": row["last_status"],
            "last_outcome_at": _iso(row["last_run"]),
            "last_error": row["last_error"] if failing else None,
            "last_success_at": _iso(_ts(row["last_success"])),
            "overdue": overdue,
            "overdue_seconds": round(late, 3) if overdue and late is not None else None,
            "failing": failing,
            "restorable": restorable,
            "restore_error": row["restore_error"] or None,
        }
        jobs.append(job)
        if failing:
            problems.append(f"{row['id']}: last run failed ({row['last_status']})")
        if overdue and late is not None:
            problems.append(f"{row['id']}: overdue by {_ago(late)}")
        if not restorable:
            problems.append(f"{row['id']}: state cannot be restored")

    leader = current_leader(group)
    lease = SchedulerLease.objects.filter(name=group).values("owner", "expires_at").first()
    stale_before = now - timedelta(seconds=INSTANCE_STALE)
    instances = [
        {
            "identity": inst.identity,
            "hostname": inst.hostname,
            "pid": inst.pid,
            "started_at": _iso(inst.started_at),
            "last_seen": _iso(inst.last_seen),
            "leader": bool(leader and leader["owner"] == inst.identity),
            "stale": inst.last_seen < stale_before,
        }
        for inst in SchedulerInstance.objects.filter(group=group).order_by("identity")
    ]
    return {
        "group": group,
        "checked_at": _iso(now),
        "grace_seconds": grace,
        "leader": (
            {
                "identity": leader["owner"],
                "epoch": leader["epoch"],
                "expires_at": _iso(leader["expires_at"]),
                "acquired_at": _iso(leader["acquired_at"]),
            }
            if leader
            else None
        ),
        "lease_expired_at": _iso(lease["expires_at"]) if lease and not leader else None,
        "instances": instances,
        "jobs": jobs,
        "problems": problems,
    }


class Command(BaseCommand):
    help = (
        "Shows jobs (next run, last outcome, last success, overdue) and the scheduler leader "
        "and standbys. Exits 1 when a job is failing, overdue or unrestorable."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--grace",
            type=_non_negative,
            default=60.0,
            help="seconds past its next run before a job counts as overdue (default 60)",
        )
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        parser.add_argument("--group", help="scheduler group (default APSCHEDULER_GROUP)")
        parser.add_argument(
            "--require-leader",
            action="store_true",
            help="also exit 1 when no scheduler holds the lease",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        status = collect(options["grace"], options["group"])
        if options["require_leader"] and status["leader"] is None:
            status["problems"].append(f"no scheduler leads group {status['group']!r}")
        status["healthy"] = not status["problems"]
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2))
        else:
            self._table(status)
        if status["problems"]:
            raise CommandError(
                f"{len(status['problems'])} problem(s): " + "; ".join(status["problems"]),
                returncode=1,
            )

    # -- the table ------------------------------------------------------------------------

    def _table(self, status: dict[str, Any]) -> None:
        now = datetime.fromisoformat(status["checked_at"])
        headers = ["JOB", "NEXT RUN (UTC)", "LAST OUTCOME", "LAST SUCCESS (UTC)", "STATE"]
        rows = []
        styles = []
        for job in status["jobs"]:
            state, style = "ok", self.style.SUCCESS
            if not job["restorable"]:
                state, style = "UNRESTORABLE", self.style.ERROR
            elif job["failing"]:
                state, style = "FAILING", self.style.ERROR
            if job["overdue"]:
                late = _ago(job["overdue_seconds"])
                state = f"{state}, OVERDUE {late}" if state != "ok" else f"OVERDUE {late}"
                style = self.style.ERROR
            elif job["paused"] and state == "ok":
                state, style = "paused", self.style.WARNING
            if job["running"]:
                state += " (running)"
            elif job["queued"]:
                state += " (queued for a worker)"
            rows.append(
                [
                    job["id"],
                    _short(job["next_run_time"]) or "paused",
                    job["last_outcome"] or "-",
                    _short(job["last_success_at"]) or "never",
                    state,
                ]
            )
            styles.append(style)
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

        def line(cells: list[str]) -> str:
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))

        self.stdout.write(self.style.MIGRATE_HEADING(line(headers).rstrip()))
        for cells, style in zip(rows, styles, strict=True):
            self.stdout.write(line(cells[:-1]) + "  " + style(cells[-1]))
        if not rows:
            self.stdout.write("(no jobs)")
        self.stdout.write("")

        leader = status["leader"]
        if leader:
            expires = datetime.fromisoformat(leader["expires_at"])
            self.stdout.write(
                f"Leader ({status['group']}): {leader['identity']}, epoch {leader['epoch']}, "
                f"lease expires in {_ago((expires - now).total_seconds())}"
            )
        else:
            self.stdout.write(
                self.style.WARNING(f"Leader ({status['group']}): none (no live lease)")
            )
        standbys = [i for i in status["instances"] if not i["leader"]]
        if standbys:
            for inst in standbys:
                seen = (now - datetime.fromisoformat(inst["last_seen"])).total_seconds()
                note = " STALE" if inst["stale"] else ""
                self.stdout.write(f"Standby: {inst['identity']} (last seen {_ago(seen)} ago){note}")
        else:
            self.stdout.write("Standbys: none")
        if status["problems"]:
            self.stdout.write("")
            for problem in status["problems"]:
                self.stdout.write(self.style.ERROR(f"problem: {problem}"))


def _short(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else ""
