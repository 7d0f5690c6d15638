from __future__ import annotations

import pytest
from apscheduler import events

from django_apscheduler_obs.models import DjangoJobExecution
from tests.conftest import RUN_EVENTS


@pytest.mark.django_db(transaction=True)
def test_a_run_leaves_one_row(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        seconds=60,
        id="noop",
        next_run_time=__import__("datetime").datetime.now().astimezone(),
    )
    rt.events.wait(RUN_EVENTS, "noop")
    rows = list(DjangoJobExecution.objects.filter(job_id="noop"))
    assert len(rows) == 1
    assert rows[0].status == DjangoJobExecution.SUCCESS
    assert events
