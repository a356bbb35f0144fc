"""The client's live view of a running job: records published by rank 0 as Dask events, as they arrive."""

from __future__ import annotations

import queue
import time
from typing import Any, Iterator

from daskgan import dispatch
from daskgan.run.records import topic


class RunMonitor:
    """Client-side view of a running job: subscribe before dispatching, then iterate ``records(futures)``."""

    def __init__(self, client, run_url: str):
        self._client = client
        self._topic = topic(run_url)
        self._queue: queue.Queue = queue.Queue()
        client.subscribe_topic(self._topic, lambda event: self._queue.put(event[1]))

    def records(self, futures, poll_seconds: float = 0.5) -> Iterator[dict[str, Any]]:
        """Yield records as ranks publish them until every rank is done; then raise the first rank failure.

        The ranks are looked at every ``poll_seconds`` whether records come or not: the topic is the run's, so a
        driver whose ranks stopped (taken over while it slept) would otherwise follow its successor's records for
        as long as they come. Only the records already queued when the ranks ended follow them."""
        looked_at = time.monotonic()
        while True:
            try:
                yield self._queue.get(timeout=poll_seconds)
            except queue.Empty:
                pass
            if time.monotonic() - looked_at >= poll_seconds:
                if all(f.done() for f in futures) or dispatch.has_failed(futures):
                    break
                looked_at = time.monotonic()
        for _ in range(self._queue.qsize()):
            yield self._queue.get()
        dispatch.results(futures)

    def close(self) -> None:
        self._client.unsubscribe_topic(self._topic)
