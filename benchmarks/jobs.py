"""Job functions of the benchmarks (module level: stored jobs refer to them by name)."""

from __future__ import annotations

import time

# (job index, wall-clock start) of every probe run; list.append is atomic under the GIL.
starts: list[tuple[int, float]] = []


def probe(index: int) -> None:
    """A no-op that notes when it really started, for the start-delay measurement."""
    starts.append((index, time.time()))


def noop() -> None:
    pass
