"""Job functions of the chaos suite (importable by reference from every process)."""

from __future__ import annotations

import time

from tests.jobs import ledger


def slow_ledger(seconds: float = 0.8) -> None:
    """Runs for a while, *then* appends its Ledger row: a process killed mid-run leaves no
    row, and the next leader must record that fire time as abandoned."""
    time.sleep(seconds)
    ledger()
