"""A window of single-image fetches that stays full while some images wait for their retry.

Throttled storage (S3's 503 SlowDown, a 500 now and then) fails a share of requests at random. Fetching a chunk of
images together and retrying its failed ones holds every image behind them until the slowest retry ends (see
``benchmarks/throttle.py``: with 20% of GETs failing, several times slower). Here each image is fetched on its
own, at most ``in_flight`` at a time, the earliest requested first; an image that fails transiently gives its slot
back while it waits for its retry, and the images after it are fetched meanwhile, so a caller waits only for the
images it takes.

A retry's wait grows with the storage's failures in a row (any answer resets them), not with the image's own:
under random throttling the storage keeps answering and the waits stay short; a storage that answers nothing sees
every wait grow as botocore's would. Each image still gives up after its tries or its time (``StorageUnavailable``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from daskgan.data.index import Fetch, Settled, settled
from daskgan.errors import first_line
from daskgan.run import storage

RETRY_BASE_S = 0.05  # the first retry's wait (at most; full jitter), doubling with each failure in a row
WARN_IN_A_ROW = 16  # failures in a row that are logged (more than random throttling makes): the storage may be down
logger = logging.getLogger(__name__)


class FetchWindow:
    """``tickets = window.request(paths)`` starts fetching; ``window.take(tickets)`` waits for those images only.
    ``close()`` it."""

    def __init__(self, url: str, fetch: Fetch, in_flight: int, tries: int, seconds: float):
        """``fetch(paths)``: the images' bytes or errors by path (asked one path at a time); ``tries`` and
        ``seconds``: how often and how long one image is fetched before the storage is taken for unavailable."""
        self.url, self._fetch, self._tries, self._seconds = url, fetch, tries, seconds
        self.retried = 0  # fetches tried again after a transient storage error
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="daskgan-fetch")
        self._slots = in_flight
        self._changed = threading.Condition()
        self._queued: list[tuple[int, str]] = []  # (ticket, path) waiting for a slot, the earliest ticket first
        self._sleeping: list[tuple[float, int, str]] = []  # (when, ticket, path) waiting for their retry
        self._backoffs: dict[int, storage.Backoff] = {}
        self._settled: dict[int, Settled] = {}
        self._tickets = itertools.count()
        self._busy = self._failures_in_a_row = self._untaken = 0
        self._error: BaseException | None = None  # refused credentials, or an image out of tries
        self._closed = False
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="daskgan-fetch-window")
        self._dispatcher.start()

    def __len__(self) -> int:
        """Images requested and not yet taken."""
        return self._untaken

    def request(self, paths: list[str]) -> list[int]:
        """Start fetching ``paths`` (after those requested before); returns their tickets for ``take``."""
        with self._changed:
            tickets = [next(self._tickets) for _ in paths]
            for ticket, path in zip(tickets, paths):
                heapq.heappush(self._queued, (ticket, path))
            self._untaken += len(paths)
            self._changed.notify_all()
        return tickets

    def take(self, tickets: list[int]) -> list[Settled]:
        """The requested images, once every one is settled; raises what stopped the window."""
        with self._changed:
            self._changed.wait_for(lambda: self._error is not None or all(t in self._settled for t in tickets))
            if self._error is not None:
                raise self._error
            self._untaken -= len(tickets)
            return [self._settled.pop(ticket) for ticket in tickets]

    def close(self) -> None:
        """Stop fetching; a ``take`` still waiting raises (its stream is closing)."""
        with self._changed:
            self._closed = True
            self._error = self._error or RuntimeError(f"the fetches from {self.url} were stopped")
            self._changed.notify_all()
        self._dispatcher.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        """Hand free slots to the earliest images waiting for one, their retries included once due."""
        with self._changed:
            while not self._closed:
                now = time.monotonic()
                while self._sleeping and self._sleeping[0][0] <= now:
                    _, ticket, path = heapq.heappop(self._sleeping)
                    heapq.heappush(self._queued, (ticket, path))
                while self._queued and self._busy < self._slots:
                    self._busy += 1
                    self._pool.submit(self._attempt, *heapq.heappop(self._queued))
                self._changed.wait(self._sleeping[0][0] - now if self._sleeping else None)

    def _attempt(self, ticket: int, path: str) -> None:
        """Fetch one image once; settle it, or put it to sleep until its retry."""
        try:
            value = self._fetch([path]).get(path, FileNotFoundError(path))
        except Exception as error:  # a fetch that raises instead of returning the error: the same to judge
            value = error
        with self._changed:
            self._busy -= 1
            try:
                outcome = settled(self.url, value)
                if outcome is None:
                    self._retry_later(ticket, path, value)
                else:
                    self._settled[ticket] = outcome
                    self._backoffs.pop(ticket, None)
                    self._failures_in_a_row = 0
            except Exception as error:  # refused credentials, or out of tries: the taker raises it
                self._error = self._error or error
            self._changed.notify_all()

    def _retry_later(self, ticket: int, path: str, error: BaseException) -> None:
        self._failures_in_a_row += 1
        backoff = self._backoffs.setdefault(ticket, storage.Backoff(self._tries, self._seconds, RETRY_BASE_S))
        delay = backoff.next_delay(f"reading {path} under {self.url}", error, in_a_row=self._failures_in_a_row)
        self.retried += 1
        heapq.heappush(self._sleeping, (time.monotonic() + delay, ticket, path))
        in_a_row = self._failures_in_a_row
        if in_a_row >= WARN_IN_A_ROW and in_a_row & (in_a_row - 1) == 0:  # 16, 32, 64...: not every throttled GET
            logger.warning("%s: %d fetches in a row failed, the last (%s) with %s: %s; tried again in %.1fs",
                           self.url, in_a_row, path, type(error).__name__, first_line(error), delay)
