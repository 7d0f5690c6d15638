"""Due jobs restored once per stored state, not once per read.

Every pass of the scheduler loop reads the row of each due job. Checking the row's HMAC and
unpickling it again was most of a pass's time (profiled at 10,000 jobs: ``pickle.loads``
35 %, HMAC 16 %), while most rows come back exactly as this process last read or wrote them.

A signed row's signature is an HMAC of its payload, so ``(job id, signature)`` names one
payload. The state of a job restored from a verified payload (or of one this process signed
and wrote) is kept under that pair; when the row comes back with the same pair, the job is
restored from the kept state and the row's bytes are never unpickled. A row tampered with
under an old signature therefore gets the job that was verified, never its own pickle; a row
with a new signature is verified and unpickled as before.

Jobs restored from a kept state share its trigger and arguments, so only states whose shared
parts nobody can change are kept: a built-in trigger, and arguments made of immutable values
(a job that appends to a list it was given must see the list as stored, as it does without
this cache). Unsigned state (``APSCHEDULER_SIGN_JOB_STATE = False``) is not kept: nothing
names its payload cheaply.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from apscheduler.job import Job
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from django_apscheduler_obs import signing

# Each kept state costs about 1.5 KiB (measured with an interval trigger): the bound keeps
# this under about 15 MiB for a store of any size.
MAX_JOBS = 10_000

_SHARED_TRIGGERS = frozenset({CronTrigger, DateTrigger, IntervalTrigger})
_IMMUTABLE = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        decimal.Decimal,
        uuid.UUID,
        dt.datetime,
        dt.date,
        dt.time,
        dt.timedelta,
    }
)


def _immutable(value: Any) -> bool:
    kind = type(value)
    if kind in _IMMUTABLE:
        return True
    return kind is tuple and all(_immutable(v) for v in value)


def shareable(state: dict[str, Any]) -> bool:
    """Whether jobs restored from ``state`` (``Job.__getstate__()``) may share its trigger
    and arguments. A bound method's instance is among the arguments there, so a job on a
    method is never kept: it gets a fresh instance from each stored state, as before."""
    args, kwargs = state["args"], state["kwargs"]
    return (
        type(state["trigger"]) in _SHARED_TRIGGERS
        and (not args or _immutable(args))
        and (not kwargs or all(_immutable(v) for v in kwargs.values()))
    )


class RestoredJobs:
    """Kept job states by id, each with the signature of the payload it stands for.

    Filled and read by the scheduler loop's thread only; other threads only ``forget``.
    """

    def __init__(self, max_jobs: int = MAX_JOBS) -> None:
        self.max_jobs = max_jobs
        # Oldest first; an OrderedDict drops its oldest in O(1), where a dict whose front was
        # emptied walks the holes on each next(iter(...)).
        # Each entry: signature, state, and the pass that last used it.
        self._states: OrderedDict[str, tuple[bytes, dict[str, Any], int]] = OrderedDict()
        self._keys: Sequence[bytes] | None = None
        self._pass = 0

    def begin_pass(self, keys: Sequence[bytes] | None) -> None:
        """Start a pass under the signing keys in force now: a key dropped from the settings
        must not keep vouching for jobs verified with it."""
        self._pass += 1
        if keys != self._keys:
            self._states.clear()
            self._keys = keys

    def get(self, job_id: str, stored: bytes) -> Job | None:
        """A job restored from the state kept for exactly this stored state, or None.

        ``Job.__setstate__`` looks its function up again, as restoring the row would: code
        removed by a deploy is noticed (None here, and the caller's restore flags the job).
        """
        kept = self._states.get(job_id)
        if kept is None or self._keys is None:
            return None
        signature = signing.signature(stored)
        if signature is None or signature != kept[0]:
            return None
        if kept[2] != self._pass:
            self._states[job_id] = (kept[0], kept[1], self._pass)
            with contextlib.suppress(KeyError):  # forget() may run in another thread
                self._states.move_to_end(job_id)
        job = Job.__new__(Job)
        try:
            job.__setstate__(kept[1])  # reads the state; keeps only what it shares
        except Exception:
            self.forget(job_id)
            return None
        job.kwargs = dict(job.kwargs)
        return job

    def put_state(self, job_id: str, stored: bytes, state: dict[str, Any]) -> None:
        """Keep ``state`` (unpickled from, or pickled as, the signed ``stored``). The dict
        becomes the keeper's: pass a fresh one (from ``pickle.loads`` or ``__getstate__``);
        its ``kwargs`` is copied, so the job it came with keeps its own."""
        if self._keys is None:
            return
        self._states.pop(job_id, None)  # re-inserted last: the oldest kept state goes first
        if len(self._states) >= self.max_jobs:
            # The oldest goes, unless this pass used it: a pass with more due jobs than
            # fit keeps serving the ones kept, instead of each evicting the next.
            try:
                if self._states[next(iter(self._states))][2] == self._pass:
                    return
                self._states.popitem(last=False)
            except (KeyError, RuntimeError, StopIteration):  # forget() in another thread
                return
        signature = signing.signature(stored)
        if signature is None or not shareable(state):
            return
        state["kwargs"] = dict(state["kwargs"])  # not the dict of the job it came with
        self._states[job_id] = (signature, state, self._pass)

    def forget(self, job_id: str) -> None:
        self._states.pop(job_id, None)

    def clear(self) -> None:
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)
