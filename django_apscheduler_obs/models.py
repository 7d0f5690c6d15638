"""Jobs, their execution history and the leader lease.

``DjangoJob`` and ``DjangoJobExecution`` keep every field, status string and manager method of
django-apscheduler 0.7, so code written for it keeps working. Two deliberate differences:

* removing a job no longer cascade-deletes its history (0.7 loses the history of every
  one-off job the moment it has run); the cleanup job prunes history by age instead;
* ``duration`` is the pure run time (end - true start), not end - scheduled time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import models
from django.db.models import UniqueConstraint
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_apscheduler_obs import util


class DjangoJob(models.Model):
    id = models.CharField(max_length=255, primary_key=True, help_text=_("Unique id for this job."))
    next_run_time = models.DateTimeField(
        db_index=True,
        blank=True,
        null=True,
        help_text=_("Date and time at which this job is scheduled to be executed next."),
    )
    job_state = models.BinaryField()

    # Optimistic concurrency: every write bumps it; the leader's write is rejected if it moved.
    version = models.BigIntegerField(default=1, editable=False)
    registered_at = models.DateTimeField(default=timezone.now, editable=False)
    # Hash of a job declared in code (registry); empty for jobs added at run time.
    definition_hash = models.CharField(max_length=64, blank=True, default="", editable=False)
    # Set when the stored state cannot be unpickled (module gone, corrupt, bad signature):
    # the job is kept and skipped, never deleted, until the registry or an admin clears it.
    restore_error = models.TextField(blank=True, default="", editable=False)

    class Meta:
        ordering = ("next_run_time",)

    def __str__(self) -> str:
        status = (
            f"next run at: {util.get_local_dt_format(self.next_run_time)}"
            if self.next_run_time
            else "paused"
        )
        return f"{self.id} ({status})"


class DjangoJobExecutionManager(models.Manager["DjangoJobExecution"]):
    def delete_old_job_executions(self, max_age: int) -> None:
        """Delete executions whose run time is older than ``max_age`` seconds (0.7 API).

        Deletes in batches (see ``cleanup.py``) so no statement holds a lock for long.
        """
        from django_apscheduler_obs.cleanup import delete_executions

        delete_executions(before=timezone.now() - timedelta(seconds=max_age))


class DjangoJobExecution(models.Model):
    # Stored strings of django-apscheduler 0.7: existing rows and queries keep their meaning.
    SENT = "Started execution"
    SUCCESS = "Executed"
    MISSED = "Missed!"
    MAX_INSTANCES = "Max instances!"
    ERROR = "Error!"
    # New: the process running it died or was stopped before the run finished.
    ABANDONED = "Abandoned"
    # New, runs handed to a worker engine (handoff.py, worker.py): claimed and enqueued;
    # picked up by a worker (a compare-and-set from QUEUED, so a redelivery never runs twice);
    # never picked up within the dispatch timeout, or the enqueue itself failed.
    QUEUED = "Queued"
    PICKED_UP = "Running on worker"
    LOST = "Lost"

    # 0.7 listed only three of the five statuses it writes, so admin filters missed two.
    STATUS_CHOICES = [
        (x, x)
        for x in [SENT, SUCCESS, ERROR, MISSED, MAX_INSTANCES, ABANDONED, QUEUED, PICKED_UP, LOST]
    ]
    FINAL_STATUSES = (SUCCESS, ERROR, MISSED, MAX_INSTANCES, ABANDONED, LOST)
    # Runs on a worker, not yet final: the leader's in-flight watch looks after them.
    REMOTE_PENDING = (QUEUED, PICKED_UP)

    id = models.BigAutoField(primary_key=True, help_text=_("Unique ID for this job execution."))
    job = models.ForeignKey(
        DjangoJob,
        # History outlives the job: removing a job (or a one-off job finishing) keeps its rows.
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        # No index of its own: the unique (job_id, run_time) constraint and the
        # (job, status, run_time) index both lead with job_id and serve every lookup by job.
        # A third copy cost every claim and every cleanup batch (25 % of a batch on SQLite).
        db_index=False,
        help_text=_("The job that this execution relates to."),
    )
    status = models.CharField(
        max_length=50,
        choices=STATUS_CHOICES,
        help_text=_("The current status of this job execution."),
    )
    run_time = models.DateTimeField(
        db_index=True, help_text=_("Date and time at which this job was scheduled to run.")
    )
    duration = models.DecimalField(
        max_digits=18,
        decimal_places=6,
        default=None,
        null=True,
        help_text=_("Run time of the job's function (end - true start), in seconds."),
    )
    finished = models.DecimalField(
        max_digits=18,
        decimal_places=6,
        default=None,
        null=True,
        help_text=_("Unix timestamp at which this job finished."),
    )
    exception = models.CharField(
        max_length=1000,
        null=True,
        help_text=_("Details of exception that occurred during job execution (if any)."),
    )
    traceback = models.TextField(
        null=True,
        help_text=_("Traceback of exception that occurred during job execution (if any)."),
    )

    # -- new fields ----------------------------------------------------------------------------
    started = models.DateTimeField(
        null=True, blank=True, help_text=_("True start of the job's function.")
    )
    start_delay = models.FloatField(
        null=True, blank=True, help_text=_("True start - scheduled run time, in seconds.")
    )
    error_type = models.CharField(max_length=200, blank=True, default="")
    trace_id = models.CharField(max_length=32, blank=True, default="")
    span_id = models.CharField(max_length=16, blank=True, default="")
    # The scheduler process that claimed this fire time, and its fencing epoch.
    owner = models.CharField(max_length=200, blank=True, default="")
    epoch = models.BigIntegerField(null=True, blank=True)
    trigger_source = models.CharField(max_length=20, blank=True, default="schedule")
    # -- runs on a worker (all nullable: added without rewriting a large table) ---------------
    worker = models.CharField(
        max_length=200, null=True, blank=True, help_text=_("The worker that ran it.")
    )
    enqueued_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When the scheduler claimed it and enqueued it.")
    )
    picked_up_at = models.DateTimeField(null=True, blank=True)
    queue_wait = models.FloatField(
        null=True, blank=True, help_text=_("Picked up - enqueued, in seconds.")
    )
    # Refreshed by the worker while the run goes on; the leader marks a run whose worker
    # stopped refreshing it abandoned.
    worker_seen = models.DateTimeField(null=True, blank=True)
    # True from the worker's final write (or the leader's lost/abandoned mark) until the
    # leader has counted the run in its metrics; NULL otherwise.
    report_pending = models.BooleanField(null=True, blank=True, editable=False)
    # The job's signed state, kept only when its last fire time went to a worker: the
    # scheduler removes a finished one-off job from the store before a worker loads it.
    job_state = models.BinaryField(null=True, blank=True, editable=False)

    objects = DjangoJobExecutionManager()

    class Meta:
        ordering = ("-run_time",)
        constraints = [
            # The fenced claim: one row per fire time, whatever the number of schedulers.
            UniqueConstraint(fields=["job_id", "run_time"], name="dao_exec_unique_job_run_time")
        ]
        indexes = [
            # last success / failure per job (admin, metrics seeding, status command)
            models.Index(fields=["job", "status", "run_time"], name="dao_exec_job_status_rt"),
            models.Index(fields=["status", "run_time"], name="dao_exec_status_rt"),
            # remote runs finished but not yet counted by the leader (few rows are True)
            models.Index(fields=["report_pending"], name="dao_exec_report_pending"),
        ]

    def __str__(self) -> str:
        return f"{self.id}: job '{self.job_id}' ({self.status})"

    @classmethod
    def atomic_update_or_create(
        cls,
        lock: Any,
        job_id: str,
        run_time: Any,
        status: str,
        exception: str | None = None,
        traceback: str | None = None,
    ) -> DjangoJobExecution:
        """0.7 API used by its event listeners; kept for code that calls it directly."""
        from django_apscheduler_obs.sinks.history import legacy_update_or_create

        with lock:
            return legacy_update_or_create(job_id, run_time, status, exception, traceback)


class SchedulerLease(models.Model):
    """One row per scheduler group: who leads, until when (database clock), and the epoch."""

    name = models.CharField(max_length=100, primary_key=True)
    owner = models.CharField(max_length=200, blank=True, default="")
    # Fencing token: +1 on every acquisition, never on renewal.
    epoch = models.BigIntegerField(default=0)
    expires_at = models.DateTimeField()
    acquired_at = models.DateTimeField(null=True, blank=True)
    renewed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name}: {self.owner or '(none)'} epoch {self.epoch}"


class JobStoreVersion(models.Model):
    """Change counter: bumped after every job write that is not the leader's own."""

    name = models.CharField(max_length=100, primary_key=True)
    version = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name}: {self.version}"


class SchedulerInstance(models.Model):
    """A running ``runapscheduler`` process, for the status command and the admin."""

    identity = models.CharField(max_length=200, primary_key=True)
    group = models.CharField(max_length=100, default="default")
    hostname = models.CharField(max_length=255)
    pid = models.IntegerField()
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    is_leader = models.BooleanField(default=False)

    def __str__(self) -> str:
        return self.identity


class RunRequest(models.Model):
    """A "run now" asked for in the admin, carried out by the leader of ``group``.

    The web process only writes this row; the active scheduler polls queued rows (``runnow.py``)
    and runs the job through its observed executor with ``run_time = requested_at``, so the
    resulting execution row is ``(job_id, requested_at)``.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"
    STATUS_CHOICES = [(s, s) for s in (QUEUED, RUNNING, DONE, FAILED, REFUSED)]
    PENDING_STATUSES = (QUEUED, RUNNING)

    id = models.BigAutoField(primary_key=True)
    job_id = models.CharField(max_length=255, db_index=True)
    group = models.CharField(max_length=100, default="default")
    requested_by = models.CharField(max_length=150, blank=True, default="")
    requested_at = models.DateTimeField(default=timezone.now, db_index=True)
    # W3C trace context of the admin request, so the run's span can link to it.
    traceparent = models.CharField(max_length=55, blank=True, default="")
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=QUEUED)
    message = models.TextField(blank=True, default="")
    # Who picked it up, and when.
    handled_by = models.CharField(max_length=200, blank=True, default="")
    handled_at = models.DateTimeField(null=True, blank=True)
    # The execution row it produced, once known (history outlives requests and vice versa).
    execution = models.ForeignKey(
        DjangoJobExecution,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )

    class Meta:
        ordering = ("-requested_at",)
        indexes = [models.Index(fields=["group", "status"], name="dao_runreq_group_status")]

    def __str__(self) -> str:
        return f"run {self.job_id} now (#{self.pk}, {self.status})"
