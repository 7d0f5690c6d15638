"""Final statuses of concurrent runs share a commit; each run still waits for its own.

On PostgreSQL and MariaDB a commit waits for its log flush, and when the executor's threads
finish runs together, one flush after another sets the pace (a burst of 1,000 runs: 1,000
final commits). Here the first thread to arrive writes and commits alone; threads that
arrive meanwhile queue, and the next of them commits everything queued in one transaction.
Nobody waits for a timer, and no write returns before its commit: a final status is as
durable as when each run committed its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import connections, transaction

from django_apscheduler_obs.util import reset_connection


@dataclass(eq=False)
class _Write:
    write: Callable[[], None]
    ready: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # this thread commits the next batch
    error: BaseException | None = None  # its own error (it was written alone)
    alone: bool = False  # its batch failed: write it again by itself


class GroupCommit:
    """Runs writes of many threads in as few commits as the database's pace allows."""

    def __init__(self, alias: Callable[[], str]) -> None:
        self._alias = alias
        self._lock = threading.Lock()
        self._queue: list[_Write] = []
        self._busy = False
        self.commits = 0  # for tests and benchmarks: commits made
        self.writes = 0  # writes committed

    def run(self, write: Callable[[], None]) -> None:
        """``write()`` committed, perhaps with others' writes; raises what ``write`` raised.

        A batch that fails is not retried as a batch: each of its writes runs again alone in
        its own thread, so that each gets its own error (and its own buffering upstream).
        """
        alias = self._alias()
        if connections[alias].in_atomic_block:  # the caller's transaction commits it
            write()
            return
        entry = _Write(write)
        with self._lock:
            self._queue.append(entry)
            entry.lead = not self._busy
            self._busy = True
        if not entry.lead:
            entry.ready.wait()
        if entry.lead:
            self._commit_queued(alias)
        if entry.alone:
            write()
        elif entry.error is not None:
            raise entry.error

    def _commit_queued(self, alias: str) -> None:
        """Commit the queue (it starts with the leader's own write), then hand over."""
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            if len(batch) == 1:
                try:
                    batch[0].write()
                except Exception as exc:  # raised again in run(), in its own thread
                    batch[0].error = exc
            else:
                try:
                    with transaction.atomic(using=alias):
                        for entry in batch:
                            entry.write()
                except Exception:
                    reset_connection(alias)
                    for entry in batch:
                        entry.alone = True
        finally:  # whatever happened, the next writers must not wait forever
            with self._lock:
                self.commits += 1
                self.writes += sum(1 for e in batch if not e.alone and e.error is None)
                if self._queue:  # the next batch is led by its first writer
                    self._queue[0].lead = True
                    self._queue[0].ready.set()
                else:
                    self._busy = False
            for entry in batch:
                entry.ready.set()
