"""``manage.py runapscheduler``: run the scheduler, serve its metrics, stop cleanly.

Thin on purpose: parse flags, ``build_scheduler()``, serve, block until SIGTERM/SIGINT, then
stop taking runs, wait a bounded time for running ones, record what could not finish, release
the lease (a standby takes over within its poll) and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any

import prometheus_client
from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from django_apscheduler_obs.conf import conf
from django_apscheduler_obs.management.base import OneLineErrorCommand

logger = logging.getLogger("django_apscheduler_obs.runapscheduler")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: not a number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 1-65535")
    return port


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


class Command(OneLineErrorCommand):
    help = "Runs APScheduler with the jobs declared in code, and serves /metrics."
    requires_system_checks = "__all__"

    def add_arguments(self, parser: CommandParser) -> None:
        m = parser.add_argument_group("metrics endpoint")
        m.add_argument(
            "--metrics-port",
            type=_port,
            help="serve /metrics, /healthz and /readyz on this port (off if unset)",
        )
        m.add_argument(
            "--metrics-addr",
            default="0.0.0.0",
            help="address to bind (default 0.0.0.0; use 127.0.0.1 on a bare host)",
        )
        m.add_argument("--metrics-certfile", help="TLS certificate (PEM) for the endpoint")
        m.add_argument("--metrics-keyfile", help="TLS private key (PEM)")
        m.add_argument(
            "--metrics-client-cafile", help="CA bundle to verify client certificates (mTLS)"
        )
        m.add_argument(
            "--metrics-client-auth-required",
            action="store_true",
            help="refuse clients without a valid certificate",
        )
        h = parser.add_argument_group("several schedulers")
        h.add_argument("--group", help="scheduler group (lease name); default APSCHEDULER_GROUP")
        h.add_argument("--lease-ttl", type=_positive, help="lease TTL in seconds")
        h.add_argument("--renew", type=_positive, help="lease renewal interval in seconds")
        h.add_argument("--standby-poll", type=_positive, help="standby poll in seconds")
        h.add_argument("--change-poll", type=_positive, help="leader's change poll in seconds")
        h.add_argument(
            "--no-change-poll",
            action="store_true",
            help="do not poll for job changes (only the 60 s resync)",
        )
        parser.add_argument("--max-workers", type=int, help="threads running jobs")
        parser.add_argument(
            "--shutdown-timeout",
            type=float,
            help="seconds to wait for running jobs on SIGTERM/SIGINT",
        )

    def check(self, *args: Any, **kwargs: Any) -> None:
        """Django's checks, but a failure is one line per problem: ``id: message``."""
        from django.core import checks
        from django.core.management.base import SystemCheckError

        try:
            super().check(*args, **kwargs)
        except SystemCheckError:
            issues = checks.run_checks(
                app_configs=kwargs.get("app_configs"),
                tags=kwargs.get("tags"),
                include_deployment_checks=kwargs.get("include_deployment_checks", False),
                databases=kwargs.get("databases"),
            )
            serious = [i for i in issues if i.level >= checks.ERROR and not i.is_silenced()]
            raise CommandError(
                "system check failed: " + "; ".join(f"{i.id}: {i.msg}" for i in serious)
            ) from None

    def handle(self, *args: Any, **options: Any) -> None:
        if os.environ.get("RUN_MAIN") == "true":
            raise CommandError("runapscheduler cannot run under the autoreloader")
        ttl = options["lease_ttl"] or conf.LEASE_TTL
        renew = options["renew"] or conf.LEASE_RENEW_INTERVAL
        if ttl < 3 * renew:
            raise CommandError(f"--lease-ttl ({ttl:g}) must be at least 3 x --renew ({renew:g})")
        if options["max_workers"] is not None and options["max_workers"] < 1:
            raise CommandError("--max-workers must be at least 1")
        tls = self._tls(options)

        from django_apscheduler_obs import server
        from django_apscheduler_obs.scheduler import build_scheduler
        from django_apscheduler_obs.sinks import tracing

        project = settings.SETTINGS_MODULE.split(".")[0] if settings.SETTINGS_MODULE else "django"
        tracing.configure_from_env(f"{project}-scheduler")
        # One process, one registry of ours: the ``*_created`` series of every counter and
        # histogram would double the series count for nothing (process-wide switch).
        prometheus_client.disable_created_metrics()
        runtime = build_scheduler(
            group=options["group"],
            lease_ttl=ttl,
            renew_interval=renew,
            standby_poll=options["standby_poll"],
            change_poll=options["change_poll"],
            change_polling=not options["no_change_poll"],
            max_workers=options["max_workers"],
        )
        self._warn_misfire_grace(ttl, options["standby_poll"] or conf.STANDBY_POLL_INTERVAL)

        httpd = None
        if options["metrics_port"]:
            try:
                httpd, _ = server.serve(
                    runtime,
                    options["metrics_port"],
                    options["metrics_addr"],
                    tls=tls,
                    basic_auth=conf.METRICS_BASIC_AUTH,
                )
            except (OSError, socket.gaierror) as exc:
                raise CommandError(
                    f"cannot serve metrics on {options['metrics_addr']}:"
                    f"{options['metrics_port']}: {exc.strerror or exc}"
                ) from None

        stop = threading.Event()
        signals_seen: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            signals_seen.append(signum)
            if len(signals_seen) > 1:
                logger.error("Second signal: exiting now without waiting for jobs")
                os._exit(1)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        if not self._wait_for_database(stop, server.database_writable):
            return  # stopped while waiting
        runtime.start()
        url = ""
        if httpd:
            scheme = "https" if tls else "http"
            url = f"{scheme}://{options['metrics_addr']}:{options['metrics_port']}/metrics"
        logger.info(
            "Scheduler started (%s, group %r%s); Ctrl-C or SIGTERM stops it",
            runtime.lease.identity,
            runtime.lease.group,
            f", metrics on {url}" if url else "",
        )
        self.stdout.write(
            f"Scheduler running as {runtime.lease.identity}"
            + (f"; metrics on {url}" if url else "")
            + ". Press Ctrl-C to stop."
        )
        self.stdout.flush()
        # Short waits: a signal the kernel delivers to another thread sets Python's flag but
        # does not interrupt a long lock wait here, so the handler would run only at timeout.
        while not stop.wait(0.5):
            pass

        logger.info(
            "Stopping: no new runs; waiting up to %ss for running jobs",
            options["shutdown_timeout"] or conf.SHUTDOWN_TIMEOUT,
        )
        unfinished = runtime.stop(options["shutdown_timeout"])
        if httpd is not None:
            httpd.shutdown()
        tracing.shutdown_provider()
        logger.info("Scheduler stopped")
        if unfinished:
            # Job threads that are still running would keep the interpreter alive.
            logging.shutdown()
            sys.stdout.flush()
            os._exit(0)

    def _wait_for_database(self, stop: threading.Event, probe: Any) -> bool:
        """Start on a database that takes writes. A read-only, full or unreachable one is
        reported in one line per attempt and retried (backoff up to 30 s) while /metrics,
        /healthz and /readyz (503) answer: exiting would make a supervisor restart us in a
        loop. False if stopped by a signal meanwhile."""
        delay = 1.0
        while not stop.is_set():
            ok, problem = probe()
            if ok:
                return True
            logger.error(
                "Cannot start the scheduler: the database does not take writes (%s); "
                "retrying in %.0fs",
                problem,
                delay,
            )
            deadline = time.monotonic() + delay
            while not stop.is_set() and time.monotonic() < deadline:
                stop.wait(0.5)  # short waits, as in handle(): signals are seen promptly
            delay = min(delay * 2, 30.0)
        return False

    def _tls(self, options: dict[str, Any]) -> ssl.SSLContext | None:
        certfile, keyfile = options["metrics_certfile"], options["metrics_keyfile"]
        if not certfile:
            if (
                keyfile
                or options["metrics_client_cafile"]
                or options["metrics_client_auth_required"]
            ):
                raise CommandError(
                    "--metrics-keyfile and client certificate options need --metrics-certfile"
                )
            return None
        from django_apscheduler_obs.server import ssl_context

        try:
            return ssl_context(
                certfile,
                keyfile,
                client_cafile=options["metrics_client_cafile"],
                client_auth_required=options["metrics_client_auth_required"],
            )
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(f"cannot load TLS files: {exc}") from None

    def _warn_misfire_grace(self, ttl: float, standby_poll: float) -> None:
        grace = conf.JOB_DEFAULTS.get("misfire_grace_time")
        if grace is not None and grace < ttl + standby_poll:
            logger.warning(
                "misfire_grace_time (%ss) is shorter than a failover (lease TTL %ss + standby "
                "poll %ss): runs due during a failover will be recorded as missed",
                grace,
                ttl,
                standby_poll,
            )
