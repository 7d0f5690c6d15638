"""The HTTP endpoint of a scheduler process: ``/metrics``, ``/healthz`` and ``/readyz``.

``prometheus_client.start_http_server`` answers *every* path with metrics, so this is a small
WSGI app of our own. ``/metrics`` negotiates like ``make_wsgi_app`` (``choose_encoder``: the
OpenMetrics format carries exemplars; gzip), but renders through ``sinks.metrics.render``,
which re-renders only the job series that changed since the last scrape.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hmac
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from apscheduler.schedulers.base import STATE_STOPPED
from django import db
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted

from django_apscheduler_obs.sinks.metrics import render

if TYPE_CHECKING:
    from django_apscheduler_obs.scheduler import SchedulerRuntime

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("metrics endpoint: %s", format % args)


def database_ready() -> tuple[bool, str]:
    """``SELECT 1`` on this thread's own connection, closed afterwards."""
    conn = db.connections["default"]
    try:
        conn.close_if_unusable_or_obsolete()
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return True, "ok"
    except Exception as exc:  # any driver error means "not ready"
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def database_writable() -> tuple[bool, str]:
    """An INSERT in a transaction that is rolled back: refused by a read-only database (a
    read-only SQLite file, a replica) as well as by one that is down. Nothing is kept."""
    from django.db import transaction

    from django_apscheduler_obs.models import JobStoreVersion

    conn = db.connections["default"]
    try:
        conn.close_if_unusable_or_obsolete()
        with transaction.atomic():
            JobStoreVersion.objects.create(name="django_apscheduler_obs.write-probe", version=0)
            transaction.set_rollback(True)
        return True, "ok"
    except Exception as exc:  # any driver error means "not writable"
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def metrics_app(registry: Any) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """``make_wsgi_app(registry)`` with the cached job series of ``render``."""
    stock = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        params = parse_qs(environ.get("QUERY_STRING", ""))
        if environ.get("REQUEST_METHOD") != "GET" or "name[]" in params:
            return stock(environ, start_response)  # OPTIONS, 405 and name[] filtering
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        output = render(registry, encoder)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app


def make_app(
    runtime: SchedulerRuntime, *, basic_auth: tuple[str, str] | None = None
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    metrics = metrics_app(runtime.registry)

    def json_response(start_response: StartResponse, ok: bool, body: dict[str, Any]) -> list[bytes]:
        data = json.dumps(body, sort_keys=True).encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def authorized(environ: dict[str, Any]) -> bool:
        if basic_auth is None:
            return True
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return hmac.compare_digest(user, basic_auth[0]) & hmac.compare_digest(
            password, basic_auth[1]
        )

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not authorized(environ):
            start_response(
                "401 Unauthorized",
                [("WWW-Authenticate", 'Basic realm="apscheduler"'), ("Content-Length", "0")],
            )
            return [b""]
        path = environ.get("PATH_INFO", "/")
        if path in ("/metrics", "/metrics/"):
            return metrics(environ, start_response)
        if path == "/healthz":
            ok, body = runtime.health()
            return json_response(start_response, ok, body)
        if path == "/readyz":
            # Ready: the database answers and the scheduler was started (runapscheduler waits
            # for a writable database before starting it).
            ok, detail = database_ready()
            body = {"database": detail}
            if runtime.scheduler.state == STATE_STOPPED:
                ok, body["scheduler"] = False, "not started"
            return json_response(start_response, ok, body)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"Not found. Try /metrics, /healthz or /readyz.\n"]

    return app


def ssl_context(
    certfile: str,
    keyfile: str | None = None,
    *,
    client_cafile: str | None = None,
    client_auth_required: bool = False,
) -> ssl.SSLContext:
    """Server TLS, with optional client certificates (mTLS), on public ``ssl`` APIs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if client_cafile:
        ctx.load_verify_locations(cafile=client_cafile)
    if client_auth_required:
        if not client_cafile:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def serve(
    runtime: SchedulerRuntime,
    port: int,
    addr: str = "0.0.0.0",
    *,
    tls: ssl.SSLContext | None = None,
    basic_auth: tuple[str, str] | None = None,
) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Bind now (so errors surface at start) and serve in a daemon thread."""
    server_cls = ThreadingWSGIServer
    if ":" in addr:  # IPv6
        import socket

        class _V6(ThreadingWSGIServer):
            address_family = socket.AF_INET6

        server_cls = _V6
    httpd = make_server(
        addr,
        port,
        make_app(runtime, basic_auth=basic_auth),
        server_class=server_cls,
        handler_class=_QuietHandler,
    )
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, name="apscheduler-metrics", daemon=True)
    thread.start()
    return httpd, thread
