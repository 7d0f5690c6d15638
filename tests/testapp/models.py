"""A ledger without a unique constraint: jobs append to it, so duplicate runs are visible
independently of the execution table's own unique claim."""

from __future__ import annotations

from django.db import models


class Ledger(models.Model):
    job_id = models.CharField(max_length=200)
    run_time = models.DateTimeField()
    written_by = models.CharField(max_length=200, blank=True, default="")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "testapp"
