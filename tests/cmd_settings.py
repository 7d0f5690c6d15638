"""Settings for ``runapscheduler`` subprocesses started by the tests.

The parent passes its test database (``DAO_TEST_DATABASE``, JSON of ``settings_dict``) and any
extra settings (``DAO_TEST_SETTINGS``, a JSON object), so the child uses exactly the database
and configuration the test prepared.
"""

from __future__ import annotations

import json
import os

from tests.settings import *  # noqa: F403

if os.environ.get("DAO_TEST_DATABASE"):
    DATABASES = {"default": json.loads(os.environ["DAO_TEST_DATABASE"])}
globals().update(json.loads(os.environ.get("DAO_TEST_SETTINGS", "{}")))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # Warnings and errors only, so a failing start prints just its one line.
    "root": {"handlers": ["console"], "level": os.environ.get("DAO_TEST_LOG_LEVEL", "ERROR")},
}
