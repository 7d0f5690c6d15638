"""Settings of the ``runapscheduler`` processes of the chaos suite (``tests/test_chaos.py``).

The database is the one the test run uses (``DATABASE_URL``, SQLite by default) with the name
of the test database that pytest-django created, passed in ``CHAOS_DB_NAME``. The jobs are
declared here, so every process registers the same definitions (the registry's hash keeps them
untouched across restarts and replacements):

* ``CHAOS_JOBS=interval``: ``CHAOS_JOB_COUNT`` jobs every second from ``CHAOS_START`` (a whole
  second, epoch seconds), ``coalesce=False``, ``misfire_grace_time=60``, each appending one
  ``Ledger`` row per run (no unique constraint: duplicates stay visible);
* ``CHAOS_SLOW_JOB=1``: also ``slow``, every 2 s, which sleeps 0.8 s before writing its row
  (a kill during that sleep is a run that died mid-way: ``abandoned``);
* ``CHAOS_JOBS=hourly``: one hourly job only, so the leader sleeps (the change test).

The test hooks (``DAO_TEST_FREEZE_FILE``, ``DAO_UNSAFE_NO_CLAIM``) are honoured only because
``APSCHEDULER_TEST_HOOKS`` is set here.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

DATABASES["default"]["NAME"] = os.environ["CHAOS_DB_NAME"]
DATABASES["default"].pop("TEST", None)
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # WAL and a busy timeout are set on every connection by the scheduler; IMMEDIATE makes
    # write transactions take the lock up front instead of failing to upgrade a read.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 30, "transaction_mode": "IMMEDIATE"}
    )

APSCHEDULER_TEST_HOOKS = True  # never in a real settings module
APSCHEDULER_AUTODISCOVER = False
APSCHEDULER_EXECUTION_RETENTION = None  # no cleanup job waking the leader
APSCHEDULER_HEARTBEAT_INTERVAL = 3600  # nor the canary: the change test needs an idle leader
APSCHEDULER_SHUTDOWN_TIMEOUT = 5

_start = datetime.fromtimestamp(float(os.environ.get("CHAOS_START", "0")), tz=timezone.utc)
if os.environ.get("CHAOS_JOBS") == "hourly":
    APSCHEDULER_JOBS = [
        {
            "id": "hourly",
            "func": "tests.jobs:ledger",
            "trigger": "interval",
            "hours": 1,
            "start_date": _start,
        }
    ]
else:
    APSCHEDULER_JOBS = [
        {
            "id": f"every-second-{i}",
            "func": "tests.jobs:ledger",
            "trigger": "interval",
            "seconds": 1,
            "start_date": _start,
            "coalesce": False,
            "misfire_grace_time": 60,
            # With 1, a fire time that comes due while a new leader's catch-up batch (the
            # fire times missed during the failover, run one after the other) is still
            # running is skipped by APScheduler ("Max instances!"): its semantics, not a
            # failover loss. 3 lets the audit demand every fire time.
            "max_instances": 3,
        }
        for i in range(int(os.environ.get("CHAOS_JOB_COUNT", "3")))
    ]
    if os.environ.get("CHAOS_SLOW_JOB") == "1":
        APSCHEDULER_JOBS.append(
            {
                "id": "slow",
                "func": "tests.chaos.jobs:slow_ledger",
                "trigger": "interval",
                "seconds": 2,
                "start_date": _start,
                "coalesce": False,
                "misfire_grace_time": 60,
                "max_instances": 3,  # a catch-up after a failover must not skip fire times
            }
        )

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "format": "%(asctime)s.%(msecs)03d %(threadName)s %(name)s %(levelname)s %(message)s",
            "datefmt": "%H:%M:%S",
        }
    },
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {
        # One line per run is noise here; runs are in the Ledger and the execution table.
        "apscheduler.executors": {"level": "WARNING"},
        "apscheduler.scheduler": {"level": "WARNING"},
    },
}
