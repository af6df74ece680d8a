"""Group commit: one process's concurrent updates of one record, made in one locked write.

When many requests carry one cookie, every update of that session queues for
the same file lock, and each pays for a whole locked read-modify-write while
the rest wait.  Under gunicorn's ``gthread`` workers each wait also costs a
round of the GIL: the waiter sleeps, is woken, and must win the GIL back, and
the writer holding the lock gives the GIL up for each of its system calls.

Here the threads of one process that update one record at the same time form
a batch instead.  The first one leads; those that come while it writes queue
behind it.  Those that queued while it waited for the file's lock (held by
another process's writer, as a shared cookie's is half the time under two
workers) join its write once it has the lock (:meth:`GroupCommit.joined`).
When the leader's write is done it wakes its batch, and makes everything that
queued meanwhile as the next batch: all of it in one read-modify-write under
the file lock.  After :data:`LEAD_LIMIT` batches it hands what is queued to
the first of them, which leads from there.

The updates of a batch are applied one after another, in the order they
queued, and each caller gets the record as its own update left it: what a lock
taken by each in turn would have given it.  An update that raises fails alone,
and the next goes on from the record before it.  A caller returns only once
the write that holds its update is done, so nothing is acknowledged before it
is stored; if that write fails, every caller of the batch gets its error.

The Redis store batches the same way under gevent (:mod:`.redis`): there a
*job* is one request's commands, its key the connection pool of one Redis, and
a batch goes down one connection as one pipeline.

Written here because no library does it: ``concurrent.futures`` hands work to
other threads but does not merge it, and a writer thread would add a hand-off
to every write, contended or not.  An update that meets no other costs three
uncontended acquisitions of one mutex here (to queue, to take what joined, to close).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from functools import partial
from typing import Any, Generic, TypeVar

from .awake import gevent_patched, spin
from .base import Change, Record


class Job:
    """One caller's part of a batch: whether it failed, and what it waits on."""

    __slots__ = ("_wake", "batch", "error")

    #: Held until this queued job is done, or is to lead the next batch.
    _wake: threading.Lock

    def __init__(self) -> None:
        #: What this job raised instead, or what its batch's write raised.
        self.error: BaseException | None = None
        #: Set on a queued job that is to lead the next batch: that batch, itself first.
        self.batch: list[Any] | None = None

    def raise_error(self) -> None:
        """Raise the error that stopped this job, if one did."""
        if self.error is not None:
            raise self.error


class Update(Job):
    """One caller's update of a record, and what came of it."""

    __slots__ = ("change", "create", "record", "ttl")

    def __init__(self, change: Change, ttl: int, create: bool) -> None:
        super().__init__()
        self.change = change
        self.ttl = ttl
        self.create = create
        #: The record as this update left it; None if there was none and it may not create one.
        self.record: Record | None = None

    def result(self) -> Record | None:
        """The record as this update left it, or raise the error that stopped it."""
        self.raise_error()
        return self.record


J = TypeVar("J", bound=Job)


#: How many batches in a row one leader makes before it hands the queue on.
#: Going on saves a hand-off: the next leader would have to be woken, and win
#: the GIL back, while no one in this process could take the file's lock.
#: The bound keeps the leader's own answer from waiting long.
LEAD_LIMIT = 8

#: How long a queued update waits awake for its batch's write before it
#: sleeps (see :mod:`.awake`): a batch's write takes tens of microseconds,
#: and waking from a sleep costs as much again.  Under gthread, one shared
#: cookie ran at 0.84 of separate cookies without it, 0.85 at 50 µs, 0.92 to
#: 0.95 at 150 µs and 0.97 at 400 µs (A/Bs of 6 and 8 alternating rounds).
WAKE_SPIN_SECONDS = 400e-6


def _go_on(error: BaseException) -> BaseException | None:
    return None


def _others(batch: list[J], led: int) -> list[J]:
    """The jobs of a leader's ``led``-th batch that it answers: in its first, all but its own."""
    return batch[1:] if led == 1 else batch


class GroupCommit(Generic[J]):
    """Per process: the jobs under way on each record (or connection), and those queued behind them."""

    def __init__(
        self,
        on_wait: Callable[[], None] = lambda: None,
        give_up: Callable[[BaseException], BaseException | None] = _go_on,
        gather: Callable[[], None] | None = None,
    ) -> None:
        #: Called when a job queues behind another of the same key.
        self.on_wait = on_wait
        #: Given what a batch's write raised: the error that the jobs queued
        #: behind it fail with, unsent, or None for them to go on as a batch.
        self.give_up = give_up
        #: Called by a job that is to lead, before its first write: the jobs
        #: that come and queue meanwhile join that write.
        self.gather = gather
        self._mutex = threading.Lock()
        #: Per key being written: the jobs that came while it was.
        self._queued: dict[Hashable, list[J]] = {}

    def run(self, key: Hashable, job: J, commit: Callable[[list[J]], None]) -> J:
        """Make ``job`` through ``commit``, with any of ``key`` that come meanwhile; return it, done.

        ``commit`` makes a batch in one write, setting each job's outcome or
        error; raising means that nothing of the batch was made.
        """
        with self._mutex:
            queue = self._queued.get(key)
            if queue is None:
                self._queued[key] = []
            else:
                # A held lock wakes its one waiter when released: the lightest
                # one-shot signal in threading (an Event is a Condition, a lock and a list).
                job._wake = threading.Lock()
                job._wake.acquire()
                queue.append(job)
        if queue is not None:
            self.on_wait()
            if gevent_patched("threading") or not spin(partial(job._wake.acquire, False), WAKE_SPIN_SECONDS):
                job._wake.acquire()
            if job.batch is None:
                return job  # done, in a batch another job led
        batch = job.batch or [job]
        if self.gather is not None:
            self.gather()
            batch += self.joined(key)
        self._lead(key, batch, commit)
        return job

    def joined(self, key: Hashable) -> list[J]:
        """Take the jobs queued behind the batch under way on ``key``, for it to make them too.

        Called by a batch's commit once it holds what it waited for (the
        file's lock): what queued meanwhile goes in the same write instead of
        waiting for another.  The commit adds them to its batch, which answers them.
        """
        with self._mutex:
            came, self._queued[key] = self._queued[key], []
        return came

    def _lead(self, key: Hashable, batch: list[J], commit: Callable[[list[J]], None]) -> None:
        """Make ``batch``, then what queued meanwhile, up to :data:`LEAD_LIMIT` batches; hand the rest on."""
        for led in range(1, LEAD_LIMIT + 1):
            try:
                commit(batch)  # which may add to it what joined meanwhile
            except BaseException as exc:
                # As concurrent.futures does for a future's waiters, each caller raises the one exception.
                for job in batch:
                    job.error = exc
                self._close(key, _others(batch, led), hand_on=True, error=self.give_up(exc))
                if led == 1:
                    raise
                return  # the leader's own job was made in its first batch
            batch = self._close(key, _others(batch, led), hand_on=led == LEAD_LIMIT)
            if not batch:
                return

    def _close(self, key: Hashable, answered: list[J], hand_on: bool, error: BaseException | None = None) -> list[J]:
        """Wake the ``answered``; return what queued meanwhile, for this leader to make next.

        With ``hand_on`` the queued jobs go instead to the first of them, to
        lead from there, and nothing is returned.  With an ``error`` they
        fail with it, unmade.
        """
        with self._mutex:
            queued = self._queued.pop(key)
            if queued and error is None:
                self._queued[key] = []  # still under way: newcomers queue
                if hand_on:
                    queued[0].batch = queued
        if error is not None:
            for job in queued:
                job.error = error
            answered, queued = answered + queued, []
        for job in answered:
            job._wake.release()
        if queued and hand_on:
            queued[0]._wake.release()
            return []
        return queued
