#!/usr/bin/env python3
"""Write this folder's alert rules, promtool tests and dashboards for the default config.

The code lives in the package (``django_apscheduler_obs.monitoring``); this script renders it
with the default :class:`MonitoringConfig`, so ``grafana/`` is exactly what
``manage.py apscheduler_monitoring --out DIR`` writes without options. Use that command to
change the selector or thresholds. ``--check`` writes nothing and exits 1 if a file is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing the package

from django_apscheduler_obs.monitoring import (  # noqa: E402
    MonitoringConfig,
    check_dir,
    render_all,
    write_dir,
)

CONFIG = MonitoringConfig().as_dict()
OUTPUTS = tuple(Path(rel) for rel in render_all())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir", type=Path, default=HERE, help="where to write (default: grafana/)"
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is stale"
    )
    args = parser.parse_args(argv)
    files = render_all()
    if args.check:
        stale = check_dir(args.output_dir, files)
        if stale:
            print("stale, run python grafana/generate.py:", *stale, sep="\n  ", file=sys.stderr)
            return 1
        return 0
    write_dir(args.output_dir, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
