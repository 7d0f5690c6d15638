"""A real ``runapscheduler`` process, scraped over HTTP and parsed as Prometheus would.

Spans go to a local OTLP/HTTP receiver that decodes the protobuf, so the trace ids in the
exemplars, on the execution rows and in the exported spans can be compared.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.demo_process import REPO, DemoProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.once]


class OTLPReceiver:
    """A minimal OTLP/HTTP trace receiver: decodes ``ExportTraceServiceRequest`` bodies."""

    def __init__(self) -> None:
        self.spans: list[dict[str, object]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    for resource_spans in request.resource_spans:
                        service = {
                            a.key: a.value.string_value for a in resource_spans.resource.attributes
                        }
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                receiver.spans.append({
                                    "trace_id": span.trace_id.hex(),
                                    "name": span.name,
                                    "service": service.get("service.name"),
                                    "attributes": {a.key: a.value for a in span.attributes},
                                    "error": span.status.code == 2,
                                })  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace_ids(self, name: str) -> set[str]:
        with self.lock:
            return {str(s["trace_id"]) for s in self.spans if s["name"] == name}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver()
    yield r
    r.close()


@pytest.fixture
def demo(tmp_path: Path, receiver: OTLPReceiver) -> Iterator[DemoProcess]:
    process = DemoProcess(tmp_path, {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    })  # fmt: skip
    yield process
    process.kill()


def samples(text: str, name: str, **labels: str) -> list[object]:
    return [
        s
        for family in parse_text(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def sample_value(text: str, name: str, **labels: str) -> float | None:
    found = samples(text, name, **labels)
    return found[0].value if found else None  # type: ignore[attr-defined]


def wait_scrape(demo: DemoProcess, check, timeout: float = 45, what: str = "") -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        text = demo.scrape()
        if check(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{text[-4000:]}")
        time.sleep(0.25)


def at_least(name: str, n: float, **labels: str):  # type: ignore[no-untyped-def]
    return lambda text: (sample_value(text, name, **labels) or 0) >= n


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def pause_job(demo: DemoProcess, job_id: str) -> None:
    """Pause a job from another process, as a web request or a shell would."""
    demo.manage(
        "shell", "-c", f"from django_apscheduler_obs import control; control.pause_job({job_id!r})"
    )


def rewind_job(demo: DemoProcess, job_id: str, seconds: float) -> None:
    """Move a job's next run into the past, as if the scheduler had been down that long."""
    demo.manage(
        "shell",
        "-c",
        (
            "from datetime import datetime, timedelta, timezone\n"
            "from django_apscheduler_obs import control\n"
            f"control.modify_job({job_id!r}, next_run_time=datetime.now(timezone.utc)"
            f" - timedelta(seconds={seconds}))\n"
        ),
    )


def test_a_real_scheduler_exposes_every_outcome(demo: DemoProcess, receiver: OTLPReceiver):
    demo.start()
    text = wait_scrape(demo, lambda t: all(check(t) for check in (
        at_least("apscheduler_job_runs_total", 2, job_id="demo_succeed", outcome="success"),
        at_least("apscheduler_job_runs_total", 1, job_id="demo_slow", outcome="success"),
        at_least("apscheduler_job_runs_total", 1, job_id="demo_fail", outcome="error",
                 error_type="RuntimeError"),
        at_least("apscheduler_job_skipped_runs_total", 1, job_id="demo_overlap",
                 reason="max_instances"),
        at_least("apscheduler_job_skipped_runs_total", 1, job_id="demo_missed",
                 reason="misfire"),
    )), what="success, failure, max_instances and misfire")  # fmt: skip
    assert (
        sample_value(text, "apscheduler_job_last_failure_timestamp_seconds", job_id="demo_fail")
        is not None
    )
    assert (
        sample_value(text, "apscheduler_job_last_success_timestamp_seconds", job_id="demo_fail")
        is None
    )
    assert sample_value(text, "apscheduler_leader", group="default") == 1
    assert (
        sample_value(text, "apscheduler_scheduler_state", apscheduler_scheduler_state="running")
        == 1
    )
    assert sample_value(text, "apscheduler_job_max_runtime_seconds", job_id="demo_slow") == 10
    assert (
        sample_value(text, "apscheduler_job_expected_interval_seconds", job_id="demo_succeed") == 1
    )
    assert sample_value(text, "process_resident_memory_bytes") > 0

    # A job paused by another process is reported paused, and loses its next run time.
    pause_job(demo, "demo_slow")
    text = wait_scrape(
        demo,
        at_least("apscheduler_job_paused", 1, job_id="demo_slow"),
        what="demo_slow to be paused",
    )
    assert (
        sample_value(text, "apscheduler_job_next_run_timestamp_seconds", job_id="demo_slow") is None
    )

    # Exemplars (OpenMetrics only) carry the trace ids stored on the rows and exported.
    om = demo.scrape(openmetrics=True)
    exemplar_ids = {
        s.exemplar.labels["trace_id"]
        for f in parse_om(om)
        for s in f.samples
        if s.exemplar and s.labels.get("job_id") == "demo_succeed"
    }
    assert exemplar_ids
    stored = {
        r[0]
        for r in rows(
            demo.db,
            "SELECT trace_id FROM django_apscheduler_obs_"
            "djangojobexecution WHERE job_id='demo_succeed'",
        )
    }
    assert exemplar_ids <= stored
    deadline = time.monotonic() + 10
    while not exemplar_ids <= receiver.trace_ids("run demo_succeed"):
        assert time.monotonic() < deadline, "exported spans do not match the exemplars"
        time.sleep(0.2)
    failed = [s for s in receiver.spans if s["name"] == "run demo_fail"]
    assert failed and all(s["error"] for s in failed)
    assert {s["service"] for s in receiver.spans} == {"demo-scheduler"}

    # Every row written; none left running once the process stops.
    assert demo.stop() == 0
    statuses = dict(
        rows(
            demo.db,
            "SELECT status, COUNT(*) FROM django_apscheduler_obs_"
            "djangojobexecution GROUP BY status",
        )
    )
    assert "Started execution" not in statuses
    assert {"Executed", "Error!", "Missed!", "Max instances!"} <= set(statuses)

    # Downtime: fire times missed while stopped are coalesced into one run and counted.
    rewind_job(demo, "demo_succeed", 5.5)
    ((last_slow_success,),) = rows(
        demo.db,
        "SELECT MAX(finished) FROM django_apscheduler_obs_"
        "djangojobexecution WHERE job_id='demo_slow' AND "
        "status='Executed'",
    )
    demo.start()
    # Last outcomes survive the restart: seeded from the history (demo_slow is paused, so
    # no new run can have set it).
    seeded = sample_value(
        demo.scrape(), "apscheduler_job_last_success_timestamp_seconds", job_id="demo_slow"
    )
    assert seeded == pytest.approx(float(last_slow_success), abs=1e-5)
    wait_scrape(
        demo,
        at_least(
            "apscheduler_job_skipped_runs_total", 5, job_id="demo_succeed", reason="coalesced"
        ),
        what="coalesced fire times",
    )
    assert demo.stop() == 0


def test_every_metric_used_by_dashboards_alerts_and_readme_is_emitted(demo: DemoProcess):
    """The contract between the exporter and what we ship: names cannot drift apart."""
    import sys

    sys.path.insert(0, str(REPO))
    from grafana.metric_names import metric_names_used

    used = set(metric_names_used())
    readme = (REPO / "README.md").read_text()
    used |= set(re.findall(r"`(apscheduler_[a-z_]+)", readme))
    used = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in used}
    demo.start()
    text = wait_scrape(
        demo,
        at_least("apscheduler_job_skipped_runs_total", 1, job_id="demo_missed", reason="misfire"),
        what="the demo to exercise every path",
    )
    emitted = {f.name for f in parse_text(text)}
    emitted |= {re.sub(r"_(total|created)$", "", n) for n in emitted}
    missing = sorted(
        n for n in used if n not in emitted and not n.startswith("apscheduler_jobstore_")
    )  # the web-side collector is tested separately
    assert not missing, f"used but never emitted: {missing}"
    assert demo.stop() == 0
