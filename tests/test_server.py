"""The endpoint of a scheduler process: /metrics, /healthz, /readyz, TLS and basic auth."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from django_apscheduler_obs import server
from tests import jobs
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
        ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def served(make_runtime):
    servers = []

    def start(runtime=None, **kwargs):
        runtime = runtime or make_runtime()
        port = free_port()
        httpd, _ = server.serve(runtime, port, "127.0.0.1", **kwargs)
        servers.append(httpd)
        return runtime, port

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_metrics_in_text_and_openmetrics(served):
    _, port = served()
    status, headers, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"apscheduler_scheduler_state" in body
    status, headers, body = get(
        f"http://127.0.0.1:{port}/metrics",
        {"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_unknown_paths_are_not_metrics(served):
    _, port = served()
    status, _, _ = get(f"http://127.0.0.1:{port}/anything")
    assert status == 404


def test_healthz_is_healthy_while_the_loop_runs_and_unhealthy_when_paused(served):
    runtime, port = served()
    wait_for(lambda: runtime.last_heartbeat, message="the first heartbeat")
    status, _, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200, body
    assert json.loads(body)["state"] == "running"
    runtime.scheduler.pause()
    status, _, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503
    assert json.loads(body)["state"] == "paused"


def test_healthz_goes_unhealthy_when_the_executor_stalls(served, make_runtime):
    """Every worker busy: the canary cannot run, /metrics still answers, /healthz says so."""
    jobs.release.clear()
    runtime = make_runtime(max_workers=1, heartbeat_interval=0.5)
    try:
        runtime, port = served(runtime)
        wait_for(lambda: runtime.last_heartbeat, message="the first heartbeat")
        runtime.scheduler.add_job(
            "tests.jobs:block",
            "interval",
            hours=1,
            id="hog",
            next_run_time=datetime.now(timezone.utc),
        )
        wait_for(
            lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 503,
            timeout=10,
            interval=0.2,
            message="/healthz to report the stall",
        )
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        jobs.release.set()
    wait_for(
        lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200,
        timeout=10,
        interval=0.2,
        message="/healthz to recover",
    )


def test_readyz_checks_the_database(served):
    _, port = served()
    status, _, body = get(f"http://127.0.0.1:{port}/readyz")
    assert status == 200
    assert json.loads(body) == {"database": "ok"}


def test_basic_auth(served):
    _, port = served(basic_auth=("prom", "s3cret"))
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 401
    bad = base64.b64encode(b"prom:wrong").decode()
    assert get(f"http://127.0.0.1:{port}/metrics", {"Authorization": f"Basic {bad}"})[0] == 401
    good = base64.b64encode(b"prom:s3cret").decode()
    assert get(f"http://127.0.0.1:{port}/metrics", {"Authorization": f"Basic {good}"})[0] == 200


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


# What a real CA issues, so that verification as strict as Python 3.13's default
# (VERIFY_X509_STRICT: RFC 5280 profile) accepts it: a CA with critical basicConstraints and
# keyUsage, leaves that are not CAs, carry key identifiers and say what they are for.
CA_EXTENSIONS = (
    "basicConstraints=critical,CA:TRUE",
    "keyUsage=critical,keyCertSign,cRLSign",
    "subjectKeyIdentifier=hash",
)
LEAF_EXTENSIONS = {
    "server": (
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        "extendedKeyUsage=serverAuth",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
    ),
    "client": (
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=clientAuth",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
    ),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, RFC 5280 style."""
    d = tmp_path_factory.mktemp("pki")
    ca_ext = [arg for ext in CA_EXTENSIONS for arg in ("-addext", ext)]
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        *ca_ext, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
    )  # fmt: skip
    for name, extensions in LEAF_EXTENSIONS.items():
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
        )  # fmt: skip
        (d / f"{name}.ext").write_text("\n".join(extensions) + "\n")
        _openssl(
            "x509", "-req", "-in", str(d / f"{name}.csr"),
            "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"), "-CAcreateserial",
            "-days", "2", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"),
        )  # fmt: skip
    return d


def _strict_client(pki: Path) -> ssl.SSLContext:
    """A client that verifies like Python 3.13 does by default, on every Python we support."""
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    client.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    return client


def test_tls_with_required_client_certificates(served, pki):
    tls = server.ssl_context(
        str(pki / "server.pem"),
        str(pki / "server.key"),
        client_cafile=str(pki / "ca.pem"),
        client_auth_required=True,
    )
    _, port = served(tls=tls)
    url = f"https://127.0.0.1:{port}/metrics"

    client = _strict_client(pki)
    client.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    status, _, body = get(url, context=client)
    assert status == 200 and b"apscheduler_scheduler_state" in body

    anonymous = _strict_client(pki)
    with pytest.raises(OSError):  # no client certificate: the handshake is refused
        get(url, context=anonymous)
    with pytest.raises(OSError):  # plain HTTP against TLS
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    # Refused clients do not take the endpoint down.
    assert get(url, context=client)[0] == 200
