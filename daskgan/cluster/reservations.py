"""Runs that share a cluster: a reservation book on the scheduler grants each run its own workers, or queues it.

The book is a scheduler plugin (``BookPlugin``, registered idempotently by every driver that reserves) holding,
per run: the workers asked and granted, its priority and since when it waits. Every change happens on the
scheduler's event loop (through ``run_on_scheduler``), one at a time, so two drivers never get the same worker.
Queued runs are granted in order: higher ``priority`` first, first come first served within a priority; the head
of the queue waits for enough free workers (no run jumps ahead of it). A worker that leaves frees its slot; a run
holding fewer workers than it asked (it lost some) is topped up from the free ones before any queued run starts.
A run's entry lasts as long as its driver's lease (``daskgan.lease``): released, taken by another driver, or
silent as long as its ranks wait before they stop (the driver killed), the run's workers go back to the pool and
the queue advances.
The workers of a dispatch are the ones granted (``dispatch.run(workers=...)`` pins each rank to its worker).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from daskgan.lease import Heartbeat, metadata_key, ranks_stop_after_s

logger = logging.getLogger(__name__)

NAME = "daskgan-reservations"
LEASE_CHECK_S = 1.0  # how often the book looks at the leases of its runs' drivers
POLL_S = 0.5  # how often a queued driver asks the book


@dataclass
class Entry:
    """One run in the book: queued while ``granted`` is empty and ``started`` false."""

    run_url: str
    asked: int
    token: str  # the run's driver lease: the entry lives as long as it does
    priority: int
    since: float  # wall clock, for people: when the run joined the queue
    order: int  # first come, first served within a priority
    granted: list[str] = field(default_factory=list)
    started: bool = False
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # how long the driver's lease has been still


class Book:
    """The book's state and rules, apart from the scheduler (``BookPlugin`` feeds it the workers and leases)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.removed: dict[str, str] = {}  # run_url -> token of a queued run that `daskgan stop` removed
        self._orders = 0

    def reserve(self, run_url: str, asked: int, token: str, priority: int, present: set[str],
                excluded: tuple[str, ...] = ()) -> dict[str, Any]:
        """Ask for ``asked`` workers for the run (again: a poll, or a top-up after lost workers, leaving out
        ``excluded`` ones that may linger); returns where the run stands (``view``)."""
        if self.removed.get(run_url) == token:
            del self.removed[run_url]
            return {"state": "removed"}
        entry = self.entries.get(run_url)
        if entry is None or entry.token != token:
            self._orders += 1
            entry = self.entries[run_url] = Entry(run_url, asked, token, priority, time.time(), self._orders)
        entry.granted = [worker for worker in entry.granted if worker not in excluded]
        self.advance(present - set(excluded))
        return self.view(run_url, present)

    def release(self, run_url: str, token: str, present: set[str]) -> None:
        """The run ended: its workers go back to the pool."""
        if run_url in self.entries and self.entries[run_url].token == token:
            del self.entries[run_url]
            self.advance(present)

    def remove_queued(self, run_url: str) -> bool:
        """Take a queued run out of the queue (``daskgan stop``); False if it is not queued."""
        entry = self.entries.get(run_url)
        if entry is None or entry.started:
            return False
        self.removed[run_url] = entry.token
        del self.entries[run_url]
        return True

    def worker_left(self, worker: str) -> None:
        for entry in self.entries.values():
            if worker in entry.granted:
                entry.granted.remove(worker)
                logger.warning("worker %s of %s left the cluster", worker, entry.run_url)

    def advance(self, present: set[str]) -> None:
        """Grant free workers: first to started runs short of their workers, then to the queue in order."""
        free = sorted(present - {w for entry in self.entries.values() for w in entry.granted})
        for entry in sorted(self.entries.values(), key=lambda e: (not e.started, -e.priority, e.order)):
            missing = entry.asked - len(entry.granted)
            if entry.started and missing > 0:
                entry.granted += free[:missing]
                free = free[missing:]
            elif not entry.started:
                if missing > len(free):
                    return  # the head of the queue waits for its workers; nothing jumps ahead of it
                entry.granted, entry.started, free = free[:missing], True, free[missing:]
                logger.info("granted %s to %s", ", ".join(entry.granted), entry.run_url)

    def queue(self) -> list[Entry]:
        """The queued runs, in the order they will start."""
        return sorted((e for e in self.entries.values() if not e.started), key=lambda e: (-e.priority, e.order))

    def view(self, run_url: str, present: set[str]) -> dict[str, Any]:
        """Where the run stands, as plain data: ``granted`` (its workers) or ``queued`` (its position from 1, the
        free workers, and the runs holding the others)."""
        entry = self.entries[run_url]
        if entry.started:
            return {"state": "granted", "workers": list(entry.granted)}
        held = {e.run_url: list(e.granted) for e in self.entries.values() if e.started}
        return {"state": "queued", "position": self.queue().index(entry) + 1, "asked": entry.asked,
                "free": len(present) - sum(map(len, held.values())), "cluster": len(present), "holders": held}

    def listing(self) -> dict[str, list[dict[str, Any]]]:
        """Every run in the book as plain data: ``queued`` (position, workers asked, waiting since) and
        ``granted`` (workers)."""
        queued = [{"run_url": e.run_url, "position": i + 1, "asked": e.asked, "priority": e.priority,
                   "since": e.since} for i, e in enumerate(self.queue())]
        granted = [{"run_url": e.run_url, "asked": e.asked, "workers": list(e.granted), "priority": e.priority}
                   for e in self.entries.values() if e.started]
        return {"queued": queued, "granted": sorted(granted, key=lambda run: run["run_url"])}

    def expire(self, leases: dict[str, Any], present: set[str]) -> None:
        """Drop the runs whose driver let go of its lease, lost it to another driver, or went silent as long as
        its ranks wait before they stop (``recovery.driver_timeout_s``: a heartbeat late under load frees nothing
        still training); ``leases``: each run's lease as the scheduler holds it now."""
        for entry in list(self.entries.values()):
            lease = leases.get(entry.run_url)
            if lease is not None and lease.get("token") == entry.token:
                if entry.heartbeat.silent_for(lease) <= ranks_stop_after_s(lease):
                    continue
            logger.warning("the driver of %s let go or went silent: its workers go back to the pool", entry.run_url)
            del self.entries[entry.run_url]
        self.advance(present)


class BookPlugin(SchedulerPlugin):
    """The book on the scheduler: fed workers leaving and joining, and the drivers' leases every
    ``LEASE_CHECK_S``."""

    idempotent = True  # one per scheduler, whichever driver registered it first
    name = NAME

    def __init__(self) -> None:
        self.book = Book()
        self.scheduler: Any = None
        self._callback: Any = None

    async def start(self, scheduler: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self._callback = PeriodicCallback(self._expire, LEASE_CHECK_S * 1000)
        self._callback.start()

    async def close(self) -> None:
        if self._callback is not None:
            self._callback.stop()

    def present(self) -> set[str]:
        """The workers the scheduler has now: the book's pool, never a list of its own that could drift."""
        return set(self.scheduler.workers)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.book.advance(self.present())

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.book.worker_left(worker)
        self.book.advance(self.present() - {worker})

    def _expire(self) -> None:
        leases = {run_url: self.scheduler.get_metadata(keys=metadata_key(run_url, "driver"), default=None)
                  for run_url in self.book.entries}
        self.book.expire(leases, self.present())


def _book(dask_scheduler: Any) -> BookPlugin | None:
    return dask_scheduler.plugins.get(NAME)


def _reserve(run_url: str, asked: int, token: str, priority: int, excluded: tuple[str, ...],
             dask_scheduler: Any = None) -> dict[str, Any]:
    plugin = _book(dask_scheduler)
    return plugin.book.reserve(run_url, asked, token, priority, plugin.present(), excluded)


def _release(run_url: str, token: str, dask_scheduler: Any = None) -> None:
    plugin = _book(dask_scheduler)
    if plugin is not None:
        plugin.book.release(run_url, token, plugin.present())


def _remove_queued(run_url: str, dask_scheduler: Any = None) -> bool:
    plugin = _book(dask_scheduler)
    return plugin is not None and plugin.book.remove_queued(run_url)


def _listing(dask_scheduler: Any = None) -> dict[str, list[dict[str, Any]]]:
    plugin = _book(dask_scheduler)
    return plugin.book.listing() if plugin is not None else {"queued": [], "granted": []}


def listing(client: Any) -> dict[str, list[dict[str, Any]]]:
    """The book's queued runs (position, workers asked, waiting since) and granted ones (their workers)."""
    return client.run_on_scheduler(_listing)


def remove_queued(client: Any, run_url: str) -> bool:
    """Take the run out of the queue, if it is queued; its driver then ends without training."""
    return client.run_on_scheduler(_remove_queued, run_url)


class Removed(Exception):
    """The run was taken out of the queue (``daskgan stop``) while its driver waited."""


class Reservation:
    """A driver's side: the run's workers, from the book."""

    def __init__(self, client: Any, run_url: str, asked: int, token: str, priority: int = 0):
        self.client, self.run_url, self.asked, self.token, self.priority = client, run_url, asked, token, priority
        client.register_plugin(BookPlugin())

    def ask(self, excluded: tuple[str, ...] = ()) -> dict[str, Any]:
        """Where the run stands in the book now (asking for its workers, or for the missing ones)."""
        return self.client.run_on_scheduler(_reserve, self.run_url, self.asked, self.token, self.priority,
                                            tuple(excluded))

    def wait(self, excluded: tuple[str, ...] = ()) -> list[str]:
        """The run's workers, once granted; until then it waits in the queue, logging its position and what it
        waits for whenever that changes. Raises ``Removed`` if taken out of the queue."""
        logged = None
        while (answer := self.ask(excluded))["state"] == "queued":
            said = waiting_line(self.run_url, answer)
            if said != logged:
                logger.info("%s", said)
                logged = said
            time.sleep(POLL_S)
        if answer["state"] == "removed":
            raise Removed(f"{self.run_url} was taken out of the queue (daskgan stop) before it started")
        return answer["workers"]

    def at_least(self, count: int, excluded: tuple[str, ...], wait_s: float) -> list[str]:
        """The run's workers once it holds ``count`` (after lost ones, ``excluded``: topped up from the free
        pool, ahead of queued runs), waiting up to ``wait_s`` for others to free theirs."""
        deadline = time.monotonic() + wait_s
        while len(granted := self.wait(excluded)) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"only {len(granted)} of {count} workers free for {self.run_url} within "
                                   f"{wait_s:.0f}s: other runs hold the rest (set recovery.min_workers to continue "
                                   "with fewer)")
            time.sleep(POLL_S)
        return granted[:count]

    def release(self) -> None:
        """The run ended (finished, failed, stopped, interrupted): its workers go to the next queued run now,
        not when the book notices the released lease."""
        self.client.run_on_scheduler(_release, self.run_url, self.token)


def waiting_line(run_url: str, answer: dict[str, Any]) -> str:
    """What a queued driver logs: its position, the workers it asked, and what holds the others."""
    holders = "; ".join(f"{run} has {len(workers)}" for run, workers in sorted(answer["holders"].items()))
    short = (f" (the cluster has only {answer['cluster']} workers: more must join)"
             if answer["asked"] > answer["cluster"] else "")
    return (f"{run_url} queued at position {answer['position']} for {answer['asked']} workers{short}: "
            f"{answer['free']} of {answer['cluster']} free{'; ' + holders if holders else ''}")
