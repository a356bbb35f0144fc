"""Client side of a training job: dispatch ``train_gan`` to every worker and follow its records live."""

from __future__ import annotations

import logging
from typing import Any, Callable

from distributed import Client

from daskgan import dispatch
from daskgan.config import JobConfig
from daskgan.results import RunMonitor
from daskgan.train import train_gan

logger = logging.getLogger(__name__)


def run_job(client: Client, config: JobConfig, on_record: Callable[[dict[str, Any]], None] | None = None,
            timeout: float = dispatch.DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Train ``config`` on every worker of ``client``; ``on_record`` sees each iteration's record as it arrives.

    Returns rank 0's summary (run URL, iterations, last checkpoint). A failing rank raises here, naming its rank.
    """
    monitor = RunMonitor(client, config.output.run_url)
    try:
        futures = dispatch.run(client, train_gan, config, timeout=timeout)
        for record in monitor.records(futures):
            if on_record is not None:
                on_record(record)
        return dispatch.results(futures)[0]
    finally:
        monitor.close()
