from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DjangoApschedulerObsConfig(AppConfig):
    name = "django_apscheduler_obs"
    verbose_name = _("Django APScheduler")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_apscheduler_obs import checks, signals  # noqa: F401 - registers them
