"""One driver per run, and no orphans: a lease the driving client holds on the scheduler, which rank 0 watches.

The driver (``cluster.driver.run_job``) publishes its lease on the scheduler (scheduler metadata under a key
named after the run directory) and bumps its heartbeat counter every few seconds. Taking the lease is atomic:
the check for a live holder and the write happen under distributed's ``Lock`` for the run, so of two drivers
starting together exactly one gets it. A lease whose heartbeat has not moved for ``STALE_AFTER_INTERVALS``
of its interval is stale (its driver was killed or cut off): a new driver takes it over, and ``attach``, ``runs``
and ``status`` say so rather than wait on it. A driver beats and lets go only while the lease still carries its
own token (compared and written in one step on the scheduler), so a driver that wakes after being taken over
(a laptop asleep, a network cut) neither overwrites nor erases its successor's lease: it stops, and says who took
the run.

Rank 0 knows the lease of the driver that dispatched it (``driven``) and stops, after a checkpoint, once that
lease is released (the driver ended, by Ctrl-C or an error), taken over by another driver, or silent for
``recovery.driver_timeout_s``; so nothing trains unwatched and the next ``daskgan train`` resumes. Only ranks
dispatched without a driver (a user's own ``dispatch.run``) train on without a lease. ``daskgan stop`` leaves a
request under a second name, which rank 0 honours the same way. Heartbeats are counters, judged on the
watcher's own clock: the client's clock and the workers' need not agree.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from distributed import Lock, get_client

from daskgan.errors import UserError

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # how often rank 0 looks at the scheduler
BEATS_PER_TIMEOUT = 4  # heartbeats within the ranks' driver_timeout_s, so one late beat does not stop them
BEAT_S_MIN, BEAT_S_MAX = 0.5, 10.0  # bounds on the heartbeat interval: scheduler load vs. how soon a loss shows
STALE_AFTER_INTERVALS = 2.0  # a heartbeat still for this many of its intervals: the driver is gone
TAKE_TIMEOUT_S = 60.0  # the longest another driver's decision may hold the run's lock (a dead one's: 40 s)
ENDED_SHOWN_S = 24 * 3600.0  # `daskgan runs` lists the runs whose driver let go within this long

_driver_token: contextvars.ContextVar[str | None] = contextvars.ContextVar("daskgan_driver_token", default=None)


class RunActive(UserError):
    """The run already has a live driver."""


def metadata_key(run_url: str, kind: str) -> list[str]:
    """Where the run's ``driver`` heartbeat or ``stop`` request lives in the scheduler's metadata."""
    return ["daskgan", kind, _run_id(run_url)]


def _run_id(run_url: str) -> str:
    return hashlib.sha1(run_url.encode()).hexdigest()[:16]


def _read(key: list[str], client: Any = None) -> Any:
    return (client or get_client()).get_metadata(key, default=None)


def _write(key: list[str], value: Any, client: Any = None) -> None:
    (client or get_client()).set_metadata(key, value)


class Heartbeat:
    """How long a lease's heartbeat has been still, on the watcher's own clock (a new driver's lease counts as a
    move)."""

    def __init__(self) -> None:
        self._seen: tuple[Any, Any] = (None, None)
        self._moved_at = time.monotonic()

    def silent_for(self, lease: dict) -> float:
        if (lease.get("token"), lease.get("beat")) != self._seen:
            self._seen, self._moved_at = (lease.get("token"), lease.get("beat")), time.monotonic()
        return time.monotonic() - self._moved_at


def stale_after_s(lease: dict) -> float:
    """How long a lease's heartbeat may be still before its driver counts as gone (another driver may take the
    run over)."""
    return STALE_AFTER_INTERVALS * float(lease.get("interval_s", 1.0))


def ranks_stop_after_s(lease: dict) -> float:
    """How long a lease's heartbeat is still before its ranks checkpoint and stop (``recovery.driver_timeout_s``,
    which the lease carries; at least ``stale_after_s``)."""
    return max(stale_after_s(lease), float(lease.get("timeout_s", 0.0)))


class DriverLease:
    """The client side: take the run unless another live driver holds it, then keep the heartbeat going."""

    def __init__(self, client: Any, run_url: str, timeout_s: float, iterations: int = 0):
        self.client, self.run_url, self.timeout_s, self.iterations = client, run_url, timeout_s, iterations
        self.interval_s = max(BEAT_S_MIN, min(BEAT_S_MAX, timeout_s / BEATS_PER_TIMEOUT))
        self._key = metadata_key(run_url, "driver")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.driver = f"{socket.gethostname()}:{os.getpid()}"
        self.token = uuid.uuid4().hex  # tells this driver from a later one in the same process (detached drivers)
        self.iteration = 0  # the newest record this driver saw, shown to a refused second driver
        self.progress: Callable[[], dict] = dict  # what it knows of the run's progress, shown by `daskgan runs`

    def acquire(self) -> None:
        """Take the run, unless another driver's heartbeat moves; atomic under the run's ``distributed.Lock``
        (held only while deciding: a driver killed then frees it after the lock's lease timeout)."""
        lock = Lock(f"daskgan-driver-{_run_id(self.run_url)}", scheduler_rpc=self.client.scheduler,
                    loop=self.client.loop)
        if not lock.acquire(timeout=TAKE_TIMEOUT_S):
            raise RunActive(f"{self.run_url}: another driver is taking the run; wait, or see it with daskgan runs")
        try:
            if driver_is_live(self.client, self.run_url):
                held = _read(self._key, self.client)
                raise RunActive(f"{self.run_url} is being trained by {held.get('driver')} (iteration "
                                f"{held.get('iteration')}); stop it first (daskgan stop), or wait")
            _write(self._key, self.lease(0), self.client)
        finally:
            lock.release()
        self._thread = threading.Thread(target=self._keep_beating, daemon=True, name="daskgan-driver-lease")
        self._thread.start()

    def release(self, outcome: str | None = None) -> None:
        """Let go of the run: its ranks write a checkpoint and stop (``DriverWatch``). ``outcome``, how the driving
        ended, stays on the scheduler among the recently ended runs (``ended_runs``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write_if_held(None)
        if outcome is not None:
            try:
                _write(metadata_key(self.run_url, "ended"), {
                    "run_url": self.run_url, "driver": self.driver, "iteration": self.iteration,
                    "iterations": self.iterations, "ended_at": time.time(), "outcome": outcome}, self.client)
            except Exception as error:  # the scheduler gone: only `daskgan runs` misses it
                logger.warning("the run's end is not noted on the scheduler: %s", error)

    def ensure_held(self) -> None:
        """Raise ``RunActive`` if another driver took the run over while this one was silent (asleep, cut off): its
        ranks saw the new lease, wrote a checkpoint and stopped, and the run goes on under the other driver."""
        taken_by = _taken_by(held_lease(self.client, self.run_url), self.token)
        if taken_by is not None:
            raise RunActive(f"{self.run_url} was taken over by driver {taken_by} while this driver was silent; "
                            "it resumes from the checkpoint this driver's ranks wrote")

    def dispatched(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as ranks of this driver: dispatch this, and they stop once this lease is released."""
        return _Driven(self.token, fn)

    def _keep_beating(self) -> None:
        beat = 1
        while not self._stop.wait(self.interval_s):
            try:
                taken_by = _taken_by(self._write_if_held(self.lease(beat)), self.token)
                if taken_by is not None:
                    logger.warning("driver %s took over %s: this driver stops its heartbeat", taken_by, self.run_url)
                    return
            except Exception as error:  # the scheduler gone for a moment: the ranks will judge by the timeout
                logger.warning("driver heartbeat not sent: %s", error)
            beat += 1

    def lease(self, beat: int) -> dict:
        """What this driver publishes on the scheduler with its ``beat``-th heartbeat."""
        return {"beat": beat, "token": self.token, "run_url": self.run_url, "driver": self.driver,
                "iteration": self.iteration, "iterations": self.iterations, "interval_s": self.interval_s,
                "timeout_s": self.timeout_s, "progress": self._progress()}

    def _progress(self) -> dict:
        try:
            return self.progress()
        except Exception as error:  # what the run shows must never cost its heartbeat
            logger.warning("the run's progress is not published with the heartbeat: %s", error)
            return {}

    def _write_if_held(self, lease: dict | None) -> dict | None:
        """Write the run's lease only while it still carries this driver's token; returns the lease found there.
        One call on the scheduler, as cheap as a plain write."""
        return self.client.run_on_scheduler(_compare_and_write, self._key, self.token, lease)


def _taken_by(held: dict | None, token: str) -> str | None:
    """Who took the run from the driver holding ``token``, given the lease on the scheduler; None: no one."""
    if held is not None and held.get("token") == token:
        return None
    return held.get("driver") if held else "another driver, which has let go of it since"


def _compare_and_write(key: list[str], token: str, lease: dict | None, dask_scheduler: Any = None) -> dict | None:
    """On the scheduler: write ``lease`` at ``key`` if the lease there carries ``token``; returns the lease found.
    Atomic without a lock: the scheduler runs it in one step of its event loop, between any two other writes
    (the run's ``Lock`` would stall the heartbeat while a new driver, holding it, watches that heartbeat)."""
    held = dask_scheduler.get_metadata(keys=key, default=None)
    if _taken_by(held, token) is None:
        dask_scheduler.set_metadata(keys=key, value=lease)
    return held


class _Driven:
    """A rank function run on behalf of the driver holding lease ``token`` (a class, not a closure: it pickles)."""

    def __init__(self, token: str, fn: Callable[..., Any]):
        self.token, self.fn = token, fn
        self.__name__ = getattr(fn, "__name__", "fn")  # names the dispatch's task keys

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reset = _driver_token.set(self.token)
        try:
            return self.fn(*args, **kwargs)
        finally:
            _driver_token.reset(reset)


def held_lease(client: Any, run_url: str) -> dict | None:
    """What the run's driver last published (driver, iteration, iterations), or None without a driver."""
    return _read(metadata_key(run_url, "driver"), client)


def active_runs(client: Any) -> list[dict]:
    """The leases of every run with a driver on this cluster (run_url, driver, iteration, iterations), each with
    ``live``: whether its heartbeat moved while watched (a stale one's driver was killed or cut off)."""
    before = _leases(client)
    if before:
        time.sleep(max(stale_after_s(lease) for lease in before.values()))
    after = _leases(client)
    return sorted(({**lease, "live": _moved(before.get(run), lease)} for run, lease in after.items()),
                  key=lambda lease: lease["run_url"])


def ended_runs(client: Any, within_s: float = ENDED_SHOWN_S) -> list[dict]:
    """The runs whose driver let go within the last ``within_s`` seconds, newest first: run_url, driver,
    iteration, iterations, ended_at (epoch seconds) and outcome (finished, stopped (...), failed: ..., ...)."""
    noted = (_read(["daskgan", "ended"], client) or {}).values()
    now = time.time()
    return sorted((run for run in noted if run and now - run["ended_at"] <= within_s),
                  key=lambda run: run["ended_at"], reverse=True)


def _leases(client: Any) -> dict[str, dict]:
    return {run: lease for run, lease in (_read(["daskgan", "driver"], client) or {}).items() if lease}


def _moved(before: dict | None, after: dict) -> bool:
    return before is None or (before.get("token"), before.get("beat")) != (after.get("token"), after.get("beat"))


STOP_REQUESTS = ("next_checkpoint", "checkpoint", "now")  # when ranks asked to stop do so (least urgent first)


def request_stop(client: Any, run_url: str, now: bool = False, when: str | None = None) -> None:
    """Ask the ranks of the run at ``run_url`` to stop: after a checkpoint, at once with ``now``, or ``when``
    (one of ``STOP_REQUESTS``; ``next_checkpoint``: at the next one the job schedules, as the driver asks when
    more workers joined)."""
    _write(metadata_key(run_url, "stop"), when or ("now" if now else "checkpoint"), client)


class DriverWatch:
    """Rank 0's side: whether the run should go on, stop after a checkpoint, or stop now."""

    def __init__(self, run_url: str, timeout_s: float):
        self.run_url, self.timeout_s = run_url, timeout_s
        self._driver, self._stop = metadata_key(run_url, "driver"), metadata_key(run_url, "stop")
        self._heartbeat = Heartbeat()
        self._token = _driver_token.get()  # the lease of the driver that started these ranks (None: none did)
        self._checked_at = time.monotonic()
        self.verdict = "continue"

    def check(self) -> str:
        """``continue``, ``next_checkpoint`` (stop after the next scheduled checkpoint: asked), ``checkpoint``
        (stop after one: asked, or the driver gone) or ``now``; once it is one of the last two it stays so."""
        if time.monotonic() - self._checked_at < CHECK_EVERY_S or self.verdict in ("checkpoint", "now"):
            return self.verdict
        self._checked_at = time.monotonic()
        requested = _read(self._stop)
        if requested in ("checkpoint", "now"):
            self.verdict = requested
            logger.warning("stop requested for %s (%s)", self.run_url, requested)
            return self.verdict
        self.verdict = self._driver_verdict(_read(self._driver))
        if self.verdict == "continue" and requested == "next_checkpoint":
            self.verdict = requested
        return self.verdict

    def _driver_verdict(self, held: dict | None) -> str:
        if held is None:
            if self._token is not None:
                logger.warning("the driver of %s let go of it: checkpoint and stop", self.run_url)
                return "checkpoint"
            return "continue"  # dispatched without a driver (a user's own dispatch.run): nothing to watch
        self._token = self._token or held.get("token")
        if held.get("token") != self._token:
            logger.warning("driver %s took the run over: checkpoint and stop, it resumes from there",
                           held.get("driver"))
            return "checkpoint"
        if self._heartbeat.silent_for(held) > self.timeout_s:
            logger.warning("driver %s silent for %.0f s: checkpoint and stop", held.get("driver"), self.timeout_s)
            return "checkpoint"
        return "continue"


def driver_is_live(client: Any, run_url: str) -> bool:
    """Whether a driver's heartbeat for the run moves (watched for ``stale_after_s`` of its lease)."""
    held = held_lease(client, run_url)
    if held is None:
        return False
    time.sleep(stale_after_s(held))
    again = held_lease(client, run_url)
    return again is not None and _moved(held, again)


def clear_stop(client: Any, run_url: str) -> None:
    """Forget a stop request (a new driver starts the run again)."""
    _write(metadata_key(run_url, "stop"), None, client)
