"""Chaos suite for runs on workers: three schedulers, two Celery workers on Redis, real faults.

The ``Cluster`` of ``tests/chaos/harness.py`` (three ``runapscheduler`` processes on the test
database) hands every run of its jobs to Celery (``executor="celery"``, a queue of its own per
test); two ``celery worker`` processes (``tests/chaos/workers.py``) run them. Jobs: two every
second that append to ``Ledger`` (no unique constraint), one every 2 s that runs 1.5 s, and a
one-off that runs longer than the Redis visibility timeout. Small timeouts: dispatch 4 s,
worker liveness 2 s, in-flight poll 0.2 s. The timeline:

1. kill -9 of a worker in the middle of a slow run: the run ends ``Abandoned``; Redis
   redelivers its message to another worker, whose pick-up drops it;
2. kill -9 of the leader: a standby takes over (epoch + 1), still one publish per fire time;
3. a Redis restart (``SHUTDOWN NOSAVE``, then a new server): every run whose enqueue failed
   while it was down (the schedulers' log says which) is recorded ``Lost``, and so is every
   run whose message the restart dropped; every scheduler survives, every worker reconnects
   (but see Celery's bug below);
4. every worker stopped for longer than the dispatch timeout: those runs become ``Lost`` and
   the leader's ``/metrics`` counts them (``apscheduler_job_lost_runs_total``);
5. a run longer than the visibility timeout: Redis redelivers it while it runs (the classic
   Celery-on-Redis double run), the pick-up drops the copy; and a duplicate publish of a
   finished run is dropped too.

Then every expected fire time of every job has exactly one execution row in a final status
(Executed, or Lost/Abandoned/Missed: never a silent gap), the Ledger has no fire time twice,
no Lost run ran, and the schedulers' logs show no run published twice. The negative control
runs workers without the pick-up's compare-and-set (``DAO_UNSAFE_NO_PICKUP=1``, test hooks
on): the same redeliveries then run twice and the audit reports the duplicates.

Celery 5.7 with kombu 5.7 on Redis: a worker that holds an unacknowledged message (a running
``acks_late`` task) when the broker connection drops exits with "Unrecoverable error:
AttributeError(... 'hostname')" once its running tasks end (the consumer's cleanup closes a
connection it has already collected). That is Celery's bug, not this package's: the broker
restart tolerates exactly that exit, restarts the worker as a supervisor would, and the audit
still demands every run of it recorded.

Every wait is on an event (a row, a log line, a metric) with a deadline. The JSON report is
written next to the logs (``tmp_path``) and, with ``CHAOS_REPORT_DIR``, there too.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import workers as cw
from tests.chaos.harness import CRASH_BOUND, Cluster, Proc, _db_retry

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

UTC = timezone.utc
FAST = ("remote-0", "remote-1")  # every second
SLOW_INTERVAL, SLOW_SECONDS = 2, 1.5
LONG_SECONDS = 9.0  # > visibility timeout (5 s) + restore interval (1 s), with room for load
DISPATCH_TIMEOUT = 4
LIVENESS = 2


# -- the rig: schedulers, workers, broker; all stopped at teardown ----------------------------


class Rig:
    def __init__(self, workdir: Path, redis: cw.Redis) -> None:
        self.workdir = workdir
        self.redis = redis
        self.queue = f"dao-chaos-{uuid.uuid4().hex[:12]}"  # nothing of another run reaches us
        self.executors = {"celery": {"ENGINE": "celery", "APP": cw.APP, "QUEUE": self.queue}}
        self.workers: list[cw.Worker] = []
        self.cluster: Cluster | None = None
        self.start = 0.0  # the jobs' start date (a whole second)
        self.audit_from = 0.0
        self.one_offs: dict[str, float] = {}  # job id -> fire time
        self.notes: dict[str, Any] = {}

    # schedulers

    def scheduler_settings(self, start: float) -> dict[str, Any]:
        common = {
            "trigger": "interval",
            "start_date": datetime.fromtimestamp(start, tz=UTC).isoformat(),
            "executor": "celery",
            "coalesce": False,
            "misfire_grace_time": 60,
            # A remote run holds its slot until it is final: runs queued while every worker
            # is stopped (until the dispatch timeout) must not make APScheduler skip any.
            "max_instances": 50,
        }
        jobs: list[dict[str, Any]] = [
            {"id": job, "func": "tests.jobs:ledger", "seconds": 1, **common} for job in FAST
        ]
        jobs.append(
            {
                "id": "slow",
                "func": "tests.chaos.jobs:slow_ledger",
                "kwargs": {"seconds": SLOW_SECONDS},
                "seconds": SLOW_INTERVAL,
                **common,
            }
        )
        return {
            "APSCHEDULER_EXECUTORS": self.executors,
            "APSCHEDULER_DISPATCH_TIMEOUT": DISPATCH_TIMEOUT,
            "APSCHEDULER_WORKER_LIVENESS": LIVENESS,
            "APSCHEDULER_INFLIGHT_POLL_INTERVAL": 0.2,
            "APSCHEDULER_AUTODISCOVER": False,
            "APSCHEDULER_EXECUTION_RETENTION": None,
            "APSCHEDULER_HEARTBEAT_INTERVAL": 3600,
            "APSCHEDULER_SHUTDOWN_TIMEOUT": 5,
            "APSCHEDULER_JOBS": jobs,
        }

    def start_cluster(self, n: int = 3) -> Cluster:
        self.start = float(int(time.time()) + 4)
        env = cw.process_env(self.scheduler_settings(self.start))
        self.cluster = Cluster(self.workdir / "cluster", start=self.start, env=env)
        self.cluster.intervals = {**dict.fromkeys(FAST, 1), "slow": SLOW_INTERVAL}
        t0 = time.monotonic()
        self.cluster.spawn_many(n)
        self.notes["spawn_s"] = round(time.monotonic() - t0, 3)
        # The audit starts at the first fire time: if the processes came up after it (a slow
        # machine), APScheduler never schedules the fire times before the job was stored.
        self.audit_from = max(self.start, float(math.ceil(time.time())))
        self.cluster.leader()
        return self.cluster

    # workers

    def start_worker(self, name: str, *, unsafe: bool = False) -> cw.Worker:
        settings: dict[str, Any] = {
            "APSCHEDULER_EXECUTORS": self.executors,
            "APSCHEDULER_WORKER_LIVENESS": LIVENESS,
        }
        env = None
        if unsafe:  # TEST-ONLY: every delivery runs, no compare-and-set
            settings["APSCHEDULER_TEST_HOOKS"] = True
            env = {"DAO_UNSAFE_NO_PICKUP": "1"}
        worker = cw.Worker(name, self.queue, self.workdir / f"worker-{name}.log", settings, env)
        self.workers.append(worker)
        return worker

    def start_workers(self, *names: str, unsafe: bool = False) -> list[cw.Worker]:
        started = [self.start_worker(name, unsafe=unsafe) for name in names]
        for worker in started:
            worker.wait_ready()
        return started

    def live_workers(self) -> list[cw.Worker]:
        return [w for w in self.workers if w.alive()]

    def worker_named(self, name: str) -> cw.Worker:
        return next(w for w in self.workers if w.name == name and w.alive())

    def worker_logs(self) -> list[str]:
        return [w.text() for w in self.workers]

    def scheduler_logs(self) -> list[str]:
        assert self.cluster is not None
        procs = self.cluster.procs + self.cluster.retired
        return [p.log.read_text(errors="replace") for p in procs if p.log.exists()]

    def drops_of(self, execution_id: int) -> int:
        return cw.dropped(self.worker_logs())[execution_id]

    # jobs

    def add_one_off(self, job_id: str, fire: float, seconds: float) -> None:
        """A one-off remote job added to the job store by another process (a web process):
        the leader's change poll wakes it; its worker loads it from the run's row."""
        from apscheduler.job import Job
        from apscheduler.schedulers.background import BackgroundScheduler

        from django_apscheduler_obs.jobstores import DjangoJobStore

        run_date = datetime.fromtimestamp(fire, tz=UTC)
        scheduler = BackgroundScheduler(timezone="UTC")  # never started: lends its time zone
        job = Job(
            scheduler,
            id=job_id,
            func="tests.chaos.jobs:slow_ledger",
            args=(),
            kwargs={"seconds": seconds},
            trigger=scheduler._create_trigger("date", {"run_date": run_date}),
            executor="celery",
            name=job_id,
            misfire_grace_time=60,
            coalesce=False,
            max_instances=1,
            next_run_time=run_date,
        )
        _db_retry(lambda: DjangoJobStore().add_job(job))
        self.one_offs[job_id] = fire

    def audited_jobs(self) -> dict[str, tuple[float, float]]:
        def first(interval: float) -> float:
            return self.start + math.ceil((self.audit_from - self.start) / interval) * interval

        jobs = dict.fromkeys(FAST, (first(1.0), 1.0))
        jobs["slow"] = (first(SLOW_INTERVAL), float(SLOW_INTERVAL))
        jobs.update({job: (fire, 0.0) for job, fire in self.one_offs.items()})
        return jobs

    def close(self) -> None:
        """Stop every process this test started, whatever happened; the broker first (a
        worker stopping while it is down would wait for it)."""
        try:
            self.redis.ensure_up()
        finally:
            try:
                for worker in self.workers:  # all at once, then each waited for
                    worker.terminate()
                for worker in self.workers:
                    worker.stop(timeout=10)
            finally:
                if self.cluster is not None:
                    self.cluster.stop_all()
        self.redis.forget_queue(self.queue)


@pytest.fixture
def rig(transactional_db: Any, tmp_path: Path) -> Iterator[Rig]:
    redis = cw.Redis()
    if not redis.up():
        pytest.fail("redis-server is not answering on 127.0.0.1:6379")
    rig = Rig(tmp_path, redis)
    try:
        yield rig
    finally:  # before the test database is flushed or dropped
        rig.close()


# -- reading the database and the leader --------------------------------------------------------


def _rows(**filters: Any) -> list[Any]:
    from django_apscheduler_obs.models import DjangoJobExecution

    return _db_retry(lambda: list(DjangoJobExecution.objects.filter(**filters).order_by("id")))


def _ledger(job_id: str, run_time: datetime) -> int:
    from tests.testapp.models import Ledger

    return _db_retry(lambda: Ledger.objects.filter(job_id=job_id, run_time=run_time).count())


def wait_running(timeout: float = 30) -> None:
    """Every every-second job has an Executed run for a fire time from now on."""
    from django_apscheduler_obs.models import DjangoJobExecution as EX

    since = datetime.fromtimestamp(int(time.time()), tz=UTC)

    def running() -> bool:
        done = {r.job_id for r in _rows(job_id__in=FAST, run_time__gte=since, status=EX.SUCCESS)}
        return done == set(FAST)

    cw.wait_until(running, timeout=timeout, what="remote runs executing again", interval=0.1)


def _metric(proc: Proc, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    try:
        return proc.metrics().get(key, 0.0)
    except OSError:
        return 0.0


def _lost_metrics(proc: Proc) -> dict[str, float]:
    return {job: _metric(proc, "apscheduler_job_lost_runs_total", job_id=job) for job in FAST}


def _save(rig: Rig, name: str, text: str) -> None:
    (rig.workdir / f"{name}.json").write_text(text)
    target = os.environ.get("CHAOS_REPORT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        vendor = rig.cluster.vendor if rig.cluster else "unknown"
        (Path(target) / f"{name}-{vendor}.json").write_text(text)
    print(f"\n=== {name} ===\n{text}")


def _final_audit(rig: Rig) -> cw.WorkerAudit:
    until = time.time() - 2  # the last fire times are still on their way
    done, expected = cw.wait_final(rig.audited_jobs(), until, timeout=DISPATCH_TIMEOUT + 20)
    rig.notes["final_before_audit"] = f"{done}/{expected}"
    return cw.audit(rig.audited_jobs(), until, rig.scheduler_logs(), rig.worker_logs())


# -- the timeline -------------------------------------------------------------------------------


def phase_kill_worker_mid_run(rig: Rig, cluster: Cluster) -> None:
    """1. kill -9 of the worker running a slow run."""
    from django_apscheduler_obs.models import DjangoJobExecution as EX

    leader, _ = cluster.leader()
    abandoned_before = _metric(leader, "apscheduler_abandoned_runs_total", group="default")
    # A run picked up from now on: the kill lands early in its 1.5 s, before its Ledger write.
    since = datetime.fromtimestamp(time.time(), tz=UTC)
    row = cw.wait_until(
        lambda: next(
            iter(_rows(job_id="slow", status=EX.PICKED_UP, picked_up_at__gte=since)), None
        ),
        timeout=20,
        what="a slow run picked up by a worker",
        interval=0.02,
    )
    victim = rig.worker_named(row.worker.split("@", 1)[0])
    victim.kill()
    killed_at = time.time()
    # Its liveness stops: the leader marks the run abandoned once WORKER_LIVENESS has passed.
    cw.wait_until(
        lambda: _rows(id=row.id)[0].status == EX.ABANDONED,
        timeout=LIVENESS + 10,
        what=f"run #{row.id} abandoned",
    )
    abandoned_after = time.time() - killed_at
    # Marked once its liveness stamp (refreshed every LIVENESS / 4) was LIVENESS old, not sooner.
    assert abandoned_after > LIVENESS / 2, abandoned_after
    leader, _ = cluster.leader()
    cw.wait_until(
        lambda: (
            _metric(leader, "apscheduler_abandoned_runs_total", group="default")
            >= abandoned_before + 1
        ),
        timeout=10,
        what="the abandoned run in the leader's metrics",
    )
    rig.start_workers("w3")  # a replacement, while Redis takes its time to redeliver
    # Redis redelivers the unacknowledged message (visibility timeout): the pick-up drops it.
    cw.wait_until(
        lambda: rig.drops_of(row.id) >= 1,
        timeout=30,
        what=f"the redelivery of run #{row.id} dropped",
    )
    dropped_by = [w.name for w in rig.workers if cw.dropped([w.text()])[row.id]]
    assert victim.name not in dropped_by
    final = _rows(id=row.id)[0]
    assert final.status == EX.ABANDONED, (final.status, final.exception)
    assert final.worker.startswith(f"{victim.name}@"), final.worker
    assert _ledger("slow", final.run_time) == 0, "the run was killed before its Ledger write"
    rig.notes["kill_worker"] = {
        "run": row.id,
        "worker": victim.name,
        "abandoned_after_s": round(abandoned_after, 3),
        "redelivery_dropped_by": dropped_by,
        "redelivery_dropped_after_s": round(time.time() - killed_at, 3),
    }
    wait_running()


def phase_kill_leader(rig: Rig, cluster: Cluster) -> None:
    """2. kill -9 of the leader: a standby takes over."""
    fault = cluster.kill9(replace=True)
    assert fault.new_epoch == fault.old_epoch + 1, fault
    assert fault.within_bound, fault
    rig.notes["kill_leader"] = {"failover_s": fault.failover_s, "bound_s": CRASH_BOUND}
    wait_running()


def phase_broker_restart(rig: Rig, cluster: Cluster) -> None:
    """3. Redis restarted: the runs whose enqueue failed while it was down are recorded Lost
    (the final audit checks every one), and the runs it dropped (queued, unacknowledged) are
    recorded Lost by the dispatch timeout; every scheduler survives, every worker reconnects."""
    workers = rig.live_workers()
    connected = {w.name: w.text().count(cw.CONNECTED) for w in workers}
    failed_before = len(cw.enqueue_failures(rig.scheduler_logs()))
    t0 = time.monotonic()
    rig.redis.stop()
    try:  # down until a fire time came due and its enqueue failed (an event, not a pause)
        cw.wait_until(
            lambda: len(cw.enqueue_failures(rig.scheduler_logs())) > failed_before,
            timeout=20,
            what="an enqueue failing in the leader",
        )
    finally:
        rig.redis.start()
    down_s = time.monotonic() - t0

    def settled(worker: cw.Worker) -> bool:
        """Reconnected (Celery retries after 2 s, then 4 s, ...), or exited."""
        return not worker.alive() or worker.text().count(cw.CONNECTED) > connected[worker.name]

    cw.wait_until(
        lambda: all(settled(w) for w in workers),
        timeout=30,
        what="every worker reconnected to the new Redis",
    )
    crashed = [w for w in workers if not w.alive()]
    for worker in crashed:
        # Celery 5.7 / kombu 5.7: a worker holding unacknowledged messages (a running
        # acks_late task) when the Redis connection drops dies in its connection cleanup
        # ("Unrecoverable error: AttributeError(... 'hostname')"), after its running tasks.
        # Not this package's code: tolerated with exactly that signature, and the worker is
        # restarted as its supervisor would; its runs must still be recorded (the audit).
        assert cw.CELERY_RESTART_CRASH in worker.text(), (
            f"worker {worker.name} died with the broker:\n{worker.tail()}"
        )
        worker.kill()  # its pool children, if any are left
    if crashed:
        rig.start_workers(*(f"{w.name}r" for w in crashed))
    wait_running(timeout=45)
    assert cluster.alive_all(), "a scheduler died with the broker"
    rig.notes["broker_restart"] = {
        "down_s": round(down_s, 3),
        "enqueue_failures": len(cw.enqueue_failures(rig.scheduler_logs())) - failed_before,
        "workers_crashed_in_celery": [w.name for w in crashed],
        "workers_survived": [w.name for w in workers if w not in crashed],
    }


def phase_workers_stopped(rig: Rig, cluster: Cluster) -> None:
    """4. No worker for longer than the dispatch timeout: the queued runs become Lost."""
    from django_apscheduler_obs.models import DjangoJobExecution as EX

    leader, _ = cluster.leader()
    lost_before = _lost_metrics(leader)
    stopped_at = datetime.fromtimestamp(time.time(), tz=UTC)
    t0 = time.monotonic()
    live = rig.live_workers()
    for worker in live:  # all at once, then each waited for
        worker.terminate()
    for worker in live:
        worker.stop()
    cw.wait_until(
        lambda: _metric(leader, "apscheduler_remote_runs", state="queued") >= 1,
        timeout=10,
        what="queued runs in the leader's apscheduler_remote_runs",
    )

    def lost_each() -> bool:
        rows = _rows(job_id__in=FAST, status=EX.LOST, run_time__gte=stopped_at)
        timed_out = {
            r.job_id for r in rows if (r.exception or "").startswith(cw.DISPATCH_TIMED_OUT)
        }
        return timed_out == set(FAST)

    cw.wait_until(lost_each, timeout=DISPATCH_TIMEOUT + 15, what="runs of every job marked Lost")
    current, _ = cluster.leader()
    same = current is leader

    def counted() -> bool:
        now = _lost_metrics(current)
        return all(now[j] > (lost_before[j] if same else 0) for j in FAST)

    cw.wait_until(counted, timeout=10, what="apscheduler_job_lost_runs_total on the leader")
    lost_after = _lost_metrics(current)
    stopped_s = time.monotonic() - t0
    assert stopped_s > DISPATCH_TIMEOUT
    rig.start_workers("w4", "w5")
    wait_running(timeout=30)
    rig.notes["workers_stopped"] = {
        "stopped_s": round(stopped_s, 3),
        "lost_metric_before": lost_before,
        "lost_metric_after": lost_after,
        "same_leader": same,
    }


def phase_redelivered_while_running(rig: Rig, cluster: Cluster) -> None:
    """5. A run longer than the visibility timeout: Redis redelivers it while it runs."""
    from django_apscheduler_obs.handoff import RunMessage
    from django_apscheduler_obs.models import DjangoJobExecution as EX

    fire = float(int(time.time()) + 2)
    rig.add_one_off("long", fire, LONG_SECONDS)
    row = cw.wait_until(
        lambda: next(iter(_rows(job_id="long", status=EX.PICKED_UP)), None),
        timeout=20,
        what="the long run picked up",
    )
    picked = time.monotonic()
    cw.wait_until(
        lambda: rig.drops_of(row.id) >= 1,
        timeout=LONG_SECONDS + 15,
        what=f"the redelivery of the long run #{row.id} dropped",
    )
    redelivered_s = time.monotonic() - picked
    # The copy came while the run went on (its ack, after the run, would have ended it).
    assert _rows(id=row.id)[0].status == EX.PICKED_UP, "the redelivery came after the run"
    done = cw.wait_until(
        lambda: next(iter(_rows(id=row.id, status__in=EX.FINAL_STATUSES)), None),
        timeout=LONG_SECONDS + 15,
        what="the long run final",
    )
    assert done.status == EX.SUCCESS, (done.status, done.exception)
    assert _ledger("long", done.run_time) == 1
    # And a duplicate publish of a finished run: dropped as well.
    executed = _rows(job_id=FAST[0], status=EX.SUCCESS)[-1]
    message = RunMessage(executed.id, executed.job_id, executed.run_time).to_dict()
    cw.publish_again(rig.queue, message)
    cw.wait_until(
        lambda: rig.drops_of(executed.id) >= 1,
        timeout=20,
        what=f"the duplicate publish of run #{executed.id} dropped",
    )
    assert _ledger(executed.job_id, executed.run_time) == 1
    # The leader counts the workers' runs in the series local runs use.
    leader, _ = cluster.leader()
    success = {"job_id": FAST[0], "outcome": "success", "error_type": ""}
    cw.wait_until(
        lambda: _metric(leader, "apscheduler_job_runs_total", **success) > 0,
        timeout=10,
        what="remote runs in the leader's apscheduler_job_runs_total",
    )
    rig.notes["redelivered_while_running"] = {
        "run": row.id,
        "dropped_after_pickup_s": round(redelivered_s, 3),
        "duplicate_publish_of": executed.id,
    }


def test_chaos_workers_timeline(rig: Rig) -> None:
    t0 = time.monotonic()
    rig.start_workers("w1", "w2")
    cluster = rig.start_cluster(3)
    wait_running(timeout=rig.start - time.time() + 20)
    phases = {}
    for phase in (
        phase_kill_worker_mid_run,
        phase_kill_leader,
        phase_broker_restart,
        phase_workers_stopped,
        phase_redelivered_while_running,
    ):
        t = time.monotonic()
        phase(rig, cluster)
        phases[phase.__name__] = round(time.monotonic() - t, 1)
    audit = _final_audit(rig)
    alive = cluster.alive_all() and all(w.alive() for w in rig.workers[-2:])
    report = cluster.report(
        None,
        worker_audit=asdict(audit),
        alive=alive,
        phases_s=phases,
        total_s=round(time.monotonic() - t0, 1),
        **rig.notes,
    )
    _save(rig, "chaos-workers-timeline", report)

    assert alive, "a scheduler or a worker died"
    assert audit.ok, report
    assert audit.fire_times >= 2 * 25
    assert audit.statuses.get("Lost"), "enqueue failures and the dispatch timeout leave Lost runs"
    assert audit.statuses.get("Abandoned"), "the run killed mid-way is recorded Abandoned"
    assert audit.enqueue_failures >= 1, "the broker restart made enqueues fail"
    assert audit.lost_reasons.get("dispatch timeout"), audit.lost_reasons
    assert audit.redeliveries >= 1 and audit.drops >= 3, audit
    # The publish log is what "one publish per fire time" rests on: it must see the runs.
    # (A leader killed between its publish and the log line would leave one unlogged.)
    assert len(audit.executed_unpublished) <= 1, audit.executed_unpublished


def test_negative_control_without_pickup_redeliveries_run_twice(rig: Rig) -> None:
    """DAO_UNSAFE_NO_PICKUP=1 (test-only hook): the workers run every delivery, so the same
    redelivery and duplicate publish as in the timeline must show in the audit."""
    from django_apscheduler_obs.handoff import RunMessage
    from django_apscheduler_obs.models import DjangoJobExecution as EX
    from tests.testapp.models import Ledger

    rig.start_workers("u1", "u2", unsafe=True)
    cluster = rig.start_cluster(1)
    wait_running(timeout=rig.start - time.time() + 20)
    executed = _rows(job_id=FAST[0], status=EX.SUCCESS)[-1]
    cw.publish_again(rig.queue, RunMessage(executed.id, FAST[0], executed.run_time).to_dict())
    fire = float(int(time.time()) + 2)
    rig.add_one_off("long", fire, LONG_SECONDS)
    long_time = datetime.fromtimestamp(fire, tz=UTC)

    def twice(job_id: str, run_time: datetime) -> bool:
        return _db_retry(
            lambda: Ledger.objects.filter(job_id=job_id, run_time=run_time).count() >= 2
        )

    cw.wait_until(
        lambda: twice(FAST[0], executed.run_time),
        timeout=20,
        what="the duplicate publish run twice",
    )
    cw.wait_until(
        lambda: twice("long", long_time),
        timeout=2 * LONG_SECONDS + 20,
        what="the redelivered long run run twice",
    )
    audit = _final_audit(rig)
    report = cluster.report(None, worker_audit=asdict(audit))
    _save(rig, "chaos-workers-negative-no-pickup", report)
    assert not audit.ok, "the audit must see the double runs"
    assert audit.duplicates >= 2, report
    assert f"long@{long_time.isoformat()}" in audit.duplicated, audit.duplicated
    assert f"{FAST[0]}@{executed.run_time.astimezone(UTC).isoformat()}" in audit.duplicated
