"""One driver per run, and no orphans: a heartbeat the driving client keeps on the scheduler, which rank 0 watches.

The driver (``cluster.driver.run_job``) publishes a counter on the scheduler (scheduler metadata under a key
named after the run directory) and bumps it every few seconds. Rank 0 notes, on its own clock, when it last saw the counter move;
once it has not moved for ``recovery.driver_timeout_s`` (the client was killed, the laptop slept, the network is
gone) the ranks write a checkpoint and stop, so nothing trains unwatched and the next ``daskgan train`` resumes.
A second driver for the same run sees the counter move and refuses to start; one that starts after a driver died,
before its ranks noticed, takes the run over: each lease carries a token, and ranks that see another driver's
token than the one that started them checkpoint and stop (the new driver's dispatch queues behind them and resumes
from that checkpoint). ``daskgan stop`` leaves a request
under a second name, which rank 0 honours the same way. Counters rather than timestamps: the client's clock and
the workers' need not agree.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from distributed import get_client

from daskgan.errors import UserError

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # how often rank 0 looks at the scheduler
STATE_FILE = "state.json"  # in the run directory when its ranks stopped early: state, iteration, checkpoint


class RunActive(UserError):
    """The run already has a live driver."""


def metadata_key(run_url: str, kind: str) -> list[str]:
    """Where the run's ``driver`` heartbeat or ``stop`` request lives in the scheduler's metadata."""
    return ["daskgan", kind, hashlib.sha1(run_url.encode()).hexdigest()[:16]]


def _read(key: list[str], client: Any = None) -> Any:
    return (client or get_client()).get_metadata(key, default=None)


def _write(key: list[str], value: Any, client: Any = None) -> None:
    (client or get_client()).set_metadata(key, value)


class DriverLease:
    """The client side: refuse a run that another live driver holds, then keep the heartbeat going."""

    def __init__(self, client: Any, run_url: str, timeout_s: float, iterations: int = 0):
        self.client, self.run_url, self.timeout_s, self.iterations = client, run_url, timeout_s, iterations
        self.interval_s = max(0.5, min(10.0, timeout_s / 4))
        self._key = metadata_key(run_url, "driver")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.driver = f"{socket.gethostname()}:{os.getpid()}"
        self.token = uuid.uuid4().hex  # tells this driver from a later one in the same process (detached drivers)
        self.iteration = 0  # the newest record this driver saw, shown to a refused second driver

    def acquire(self) -> None:
        """Take the run, unless another driver's heartbeat moves within ``1.5 x`` its interval."""
        if driver_is_live(self.client, self.run_url):
            held = _read(self._key, self.client)
            raise RunActive(f"{self.run_url} is being trained by {held.get('driver')} (iteration "
                            f"{held.get('iteration')}); stop it first (daskgan stop), or wait")
        self._beat(0)
        self._thread = threading.Thread(target=self._keep_beating, daemon=True, name="daskgan-driver-lease")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _write(self._key, None, self.client)

    def _keep_beating(self) -> None:
        beat = 1
        while not self._stop.wait(self.interval_s):
            try:
                self._beat(beat)
            except Exception as error:  # the scheduler gone for a moment: the ranks will judge by the timeout
                logger.warning("driver heartbeat not sent: %s", error)
            beat += 1

    def _beat(self, beat: int) -> None:
        _write(self._key, {"beat": beat, "token": self.token, "run_url": self.run_url, "driver": self.driver,
                           "iteration": self.iteration, "iterations": self.iterations, "interval_s": self.interval_s},
               self.client)


def held_lease(client: Any, run_url: str) -> dict | None:
    """What the run's driver last published (driver, iteration, iterations), or None without a driver."""
    return _read(metadata_key(run_url, "driver"), client)


def active_runs(client: Any) -> list[dict]:
    """The leases of every run with a driver on this cluster (run_url, driver, iteration, iterations)."""
    leases = _read(["daskgan", "driver"], client) or {}
    return sorted((lease for lease in leases.values() if lease), key=lambda lease: lease["run_url"])


def request_stop(client: Any, run_url: str, now: bool = False) -> None:
    """Ask the ranks of the run at ``run_url`` to stop: after a checkpoint, or at once with ``now``."""
    _write(metadata_key(run_url, "stop"), "now" if now else "checkpoint", client)


class DriverWatch:
    """Rank 0's side: whether the run should go on, stop after a checkpoint, or stop now."""

    def __init__(self, run_url: str, timeout_s: float):
        self.run_url, self.timeout_s = run_url, timeout_s
        self._driver, self._stop = metadata_key(run_url, "driver"), metadata_key(run_url, "stop")
        self._last_beat: Any = None
        self._token: Any = None  # the lease of the driver that started these ranks
        self._moved_at = self._checked_at = time.monotonic()
        self.verdict = "continue"

    def check(self) -> str:
        """``continue``, ``checkpoint`` (stop after one: asked, or the driver silent for ``timeout_s``) or ``now``."""
        if time.monotonic() - self._checked_at < CHECK_EVERY_S or self.verdict != "continue":
            return self.verdict
        self._checked_at = time.monotonic()
        requested = _read(self._stop)
        if requested in ("checkpoint", "now"):
            self.verdict = requested
            logger.warning("stop requested for %s (%s)", self.run_url, requested)
            return self.verdict
        held = _read(self._driver)
        if held is None:  # dispatched without a lease (a user's own dispatch.run): nothing to watch
            return self.verdict
        self._token = self._token or held.get("token")
        if held.get("token") != self._token:
            logger.warning("driver %s took the run over: checkpoint and stop, it resumes from there",
                           held.get("driver"))
            self.verdict = "checkpoint"
        elif held.get("beat") != self._last_beat:
            self._last_beat, self._moved_at = held.get("beat"), time.monotonic()
        elif time.monotonic() - self._moved_at > self.timeout_s:
            logger.warning("driver %s silent for %.0f s: checkpoint and stop", held.get("driver"), self.timeout_s)
            self.verdict = "checkpoint"
        return self.verdict


def driver_is_live(client: Any, run_url: str, wait_s: float | None = None) -> bool:
    """Whether a driver's heartbeat for the run moves (watched for ``1.5 x`` its interval)."""
    key = metadata_key(run_url, "driver")
    held = _read(key, client)
    if held is None:
        return False
    time.sleep(wait_s if wait_s is not None else 1.5 * float(held.get("interval_s", 1.0)))
    again = _read(key, client)
    return again is not None and again.get("beat") != held.get("beat")


def clear_stop(client: Any, run_url: str) -> None:
    """Forget a stop request (a new driver starts the run again)."""
    _write(metadata_key(run_url, "stop"), None, client)
