"""Shared machinery: statement counting on every thread's connection, timing, result rows,
per-subject database settings and bulk loading."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

OURS = "obs"  # django-apscheduler-obs
LEGACY = "dja-0.7"  # django-apscheduler 0.7
BARE = "bare"  # APScheduler 3 with MemoryJobStore
SUBJECTS = (OURS, LEGACY, BARE)
SUBJECT_TITLES = {
    OURS: "django-apscheduler-obs",
    LEGACY: "django-apscheduler 0.7",
    BARE: "bare APScheduler (MemoryJobStore)",
}


# -- statement counting -----------------------------------------------------------------------

_MAIN_VERB_RE = re.compile(r"\)\s*(SELECT|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
_TABLE_RE = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+[`\"]?([A-Za-z0-9_]+)[`\"]?", re.IGNORECASE)


def classify(sql: str) -> tuple[str, str]:
    """(verb, area) of one statement. Areas: jobstore, history, lease, session, tx, other."""
    text = sql.lstrip().lstrip("(")  # "(SELECT …) UNION ALL (SELECT …)"
    verb = text.split(None, 1)[0].upper() if text else "?"
    if verb == "WITH":  # the verb of the main statement, after its CTEs
        m = _MAIN_VERB_RE.search(text)
        verb = m.group(1).upper() if m else verb
    if verb in ("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT", "START"):
        return verb, "tx"
    if verb in ("PRAGMA", "SET", "SHOW"):
        return verb, "session"
    m = _TABLE_RE.search(text)
    table = m.group(1).lower() if m else ""
    if table.endswith("djangojobexecution"):
        area = "history"
    elif table.endswith("djangojob"):
        area = "jobstore"
    elif table.endswith(("schedulerlease", "jobstoreversion", "schedulerinstance")):
        area = "lease"
    else:
        area = "other"
    return verb, area


@dataclass
class Statement:
    verb: str
    area: str
    thread: str
    seconds: float
    sql: str


class StatementLog:
    """Every statement run through Django on any thread while ``active``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = False
        self.keep_sql = False
        self.items: list[Statement] = []

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any):
        if not self.active:
            return execute(sql, params, many, ctx)
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, ctx)
        finally:
            dt = time.perf_counter() - t0
            verb, area = classify(sql)
            item = Statement(verb, area, thread_kind(), dt, sql if self.keep_sql else sql[:120])
            with self._lock:
                self.items.append(item)

    @contextlib.contextmanager
    def capture(self, keep_sql: bool = False) -> Iterator[list[Statement]]:
        with self._lock:
            self.items = []
        self.keep_sql = keep_sql
        self.active = True
        try:
            yield self.items
        finally:
            self.active = False

    def start(self) -> None:
        with self._lock:
            self.items = []
        self.active = True

    def stop(self) -> list[Statement]:
        self.active = False
        with self._lock:
            items, self.items = self.items, []
        return items


STATEMENTS = StatementLog()


def thread_kind() -> str:
    name = threading.current_thread().name
    if name == "APScheduler":
        return "scheduler"
    if name.startswith("ThreadPoolExecutor") or name.startswith("bench-worker"):
        return "worker"
    if name.startswith("apscheduler-lease"):
        return "lease"
    if name == "MainThread":
        return "main"
    return "other"


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    if STATEMENTS not in connection.execute_wrappers:
        connection.execute_wrappers.append(STATEMENTS)


def install_statement_counter() -> None:
    """Count statements on every connection of every thread, present and future."""
    from django.db import connections
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection_created, dispatch_uid="benchmarks.counter")
    for conn in connections.all():
        if STATEMENTS not in conn.execute_wrappers:
            conn.execute_wrappers.append(STATEMENTS)


def count_by(items: Iterable[Statement], *keys: str) -> Counter[tuple[str, ...]]:
    return Counter(tuple(getattr(s, k) for k in keys) for s in items)


DATA_VERBS = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")


def data_statements(items: Iterable[Statement]) -> list[Statement]:
    return [s for s in items if s.verb in DATA_VERBS]


# -- timing -----------------------------------------------------------------------------------


@dataclass
class Timing:
    """Median, min and max over repeats of one measured quantity."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def min(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def max(self) -> float:
        return max(self.values) if self.values else float("nan")

    def as_dict(self, scale: float = 1.0, digits: int = 3) -> dict[str, float]:
        return {
            "median": round(self.median * scale, digits),
            "min": round(self.min * scale, digits),
            "max": round(self.max * scale, digits),
        }


def timed(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> Timing:
    t = Timing()
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        t.values.append(time.perf_counter() - t0)
    return t


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- results ----------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    case: str
    subject: str
    metrics: dict[str, Any]
    note: str = ""


@dataclass
class Ratio:
    scenario: str
    case: str
    metric: str
    ours: float | None
    other: float | None
    versus: str
    better: str  # "lower" or "higher"

    @property
    def value(self) -> float | None:
        if self.ours in (None, 0) or self.other is None:
            return None
        if isinstance(self.ours, str) or isinstance(self.other, str):
            return None
        return self.other / self.ours if self.better == "lower" else self.ours / self.other


@dataclass
class Target:
    scenario: str
    text: str
    holds: bool | None
    figure: str


# -- machine and versions ---------------------------------------------------------------------


def cpu_speed_ms() -> float:
    """A fixed pure-Python workload (10 million additions), median of three, in ms.

    Machines of the same name differ by several times in single-core speed; absolute figures
    of two runs compare only as far as this one does (ratios within a run always do)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[1] * 1000, 1)


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pkgs = {}
    for dist in (
        "django",
        "apscheduler",
        "django-apscheduler",
        "django-apscheduler-obs",
        "prometheus-client",
        "opentelemetry-sdk",
        "psycopg",
        "mysqlclient",
    ):
        try:
            pkgs[dist] = version(dist)
        except Exception:
            pkgs[dist] = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "cpu_speed_ms": cpu_speed_ms(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": pkgs,
    }


def db_server_version() -> str:
    from django.db import connection

    with connection.cursor() as c:
        if connection.vendor == "sqlite":
            c.execute("select sqlite_version()")
            return "SQLite " + c.fetchone()[0]
        if connection.vendor == "postgresql":
            c.execute("show server_version")
            return "PostgreSQL " + c.fetchone()[0]
        c.execute("select version()")
        return "MariaDB " + c.fetchone()[0]


# -- per-subject database behaviour -----------------------------------------------------------


def db_started_at() -> str:
    """When the database server started (PostgreSQL, MariaDB): a change means a restart."""
    from django.db import connection, connections

    try:
        with connection.cursor() as c:
            if connection.vendor == "postgresql":
                c.execute("select pg_postmaster_start_time()")
                return str(c.fetchone()[0])
            if connection.vendor == "mysql":
                c.execute(
                    "select unix_timestamp() - variable_value from "
                    "information_schema.global_status where variable_name = 'UPTIME'"
                )
                return str(round(float(c.fetchone()[0]) / 10))
    except Exception as exc:
        connections.close_all()
        return f"unreachable: {type(exc).__name__}"
    return ""


def sqlite_journal_mode() -> str:
    from django.db import connection

    if connection.vendor != "sqlite":
        return ""
    with connection.cursor() as c:
        c.execute("PRAGMA journal_mode")
        return str(c.fetchone()[0])


@contextlib.contextmanager
def subject_database(subject: str) -> Iterator[str]:
    """Each subject on the database as it sets it up itself.

    On SQLite this package switches every connection to WAL with ``synchronous=NORMAL`` and a
    30 s busy timeout (``scheduler.configure_sqlite``, installed by ``SchedulerRuntime.start``);
    django-apscheduler 0.7 and bare APScheduler leave SQLite's defaults (rollback journal,
    ``synchronous=FULL``, Django's 5 s timeout). WAL is a property of the database file, so it
    is switched back before the other subjects run. Yields the journal mode in force.
    """
    from django.db import OperationalError, connection, connections
    from django.db.backends.signals import connection_created

    from django_apscheduler_obs.scheduler import configure_sqlite

    connections.close_all()
    if connection.vendor != "sqlite":
        yield ""
        connections.close_all()
        return
    if subject == OURS:
        connection_created.connect(configure_sqlite, dispatch_uid="django_apscheduler_obs")
    else:
        connection_created.disconnect(dispatch_uid="django_apscheduler_obs")
        # Leaving WAL needs the only connection: connections of finished threads go with
        # their thread-locals, so collect them; retry while a straggler lets go.
        deadline = time.monotonic() + 30
        while True:
            gc.collect()
            try:
                with connection.cursor() as c:
                    c.execute("PRAGMA journal_mode=DELETE")
                break
            except OperationalError:
                connections.close_all()
                if time.monotonic() > deadline:
                    break  # the journal column of the results says what was in force
                time.sleep(0.5)
    mode = sqlite_journal_mode()
    try:
        yield mode
    finally:
        connections.close_all()
        connection_created.disconnect(dispatch_uid="django_apscheduler_obs")


def truncate(*models: Any) -> None:
    """Empty the tables (PostgreSQL: one TRUNCATE, as foreign keys between them require)."""
    from django.db import connection

    tables = [connection.ops.quote_name(m._meta.db_table) for m in models]
    with connection.cursor() as c:
        if connection.vendor == "postgresql":
            c.execute(f"TRUNCATE {', '.join(tables)}")
        else:
            for table in tables:
                c.execute(f"DELETE FROM {table}")


def bulk_insert(model: Any, columns: list[str], rows: Iterable[tuple[Any, ...]]) -> int:
    """Fast raw load: COPY on PostgreSQL, multi-row INSERTs elsewhere. Values are already
    database-ready (strings for dates on SQLite/MariaDB, datetimes for PostgreSQL)."""
    from django.db import connection, transaction

    table = connection.ops.quote_name(model._meta.db_table)
    cols = ", ".join(connection.ops.quote_name(c) for c in columns)
    n = 0
    with transaction.atomic():
        cursor = connection.cursor()
        raw = cursor.cursor  # the driver's cursor: no wrappers, no per-statement overhead
        if connection.vendor == "postgresql":
            with raw.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    n += 1
            return n
        per = 500
        batch: list[tuple[Any, ...]] = []
        ph = "(" + ", ".join(["?" if connection.vendor == "sqlite" else "%s"] * len(columns)) + ")"

        def flush() -> None:
            if not batch:
                return
            sql = f"INSERT INTO {table} ({cols}) VALUES " + ", ".join([ph] * len(batch))
            raw.execute(sql, [v for r in batch for v in r])
            batch.clear()

        for row in rows:
            batch.append(row)
            n += 1
            if len(batch) >= per:
                flush()
        flush()
    return n


def db_datetime(dt: Any) -> Any:
    """A datetime as the raw driver wants it for bulk_insert."""
    from django.db import connection

    if connection.vendor == "postgresql":
        return dt
    return connection.ops.adapt_datetimefield_value(dt)
