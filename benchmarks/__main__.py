"""``python -m benchmarks [--db sqlite|postgres|mariadb] [--smoke] [--json out.json]
[--markdown out.md] [--only N[,N...]]``

Every scenario runs against three subjects in this one process: django-apscheduler-obs,
django-apscheduler 0.7 and bare APScheduler 3 (MemoryJobStore, the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

TITLES = {
    "1": "Sustained scheduling: 100 interval jobs firing 2x/s each (200 runs/s)",
    "2": "DB statements per run (all threads)",
    "3": "Recording throughput (row + metrics + span)",
    "4": "Observation overhead per run over bare APScheduler",
    "5": "Job store scale",
    "6": "/metrics scrape",
    "7": "Cleanup of the execution history",
    "8": "Admin pages over a large history",
    "9": "Burst: jobs due in the same second",
    "10": "Runs on Celery workers vs django-celery-beat (python -m benchmarks.workers)",
}
ORDER = ["1", "2", "9", "3", "4", "5", "6", "8", "7"]  # 8 reads the history that 7 halves


@dataclass
class Config:
    smoke: bool = False
    sustained_seconds: float = 60
    lead_seconds: float = 3.0  # start-up time before the first fire time
    statements_seconds: float = 10
    record_threads: int = 4
    record_seconds: float = 10
    overhead_runs: int = 2000
    repeats: int = 5
    store_sizes: list[int] = field(default_factory=lambda: [10_000, 100_000])
    store_adds: int = 1000
    repeats_small: int = 20
    repeats_big: int = 3
    rss_timeout: float = 240
    scrape_sizes: list[int] = field(default_factory=lambda: [10, 100, 1000])
    history_rows: int = 1_000_000
    admin_jobs: list[int] = field(default_factory=lambda: [100, 1000])
    burst_jobs: int = 1000
    burst_lead_seconds: float = 20  # storing the jobs comes first

    @classmethod
    def smoke_config(cls) -> Config:
        return cls(
            smoke=True,
            sustained_seconds=5,
            lead_seconds=1.5,
            statements_seconds=3,
            record_seconds=1,
            overhead_runs=50,
            repeats=2,
            store_sizes=[1000],
            store_adds=50,
            repeats_small=3,
            repeats_big=1,
            rss_timeout=90,
            scrape_sizes=[10, 100],
            history_rows=20_000,
            admin_jobs=[100, 300],
            burst_jobs=100,
            burst_lead_seconds=5,
        )


def create_database(kind: str, name: str, port: int) -> None:
    """A fresh benchmark database on the server (SQLite: a new file in a temp dir)."""
    if kind == "postgres":
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    elif kind == "mariadb":
        import MySQLdb

        conn = MySQLdb.connect(host="127.0.0.1", port=port, user="root", passwd="")
        cur = conn.cursor()
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        conn.close()


def fmt(value: Any) -> str:
    if isinstance(value, dict):
        if set(value) == {"median", "min", "max"}:
            return f"{value['median']:g} ({value['min']:g}–{value['max']:g})"
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return "—" if value is None else str(value)


def tables(rows: list[Any], markdown: bool) -> list[str]:
    from benchmarks.harness import SUBJECTS

    out: list[str] = []
    by_scenario: dict[str, list[Any]] = {}
    for r in rows:
        by_scenario.setdefault(r.scenario, []).append(r)
    for sc in [*ORDER, *(s for s in by_scenario if s not in ORDER)]:
        if sc not in by_scenario:
            continue
        group = sorted(
            by_scenario[sc],
            key=lambda r: (
                [x.case for x in by_scenario[sc]].index(r.case),
                SUBJECTS.index(r.subject) if r.subject in SUBJECTS else 0,
            ),
        )
        keys: list[str] = []
        for r in group:
            for k in r.metrics:
                if k not in keys:
                    keys.append(k)
        header = ["case", "subject", *keys]
        body = [[r.case, r.subject, *(fmt(r.metrics.get(k)) for k in keys)] for r in group]
        out.append("")
        out.append(f"### {sc}. {TITLES[sc]}" if markdown else f"== {sc}. {TITLES[sc]} ==")
        out.append("")
        if markdown:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(c.replace("|", "/") for c in b) + " |" for b in body)
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
            out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
            out.extend(
                "  ".join(str(c).ljust(w) for c, w in zip(b, widths, strict=False)) for b in body
            )
    return out


def summary(ratios: list[Any], targets: list[Any], markdown: bool) -> list[str]:
    out = [
        "",
        "### Ratios (how many times better obs is; < 1 means worse)"
        if markdown
        else "== Ratios (how many times better obs is; < 1 means worse) ==",
    ]
    out.append("")
    if markdown:
        out.append("| scenario | case | metric | obs | other | vs | ratio |")
        out.append("|---|---|---|---|---|---|---|")
    for r in ratios:
        v = r.value
        cells = [
            r.scenario,
            r.case,
            r.metric,
            fmt(r.ours),
            fmt(r.other),
            r.versus,
            "—" if v is None else f"{v:.2f}x",
        ]
        out.append("| " + " | ".join(cells) + " |" if markdown else "  ".join(cells))
    out += ["", "### Targets" if markdown else "== Targets ==", ""]
    if markdown:
        out.append("| scenario | target | holds | figures |")
        out.append("|---|---|---|---|")
    for t in targets:
        holds = {True: "yes", False: "NO", None: "n/a"}[t.holds]
        cells = [t.scenario, t.text, holds, t.figure]
        out.append(
            "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"
            if markdown
            else f"[{holds}] {t.scenario}: {t.text}\n      {t.figure}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--db", choices=["sqlite", "postgres", "mariadb"], default="sqlite")
    parser.add_argument("--smoke", action="store_true", help="small sizes, seconds not minutes")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--markdown", help="write the tables as Markdown here")
    parser.add_argument("--only", help="comma-separated scenario numbers, e.g. 1,5")
    parser.add_argument("--db-name", default="dao_bench")
    parser.add_argument(
        "--db-port",
        type=int,
        help="server port (default 5432 / 3306); a private server keeps others' restarts out",
    )
    parser.add_argument(
        "--conn-max-age",
        default="0",
        help="CONN_MAX_AGE of the bench database: 0 (Django's default) or 'none' (persistent)",
    )
    args = parser.parse_args(argv)

    os.environ["BENCH_DB"] = args.db
    os.environ["BENCH_DB_NAME"] = args.db_name
    port = args.db_port or {"postgres": 5432, "mariadb": 3306}.get(args.db, 0)
    os.environ["BENCH_DB_PORT"] = str(port)
    os.environ["BENCH_CONN_MAX_AGE"] = args.conn_max_age
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    create_database(args.db, args.db_name, port)

    import django

    django.setup()
    from django.core.management import call_command

    from benchmarks import (
        harness,
        s_burst,
        s_history,
        s_metrics,
        s_recording,
        s_scheduling,
        s_store,
    )
    from benchmarks.subjects import install_tracing

    install_tracing()
    harness.install_statement_counter()
    call_command("migrate", run_syncdb=True, verbosity=0)

    cfg = Config.smoke_config() if args.smoke else Config()
    selected = args.only.split(",") if args.only else ORDER
    funcs = {
        "1": s_scheduling.scenario1,
        "2": s_scheduling.scenario2,
        "3": s_recording.scenario3,
        "4": s_recording.scenario4,
        "5": s_store.scenario5,
        "6": s_metrics.scenario6,
        "7": s_history.scenario7,
        "8": s_history.scenario8,
        "9": s_burst.scenario9,
    }
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "db": args.db,
        "db_server": harness.db_server_version(),
        "conn_max_age": args.conn_max_age,
        "db_port": port,
        "smoke": args.smoke,
        "package_path": os.path.dirname(__import__("django_apscheduler_obs").__file__),
        "package_rev": os.environ.get("BENCH_PACKAGE_REV", ""),
        "config": asdict(cfg),
        **harness.machine_info(),
    }
    print(
        f"benchmarks on {meta['db_server']}, {meta['nproc']} x {meta['cpu']} "
        f"(CPU speed {meta['cpu_speed_ms']} ms), "
        f"Python {meta['python']}, {'smoke' if args.smoke else 'full'} run",
        flush=True,
    )
    rows, ratios, targets, failures = [], [], [], {}
    durations: dict[str, float] = {}
    load: dict[str, float] = {}
    disturbed: list[str] = []
    server_started = harness.db_started_at()
    for sc in ORDER:
        if sc not in selected:
            continue
        print(f"-- scenario {sc}: {TITLES[sc]}", flush=True)
        t0 = time.perf_counter()
        try:
            r, q, t = funcs[sc](cfg)
        except Exception:
            failures[sc] = traceback.format_exc()
            print(failures[sc], file=sys.stderr, flush=True)
            continue
        finally:
            durations[sc] = round(time.perf_counter() - t0, 1)
            # The machine is shared: note how busy it was, and whether the server restarted.
            load[sc] = round(os.getloadavg()[0], 2)
            restarted = harness.db_started_at()
            if restarted != server_started:
                print(f"!! the database server restarted during scenario {sc}", flush=True)
                disturbed.append(sc)
        rows += r
        ratios += q
        targets += t
        print("\n".join(tables(r, markdown=False)), flush=True)
    print("\n".join(summary(ratios, targets, markdown=False)))
    print(f"\nscenario durations (s): {durations}")
    meta["durations_s"] = durations
    meta["loadavg_1min_after"] = load
    meta["server_restarted_during"] = disturbed
    print(f"1-min load average after each scenario: {load}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "meta": meta,
                    "rows": [asdict(r) for r in rows],
                    "ratios": [{**asdict(r), "value": r.value} for r in ratios],
                    "targets": [asdict(t) for t in targets],
                    "failures": failures,
                },
                f,
                indent=1,
                default=str,
            )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(tables(rows, markdown=True) + summary(ratios, targets, True)))
            f.write("\n")
    if os.environ.get("BENCH_SQLITE_DIR_OWNED"):
        from django.db import connections

        connections.close_all()
        shutil.rmtree(os.environ["BENCH_SQLITE_DIR"], ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
