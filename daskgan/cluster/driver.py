"""Client side of a training job: dispatch ``train_gan`` to every worker, follow its records live, and recover
from lost workers and storage outages by re-dispatching from the newest checkpoint in the run directory.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Callable

from distributed import Client

from daskgan import dispatch
from daskgan.cluster.arrivals import Arrivals
from daskgan.cluster.monitor import RunMonitor
from daskgan.cluster.reservations import Removed, Reservation
from daskgan.cluster.status import LiveProgress
from daskgan.config import JobConfig, RecoveryConfig
from daskgan.errors import InfrastructureError, Preempted, UserError, WorkerLost, first_line
from daskgan.lease import CHECK_EVERY_S, DriverLease, clear_stop, request_stop
from daskgan.preemption import watch_for_notices
from daskgan.training.loop import train_gan

logger = logging.getLogger(__name__)

INFRASTRUCTURE_WAIT_S = 30.0  # the first wait before restarting after a storage outage; it doubles each restart
WORKERS_POLL_S = 0.5  # how often a wait for workers looks at the scheduler
GRACE_ADVICE_MARGIN = 2  # the grace to advise: this many times what a checkpoint took


def run_job(client: Client, config: JobConfig, on_record: Callable[[dict[str, Any]], None] | None = None,
            timeout: float = dispatch.DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Train ``config`` on every worker of ``client``; ``on_record`` sees each iteration's record as it arrives.

    Returns rank 0's summary (run URL, iterations, last checkpoint). A rank that raises fails the job here, naming
    its rank. A worker that leaves the cluster, or storage down beyond its retries once the run has made a step,
    instead triggers a restart (``config.recovery``): wait for it to come back, then resume from the newest
    checkpoint; so does a worker given notice (``daskgan.preemption``), once its ranks checkpointed. A run that
    goes on with fewer workers (``recovery.min_workers``) grows back at its next checkpoint once more join. Each
    restart's cause is recorded in the run's records and TensorBoard.
    This client is the run's driver while it runs (``daskgan.lease``): a run another live client drives is
    refused; when this client lets go of the run (it returns, raises, or is interrupted) its ranks checkpoint and
    stop, and if it dies they do so ``recovery.driver_timeout_s`` later.
    With ``recovery.workers`` the run trains on that many workers reserved for it on the scheduler
    (``cluster.reservations``), waiting in the cluster's queue until they are free; taken out of the queue
    (``daskgan stop``), it returns at once, ``stopped: queued``.
    """
    world_size = config.recovery.run_size(len(dispatch.worker_addresses(client)))
    lease = DriverLease(client, config.output.run_url, config.recovery.driver_timeout_s, config.train.iterations)
    lease.acquire()  # a run another live client drives is refused here
    clear_stop(client, config.output.run_url)
    watch_for_notices(client, config.recovery.notice_grace_s)
    book, outcome = None, "failed"
    try:
        if config.recovery.workers:
            book = Reservation(client, config.output.run_url, world_size, lease.token, config.recovery.priority)
        summary = _drive(client, config, lease, world_size, on_record, timeout, book)
        outcome = outcome_of(summary)
        return summary
    except Removed as removed:
        logger.warning("%s", removed)
        outcome = "taken out of the queue"
        return {"run_url": config.output.run_url, "iterations": config.train.iterations, "last_iteration": 0,
                "stopped": "queued", "checkpoint": None}
    except KeyboardInterrupt:
        logger.warning("interrupted: the ranks of %s write a checkpoint and stop; the next daskgan train resumes "
                       "from it", config.output.run_url)
        outcome = "interrupted"
        raise
    except Exception as error:
        outcome = f"failed: {first_line(error)}"
        raise
    finally:
        if book is not None:
            book.release()
        lease.release(outcome)


def outcome_of(summary: dict[str, Any]) -> str:
    """How a run that returned ended, in words: finished, or stopped (and when)."""
    return f"stopped ({summary['stopped']})" if summary.get("stopped") else "finished"


def _drive(client: Client, config: JobConfig, lease: DriverLease, world_size: int,
           on_record: Callable[[dict[str, Any]], None] | None, timeout: float,
           book: Reservation | None = None) -> dict[str, Any]:
    """Dispatch, follow the records, and re-dispatch after a lost worker, a storage outage or a preemption, or
    to grow back to ``world_size`` workers once more joined (see ``run_job``); on ``book``'s workers if given."""
    dispatches = Dispatches(client, config, world_size, book)
    grace, arrivals = GraceCheck(config.recovery.notice_grace_s), Arrivals(client)
    progress = LiveProgress(config.train.iterations)
    lease.progress = progress.summary
    try:
        while True:
            monitor = RunMonitor(client, config.output.run_url)
            try:
                futures = dispatches.dispatch(lease.dispatched(train_gan), timeout)
                growth = Growth(client, config.output.run_url, len(dispatches.workers), world_size, arrivals, book)
                for record in monitor.records(futures):
                    dispatches.last_seen = lease.iteration = record["iteration"]
                    progress.see(record)
                    grace.check(record)
                    growth.check()
                    if on_record is not None:
                        on_record(record)
                lease.ensure_held()  # taken over while silent: the ranks saw the new lease, checkpointed and stopped
                summary = dispatch.results(futures)[0]
                if summary.get("preempted"):
                    raise Preempted(summary["preempted"])
                if summary.get("stopped") != "next_checkpoint":
                    return summary
                dispatches.grow()
            except (WorkerLost, InfrastructureError, Preempted) as failure:
                dispatches.recover(failure)
            finally:
                monitor.close()
    finally:
        arrivals.close()


class Dispatches:
    """The job's dispatches one after another: the job and workers of the next one, and why it restarts.
    Preemptions and growth are not failures: they do not count against ``recovery.max_restarts``."""

    def __init__(self, client: Client, config: JobConfig, world_size: int, book: Reservation | None = None):
        self.client, self.config, self.world_size, self.book = client, config, world_size, book
        self.job, self.workers = config, book.wait() if book else choose_workers(client, world_size)
        self.restart: dict[str, Any] | None = None
        self.restarts = self.failures = self.last_seen = 0

    def dispatch(self, fn: Callable[..., Any], timeout: float) -> dispatch.RankFutures:
        self.last_seen = 0
        return dispatch.run(self.client, fn, self.job, restart=self.restart, timeout=timeout, workers=self.workers)

    def grow(self) -> None:
        """The ranks stopped at a checkpoint for more workers (``Growth``): the next dispatch has them."""
        clear_stop(self.client, self.config.output.run_url)
        self.workers = self.book.wait() if self.book else choose_workers(self.client, self.world_size)
        self.job = restart_config(self.config, len(self.workers), self.world_size)
        self._restart_because(f"grown back to {len(self.workers)} workers")
        logger.warning("%s at iteration %d", self.restart["cause"], self.last_seen)

    def recover(self, failure: Exception) -> None:
        """Wait for what failed to come back, or raise when the run should not go on."""
        if isinstance(failure, InfrastructureError) and self.restart is None and self.last_seen == 0:
            raise failure  # storage that never answered this driver: a wrong URL or endpoint, not an outage
        self.failures += not isinstance(failure, Preempted)
        if self.failures > self.config.recovery.max_restarts:
            raise RuntimeError(f"giving up after {self.config.recovery.max_restarts} restarts") from failure
        logger.warning("%s; restart %d, from the newest checkpoint", failure, self.restarts + 1)
        self.job, self.workers = wait_to_restart(self.client, self.config, self.job, self.workers, failure,
                                                 self.restarts + 1, self.world_size, self.book)
        self._restart_because(str(failure), **({"notice_to_checkpoint_s": failure.seconds}
                                               if isinstance(failure, Preempted) else {}))

    def _restart_because(self, cause: str, **more: Any) -> None:
        self.restarts += 1
        self.restart = {"restart": self.restarts, "cause": cause, "last_iteration": self.last_seen, **more}


class Growth:
    """Asks the ranks of a run dispatched on fewer than its ``world_size`` workers to stop at their next scheduled
    checkpoint once more workers joined the cluster (with a ``book``: once it granted the run more of them); the
    driver then re-dispatches on them."""

    def __init__(self, client: Client, run_url: str, dispatched: int, world_size: int, arrivals: Arrivals,
                 book: Reservation | None = None):
        self.client, self.run_url, self.arrivals, self.book = client, run_url, arrivals, book
        self.wanted = dispatched < world_size
        self.dispatched = dispatched

    def check(self) -> None:
        if not self.wanted or not self.arrivals.joined():
            return
        present = len(self.book.wait() if self.book else dispatch.worker_addresses(self.client))
        if present > self.dispatched:
            logger.warning("%d workers on the cluster, the run has %d: it grows at its next checkpoint", present,
                           self.dispatched)
            request_stop(self.client, self.run_url, when="next_checkpoint")
            self.wanted = False


class GraceCheck:
    """Warns once when a checkpoint took longer than a worker given notice may wait for one
    (``recovery.notice_grace_s``, which the platform's grace period must cover too)."""

    def __init__(self, grace_s: float):
        self.grace_s, self.warned = grace_s, False

    def check(self, record: dict[str, Any]) -> None:
        needed = record.get("checkpoint_s", 0) + CHECK_EVERY_S  # the notice is seen within CHECK_EVERY_S
        if needed > self.grace_s and not self.warned:
            self.warned = True
            logger.warning("a checkpoint took %.1f s: a preempted worker's grace of %.0f s (recovery.notice_grace_s,"
                           " and the platform's own) is too short to save one; raise both above %.0f s",
                           record["checkpoint_s"], self.grace_s, needed * GRACE_ADVICE_MARGIN)


def wait_to_restart(client: Client, config: JobConfig, job: JobConfig, workers: list[str], failure: Exception,
                    restarts: int, world_size: int, book: Reservation | None = None) -> tuple[JobConfig, list[str]]:
    """Wait for what failed to come back; returns the job to re-dispatch and its workers. Lost or preempted
    workers: until they are replaced (``wait_for_workers``; with a ``book``, replaced by free workers it grants).
    Storage: a wait that doubles with each restart, up to ``wait_for_workers_s``, since an outage that outlasted
    the ranks' own retries is likely to last a while longer."""
    if isinstance(failure, (Preempted, WorkerLost)):
        # a silent worker may still be there: do not wait it out
        gone = failure.workers if isinstance(failure, Preempted) or failure.confirmed else []
        count = wait_for_workers(client, world_size, gone, config.recovery)
        chosen = (book.at_least(count, tuple(gone), config.recovery.wait_for_workers_s) if book else
                  choose_workers(client, count, excluded=gone))
        return restart_config(config, count, world_size), chosen
    time.sleep(infrastructure_wait_s(config, restarts))
    return job, workers


def infrastructure_wait_s(config: JobConfig, attempt: int) -> float:
    """How long to wait before the ``attempt``-th try after storage or the cluster failed: doubling from
    ``INFRASTRUCTURE_WAIT_S``, at most ``recovery.wait_for_workers_s``."""
    return min(config.recovery.wait_for_workers_s, INFRASTRUCTURE_WAIT_S * 2 ** (attempt - 1))


def run_job_attempts(client: Client, config: JobConfig, attempts: int,
                     on_record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``run_job`` up to ``attempts`` times: again (after ``infrastructure_wait_s``) when the driver failed for a
    reason other than the job's own, a ``UserError`` (a bad setting, dataset or checkpoint), which no new attempt
    mends. A DaskJob's runner drives so, bounded, rather than being restarted by Kubernetes forever."""
    for attempt in range(1, attempts + 1):
        try:
            return run_job(client, config, on_record=on_record)
        except UserError:
            raise
        except Exception as failure:
            if attempt == attempts:
                raise
            wait_s = infrastructure_wait_s(config, attempt)
            logger.warning("the driver failed (%s); attempt %d of %d in %.0f s, from the newest checkpoint",
                           first_line(failure), attempt + 1, attempts, wait_s)
            time.sleep(wait_s)
    raise ValueError(f"attempts: must be >= 1, got {attempts}")




def choose_workers(client: Client, count: int, excluded: list[str] = ()) -> list[str]:
    """The workers a dispatch runs on: the first ``count`` of the cluster's, by address, leaving out ``excluded``
    (workers lost or given notice, which may still be listed)."""
    return sorted(set(dispatch.worker_addresses(client)) - set(excluded))[:count]


def wait_for_workers(client: Client, wanted: int, lost: list[str], policy: RecoveryConfig) -> int:
    """Wait until the lost workers are gone from the scheduler and ``wanted`` workers are there; return the count.

    With ``policy.min_workers`` the job goes on as soon as that many are there (the driver grows it back as more
    join); without, it waits up to ``policy.wait_for_workers_s`` for all of them.
    """
    deadline = time.monotonic() + policy.wait_for_workers_s
    while True:
        workers = set(dispatch.worker_addresses(client))
        if not workers & set(lost):
            if len(workers) >= wanted:
                return wanted
            if policy.min_workers is not None and len(workers) >= policy.min_workers:
                logger.warning("%d of %d workers: continuing with %d, and with more as they join", len(workers),
                               wanted, len(workers))
                return len(workers)
        if time.monotonic() >= deadline:
            break
        time.sleep(WORKERS_POLL_S)
    available = len(set(dispatch.worker_addresses(client)) - set(lost))  # the lost may linger, silent
    if policy.min_workers is not None and available >= policy.min_workers:
        logger.warning("only %d of %d workers came back; continuing with %d", available, wanted, available)
        return available
    raise TimeoutError(f"only {available} of {wanted} workers came back within {policy.wait_for_workers_s:.0f}s "
                       f"(set recovery.min_workers to continue with fewer)")


def restart_config(config: JobConfig, workers: int, original_workers: int) -> JobConfig:
    """The job to re-dispatch: resume from the run's newest checkpoint, per-worker batch scaled to keep the global
    batch when the worker count changed."""
    job = copy.deepcopy(config)  # where to resume from is rank 0's choice (training.loop.resume_source)
    if workers != original_workers:
        global_batch = config.data.batch_size * original_workers
        job.data.batch_size = max(1, global_batch // workers)
        if job.data.batch_size * workers != global_batch:
            logger.warning("global batch %d does not divide over %d workers; using %d", global_batch, workers,
                           job.data.batch_size * workers)
    return job


def detach(client: Client, config: JobConfig) -> str:
    """Start ``run_job`` for ``config`` in the scheduler's process, where it outlives this client; returns the
    scheduler's address. The driver lives as long as the scheduler: if the scheduler dies, so does the cluster
    (its workers lose it), and the run stops where its last checkpoint left it."""
    client.run_on_scheduler(_start_driver_thread, config)
    return client.scheduler.address


def _start_driver_thread(config: JobConfig, dask_scheduler=None) -> None:
    """In the scheduler process: a thread with its own client drives the run, logging what it would have printed."""

    def drive() -> None:
        try:
            with Client(dask_scheduler.address, set_as_default=False) as client:
                summary = run_job(client, config)
            logger.info("detached run %s ended: %s", config.output.run_url, outcome_of(summary))
        except Exception:
            logger.exception("detached run %s failed", config.output.run_url)

    threading.Thread(target=drive, daemon=True, name=f"daskgan-driver-{config.name}").start()
