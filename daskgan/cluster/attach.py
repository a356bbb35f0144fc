"""``daskgan attach``: follow a run that another client drives, live, from its records as rank 0 publishes them."""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Iterator

from daskgan.errors import NotFound
from daskgan.lease import held_lease
from daskgan.run.records import topic

POLL_S = 1.0


def follow(client: Any, run_url: str) -> Iterator[dict[str, Any]]:
    """Yield the run's records as they are published, until its driver lets go (finished or stopped)."""
    lease = held_lease(client, run_url)
    if lease is None:
        raise NotFound(f"{run_url} has no live driver on this cluster: nothing to attach to (daskgan status "
                       f"shows where it stands)")
    records: queue.Queue = queue.Queue()
    name = topic(run_url)
    client.subscribe_topic(name, lambda event: records.put(event[1]))
    try:
        while True:
            try:
                yield records.get(timeout=POLL_S)
            except queue.Empty:
                if held_lease(client, run_url) is None:
                    break
        while not records.empty():
            yield records.get()
    finally:
        client.unsubscribe_topic(name)


def attach(client: Any, run_url: str, on_record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Follow the run until its driver lets go; returns the last record seen and how long it was followed."""
    started, last = time.monotonic(), {}
    total = (held_lease(client, run_url) or {}).get("iterations", 0)
    for record in follow(client, run_url):
        last = record
        on_record({**record, "iterations": total})
    return {"last_record": last, "iterations": total, "followed_s": time.monotonic() - started}
