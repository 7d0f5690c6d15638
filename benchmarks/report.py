"""``python -m benchmarks.report RUN.json [RUN.json ...]``: one Markdown report from runs of
the same database (e.g. a full run plus a re-run of some scenarios; later files win)."""

from __future__ import annotations

import json
import sys
from typing import Any

from benchmarks.__main__ import ORDER, summary, tables
from benchmarks.harness import Ratio, Row, Target


def merge(paths: list[str]) -> tuple[dict[str, Any], list[Row], list[Ratio], list[Target]]:
    meta: dict[str, Any] = {}
    by_scenario: dict[str, tuple[list[Row], list[Ratio], list[Target]]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        meta = meta or data["meta"]
        durations = meta.setdefault("durations_s", {})
        durations.update(data["meta"].get("durations_s", {}))
        meta.setdefault("loadavg_1min_after", {}).update(data["meta"].get("loadavg_1min_after", {}))
        scenarios = {r["scenario"] for r in data["rows"]}
        for sc in scenarios:
            by_scenario[sc] = (
                [Row(**r) for r in data["rows"] if r["scenario"] == sc],
                [
                    Ratio(**{k: v for k, v in r.items() if k != "value"})
                    for r in data["ratios"]
                    if r["scenario"] == sc
                ],
                [Target(**t) for t in data["targets"] if t["scenario"] == sc],
            )
    rows, ratios, targets = [], [], []
    for sc in ORDER:
        if sc in by_scenario:
            r, q, t = by_scenario[sc]
            rows += r
            ratios += q
            targets += t
    return meta, rows, ratios, targets


def main() -> None:
    meta, rows, ratios, targets = merge(sys.argv[1:])
    pk = meta["packages"]
    speed = f", CPU speed {meta['cpu_speed_ms']} ms" if meta.get("cpu_speed_ms") else ""
    print(
        f"Run {meta['date']} on {meta['db_server']}; {meta['nproc']} cores ({meta['cpu']}{speed}); "
        f"Python {meta['python']}, Django {pk['django']}, APScheduler {pk['apscheduler']}, "
        f"django-apscheduler {pk['django-apscheduler']}, django-apscheduler-obs "
        f"{pk['django-apscheduler-obs']} at {meta.get('package_rev') or '?'}; "
        f"CONN_MAX_AGE={meta['conn_max_age']}; scenario seconds {meta['durations_s']}; "
        f"1-min load average after each scenario {meta.get('loadavg_1min_after')}."
    )
    print("\n".join(tables(rows, markdown=True) + summary(ratios, targets, markdown=True)))


if __name__ == "__main__":
    main()
