"""Helpers of django-apscheduler 0.7 (same names, same behaviour), plus database time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any, TypeVar

from django import db
from django.conf import settings
from django.db.models import DateTimeField, Func
from django.utils import formats, timezone

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def get_dt_format() -> str:
    """Return the configured format for displaying datetimes in the Django admin views."""
    from django_apscheduler_obs.conf import conf

    return str(formats.get_format(conf.DATETIME_FORMAT))


def get_local_dt_format(dt: datetime) -> str:
    """Get the datetime in the localized datetime format."""
    if dt and settings.USE_TZ and timezone.is_aware(dt):
        dt = timezone.localtime(dt)
    return formats.date_format(dt, get_dt_format())


def get_django_internal_datetime(dt: datetime) -> datetime:
    """The naive or aware form of ``dt`` that Django stores, following ``USE_TZ``."""
    if dt:
        if settings.USE_TZ and timezone.is_naive(dt):
            return timezone.make_aware(dt)
        if not settings.USE_TZ and timezone.is_aware(dt):
            return timezone.make_naive(dt)
    return dt


def get_apscheduler_datetime(dt: datetime, scheduler: Any) -> datetime:
    """Make ``dt`` aware in the scheduler's time zone if it is naive."""
    if dt and timezone.is_naive(dt):
        return timezone.make_aware(dt, timezone=scheduler.timezone)
    return dt


def retry_on_db_operational_error(func: F) -> F:
    """Retry once on a fresh connection after ``OperationalError``/``InterfaceError``.

    The wrapped function must be idempotent: it runs a second time.
    """

    @wraps(func)
    def func_wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (db.OperationalError, db.InterfaceError) as e:
            logger.warning(
                "DB error executing '%s' (%s). Retrying with a new DB connection...",
                func.__name__,
                e,
            )
            reset_connection()
            return func(*args, **kwargs)

    return func_wrapper  # type: ignore[return-value]


def close_old_connections(func: F) -> F:
    """Close unusable or obsolete connections before and after ``func``, like a request does."""

    @wraps(func)
    def func_wrapper(*args: Any, **kwargs: Any) -> Any:
        db.close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            db.close_old_connections()

    return func_wrapper  # type: ignore[return-value]


def reset_connection(using: str = "default") -> None:
    """Drop this thread's connection so the next query opens a fresh one.

    ``close_old_connections`` keeps a connection that is inside ``atomic()`` or whose errors
    flag is unset; after a server restart neither may be true yet, so close it outright.
    """
    conn = db.connections[using]
    try:
        if conn.in_atomic_block:
            conn.needs_rollback = True
        conn.close()
    except Exception:  # the socket may already be gone
        conn.connection = None


def recycle_worker_connections() -> None:
    """``close_old_connections`` for a pool worker, with its own age limit.

    A request closes its connection under Django's default ``CONN_MAX_AGE = 0``; a pool of a
    few long-lived workers doing hundreds of runs a second must not (a new PostgreSQL backend
    per run costs more than the run). Workers keep a connection for
    ``APSCHEDULER_WORKER_CONN_MAX_AGE`` seconds; broken ones are closed as usual.
    """
    from django_apscheduler_obs.conf import conf

    max_age = conf.WORKER_CONN_MAX_AGE
    for conn in db.connections.all(initialized_only=True):
        if conn.connection is not None and getattr(conn, "_dao_connection", None) is not (
            conn.connection
        ):
            conn._dao_connection = conn.connection  # type: ignore[attr-defined]
            conn.close_at = None if max_age is None else time.monotonic() + max_age
        conn.close_if_unusable_or_obsolete()


class DbNow(Func):
    """The database clock in UTC, as one SQL expression.

    ``django.db.models.functions.Now`` is ``CURRENT_TIMESTAMP`` on MySQL/MariaDB, which is
    in the *session* time zone: wrong for leases whenever the server is not on UTC.
    """

    template = "CURRENT_TIMESTAMP"
    output_field = DateTimeField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # STATEMENT_TIMESTAMP, not NOW(): NOW() is frozen at the start of the transaction.
        return self.as_sql(compiler, connection, template="STATEMENT_TIMESTAMP()", **extra)

    def as_mysql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="UTC_TIMESTAMP(6)", **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # "%%%%" survives the template's % formatting as "%%", which the SQLite backend
        # turns into "%" when it runs the statement (and when it logs it).
        return self.as_sql(
            compiler,
            connection,
            template="STRFTIME('%%%%Y-%%%%m-%%%%d %%%%H:%%%%M:%%%%f', 'NOW')",
            **extra,
        )


def db_now_sql(vendor: str) -> str:
    """Raw-SQL form of ``DbNow`` for the hand-written statements."""
    return {
        "postgresql": "STATEMENT_TIMESTAMP()",
        "mysql": "UTC_TIMESTAMP(6)",
        "sqlite": "STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'NOW')",
    }.get(vendor, "CURRENT_TIMESTAMP")


def held_lease_sql(conn: Any) -> str:
    """The fence of every hand-written statement, as a condition on the lease table: the
    lease row ``name`` is held by ``owner`` with ``epoch`` (three parameters, in that order)
    and has not expired by the database clock."""
    q = conn.ops.quote_name
    return (
        f"{q('name')} = %s AND {q('owner')} = %s AND {q('epoch')} = %s "
        f"AND {q('expires_at')} > {db_now_sql(conn.vendor)}"
    )
