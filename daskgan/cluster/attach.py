"""``daskgan attach``: follow a run that another client drives, live, from its records as rank 0 publishes them."""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Generator

from daskgan.errors import NotFound
from daskgan.lease import Heartbeat, held_lease, ranks_stop_after_s
from daskgan.run.records import topic

POLL_S = 1.0


def follow(client: Any, run_url: str) -> Generator[dict[str, Any], None, str]:
    """Yield the run's records as they are published until its driver lets go (finished or stopped: returns
    ``released``) or its heartbeat has been still as long as its ranks wait before they checkpoint and stop
    (``recovery.driver_timeout_s``: the driver killed or cut off; returns ``stale``)."""
    if held_lease(client, run_url) is None:
        raise NotFound(f"{run_url} has no live driver on this cluster: nothing to attach to (daskgan status "
                       f"shows where it stands)")
    records: queue.Queue = queue.Queue()
    name = topic(run_url)
    client.subscribe_topic(name, lambda event: records.put(event[1]))
    heartbeat, checked_at = Heartbeat(), time.monotonic()
    try:
        while True:
            try:
                yield records.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if time.monotonic() - checked_at >= POLL_S:
                checked_at, held = time.monotonic(), held_lease(client, run_url)
                if held is None or heartbeat.silent_for(held) > ranks_stop_after_s(held):
                    break
        while not records.empty():
            yield records.get()
        return "released" if held is None else "stale"
    finally:
        client.unsubscribe_topic(name)


def attach(client: Any, run_url: str, on_record: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Follow the run until its driver lets go or goes stale; returns the last record seen, how long it was
    followed, how it ended (``released`` or ``stale``) and the driver."""
    started, last = time.monotonic(), {}
    lease = held_lease(client, run_url) or {}
    records = follow(client, run_url)
    while True:
        try:
            last = next(records)
        except StopIteration as end:
            return {"last_record": last, "iterations": lease.get("iterations", 0), "ended": end.value,
                    "driver": lease.get("driver"), "followed_s": time.monotonic() - started}
        on_record({**last, "iterations": lease.get("iterations", 0)})
