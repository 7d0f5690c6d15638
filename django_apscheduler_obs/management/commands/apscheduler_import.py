"""``manage.py apscheduler_import``: bring a django-apscheduler 0.7 installation over.

Reads 0.7's tables (``django_apscheduler_djangojob``, ``django_apscheduler_djangojobexecution``)
directly, so ``django_apscheduler`` need not stay installed, and copies them into ours:

* jobs keep their id, next run time and pickled state; the state is signed
  (``signing.resign``) so our store, which refuses unsigned state, accepts it. A job id that
  already exists here is left alone (a job declared in code adopts the imported one by id);
* executions keep status (the same strings), run time, exception, traceback, ``finished`` and
  ``duration``. 0.7's duration runs from the *scheduled* time, so it includes the start delay:
  it is stored as-is and ``started``/``start_delay`` stay empty rather than being guessed;
* idempotent: rows already here (same job id, same ``(job_id, run_time)``) are skipped, so
  running it twice, or after a partial run, imports nothing twice;
* ``--dry-run`` reports the counts and writes nothing.

Stop the 0.7 scheduler first: what it writes during the import is picked up by a second run.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections, models, router, transaction

from django_apscheduler_obs import signing
from django_apscheduler_obs.lease import bump_change_counter
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution

JOB_TABLE = "django_apscheduler_djangojob"
EXECUTION_TABLE = "django_apscheduler_djangojobexecution"


# Read-only views of 0.7's tables, under an app label that is never installed: no migration,
# no system check, no content type; the ORM only converts values for each database.
class LegacyJob(models.Model):
    id = models.CharField(max_length=255, primary_key=True)
    next_run_time = models.DateTimeField(null=True)
    job_state = models.BinaryField()

    objects: models.Manager[LegacyJob] = models.Manager()

    class Meta:
        app_label = "django_apscheduler_obs_legacy"
        db_table = JOB_TABLE
        managed = False


class LegacyExecution(models.Model):
    id = models.BigAutoField(primary_key=True)
    job_id = models.CharField(max_length=255)
    status = models.CharField(max_length=50)
    run_time = models.DateTimeField()
    duration = models.DecimalField(max_digits=15, decimal_places=2, null=True)
    finished = models.DecimalField(max_digits=15, decimal_places=2, null=True)
    exception = models.CharField(max_length=1000, null=True)
    traceback = models.TextField(null=True)

    objects: models.Manager[LegacyExecution] = models.Manager()

    class Meta:
        app_label = "django_apscheduler_obs_legacy"
        db_table = EXECUTION_TABLE
        managed = False


def _restorable(state: bytes) -> str:
    """Why the job could not run here ("" if it can): a module or function gone since."""
    from apscheduler.job import Job

    try:
        job = Job.__new__(Job)
        job.__setstate__(pickle.loads(state))  # noqa: S301 - the operator's own database
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


class Command(BaseCommand):
    help = (
        "Imports the jobs and execution history of django-apscheduler 0.7 "
        "(django_apscheduler_* tables). Idempotent; --dry-run reports counts first."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--from-database",
            default=DEFAULT_DB_ALIAS,
            metavar="ALIAS",
            help="database alias holding the django-apscheduler 0.7 tables (default: default)",
        )
        parser.add_argument("--dry-run", action="store_true", help="count only; write nothing")
        parser.add_argument(
            "--batch-size", type=int, default=1000, help="execution rows per statement"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        source = options["from_database"]
        if source not in connections:
            raise CommandError(f"Unknown database alias {source!r}.")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1.")
        tables = set(connections[source].introspection.table_names())
        missing = [t for t in (JOB_TABLE, EXECUTION_TABLE) if t not in tables]
        if missing:
            raise CommandError(
                f"No django-apscheduler 0.7 tables in database {source!r} "
                f"(missing: {', '.join(missing)})."
            )
        dry_run = options["dry_run"]
        jobs = self._jobs(source, dry_run)
        executions = self._executions(source, options["batch_size"], dry_run)
        if jobs["imported"] and not dry_run:
            bump_change_counter()  # a running leader picks the new jobs up now

        verb = "Would import" if dry_run else "Imported"
        self.stdout.write(
            f"{verb} {jobs['imported']} of {jobs['total']} job(s) "
            f"({jobs['present']} already present) and {executions['imported']} of "
            f"{executions['total']} execution(s) ({executions['present']} already present) "
            f"from database {source!r}."
        )
        for job_id, reason in jobs["unrestorable"]:
            self.stdout.write(
                self.style.WARNING(
                    f"Job {job_id!r} cannot be restored here ({reason}); it is "
                    f"{'to be ' if dry_run else ''}imported and flagged, never run, until its "
                    "code exists or it is removed."
                )
            )
        if dry_run:
            self.stdout.write("Dry run: nothing was written.")

    # -- jobs -----------------------------------------------------------------------------

    def _jobs(self, source: str, dry_run: bool) -> dict[str, Any]:
        target = router.db_for_write(DjangoJob)
        rows = list(LegacyJob.objects.using(source).order_by("id"))
        present = set(
            DjangoJob.objects.using(target)
            .filter(id__in=[r.id for r in rows])
            .values_list("id", flat=True)
        )
        new, unrestorable = [], []
        for row in rows:
            if row.id in present:
                continue
            state = bytes(row.job_state)
            try:
                payload = signing.verify(state) if signing.is_signed(state) else state
                signed = signing.resign(state)
            except signing.BadSignature as exc:
                payload, signed = b"", state
                reason = str(exc)
            else:
                reason = _restorable(payload)
            if reason:
                unrestorable.append((row.id, reason))
            new.append(
                DjangoJob(
                    id=row.id,
                    next_run_time=row.next_run_time,
                    job_state=signed,
                    restore_error=reason[:2000],
                )
            )
        if new and not dry_run:
            with transaction.atomic(using=target):
                DjangoJob.objects.using(target).bulk_create(new, ignore_conflicts=True)
        return {
            "total": len(rows),
            "present": len(present),
            "imported": len(new),
            "unrestorable": unrestorable,
        }

    # -- executions -----------------------------------------------------------------------

    def _batches(self, source: str, size: int) -> Iterator[list[LegacyExecution]]:
        """Keyset pagination on the primary key: constant memory on any table size."""
        last = 0
        while True:
            batch = list(
                LegacyExecution.objects.using(source).filter(id__gt=last).order_by("id")[:size]
            )
            if not batch:
                return
            yield batch
            last = batch[-1].id

    def _executions(self, source: str, size: int, dry_run: bool) -> dict[str, int]:
        target = router.db_for_write(DjangoJobExecution)
        total = present = imported = 0
        for batch in self._batches(source, size):
            total += len(batch)
            times = [r.run_time for r in batch]
            existing = set(
                DjangoJobExecution.objects.using(target)
                .filter(
                    job_id__in={r.job_id for r in batch},
                    run_time__gte=min(times),
                    run_time__lte=max(times),
                )
                .values_list("job_id", "run_time")
            )
            new = [
                DjangoJobExecution(
                    job_id=r.job_id,
                    status=r.status,
                    run_time=r.run_time,
                    duration=r.duration,  # includes the start delay (0.7's definition)
                    finished=r.finished,
                    exception=r.exception,
                    traceback=r.traceback,
                )
                for r in batch
                if (r.job_id, r.run_time) not in existing
            ]
            present += len(batch) - len(new)
            imported += len(new)
            if new and not dry_run:
                with transaction.atomic(using=target):
                    DjangoJobExecution.objects.using(target).bulk_create(new, ignore_conflicts=True)
        return {"total": total, "present": present, "imported": imported}
