"""``sinks.commits.GroupCommit``: final writes of concurrent runs share a commit, each run
returns only once its own write is committed, and a failed batch costs nobody their write."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
from django.db import DatabaseError, connection, connections, transaction

from django_apscheduler_obs.models import DjangoJobExecution
from django_apscheduler_obs.sinks.commits import GroupCommit
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def _rows(n: int) -> list[int]:
    return [
        DjangoJobExecution.objects.create(
            job_id="j", run_time=T0 + timedelta(seconds=i), status=DjangoJobExecution.SENT
        ).pk
        for i in range(n)
    ]


def _finish(pk: int) -> Callable[[], None]:
    def write() -> None:
        DjangoJobExecution.objects.filter(pk=pk).update(status=DjangoJobExecution.SUCCESS)

    return write


class Writers:
    """Threads that each hand one write to the group and record what ``run`` raised."""

    def __init__(self, group: GroupCommit) -> None:
        self.group = group
        self.threads: list[threading.Thread] = []
        self.errors: dict[int, BaseException | None] = {}

    def start(self, key: int, write: Callable[[], None]) -> None:
        def target() -> None:
            try:
                self.group.run(write)
                self.errors[key] = None
            except BaseException as exc:  # noqa: BLE001 - recorded for the test
                self.errors[key] = exc
            finally:
                connections.close_all()

        thread = threading.Thread(target=target)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive()


def _held_leader(group: GroupCommit, writers: Writers, pk: int) -> threading.Event:
    """A first writer that commits alone and holds the group until released."""
    entered, release = threading.Event(), threading.Event()

    def slow() -> None:
        entered.set()
        assert release.wait(10)
        _finish(pk)()

    writers.start(-1, slow)
    assert entered.wait(10)
    return release


def test_writes_that_arrive_during_a_commit_share_the_next_one():
    group = GroupCommit(lambda: "default")
    first, *rest = _rows(6)
    writers = Writers(group)
    release = _held_leader(group, writers, first)
    for i, pk in enumerate(rest):
        writers.start(i, _finish(pk))
    wait_for(lambda: len(group._queue) == len(rest), message="the writers to queue")
    assert DjangoJobExecution.objects.filter(status=DjangoJobExecution.SUCCESS).count() == 0
    release.set()
    writers.join()
    assert all(error is None for error in writers.errors.values())
    assert group.commits == 2 and group.writes == 6  # the first alone, the other five together
    assert DjangoJobExecution.objects.filter(status=DjangoJobExecution.SUCCESS).count() == 6


def test_a_write_does_not_return_before_its_commit():
    group = GroupCommit(lambda: "default")
    first, second = _rows(2)
    writers = Writers(group)
    release = _held_leader(group, writers, first)
    writers.start(0, _finish(second))
    wait_for(lambda: len(group._queue) == 1, message="the second writer to queue")
    assert 0 not in writers.errors  # still waiting: its write has not been committed
    release.set()
    writers.join()
    assert writers.errors[0] is None
    assert DjangoJobExecution.objects.get(pk=second).status == DjangoJobExecution.SUCCESS


def test_a_failed_batch_costs_only_the_failing_write():
    group = GroupCommit(lambda: "default")
    first, *rest = _rows(4)
    writers = Writers(group)
    release = _held_leader(group, writers, first)
    attempts = []

    def broken() -> None:
        attempts.append(1)
        raise DatabaseError("this write fails wherever it runs")

    writers.start(0, _finish(rest[0]))
    writers.start(1, broken)
    writers.start(2, _finish(rest[1]))
    wait_for(lambda: len(group._queue) == 3, message="the writers to queue")
    release.set()
    writers.join()
    assert isinstance(writers.errors[1], DatabaseError)  # raised in its own thread
    assert writers.errors[0] is None and writers.errors[2] is None
    assert len(attempts) == 2  # in the batch, then alone
    done = DjangoJobExecution.objects.filter(status=DjangoJobExecution.SUCCESS)
    assert set(done.values_list("pk", flat=True)) == {first, rest[0], rest[1]}
    # The group keeps working after the failure.
    group.run(_finish(rest[2]))
    assert DjangoJobExecution.objects.get(pk=rest[2]).status == DjangoJobExecution.SUCCESS


def test_inside_a_callers_transaction_the_write_is_the_callers():
    group = GroupCommit(lambda: "default")
    [pk] = _rows(1)
    with pytest.raises(RuntimeError), transaction.atomic():
        group.run(_finish(pk))
        raise RuntimeError
    assert DjangoJobExecution.objects.get(pk=pk).status == DjangoJobExecution.SENT
    assert group.commits == 0
    assert connection.in_atomic_block is False
