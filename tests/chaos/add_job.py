"""Add a one-off ``Ledger`` job from a process that has no scheduler (a web process, a shell).

``python -m tests.chaos.add_job JOB_ID FIRE_EPOCH`` with the chaos settings: a job store that
was never started by a scheduler writes the row; the change counter is bumped after commit.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone


def main(job_id: str, fire_epoch: str) -> None:
    import django

    django.setup()
    from apscheduler.job import Job
    from apscheduler.schedulers.background import BackgroundScheduler

    from django_apscheduler_obs.jobstores import DjangoJobStore

    fire = datetime.fromtimestamp(float(fire_epoch), tz=timezone.utc)
    scheduler = BackgroundScheduler(timezone="UTC")  # never started: lends its time zone
    job = Job(
        scheduler,
        id=job_id,
        func="tests.jobs:ledger",
        args=(),
        kwargs={},
        trigger=scheduler._create_trigger("date", {"run_date": fire}),
        executor="default",
        name=job_id,
        misfire_grace_time=60,
        coalesce=False,
        max_instances=1,
        next_run_time=fire,
    )
    DjangoJobStore().add_job(job)
    print(f"added {job_id} at {fire.isoformat()}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
