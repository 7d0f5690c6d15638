"""Simulated database outages that reach every thread (executor workers, the history flusher).

``connection.execute_wrapper`` is per connection, and so per thread; this patches Django's
cursor wrapper class instead, so a statement matching ``pattern`` fails wherever it runs.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

from django.db import OperationalError
from django.db.backends import utils

# Every UPDATE of the job table, however the store builds it (ORM, raw SQL, behind a CTE).
JOB_UPDATE = r"UPDATE \W?django_apscheduler_obs_djangojob\b"
# A statement that is an UPDATE of the execution table (the final status write), not one that
# only mentions it, like the scheduler pass on PostgreSQL (``WITH … UPDATE djangojob …
# INSERT INTO djangojobexecution``).
EXECUTION_UPDATE = r"^UPDATE \W?django_apscheduler_obs_djangojobexecution\b"


class Outage:
    def __init__(self, pattern: str, error: BaseException | None = None) -> None:
        self.regex = re.compile(pattern, re.IGNORECASE | re.DOTALL)
        self.error = error
        self.down = False
        self.failures = 0
        self.remaining: int | None = None  # fail only this many statements, then recover
        self._lock = threading.Lock()

    def check(self, sql: str) -> None:
        if not self.down or not self.regex.search(sql):
            return
        with self._lock:
            if self.remaining is not None:
                if self.remaining <= 0:
                    return
                self.remaining -= 1
            self.failures += 1
        raise self.error or OperationalError("simulated outage: server closed the connection")


@contextlib.contextmanager
def outage(pattern: str = ".", error: BaseException | None = None) -> Iterator[Outage]:
    """``with outage(r"UPDATE .*execution") as o: o.down = True ...``"""
    state = Outage(pattern, error)
    execute, executemany = utils.CursorWrapper.execute, utils.CursorWrapper.executemany

    def patched_execute(self: Any, sql: str, params: Any = None) -> Any:
        state.check(sql)
        return execute(self, sql, params)

    def patched_executemany(self: Any, sql: str, param_list: Any) -> Any:
        state.check(sql)
        return executemany(self, sql, param_list)

    utils.CursorWrapper.execute = patched_execute  # type: ignore[method-assign]
    utils.CursorWrapper.executemany = patched_executemany  # type: ignore[method-assign]
    try:
        yield state
    finally:
        utils.CursorWrapper.execute = execute  # type: ignore[method-assign]
        utils.CursorWrapper.executemany = executemany  # type: ignore[method-assign]
