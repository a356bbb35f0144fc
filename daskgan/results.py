"""Files sent from inside a DDP function back to the client: dask-pytorch-ddp's ``results`` API on current Dask.

dask-pytorch-ddp's handler needs Dask's Pub/Sub, which ``distributed`` has removed. The same names work here::

    handler = results.DaskResultsHandler()             # on the client, before dispatching
    def train(...):                                    # inside the function run on every worker
        handler.submit_result(f"losses/{epoch}.json", json.dumps(losses))
    futures = dispatch.run(client, train)
    handler.process_results("s3://bucket/run", futures, raise_errors=True)   # any fsspec URL or local folder

Each result travels as a Dask event on the handler's topic (through the scheduler, which keeps the newest 1000
per topic: send records, grids and small files this way, and write checkpoints to storage from the rank).
``process_results`` also collects what was submitted before it started listening, and writes every file once.

For daskgan's own loop, ``load`` reads a run's records and ``RunMonitor`` follows them live.
"""

from __future__ import annotations

import logging
import queue
import uuid
from typing import Any, Iterable

from distributed import Future, get_client, get_worker

from daskgan import dispatch
from daskgan.cluster.monitor import RunMonitor
from daskgan.run import storage
from daskgan.run.records import load
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

__all__ = ["DaskResultsHandler", "RunMonitor", "load"]


class DaskResultsHandler:
    """Carries ``(path, data)`` results from ranks to the client, which writes them under a prefix.

    ``key`` names the channel (a fresh one by default); the handler is sent to the workers with the function, so
    it holds nothing but the key.
    """

    def __init__(self, key: str | None = None):
        self.key = key or uuid.uuid4().hex

    @property
    def topic(self) -> str:
        return f"daskgan-results:{self.key}"

    def submit_result(self, path: str, data: str | bytes) -> None:
        """Inside the dispatched function: have the client write ``data`` to ``<prefix>/<path>``."""
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"submit_result({path!r}, ...): data must be str or bytes, got {type(data).__name__}")
        storage.join("prefix", path)  # refuse a path that would escape the prefix here, where the caller sees it
        event = {"id": uuid.uuid4().hex, "path": path, "data": data}
        try:
            get_worker().log_event(self.topic, event)
        except ValueError:  # not on a worker: a plain script or a test calling the function directly
            get_client().log_event(self.topic, event)

    def process_results(self, prefix: str, futures: Iterable[Future], raise_errors: bool = True,
                        storage_options: StorageOptions | None = None) -> None:
        """On the client: write each result to ``<prefix>/<path>`` as it arrives, until every future is done.

        A failed future raises its exception once the results sent before it are written (``raise_errors``), or
        is logged and the other ranks are waited for.
        """
        futures = futures if isinstance(futures, list) else list(futures)
        client = futures[0].client if futures else get_client()
        arrived: queue.Queue = queue.Queue()
        client.subscribe_topic(self.topic, lambda event: arrived.put(event[1]))
        written: set[str] = set()
        try:
            self._write_logged(client, prefix, written, storage_options)  # submitted before we subscribed
            while not _finished(futures):
                self._drain(arrived, prefix, written, storage_options, timeout=0.5)
                if raise_errors and _failed(futures):
                    self._write_logged(client, prefix, written, storage_options)
                    _raise_first_failure(futures)
            self._write_logged(client, prefix, written, storage_options)  # any still on their way to us
            for future in futures:
                if future.status == "error":
                    logger.error("a rank failed (raise_errors is off): %r", future.exception())
        finally:
            client.unsubscribe_topic(self.topic)

    def _drain(self, arrived: queue.Queue, prefix: str, written: set[str], storage_options: StorageOptions | None,
               timeout: float) -> None:
        try:
            event = arrived.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._write(prefix, event, written, storage_options)
            try:
                event = arrived.get_nowait()
            except queue.Empty:
                return

    def _write_logged(self, client, prefix: str, written: set[str], storage_options: StorageOptions | None) -> None:
        """Write the results the scheduler holds for this topic that are not written yet."""
        for _, event in client.get_events(self.topic):
            self._write(prefix, event, written, storage_options)

    @staticmethod
    def _write(prefix: str, event: dict[str, Any], written: set[str], storage_options: StorageOptions | None) -> None:
        if event["id"] in written:
            return
        data = event["data"].encode() if isinstance(event["data"], str) else event["data"]
        storage.write_bytes(storage.join(prefix, event["path"]), data, storage_options)
        written.add(event["id"])


def _finished(futures: list[Future]) -> bool:
    """Every future is done, or a rank's worker left (its pinned task can never finish)."""
    lost = futures.lost_ranks() if isinstance(futures, dispatch.RankFutures) else []
    return bool(lost) or all(f.done() for f in futures)


def _failed(futures: list[Future]) -> bool:
    if isinstance(futures, dispatch.RankFutures):
        return dispatch.has_failed(futures)
    return any(f.status == "error" for f in futures)


def _raise_first_failure(futures: list[Future]) -> None:
    """Raise the failure that caused the others (for ranks of one dispatch: the earliest, naming its rank)."""
    if isinstance(futures, dispatch.RankFutures):
        dispatch.results(futures)
    for future in futures:
        if future.status == "error":
            future.result()
