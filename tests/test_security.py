"""Security promises: signed job state, key rotation, the signing migration, the metrics
endpoint of a real process over TLS, and no job argument in logs, metrics or spans."""

from __future__ import annotations

import logging
import os
import pickle
import ssl
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from apscheduler import events
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from django_apscheduler_obs import server, signing
from django_apscheduler_obs.jobstores import DjangoJobStore
from django_apscheduler_obs.models import DjangoJob, DjangoJobExecution
from tests.conftest import wait_for
from tests.demo_process import REPO, free_port
from tests.test_fault_processes import SchedulerProcess, jobs_source, sample
from tests.test_faults import Records, records  # noqa: F401 - fixture
from tests.test_server import pki  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)

APP = "django_apscheduler_obs"


# -- job state: refused before unpickling ------------------------------------------------------


class Plant:
    """Unpickling this creates a file: what an attacker with write access to the jobs table
    would store to run code in the scheduler."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def malicious_states(path: Path) -> dict[str, bytes]:
    payload = pickle.dumps(Plant(path), pickle.HIGHEST_PROTOCOL)
    forged = signing._signature(payload, "attacker's guess of the key")
    return {
        "unsigned": payload,
        "forged signature": signing.PREFIX + forged + b"$" + payload,
        "signature of another payload": signing.sign(b"harmless")[: -len(b"harmless")] + payload,
    }


@pytest.fixture
def store():
    scheduler = BackgroundScheduler(timezone="UTC")
    jobstore = DjangoJobStore()
    scheduler.add_jobstore(jobstore, "default")
    scheduler.start(paused=True)
    yield scheduler, jobstore
    scheduler.shutdown(wait=False)
    connection.close()


def test_the_planted_payload_is_really_malicious(tmp_path):
    """Negative control: without the signature check, the payload does create the file."""
    target = tmp_path / "pwned"
    pickle.loads(malicious_states(target)["unsigned"])  # noqa: S301
    assert target.exists()


@pytest.mark.parametrize("kind", ["unsigned", "forged signature", "signature of another payload"])
def test_malicious_job_state_is_refused_before_unpickling(
    make_runtime,
    tmp_path,
    kind,
    records,  # noqa: F811
):
    target = tmp_path / "pwned"
    DjangoJob.objects.create(
        id="planted",
        next_run_time=datetime.now(timezone.utc) - timedelta(seconds=1),  # due: read at once
        job_state=malicious_states(target)[kind],
    )
    runtime = make_runtime()
    runtime.scheduler.add_job("tests.jobs:noop", "interval", seconds=1, id="other")
    wait_for(
        lambda: DjangoJob.objects.exclude(restore_error="").exists(),
        message="the planted job to be flagged",
    )
    runtime.events.wait(events.EVENT_JOB_EXECUTED, "other", count=2)  # the others go on
    assert not target.exists()
    row = DjangoJob.objects.get(id="planted")  # kept, for someone to look at
    assert "BadSignature" in row.restore_error
    runtime.catalog.invalidate()
    assert runtime.registry.get_sample_value("apscheduler_jobs", {"state": "unrestorable"}) == 1
    assert records.matching(logging.ERROR, "Unable to restore job 'planted'")
    assert runtime.scheduler.get_job("planted") is None
    assert not target.exists()


def test_a_flipped_byte_anywhere_in_a_stored_state_is_refused(store):
    scheduler, jobstore = store
    scheduler.add_job("tests.jobs:sleep", "interval", minutes=5, id="victim", args=(0,))
    state = bytes(DjangoJob.objects.get(id="victim").job_state)
    assert jobstore.lookup_job("victim") is not None
    positions = sorted({len(signing.PREFIX), len(state) // 2, len(state) - 1})
    for i in positions:
        tampered = state[:i] + bytes([state[i] ^ 0x01]) + state[i + 1 :]
        DjangoJob.objects.filter(id="victim").update(job_state=tampered, restore_error="")
        jobstore._restore_logged.clear()
        assert jobstore.lookup_job("victim") is None, f"byte {i}"
        assert "BadSignature" in DjangoJob.objects.get(id="victim").restore_error


def test_key_rotation_through_secret_key_fallbacks(store, settings):
    scheduler, jobstore = store
    settings.SECRET_KEY = "old-key"
    scheduler.add_job("tests.jobs:sleep", "interval", minutes=5, id="rotated", args=(0,))
    signed_with_old = bytes(DjangoJob.objects.get(id="rotated").job_state)

    settings.SECRET_KEY = "new-key"
    settings.SECRET_KEY_FALLBACKS = ["old-key"]
    assert jobstore.lookup_job("rotated") is not None  # accepted through the fallback
    scheduler.modify_job("rotated", args=(1,))  # any write signs with the current key
    assert bytes(DjangoJob.objects.get(id="rotated").job_state) != signed_with_old
    settings.SECRET_KEY_FALLBACKS = []
    assert jobstore.lookup_job("rotated").args == (1,)  # the new key alone is enough now

    # A state signed with a key that is neither current nor a fallback is refused.
    DjangoJob.objects.filter(id="rotated").update(job_state=signed_with_old)
    assert jobstore.lookup_job("rotated") is None
    assert "BadSignature" in DjangoJob.objects.get(id="rotated").restore_error


# -- the data migration that signs 0.7's rows ------------------------------------------------


def test_migration_0003_signs_existing_unsigned_rows_and_reverses_as_a_no_op(store, tmp_path):
    scheduler, jobstore = store
    scheduler.add_job("tests.jobs:sleep", "interval", minutes=5, id="signed", args=(1,))
    signed = bytes(DjangoJob.objects.get(id="signed").job_state)
    legacy = pickle.dumps(jobstore.lookup_job("signed").__getstate__(), 4)
    DjangoJob.objects.create(id="legacy", next_run_time=None, job_state=legacy)
    bad = signing.PREFIX + b"0" * 64 + b"$" + legacy  # signed, does not verify: left alone
    DjangoJob.objects.create(id="tampered", next_run_time=None, job_state=bad)
    assert jobstore.lookup_job("legacy") is None  # unsigned: refused before the migration
    DjangoJob.objects.filter(id="legacy").update(restore_error="")

    try:
        _migration_0003_round_trip(jobstore, signed, legacy, bad)
    finally:  # later tests need the current schema back
        MigrationExecutor(connection).migrate(
            MigrationExecutor(connection).loader.graph.leaf_nodes(APP)
        )


def _migration_0003_round_trip(jobstore, signed: bytes, legacy: bytes, bad: bytes) -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([(APP, "0002_runrequest")])  # backwards: nothing to undo
    assert bytes(DjangoJob.objects.get(id="legacy").job_state) == legacy
    executor = MigrationExecutor(connection)
    executor.migrate([(APP, "0003_sign_job_state")])

    states = {i: bytes(s) for i, s in DjangoJob.objects.values_list("id", "job_state")}
    assert states["legacy"] == signing.sign(legacy)
    assert states["signed"] == signed  # already signed: untouched
    assert states["tampered"] == bad  # not laundered into a valid signature
    assert jobstore.lookup_job("legacy").args == (1,)
    assert jobstore.lookup_job("tampered") is None


# -- nothing in logs, metric labels or spans carries job arguments ---------------------------

SECRET = "sk_live_9f8e7d6c5b4a_DO_NOT_LOG"
SECRET_KW = "hunter2-password-DO_NOT_LOG"


def test_job_arguments_never_reach_logs_metrics_or_spans(make_runtime, records):  # noqa: F811
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runtime = make_runtime(tracer_provider=provider, max_workers=2)
    port = free_port()
    httpd, _ = server.serve(runtime, port, "127.0.0.1")
    try:
        now = datetime.now(timezone.utc)
        sched = runtime.scheduler
        sched.add_job(
            "tests.jobs:fail_with_secret_args",
            "interval",
            seconds=1,
            id="charge",
            args=(SECRET,),
            kwargs={"password": SECRET_KW},
            next_run_time=now,
        )
        # The same arguments on the other paths that log a job: a missed run (late past its
        # grace time), a max_instances skip, a success.
        sched.add_job(
            "tests.jobs:fail_with_secret_args",
            "date",
            run_date=now - timedelta(minutes=5),
            id="late",
            args=(SECRET,),
            misfire_grace_time=1,
        )
        sched.add_job(
            "tests.jobs:sleep",
            "interval",
            seconds=0.5,
            id="overlap",
            args=(1.2,),
            kwargs={},
            next_run_time=now,
        )
        sched.add_job(
            "tests.jobs:noop", "interval", seconds=1, id="ok", kwargs={}, next_run_time=now
        )
        runtime.events.wait(events.EVENT_JOB_ERROR, "charge", count=2)
        runtime.events.wait(events.EVENT_JOB_MISSED, "late")
        runtime.events.wait(events.EVENT_JOB_MAX_INSTANCES, "overlap")
        runtime.catalog.invalidate()
        import urllib.request

        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        httpd.shutdown()
        httpd.server_close()
    texts = {
        "logs": records.text(),
        "metrics": scraped.decode() + generate_openmetrics(runtime.registry).decode(),
        "spans": "\n".join(s.to_json() for s in exporter.get_finished_spans()),
    }
    assert 'error_type="ConnectionRefusedError"' in texts["metrics"]  # the class name only
    assert "run charge" in texts["spans"] and "ConnectionRefusedError" in texts["spans"]
    assert 'Job "fail_with_secret_args' in texts["logs"]  # the failure is logged
    assert "was missed by" in texts["logs"] and "maximum number of running" in texts["logs"]
    for where, text in texts.items():
        for secret in (SECRET, SECRET_KW):
            assert secret not in text, f"{secret!r} leaked into {where}"
    row = DjangoJobExecution.objects.filter(job_id="charge").first()
    assert row.error_type == "ConnectionRefusedError" and SECRET not in (row.exception or "")
    assert generate_latest(runtime.registry)  # still serves


# -- the endpoint of a real process over TLS ---------------------------------------------------


@pytest.mark.once
@pytest.mark.slow
def test_runapscheduler_serves_metrics_and_health_over_tls(tmp_path, pki):  # noqa: F811
    p = SchedulerProcess(
        tmp_path / "tls",
        jobs_source('{"id": "tick", "func": "tests.jobs:noop", "trigger": "interval", '
                    '"seconds": 1}'),
    )  # fmt: skip
    p.scheme = "https"
    p.context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    try:
        p.start(
            "--metrics-certfile",
            str(pki / "server.pem"),
            "--metrics-keyfile",
            str(pki / "server.key"),
        )
        assert p.get("/readyz")[0] == 200
        wait_for(
            lambda: (sample(p.scrape(), "apscheduler_job_runs_total", job_id="tick",
                            outcome="success", error_type="") or 0) >= 1,
            message="a tick over HTTPS",
        )  # fmt: skip
        # Plain HTTP and an unverified client get nothing; the endpoint keeps serving.
        p.scheme, context = "http", p.context
        p.context = None
        assert p.get("/metrics")[0] != 200
        p.scheme = "https"
        p.context = ssl.create_default_context()  # does not trust our CA
        assert p.get("/metrics")[0] == 0
        p.context = context
        assert p.get("/healthz")[0] == 200
        code, _ = p.sigterm()
        assert code == 0
    finally:
        p.kill()


def _cli(*args: str, preexec_fn: Any = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "django", "runapscheduler", "--metrics-port", str(free_port()),
         "--metrics-addr", "127.0.0.1", *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=preexec_fn,
    )  # fmt: skip


@pytest.mark.once
@pytest.mark.slow
def test_runapscheduler_refuses_unusable_tls_files_in_one_line(tmp_path, pki):  # noqa: F811
    from tests.test_fault_processes import _drop_dac_override

    # (Missing and garbage files, a key without a certificate: tests/test_runapscheduler.py.)
    unreadable = tmp_path / "server.key"
    unreadable.write_bytes((pki / "server.key").read_bytes())
    unreadable.chmod(0o000)
    cert = str(pki / "server.pem")
    cases = [
        # The key of another certificate.
        (("--metrics-certfile", cert, "--metrics-keyfile", str(pki / "client.key")),
         "cannot load TLS files"),
        # A key the process may not read (root is held to file permissions here).
        (("--metrics-certfile", cert, "--metrics-keyfile", str(unreadable)), "Permission denied"),
        (("--metrics-certfile", cert, "--metrics-client-cafile", str(tmp_path / "no-ca.pem")),
         "cannot load TLS files"),
    ]  # fmt: skip
    for args, expected in cases:
        result = _cli(*args, preexec_fn=_drop_dac_override)
        assert result.returncode == 1, (args, result.stderr)
        assert expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
