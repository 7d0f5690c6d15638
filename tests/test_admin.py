"""The admin as a monitoring console: columns, query counts, permissions, pause/resume, escaping.

Helpers at the top (``store_job``, ``add_runs``, ``make_user``, ``live_lease``) are shared with
the other admin-related test modules.
"""

from __future__ import annotations

import pickle
import re
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils.html import strip_tags

from django_apscheduler_obs import admin as dao_admin
from django_apscheduler_obs import signing
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import (
    DjangoJob,
    DjangoJobExecution,
    JobStoreVersion,
    RunRequest,
    SchedulerLease,
)
from tests.conftest import RUN_EVENTS

EX = DjangoJobExecution
JOBS_URL = "/admin/django_apscheduler_obs/djangojob/"
EXECUTIONS_URL = "/admin/django_apscheduler_obs/djangojobexecution/"
REQUESTS_URL = "/admin/django_apscheduler_obs/runrequest/"


# -- helpers ------------------------------------------------------------------------------


def script_job() -> None:
    """A job whose error is HTML: the admin must show it as text."""
    raise RuntimeError("<script>alert('pwned')</script>")


def store_job(
    job_id: str,
    func: str = "tests.jobs:noop",
    trigger: BaseTrigger | None = None,
    next_run_time: datetime | None = None,
    paused: bool = False,
) -> Job:
    """Write a job into the store as a scheduler would, without starting one."""
    scheduler = BackgroundScheduler(timezone="UTC")
    trigger = trigger or IntervalTrigger(minutes=5, timezone="UTC")
    if next_run_time is None and not paused:
        next_run_time = datetime.now(timezone.utc) + timedelta(minutes=5)
    job = Job(
        scheduler,
        id=job_id,
        func=func,
        trigger=trigger,
        executor="default",
        args=(),
        kwargs={},
        name=job_id,
        misfire_grace_time=60,
        coalesce=True,
        max_instances=1,
        next_run_time=next_run_time,
    )
    DjangoJobStore().add_job(job)
    return job


def add_runs(
    job_id: str, count: int, *, errors_every: int = 0, end: datetime | None = None
) -> None:
    """``count`` finished runs of ``job_id``, one a minute up to ``end`` (default now)."""
    end = end or datetime.now(timezone.utc)
    rows = []
    for k in range(count):
        failed = bool(errors_every) and k % errors_every == 0
        run_time = end - timedelta(minutes=k)
        rows.append(
            EX(
                job_id=job_id,
                status=EX.ERROR if failed else EX.SUCCESS,
                run_time=run_time,
                duration=Decimal(f"{0.1 + (k % 7) / 10:.6f}"),
                finished=Decimal(f"{run_time.timestamp() + 1:.6f}"),
                started=run_time,
                start_delay=0.002,
                exception="boom" if failed else None,
                trigger_source="schedule",
            )
        )
    EX.objects.bulk_create(rows, batch_size=500)


def make_user(username: str, *codenames: str, superuser: bool = False) -> User:
    if superuser:
        return User.objects.create_superuser(username, f"{username}@example.com", "pw")
    user = User.objects.create_user(username, password="pw", is_staff=True)
    perms = Permission.objects.filter(
        content_type__app_label="django_apscheduler_obs", codename__in=codenames
    )
    assert perms.count() == len(codenames), codenames
    user.user_permissions.set(perms)
    return user


VIEW_ALL = ("view_djangojob", "view_djangojobexecution", "view_runrequest")


def live_lease(owner: str = "somehost:1:feedbeef", seconds: float = 120) -> SchedulerLease:
    """A leader as the web process sees it, without running one."""
    now = datetime.now(timezone.utc)
    return SchedulerLease.objects.update_or_create(
        name="default",
        defaults={
            "owner": owner,
            "epoch": 1,
            "expires_at": now + timedelta(seconds=seconds),
            "acquired_at": now,
            "renewed_at": now,
        },
    )[0]


def csrf_client(user: User) -> tuple[Client, str]:
    """A client that enforces CSRF like a browser session, and its token."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.get(JOBS_URL).status_code == 200  # sets the csrftoken cookie
    return client, client.cookies["csrftoken"].value


def change_counter() -> int:
    """The job store's change counter, which wakes the leader."""
    return (
        JobStoreVersion.objects.filter(name="default").values_list("version", flat=True).first()
        or 0
    )


def job_url(job_id: str, action: str = "change") -> str:
    return f"{JOBS_URL}{job_id}/{action}/"


def count_queries(client: Client, url: str) -> int:
    """Queries of one GET of ``url``, after a first GET fills process-wide caches."""
    client.get(url)
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return len(ctx.captured_queries)


def text(response: Any) -> str:
    return response.content.decode()


# -- pure helpers -------------------------------------------------------------------------


def test_percentile_nearest_rank():
    assert dao_admin.percentile([], 95) is None
    assert dao_admin.percentile([3.0], 95) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert dao_admin.percentile(values, 95) == 95.0
    assert dao_admin.percentile(values, 50) == 50.0
    assert dao_admin.percentile(reversed(values), 100) == 100.0


def test_run_stats_ignores_running_rows():
    rows = [
        EX(status=EX.SENT, duration=None),
        EX(status=EX.SUCCESS, duration=Decimal("1")),
        EX(status=EX.ERROR, duration=Decimal("3")),
        EX(status=EX.SUCCESS, duration=Decimal("2")),
    ]
    stats = dao_admin.RunStats(rows)
    assert stats.last is rows[0]
    assert stats.success_ratio == pytest.approx(2 / 3)
    assert stats.p95 == 3.0


def test_sparkline_is_escaped_svg():
    now = datetime.now(timezone.utc)
    rows = [
        EX(status=EX.SUCCESS, duration=Decimal("2"), run_time=now),
        EX(status="<b>odd</b>", duration=None, run_time=now - timedelta(minutes=1)),
        EX(status=EX.ERROR, duration=None, run_time=now - timedelta(minutes=2)),
    ]
    svg = str(dao_admin.sparkline(rows))
    assert svg.startswith("<svg") and svg.count("<rect") == 3
    assert "<b>" not in svg and "&lt;b&gt;odd" in svg
    heights = [int(h) for h in re.findall(r'height="(\d+)" fill', svg)]
    # oldest first: the error without timing is drawn full height, the success is the tallest run
    assert heights == [21, 2, 21]
    assert 'fill="#c62828"' in svg and 'fill="#2e7d32"' in svg


@pytest.mark.parametrize(
    "fmt",
    [
        "N j, Y, f:s a",  # the default (0.7's)
        "DATETIME_FORMAT",  # a format name, resolved for the active language
        r"\N\o\w: Y-m-d H:i:s.u e O T Z U c r P A I",  # escapes, zones and the uncached ones
        r"jS F Y \a\t g:i A",
    ],
)
@pytest.mark.parametrize("lang,zone", [("en", "UTC"), ("de", "Europe/Berlin"), ("fr", None)])
def test_local_times_formats_like_util(settings, fmt, lang, zone):
    from django.utils import timezone as dj_timezone
    from django.utils import translation

    from django_apscheduler_obs import util

    settings.APSCHEDULER_DATETIME_FORMAT = fmt
    # Across a DST change, midnight, noon, whole minutes, and a naive value.
    start = datetime(2026, 3, 28, 11, 58, tzinfo=timezone.utc)
    values: list[datetime] = [start + timedelta(seconds=61 * i, microseconds=i) for i in range(60)]
    values += [start + timedelta(hours=h) for h in range(0, 48, 3)]
    values.append(datetime(2026, 7, 1, 0, 0))
    with translation.override(lang), dj_timezone.override(zone or "America/New_York"):
        times = dao_admin.LocalTimes()
        assert [times(v) for v in values] == [util.get_local_dt_format(v) for v in values]
        # kept texts are reused, and still right, on a second pass
        assert [times(v) for v in reversed(values)] == [
            util.get_local_dt_format(v) for v in reversed(values)
        ]
    assert times(None) == "—"


def test_sparkline_titles_are_local_times():
    from django_apscheduler_obs import util

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    runs = [dao_admin.Run(1, "j", EX.SUCCESS, now, 0.42, None)]
    svg = str(dao_admin.sparkline(runs, times=dao_admin.LocalTimes()))
    assert f"<title>{util.get_local_dt_format(now)}: Executed, 420 ms</title>" in svg
    assert svg == str(dao_admin.sparkline(runs))  # the same without a page's formatter


def test_badge_escapes_like_format_html():
    from django.utils.html import format_html
    from django.utils.safestring import mark_safe

    expected = format_html(
        '<span class="dao-badge dao-{}" title="{}">{}</span>', "ok", '"<t>"', "<b>x</b>"
    )
    assert dao_admin.badge("<b>x</b>", "ok", '"<t>"') == expected
    assert "<i>" in dao_admin.badge(mark_safe("<i>safe</i>"), "ok")  # safe text is kept


@pytest.mark.django_db
def test_recent_executions_newest_first_per_job():
    store_job("a")
    store_job("b")
    add_runs("a", 8, errors_every=3)
    add_runs("b", 2, end=datetime.now(timezone.utc) - timedelta(hours=1))
    with CaptureQueriesContext(connection) as ctx:
        runs = dao_admin.recent_executions(["a", "b", "none"], limit=5, complete=3)
    assert len(ctx.captured_queries) == 1
    assert [len(runs[j]) for j in ("a", "b", "none")] == [5, 2, 0]
    expected = list(EX.objects.filter(job_id="a").order_by("-run_time")[:5])
    assert [r.pk for r in runs["a"]] == [e.pk for e in expected]
    assert [r.status for r in runs["a"]] == [e.status for e in expected]
    assert [r.duration for r in runs["a"]] == [float(e.duration) for e in expected]
    # complete rows carry their run time and exception, later ones only what the stats read
    assert [r.run_time for r in runs["a"][:3]] == [e.run_time for e in expected[:3]]
    assert runs["a"][0].exception == "boom" and runs["a"][0].run_time.tzinfo is not None
    assert [r.run_time for r in runs["a"][3:]] == [None, None]
    assert all(r.run_time is not None for r in runs["b"])
    stats = dao_admin.RunStats(runs["a"])
    assert stats.success_ratio == pytest.approx(3 / 5) and stats.p95 == 0.5

    detail = dao_admin.recent_executions(["a"], detail=True)["a"]
    assert len(detail) == 8 and detail[0].trigger_source == "schedule"
    assert detail[0].start_delay == pytest.approx(0.002)


@pytest.mark.django_db
def test_recent_executions_over_many_statements(monkeypatch):
    monkeypatch.setattr(dao_admin, "BULK_PARTS", 2)
    for j in range(5):
        store_job(f"j{j}")
        add_runs(f"j{j}", j)
    with CaptureQueriesContext(connection) as ctx:
        runs = dao_admin.recent_executions([f"j{j}" for j in range(5)], limit=3)
    assert len(ctx.captured_queries) == 3
    assert [len(runs[f"j{j}"]) for j in range(5)] == [0, 1, 2, 3, 3]


@pytest.mark.django_db
def test_job_texts_are_cached_by_state():
    job = store_job("cached")
    blob = bytes(DjangoJob.objects.get(id="cached").job_state)
    dao_admin.job_texts.cache_clear()
    assert dao_admin.job_texts(blob) == (
        "tests.jobs:noop",
        dao_admin.triggers.describe(job.trigger),
    )
    assert dao_admin.job_texts(bytes(blob)) == dao_admin.job_texts(blob)
    assert dao_admin.job_texts.cache_info().hits == 2
    # a state that does not verify (tampered, or unsigned) is never unpickled
    assert dao_admin.job_texts(blob[:-1] + b"x") == ("—", "—")
    assert dao_admin.job_texts(pickle.dumps({"func": "x", "trigger": None})) == ("—", "—")


# -- job list -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_job_list_columns(admin_client):
    now = datetime.now(timezone.utc)
    store_job("healthy", trigger=IntervalTrigger(minutes=10, timezone="UTC"))
    add_runs("healthy", 120)
    store_job("flaky", next_run_time=now - timedelta(minutes=10))  # overdue
    add_runs("flaky", 20, errors_every=2)
    store_job("cronjob", trigger=CronTrigger(hour=3, minute=0, timezone="UTC"), paused=True)

    response = admin_client.get(JOBS_URL)
    page = text(response)
    assert response.status_code == 200
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r'<tr>.*?name="_selected_action" value="([^"]+)".*?</tr>', page, re.S)
    }
    assert set(rows) == {"healthy", "flaky", "cronjob"}
    # trigger in words, function, sparkline
    assert "every 10 min" in rows["healthy"] and "tests.jobs:noop" in rows["healthy"]
    assert "every day at 03:00 UTC" in rows["cronjob"]
    assert rows["healthy"].count("<rect") == dao_admin.LIST_SPARK_RUNS
    # success ratio over the last 100 runs, p95 duration
    assert ">100%<" in rows["healthy"]
    assert ">50%<" in rows["flaky"]
    assert "700 ms" in rows["healthy"]  # durations cycle 0.1..0.7 s
    # last outcome, overdue and paused badges
    assert "dao-error" in rows["flaky"] and ">Error!<" in rows["flaky"]
    assert ">overdue<" in rows["flaky"] and ">overdue<" not in rows["healthy"]
    assert ">paused<" in rows["cronjob"] and "no runs" in rows["cronjob"]
    # who leads: nobody here
    assert "No scheduler is running" in page


@pytest.mark.django_db
def test_job_list_state_filter(admin_client):
    now = datetime.now(timezone.utc)
    store_job("late", next_run_time=now - timedelta(minutes=10))
    store_job("soon")
    store_job("resting", paused=True)
    DjangoJob.objects.filter(id="soon").update(restore_error="ImportError: gone")

    def ids(state: str) -> set[str]:
        page = text(admin_client.get(f"{JOBS_URL}?state={state}"))
        return set(re.findall(r'name="_selected_action" value="([^"]+)"', page))

    assert ids("overdue") == {"late"}
    assert ids("paused") == {"resting"}
    assert ids("scheduled") == {"late", "soon"}
    assert ids("unrestorable") == {"soon"}


@pytest.mark.django_db
def test_job_list_shows_leader_and_standbys(admin_client):
    from django_apscheduler_obs.models import SchedulerInstance

    live_lease(owner="web1:10:aaaa")
    now = datetime.now(timezone.utc)
    for identity, leader, seen in [
        ("web1:10:aaaa", True, now),
        ("web2:20:bbbb", False, now),
        ("web3:30:cccc", False, now - timedelta(minutes=5)),
    ]:
        SchedulerInstance.objects.create(
            identity=identity,
            hostname=identity.split(":")[0],
            pid=1,
            started_at=now,
            last_seen=seen,
            is_leader=leader,
        )
    page = text(admin_client.get(JOBS_URL))
    banner = page[page.index('id="dao-scheduler"') :][:1500]
    assert "web1:10:aaaa" in banner and "epoch 1" in banner
    assert "1 standby" in banner and "web2:20:bbbb" in banner
    assert "1 stale instance" in banner and "web3:30:cccc" not in banner


@pytest.mark.django_db
def test_job_list_query_count_is_constant(admin_client, capsys):
    def measure(n_jobs: int) -> int:
        DjangoJob.objects.all().delete()
        EX.objects.all().delete()
        for i in range(n_jobs):
            store_job(f"job{i:03d}")
        for i in range(n_jobs):
            add_runs(f"job{i:03d}", 30, errors_every=4)
        page = text(admin_client.get(JOBS_URL))
        assert page.count('name="_selected_action"') == n_jobs
        return count_queries(admin_client, JOBS_URL)

    ten, hundred = measure(10), measure(100)
    with capsys.disabled():
        print(f"\njob list queries: 10 jobs -> {ten}, 100 jobs -> {hundred}")
    assert ten == hundred
    assert hundred <= 10


@pytest.mark.django_db
def test_job_detail_query_count_is_constant(admin_client, capsys):
    store_job("few")
    add_runs("few", 10)
    store_job("many")
    add_runs("many", 300, errors_every=10)
    for _ in range(15):
        RunRequest.objects.create(job_id="many", status=RunRequest.DONE)
    few = count_queries(admin_client, job_url("few"))
    many = count_queries(admin_client, job_url("many"))
    with capsys.disabled():
        print(f"\njob detail queries: 10 runs -> {few}, 300 runs + 15 requests -> {many}")
    assert few == many


@pytest.mark.django_db
def test_execution_and_request_lists_query_count_is_constant(admin_client, capsys):
    store_job("a")
    add_runs("a", 10)
    small = count_queries(admin_client, EXECUTIONS_URL)
    RunRequest.objects.create(job_id="a")
    small_requests = count_queries(admin_client, REQUESTS_URL)
    add_runs("a", 200, end=datetime.now(timezone.utc) - timedelta(days=1))
    for _ in range(100):
        RunRequest.objects.create(job_id="a")
    large = count_queries(admin_client, EXECUTIONS_URL)
    large_requests = count_queries(admin_client, REQUESTS_URL)
    filtered = count_queries(
        admin_client, f"{EXECUTIONS_URL}?job__id__exact=a&status__exact=Executed"
    )
    with capsys.disabled():
        print(
            f"\nexecution list queries: 10 rows -> {small}, 210 rows -> {large}, "
            f"filtered -> {filtered}; run-now requests: 1 -> {small_requests}, "
            f"101 -> {large_requests}"
        )
    assert small == large == filtered
    assert small_requests == large_requests


@pytest.mark.django_db
def test_job_detail_shows_health_links_and_recent_executions(admin_client, settings):
    settings.APSCHEDULER_GRAFANA_URL_TEMPLATE = "https://grafana.example/d/job?var-job_id={job_id}"
    settings.APSCHEDULER_TRACE_URL_TEMPLATE = (
        "https://tempo.example/trace/{trace_id}?span={span_id}"
    )
    store_job("reports/daily")
    add_runs("reports/daily", 40, errors_every=5)
    EX.objects.filter(job_id="reports/daily").update(trace_id="ab" * 16, span_id="cd" * 8)

    page = text(admin_client.get(job_url("reports_2Fdaily")))
    assert 'href="https://grafana.example/d/job?var-job_id=reports%2Fdaily"' in page
    assert "https://tempo.example/trace/" + "ab" * 16 + "?span=" + "cd" * 8 in page
    assert 'id="dao-run-now"' in page and 'id="dao-pause"' in page
    assert "?job__id__exact=reports/daily" in page
    health = page[page.index('id="dao-health"') :][:6000]
    assert health.count("<rect") == 40 and ">80%<" in health
    recent = page[page.index('id="recent-executions"') :]
    assert recent.count("<tr>") == dao_admin.DETAIL_TABLE_RUNS + 1  # + header
    # nothing on this page is a form field to save
    assert 'name="_save"' not in page


# -- permissions (API level, CSRF enforced) -------------------------------------------------


@pytest.mark.django_db
def test_anonymous_is_sent_to_login():
    store_job("j")
    client = Client()
    for url in (JOBS_URL, job_url("j"), EXECUTIONS_URL, REQUESTS_URL):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]
    response = client.post(job_url("j", "run-now"))
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert not RunRequest.objects.exists()


@pytest.mark.django_db
def test_viewing_needs_view_permission():
    store_job("j")
    add_runs("j", 1)
    nobody = Client()
    nobody.force_login(make_user("nobody"))
    assert nobody.get(JOBS_URL).status_code == 403
    assert nobody.get(job_url("j")).status_code == 403
    assert nobody.get(EXECUTIONS_URL).status_code == 403

    viewer = Client()
    viewer.force_login(make_user("viewer", *VIEW_ALL))
    assert viewer.get(JOBS_URL).status_code == 200
    page = text(viewer.get(job_url("j")))
    assert 'id="dao-run-now"' not in page and 'id="dao-pause"' not in page
    execution = EX.objects.get()
    assert viewer.get(f"{EXECUTIONS_URL}{execution.pk}/change/").status_code == 200


@pytest.mark.django_db
def test_run_now_pause_resume_need_change_permission():
    live_lease()
    store_job("j")
    client, token = csrf_client(make_user("viewer", *VIEW_ALL))
    for action in ("run-now", "pause", "resume"):
        response = client.post(job_url("j", action), {"csrfmiddlewaretoken": token})
        assert response.status_code == 403, action
    # the actions are not offered either: posting one is ignored
    for action in ("run_now", "pause_jobs", "resume_jobs", "delete_selected"):
        response = client.post(
            JOBS_URL,
            {"csrfmiddlewaretoken": token, "action": action, "_selected_action": ["j"]},
        )
        assert response.status_code in (200, 302)
    assert not RunRequest.objects.exists()
    assert DjangoJob.objects.get(id="j").next_run_time is not None


@pytest.mark.django_db
def test_run_now_needs_csrf_token():
    live_lease()
    store_job("j")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    assert client.post(job_url("j", "run-now")).status_code == 403
    assert client.post(job_url("j", "pause")).status_code == 403
    assert not RunRequest.objects.exists()
    response = client.post(job_url("j", "run-now"), {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert RunRequest.objects.get().status == RunRequest.QUEUED


@pytest.mark.django_db
def test_posting_the_read_only_job_form_writes_nothing():
    """A crafted POST to the change form must not overwrite the leader's newer state."""
    store_job("j")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    before = DjangoJob.objects.values().get(id="j")
    # meanwhile the leader advances the job
    DjangoJob.objects.filter(id="j").update(
        next_run_time=before["next_run_time"] + timedelta(minutes=5)
    )
    with CaptureQueriesContext(connection) as ctx:
        response = client.post(job_url("j"), {"csrfmiddlewaretoken": token, "_save": "Save"})
    assert response.status_code == 302
    table = DjangoJob._meta.db_table
    writes = [
        q["sql"]
        for q in ctx.captured_queries
        if q["sql"].startswith("UPDATE") and table in q["sql"]
    ]
    assert writes == []  # obj.save() would write a copy read before the leader's next write
    after = DjangoJob.objects.values().get(id="j")
    assert after["next_run_time"] == before["next_run_time"] + timedelta(minutes=5)
    assert after["version"] == before["version"]


@pytest.mark.django_db
def test_run_now_get_is_not_allowed():
    store_job("j")
    client, _ = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    assert client.get(job_url("j", "run-now")).status_code == 405
    assert not RunRequest.objects.exists()


@pytest.mark.django_db
def test_delete_needs_delete_permission(django_capture_on_commit_callbacks):
    store_job("a")
    store_job("b")
    operator, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    assert (
        operator.post(
            job_url("a", "delete"), {"csrfmiddlewaretoken": token, "post": "yes"}
        ).status_code
        == 403
    )
    operator.post(
        JOBS_URL,
        {
            "csrfmiddlewaretoken": token,
            "action": "delete_selected",
            "_selected_action": ["a"],
            "post": "yes",
        },
    )
    assert DjangoJob.objects.count() == 2

    admin_user, token = csrf_client(make_user("deleter", *VIEW_ALL, "delete_djangojob"))
    before = change_counter()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_user.post(
            job_url("a", "delete"), {"csrfmiddlewaretoken": token, "post": "yes"}
        )
    assert response.status_code == 302
    assert list(DjangoJob.objects.values_list("id", flat=True)) == ["b"]
    # the leader is told through the change counter
    assert change_counter() == before + 1


# -- run-now from the admin ---------------------------------------------------------------


@pytest.mark.django_db
def test_run_now_without_scheduler_says_so():
    store_job("j")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    response = client.post(job_url("j", "run-now"), {"csrfmiddlewaretoken": token}, follow=True)
    page = text(response)
    assert "No scheduler is running" in page and "Not run (j)" in page
    request = RunRequest.objects.get()
    assert request.status == RunRequest.REFUSED and "no live lease" in request.message


@pytest.mark.django_db
def test_run_now_with_expired_lease_is_refused():
    live_lease(seconds=-5)
    store_job("j")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    client.post(job_url("j", "run-now"), {"csrfmiddlewaretoken": token})
    assert RunRequest.objects.get().status == RunRequest.REFUSED


@pytest.mark.django_db
def test_run_now_action_queues_one_request_per_job():
    live_lease()
    store_job("a")
    store_job("b")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    response = client.post(
        JOBS_URL,
        {"csrfmiddlewaretoken": token, "action": "run_now", "_selected_action": ["a", "b"]},
        follow=True,
    )
    assert "Run-now queued for a, b" in text(response)
    requests = list(RunRequest.objects.order_by("job_id"))
    assert [(r.job_id, r.status, r.requested_by) for r in requests] == [
        ("a", RunRequest.QUEUED, "operator"),
        ("b", RunRequest.QUEUED, "operator"),
    ]
    # the job page shows it queued
    page = text(client.get(job_url("a")))
    assert 'data-status="queued"' in page
    assert '<meta http-equiv="refresh"' in page  # follows it until it is done


# -- pause / resume -------------------------------------------------------------------------


def stored_state(job_id: str) -> dict[str, Any]:
    row = DjangoJob.objects.get(id=job_id)
    return pickle.loads(signing.verify(bytes(row.job_state)))  # noqa: S301


@pytest.mark.django_db
def test_pause_and_resume_keep_column_and_state_consistent(django_capture_on_commit_callbacks):
    store_job("j", trigger=IntervalTrigger(minutes=5, timezone="UTC"))
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    version = DjangoJob.objects.get(id="j").version
    counter = change_counter()

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(job_url("j", "pause"), {"csrfmiddlewaretoken": token}, follow=True)
    assert "Paused: j." in text(response)
    row = DjangoJob.objects.get(id="j")
    assert row.next_run_time is None and stored_state("j")["next_run_time"] is None
    assert row.version == version + 1
    assert change_counter() == counter + 1
    assert DjangoJobStore().lookup_job("j").next_run_time is None
    assert 'id="dao-resume"' in text(response)

    before = datetime.now(timezone.utc)
    with django_capture_on_commit_callbacks(execute=True):
        client.post(job_url("j", "resume"), {"csrfmiddlewaretoken": token})
    row = DjangoJob.objects.get(id="j")
    assert row.next_run_time is not None
    assert before < row.next_run_time <= before + timedelta(minutes=5, seconds=1)
    assert stored_state("j")["next_run_time"] == row.next_run_time
    assert change_counter() == counter + 2


@pytest.mark.django_db
def test_pause_action_on_several_jobs_and_unrestorable_one():
    store_job("a")
    store_job("b")
    store_job("broken")
    DjangoJob.objects.filter(id="broken").update(job_state=b"not signed")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    response = client.post(
        JOBS_URL,
        {
            "csrfmiddlewaretoken": token,
            "action": "pause_jobs",
            "_selected_action": ["a", "b", "broken"],
        },
        follow=True,
    )
    page = text(response)
    assert "Paused: a, b." in page and "Could not change broken" in page
    assert set(
        DjangoJob.objects.filter(next_run_time__isnull=True).values_list("id", flat=True)
    ) == {
        "a",
        "b",
    }


@pytest.mark.django_db(transaction=True)
def test_running_leader_sees_pause_and_resume(make_runtime):
    """Paused in the admin: the leader stops running it (and does not overwrite the pause
    with its own next-run write); resumed: it runs again."""
    from apscheduler.events import EVENT_JOB_EXECUTED

    from django_apscheduler_obs.executors import HEARTBEAT_JOB_ID

    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.jobs:noop",
        "interval",
        seconds=1,
        id="tick",
        next_run_time=datetime.now(timezone.utc),
    )
    rt.events.wait(RUN_EVENTS, "tick")
    client, token = csrf_client(make_user("operator", *VIEW_ALL, "change_djangojob"))
    client.post(job_url("tick", "pause"), {"csrfmiddlewaretoken": token})
    paused_runs = EX.objects.filter(job_id="tick").count()
    # three more scheduler passes (the heartbeat runs every second), each would have run it
    beats = len(rt.events.of(EVENT_JOB_EXECUTED, HEARTBEAT_JOB_ID))
    rt.events.wait(EVENT_JOB_EXECUTED, HEARTBEAT_JOB_ID, count=beats + 3)
    assert DjangoJob.objects.get(id="tick").next_run_time is None
    assert stored_state("tick")["next_run_time"] is None
    assert EX.objects.filter(job_id="tick").count() <= paused_runs + 1  # one may be in flight
    settled = EX.objects.filter(job_id="tick").count()

    runs_before = len(rt.events.of(RUN_EVENTS, "tick"))
    client.post(job_url("tick", "resume"), {"csrfmiddlewaretoken": token})
    rt.events.wait(RUN_EVENTS, "tick", count=runs_before + 1, timeout=10)
    assert EX.objects.filter(job_id="tick").count() > settled


# -- executions: escaping, filters --------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_html_in_exception_and_traceback_is_escaped(make_runtime):
    rt = make_runtime()
    rt.scheduler.add_job(
        "tests.test_admin:script_job",
        "interval",
        minutes=5,
        id="xss",
        next_run_time=datetime.now(timezone.utc),
    )
    rt.events.wait(RUN_EVENTS, "xss")
    execution = EX.objects.get(job_id="xss")
    assert "<script>" in execution.exception and "<script>" in execution.traceback
    client = Client()
    client.force_login(make_user("viewer", *VIEW_ALL))
    for url in (
        f"{EXECUTIONS_URL}{execution.pk}/change/",
        EXECUTIONS_URL,
        job_url("xss"),
        JOBS_URL,
    ):
        page = text(client.get(url))
        assert "<script>alert" not in page, url
    detail = text(client.get(f"{EXECUTIONS_URL}{execution.pk}/change/"))
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in detail
    # the traceback keeps its lines and indentation
    assert re.search(r'<pre class="dao-pre dao-traceback">.*\n  File ', detail, re.S)
    assert "raise RuntimeError(" in detail


@pytest.mark.django_db
def test_execution_list_filters(admin_client):
    store_job("a")
    store_job("b")
    add_runs("a", 6, errors_every=3)
    add_runs("b", 3)
    EX.objects.filter(job_id="b").update(trigger_source="run_now")

    def count(query: str) -> int:
        page = text(admin_client.get(EXECUTIONS_URL + query))
        return page.count('class="action-select"')

    assert count("") == 9
    assert count("?job__id__exact=a") == 6
    assert count("?status__exact=Error%21") == 2
    assert count("?trigger_source=run_now") == 3
    page = text(admin_client.get(EXECUTIONS_URL))
    for status in (EX.SENT, EX.SUCCESS, EX.ERROR, EX.MISSED, EX.MAX_INSTANCES, EX.ABANDONED):
        assert f"?status__exact={status.replace('!', '%21').replace(' ', '+')}" in page


@pytest.mark.django_db
def test_execution_count_is_capped(admin_client, monkeypatch):
    monkeypatch.setattr(dao_admin, "COUNT_CAP", 5)
    monkeypatch.setattr(dao_admin.DjangoJobExecutionAdmin, "count_cap", 5)
    monkeypatch.setattr(dao_admin.DjangoJobExecutionAdmin, "count_cap_text", "5")
    store_job("a")
    add_runs("a", 4)
    assert "4 django job executions" in text(admin_client.get(EXECUTIONS_URL))
    add_runs("a", 4, end=datetime.now(timezone.utc) - timedelta(days=1))
    with CaptureQueriesContext(connection) as ctx:
        page = text(admin_client.get(EXECUTIONS_URL))
    assert "more than 5 django job executions" in strip_tags(page)
    assert "?_facets=True" not in page  # "Show counts" would COUNT the history per filter choice
    counts = [q["sql"] for q in ctx.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 6" in sql.upper() for sql in counts), counts


# -- a million rows -------------------------------------------------------------------------

MILLION = 1_000_000
BIG_JOBS = 10


def _fill_million() -> None:
    table = EX._meta.db_table
    cols = (
        "job_id, status, run_time, duration, trigger_source, error_type, trace_id, span_id, owner"
    )
    status = "CASE WHEN {g} % 20 = 0 THEN 'Error!' ELSE 'Executed' END"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"INSERT INTO {table} ({cols}) SELECT 'big' || (g % {BIG_JOBS}), "
                f"{status.format(g='g')}, now() - g * interval '1 second', 0.5, "
                f"'schedule', '', '', '', '' FROM generate_series(1, {MILLION}) g"
            )
        elif connection.vendor == "mysql":
            cursor.execute(
                f"INSERT INTO {table} ({cols}) SELECT CONCAT('big', seq % {BIG_JOBS}), "
                f"{status.format(g='seq')}, UTC_TIMESTAMP(6) - INTERVAL seq SECOND, 0.5, "
                f"'schedule', '', '', '', '' FROM seq_1_to_{MILLION}"
            )
        else:
            cursor.execute(
                f"WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g "
                f"WHERE x < {MILLION}) INSERT INTO {table} ({cols}) "
                f"SELECT 'big' || (x % {BIG_JOBS}), {status.format(g='x')}, "
                f"STRFTIME('%Y-%m-%d %H:%M:%f', 'now', '-' || x || ' seconds'), 0.5, "
                f"'schedule', '', '', '', '' FROM g"
            )
        if connection.vendor == "postgresql":
            cursor.execute(f"ANALYZE {table}")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_pages_stay_fast_with_a_million_executions(admin_client, capsys):
    for i in range(BIG_JOBS):
        store_job(f"big{i}")
    t0 = time.perf_counter()
    _fill_million()
    fill = time.perf_counter() - t0
    assert EX.objects.order_by()[: MILLION + 1].count() == MILLION
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    urls = {
        "job list": JOBS_URL,
        "job detail": job_url("big3"),
        "executions": EXECUTIONS_URL,
        "executions page 50": EXECUTIONS_URL + "?p=50",
        "by job": EXECUTIONS_URL + "?job__id__exact=big3",
        "by status": EXECUTIONS_URL + "?status__exact=Error%21",
        "by job+status": EXECUTIONS_URL + "?job__id__exact=big3&status__exact=Error%21",
        # the link DateFieldListFilter itself makes for "Past 7 days"
        "past 7 days": EXECUTIONS_URL
        + "?"
        + urlencode(
            {
                "run_time__gte": str(today - timedelta(days=7)),
                "run_time__lt": str(today + timedelta(days=1)),
            }
        ),
    }
    timings = {}
    for name, url in urls.items():
        admin_client.get(url)  # warm caches, as a second look in a browser would
        t0 = time.perf_counter()
        response = admin_client.get(url)
        timings[name] = time.perf_counter() - t0
        assert response.status_code == 200, name
    assert "more than 10,000 django job executions" in strip_tags(
        text(admin_client.get(EXECUTIONS_URL))
    )
    with capsys.disabled():
        print(
            f"\n{connection.vendor}: inserted {MILLION} rows in {fill:.1f}s; page times: "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
        )
    for name, seconds in timings.items():
        assert seconds < 3.0, (name, seconds)
