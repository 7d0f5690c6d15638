"""django-apscheduler 0.7 compatibility, checked against the installed 0.7 package itself.

0.7's ``models``, ``jobstores`` and ``admin`` cannot be imported without its app in
INSTALLED_APPS, so their names, signatures, constants and fields are read from their source
(AST); ``util`` imports cleanly and is compared by behaviour. Then code written the 0.7 way
(the seed README's ``runapscheduler``) must still record executions.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import pickle
import threading
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from apscheduler import events
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from django.conf import settings
from django.db import connection
from django.utils import timezone as dj_timezone

import django_apscheduler_obs
from django_apscheduler_obs import admin as obs_admin
from django_apscheduler_obs import jobstores as obs_jobstores
from django_apscheduler_obs import models as obs_models
from django_apscheduler_obs import util as obs_util
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from tests.conftest import EventLog, wait_for

SPEC = importlib.util.find_spec("django_apscheduler")
assert SPEC is not None and SPEC.origin, "django-apscheduler 0.7 must be installed (test extra)"
OLD_DIR = Path(SPEC.origin).parent


def _tree(module: str) -> ast.Module:
    return ast.parse((OLD_DIR / f"{module}.py").read_text())


def _public_defs(tree: ast.Module) -> dict[str, ast.AST]:
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
    }


def _old_params(fn: ast.FunctionDef, method: bool) -> list[tuple[str, str, Any]]:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults: list[Any] = [inspect.Parameter.empty] * (len(positional) - len(a.defaults))
    defaults += [_value(d) for d in a.defaults]
    params = [
        (p.arg, "POSITIONAL_OR_KEYWORD", d) for p, d in zip(positional, defaults, strict=True)
    ]
    if a.vararg:
        params.append((a.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append((p.arg, "KEYWORD_ONLY", inspect.Parameter.empty if d is None else _value(d)))
    if a.kwarg:
        params.append((a.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    if method and params and params[0][0] in ("self", "cls"):
        params = params[1:]
    return params


def _value(node: ast.expr) -> Any:
    try:
        return eval(ast.unparse(node), {"pickle": pickle})  # noqa: S307 - 0.7's own literals
    except Exception:
        return ast.unparse(node)


def _new_params(obj: Any) -> list[tuple[str, str, Any]]:
    params = [(p.name, p.kind.name, p.default) for p in inspect.signature(obj).parameters.values()]
    if params and params[0][0] in ("self", "cls"):
        params = params[1:]
    return params


def assert_compatible_signature(qualname: str, old: ast.FunctionDef, new: Any, method: bool):
    """Every 0.7 parameter is there, in order, with its default; additions are keyword-only."""
    old_params = _old_params(old, method)
    new_params = _new_params(new)
    by_name = {name: (kind, default) for name, kind, default in new_params}
    old_positional = [p for p in old_params if p[1] == "POSITIONAL_OR_KEYWORD"]
    new_positional = [p for p in new_params if p[1] == "POSITIONAL_OR_KEYWORD"]
    assert [p[0] for p in new_positional] == [p[0] for p in old_positional], qualname
    for name, kind, default in old_params:
        assert name in by_name, f"{qualname}: parameter {name!r} of 0.7 is missing"
        assert by_name[name][0] == kind, f"{qualname}: {name!r} is {by_name[name][0]}, not {kind}"
        assert by_name[name][1] == default, f"{qualname}: default of {name!r} changed"
    for name, kind, default in new_params:
        if name not in {p[0] for p in old_params}:
            assert kind == "KEYWORD_ONLY" and default is not inspect.Parameter.empty, (
                f"{qualname}: added parameter {name!r} must be keyword-only with a default"
            )


MODULES = {
    "jobstores": obs_jobstores,
    "models": obs_models,
    "util": obs_util,
    "admin": obs_admin,
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_public_name_and_signature_of_0_7_exists(module: str):
    new_module = MODULES[module]
    for name, node in _public_defs(_tree(module)).items():
        assert hasattr(new_module, name), f"django_apscheduler.{module}.{name} is missing"
        new = getattr(new_module, name)
        if isinstance(node, ast.FunctionDef):
            assert_compatible_signature(f"{module}.{name}", node, new, method=False)
            continue
        assert inspect.isclass(new)
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and (
                not item.name.startswith("_") or item.name == "__init__"
            ):
                if module == "admin":
                    # Admin display methods are the other engineer's UI; names only.
                    continue
                assert hasattr(new, item.name), f"{module}.{name}.{item.name} is missing"
                assert_compatible_signature(
                    f"{module}.{name}.{item.name}", item, getattr(new, item.name), method=True
                )


def test_class_hierarchy_of_the_stores_is_0_7s():
    old = _public_defs(_tree("jobstores"))
    for name in ("DjangoJobStore", "DjangoMemoryJobStore"):
        old_bases = [ast.unparse(b) for b in old[name].bases]  # type: ignore[attr-defined]
        new_bases = [b.__name__ for b in getattr(obs_jobstores, name).__bases__]
        assert new_bases == old_bases


def _class_body(tree: ast.Module, name: str) -> list[ast.stmt]:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name).body


def test_status_constants_and_stored_strings_are_0_7s():
    body = _class_body(_tree("models"), "DjangoJobExecution")
    constants = {
        node.targets[0].id: node.value.value
        for node in body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    assert constants == {
        "SENT": "Started execution",
        "SUCCESS": "Executed",
        "MISSED": "Missed!",
        "MAX_INSTANCES": "Max instances!",
        "ERROR": "Error!",
    }
    for name, value in constants.items():
        assert getattr(DjangoJobExecution, name) == value
    choices = {value for value, _ in DjangoJobExecution.STATUS_CHOICES}
    assert set(constants.values()) <= choices


@pytest.mark.parametrize("model", ["DjangoJob", "DjangoJobExecution"])
def test_model_fields_and_meta_are_0_7s(model: str):
    new = getattr(obs_models, model)
    body = _class_body(_tree("models"), model)
    fields = {
        node.targets[0].id: node.value.func.attr
        for node in body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr.endswith(("Field", "ForeignKey"))
    }
    assert fields, model
    for name, field_class in fields.items():
        field = new._meta.get_field(name)
        assert type(field).__name__ == field_class, f"{model}.{name}"
        old_call = next(
            n.value for n in body if isinstance(n, ast.Assign) and n.targets[0].id == name
        )
        for kw in old_call.keywords:
            if kw.arg in ("max_length", "null", "primary_key", "db_index"):
                assert getattr(field, kw.arg) == ast.literal_eval(kw.value), f"{model}.{name}"
    meta = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == "Meta")
    for node in meta.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "ordering":
            assert tuple(new._meta.ordering) == ast.literal_eval(node.value)
    if model == "DjangoJobExecution":
        # Same columns as 0.7's "unique_job_executions"; another name, because PostgreSQL
        # index names are per schema and both apps live side by side during an upgrade.
        unique = next(c for c in new._meta.constraints if c.name == "dao_exec_unique_job_run_time")
        assert tuple(unique.fields) == ("job_id", "run_time")
        assert new._meta.get_field("exception").max_length == 1000
    assert new._meta.db_table == f"django_apscheduler_obs_{model.lower()}"


def test_manager_method_of_0_7():
    body = _class_body(_tree("models"), "DjangoJobExecutionManager")
    old = next(n for n in body if isinstance(n, ast.FunctionDef))
    assert old.name == "delete_old_job_executions"
    assert_compatible_signature(
        "delete_old_job_executions",
        old,
        DjangoJobExecution.objects.delete_old_job_executions,
        method=True,
    )


def _old_setting_default(module: str, setting: str) -> Any:
    for node in ast.walk(_tree(module)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) == 3
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == setting
        ):
            return ast.literal_eval(node.args[2])
    raise AssertionError(f"{setting} not found in 0.7's {module}.py")


def test_settings_and_their_defaults_are_0_7s(settings):
    from django_apscheduler_obs.conf import conf

    assert _old_setting_default("util", "APSCHEDULER_DATETIME_FORMAT") == conf.DATETIME_FORMAT
    # 0.7's README documents 25 s; its admin.py falls back to 15. We follow the documentation
    # (a longer wait only matters for the admin's run-now, which no longer blocks on the job).
    assert _old_setting_default("admin", "APSCHEDULER_RUN_NOW_TIMEOUT") == 15
    assert conf.RUN_NOW_TIMEOUT == 25
    settings.APSCHEDULER_DATETIME_FORMAT = "Y-m-d H:i:s"
    settings.APSCHEDULER_RUN_NOW_TIMEOUT = 7
    assert conf.DATETIME_FORMAT == "Y-m-d H:i:s"
    assert conf.RUN_NOW_TIMEOUT == 7


# -- util: compared by behaviour with 0.7's own module ----------------------------------------


@pytest.fixture(scope="module")
def old_util():
    from django_apscheduler import util

    return util


@pytest.mark.parametrize("use_tz", [True, False])
@pytest.mark.parametrize("fmt", [None, "Y-m-d H:i:s", "DATETIME_FORMAT"])
def test_datetime_helpers_behave_like_0_7(old_util, settings, use_tz, fmt):
    settings.USE_TZ = use_tz
    settings.TIME_ZONE = "Europe/Berlin"
    if fmt:
        settings.APSCHEDULER_DATETIME_FORMAT = fmt
    sched = BackgroundScheduler(timezone="America/New_York")
    aware = datetime(2024, 3, 31, 1, 30, 15, 123456, tzinfo=timezone.utc)
    naive = datetime(2024, 3, 31, 1, 30, 15, 123456)
    for dt in (aware, naive, None):
        assert obs_util.get_django_internal_datetime(dt) == old_util.get_django_internal_datetime(
            dt
        )
        assert obs_util.get_apscheduler_datetime(dt, sched) == old_util.get_apscheduler_datetime(
            dt, sched
        )
    assert obs_util.get_dt_format() == old_util.get_dt_format()
    for dt in (aware, naive) if not use_tz else (aware,):
        assert obs_util.get_local_dt_format(dt) == old_util.get_local_dt_format(dt)


@pytest.mark.parametrize("name", ["close_old_connections", "retry_on_db_operational_error"])
def test_decorators_keep_the_function(old_util, name):
    def job(a, b=2):
        """doc"""
        return a + b

    for module in (old_util, obs_util):
        wrapped = getattr(module, name)(job)
        assert wrapped(1) == 3
        assert wrapped.__name__ == "job" and wrapped.__doc__ == "doc"
        assert wrapped.__wrapped__ is job


@pytest.mark.parametrize("error", ["OperationalError", "InterfaceError"])
def test_retry_on_db_operational_error_retries_once(error, db):
    from django import db as django_db

    calls = []

    @obs_util.retry_on_db_operational_error
    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise getattr(django_db, error)("gone away")
        return "ok"

    assert flaky() == "ok" and len(calls) == 2

    @obs_util.retry_on_db_operational_error
    def broken():
        calls.append(1)
        raise django_db.OperationalError("still gone")

    calls.clear()
    with pytest.raises(django_db.OperationalError):
        broken()
    assert len(calls) == 2

    @obs_util.retry_on_db_operational_error
    def not_retried():
        calls.append(1)
        raise django_db.IntegrityError("a bug, not a connection")

    calls.clear()
    with pytest.raises(django_db.IntegrityError):
        not_retried()
    assert len(calls) == 1


def test_close_old_connections_closes_before_and_after(monkeypatch):
    from django import db as django_db

    seen = []
    monkeypatch.setattr(django_db, "close_old_connections", lambda: seen.append("close"))

    @obs_util.close_old_connections
    def job():
        seen.append("job")
        raise RuntimeError("still closes")

    with pytest.raises(RuntimeError):
        job()
    assert seen == ["close", "job", "close"]


# -- deprecated helpers --------------------------------------------------------------------


def test_register_events_warns():
    with pytest.warns(DeprecationWarning, match="'register_events' is deprecated since version"):
        obs_jobstores.register_events(BackgroundScheduler())


def test_register_job_warns_and_adds_the_job_with_0_7s_default_id():
    sched = BackgroundScheduler()
    with pytest.warns(DeprecationWarning, match="'register_job' decorator is deprecated"):

        @obs_jobstores.register_job(sched, "interval", seconds=1)
        def dummy_job():
            pass

    (job,) = sched.get_jobs()
    assert job.id == f"{__name__}.dummy_job"
    assert job.func is dummy_job


def test_package_exports_scheduled_job_lazily():
    assert django_apscheduler_obs.scheduled_job.__name__ == "scheduled_job"
    with pytest.raises(AttributeError):
        django_apscheduler_obs.no_such_name  # noqa: B018


# -- behaviour of the 0.7 manager and atomic_update_or_create ------------------------------


@pytest.mark.django_db
def test_delete_old_job_executions_deletes_by_age_like_0_7():
    now = dj_timezone.now()
    DjangoJob.objects.create(id="j", job_state=b"")
    old = [
        DjangoJobExecution.objects.create(
            job_id="j", run_time=now - timedelta(seconds=3600 + i), status="Executed"
        )
        for i in range(1, 4)
    ]
    young = DjangoJobExecution.objects.create(
        job_id="j", run_time=now - timedelta(seconds=3500), status="Executed"
    )
    assert DjangoJobExecution.objects.delete_old_job_executions(3600) is None
    remaining = set(DjangoJobExecution.objects.values_list("id", flat=True))
    assert remaining == {young.id}
    assert not remaining & {e.id for e in old}


@pytest.mark.django_db
def test_atomic_update_or_create_state_machine():
    lock = threading.RLock()
    run_time = dj_timezone.now() - timedelta(seconds=2)
    ex = DjangoJobExecution.atomic_update_or_create(lock, "j", run_time, DjangoJobExecution.SENT)
    assert ex.status == DjangoJobExecution.SENT and ex.duration is None and ex.finished is None
    ex2 = DjangoJobExecution.atomic_update_or_create(
        lock, "j", run_time, DjangoJobExecution.ERROR, exception="x" * 5000, traceback="tb"
    )
    assert ex2.id == ex.id and ex2.status == DjangoJobExecution.ERROR
    ex2.refresh_from_db()
    assert len(ex2.exception) == 1000 and ex2.traceback == "tb"
    assert ex2.duration >= 2 and ex2.finished is not None
    # A late SUBMITTED (APScheduler may send it after EXECUTED) does not reset the status.
    ex3 = DjangoJobExecution.atomic_update_or_create(lock, "j", run_time, DjangoJobExecution.SENT)
    assert ex3.status == DjangoJobExecution.ERROR
    assert DjangoJobExecution.objects.count() == 1


# -- a scheduler written the 0.7 way still records executions ------------------------------


def my_job():
    pass


def failing_job():
    raise ValueError("0.7 style failure ✓")


@obs_util.close_old_connections
def delete_old_job_executions(max_age=604_800):
    DjangoJobExecution.objects.delete_old_job_executions(max_age)


@pytest.mark.django_db(transaction=True)
def test_seed_readme_runapscheduler_records_executions():
    """The README's command, with BlockingScheduler and CronTrigger, run in a thread."""
    scheduler = BlockingScheduler(timezone=settings.TIME_ZONE)
    scheduler.add_jobstore(obs_jobstores.DjangoJobStore(), "default")
    scheduler.add_job(
        my_job,
        trigger=CronTrigger(second="*"),
        id="my_job",
        max_instances=1,
        replace_existing=True,
    )
    scheduler.add_job(
        delete_old_job_executions,
        trigger=CronTrigger(day_of_week="mon", hour="00", minute="00"),
        id="delete_old_job_executions",
        max_instances=1,
        replace_existing=True,
    )
    log = EventLog()
    scheduler.add_listener(log, events.EVENT_ALL)
    thread = threading.Thread(target=scheduler.start, daemon=True)
    thread.start()
    try:
        log.wait(events.EVENT_JOB_EXECUTED, "my_job", count=2, timeout=10)
        wait_for(
            lambda: (
                DjangoJobExecution.objects.filter(
                    job_id="my_job", status=DjangoJobExecution.SUCCESS
                ).count()
                >= 2
            ),
            message="0.7-style execution rows",
        )
    finally:
        scheduler.shutdown(wait=True)
        thread.join(5)
        connection.close()
    assert set(DjangoJob.objects.values_list("id", flat=True)) == {
        "my_job",
        "delete_old_job_executions",
    }
    rows = DjangoJobExecution.objects.filter(job_id="my_job")
    run_times = list(rows.values_list("run_time", flat=True))
    assert len(run_times) == len(set(run_times))  # one row per fire time
    for row in rows.filter(status=DjangoJobExecution.SUCCESS):
        assert row.finished is not None and row.duration is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("store_class", ["DjangoJobStore", "DjangoMemoryJobStore"])
def test_background_scheduler_with_stock_executor_records_every_status(store_class):
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_jobstore(getattr(obs_jobstores, store_class)(), "default")
    log = EventLog()
    scheduler.add_listener(log, events.EVENT_ALL)
    scheduler.start()
    now = datetime.now(timezone.utc)
    try:
        scheduler.add_job(my_job, "date", run_date=now, id="ok")
        scheduler.add_job(failing_job, "date", run_date=now, id="bad")
        scheduler.add_job(
            my_job, "date", run_date=now - timedelta(minutes=5), id="late", misfire_grace_time=1
        )
        log.wait(events.EVENT_JOB_EXECUTED, "ok")
        log.wait(events.EVENT_JOB_ERROR, "bad")
        log.wait(events.EVENT_JOB_MISSED, "late")

        def statuses():
            return dict(DjangoJobExecution.objects.values_list("job_id", "status"))

        wait_for(
            lambda: statuses() == {"ok": "Executed", "bad": "Error!", "late": "Missed!"},
            message="final statuses",
        )
    finally:
        scheduler.shutdown(wait=True)
        connection.close()
    bad = DjangoJobExecution.objects.get(job_id="bad")
    assert bad.exception == "0.7 style failure ✓"
    assert "failing_job" in bad.traceback
    late = DjangoJobExecution.objects.get(job_id="late")
    assert late.exception == "Run time of job 'late' was missed!"
    # One-off jobs are gone from the store, but (unlike 0.7) their history is kept.
    assert DjangoJobExecution.objects.count() == 3
    if store_class == "DjangoJobStore":
        assert not DjangoJob.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_stock_executor_max_instances_is_recorded():
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_jobstore(obs_jobstores.DjangoJobStore(), "default")
    log = EventLog()
    scheduler.add_listener(log, events.EVENT_ALL)
    scheduler.start()
    try:
        from tests import jobs

        jobs.release.clear()
        scheduler.add_job(
            "tests.jobs:block",
            "interval",
            seconds=0.3,
            id="overlap",
            max_instances=1,
            next_run_time=datetime.now(timezone.utc),
        )
        log.wait(events.EVENT_JOB_MAX_INSTANCES, "overlap")
        wait_for(
            lambda: DjangoJobExecution.objects.filter(
                job_id="overlap", status=DjangoJobExecution.MAX_INSTANCES
            ).exists(),
            message="max instances row",
        )
    finally:
        jobs.release.set()
        scheduler.shutdown(wait=True)
        connection.close()
    skipped = DjangoJobExecution.objects.filter(status=DjangoJobExecution.MAX_INSTANCES).first()
    assert "maximum number of running instances reached" in skipped.exception


@pytest.mark.django_db(transaction=True)
def test_mixed_stock_and_observed_executors_each_record_once():
    """0.7's listeners are on (a stock executor is configured) but must not overwrite the
    observed executor's rows: pure duration stays pure."""
    from apscheduler.executors.pool import ThreadPoolExecutor

    from django_apscheduler_obs.executors import ObservedThreadPoolExecutor

    scheduler = BackgroundScheduler(
        timezone="UTC",
        executors={"default": ObservedThreadPoolExecutor(2), "stock": ThreadPoolExecutor(2)},
    )
    scheduler.add_jobstore(obs_jobstores.DjangoJobStore(), "default")
    log = EventLog()
    scheduler.add_listener(log, events.EVENT_ALL)
    scheduler.start()
    late = datetime.now(timezone.utc) - timedelta(seconds=3)
    try:
        scheduler.add_job(my_job, "date", run_date=late, id="observed", misfire_grace_time=30)
        scheduler.add_job(
            my_job, "date", run_date=late, id="stock", executor="stock", misfire_grace_time=30
        )
        log.wait(events.EVENT_JOB_EXECUTED, "observed")
        log.wait(events.EVENT_JOB_EXECUTED, "stock")
        wait_for(
            lambda: (
                DjangoJobExecution.objects.filter(status=DjangoJobExecution.SUCCESS).count() == 2
            ),
            message="two final rows",
        )
    finally:
        scheduler.shutdown(wait=True)
        connection.close()
    observed = DjangoJobExecution.objects.get(job_id="observed")
    stock = DjangoJobExecution.objects.get(job_id="stock")
    assert observed.started is not None and observed.duration < 1  # end - true start
    assert observed.start_delay >= 3
    assert stock.started is None and stock.duration >= 3  # 0.7's end - run_time


def test_no_warnings_importing_the_package():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import importlib

        importlib.reload(obs_util)
