"""The Celery application of the tests' worker processes (``celery -A tests.celery_app``).

Configured as a project configures its own: Django settings first, then the app reads
``CELERY_*`` settings and autodiscovers tasks, which finds ``django_apscheduler_obs.tasks``.
One app per broker: ``redis_app`` and ``rabbitmq_app``.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.cmd_settings")

REDIS_URL = "redis://127.0.0.1:6379/15"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _app(name: str, broker: str) -> Celery:
    app = Celery(name)
    app.conf.update(_CONF, broker_url=broker)
    app.autodiscover_tasks()
    return app


_CONF = {
    "broker_connection_retry_on_startup": True,
    # No publish retries; kombu still spends a few seconds reconnecting before an
    # unreachable broker is an error.
    "task_publish_retry": False,
    "worker_prefetch_multiplier": 1,
    "worker_hijack_root_logger": False,
    # Redis redelivers an unacknowledged message after this (a worker killed mid-run);
    # RabbitMQ redelivers when the dead worker's connection closes.
    "broker_transport_options": {
        "visibility_timeout": 5,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
}
redis_app = _app("tests-redis", REDIS_URL)
rabbitmq_app = _app("tests-rabbitmq", RABBITMQ_URL)
