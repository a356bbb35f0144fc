"""Workers joining the cluster, as the scheduler sees them: the driver grows a run that lost workers back to its
size when new ones join (``cluster.driver``), told by an event rather than by polling the scheduler."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

TOPIC = "daskgan-worker-arrivals"


class AnnounceArrivals(SchedulerPlugin):
    """On the scheduler: publish each worker that joins as an event on ``TOPIC``."""

    idempotent = True  # one per scheduler, whichever driver registered it first
    name = "daskgan-worker-arrivals"

    def add_worker(self, scheduler: Any, worker: str) -> None:
        scheduler.log_event(TOPIC, {"worker": worker})


class Arrivals:
    """The client's side: whether a worker joined since this was last asked (``joined``)."""

    def __init__(self, client: Any):
        self._client = client
        self._count, self._seen = 0, 0
        client.register_plugin(AnnounceArrivals())
        client.subscribe_topic(TOPIC, self._arrived)

    def _arrived(self, event: Any) -> None:
        self._count += 1  # one writer (the client's event loop); joined() only reads it

    def joined(self) -> bool:
        """Whether a worker joined since the last call."""
        count = self._count
        joined, self._seen = count != self._seen, count
        return joined

    def close(self) -> None:
        self._client.unsubscribe_topic(TOPIC)
