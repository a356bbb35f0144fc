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
from daskgan.cluster.monitor import RunMonitor
from daskgan.config import JobConfig, RecoveryConfig
from daskgan.errors import InfrastructureError
from daskgan.lease import CHECK_EVERY_S, DriverLease, clear_stop
from daskgan.preemption import watch_for_notices
from daskgan.training.loop import train_gan

logger = logging.getLogger(__name__)

INFRASTRUCTURE_WAIT_S = 30.0  # the first wait before restarting after a storage outage; it doubles each restart


def run_job(client: Client, config: JobConfig, on_record: Callable[[dict[str, Any]], None] | None = None,
            timeout: float = dispatch.DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Train ``config`` on every worker of ``client``; ``on_record`` sees each iteration's record as it arrives.

    Returns rank 0's summary (run URL, iterations, last checkpoint). A rank that raises fails the job here, naming
    its rank. A worker that leaves the cluster, or storage down beyond its retries once the run has made a step,
    instead triggers a restart (``config.recovery``): wait for it to come back, then resume from the newest checkpoint; the cause is
    recorded in the run's records and TensorBoard.
    This client is the run's driver while it runs (``daskgan.lease``): a run another live client drives is
    refused; when this client lets go of the run (it returns, raises, or is interrupted) its ranks checkpoint and
    stop, and if it dies they do so ``recovery.driver_timeout_s`` later.
    """
    world_size = len(dispatch.worker_addresses(client))
    lease = DriverLease(client, config.output.run_url, config.recovery.driver_timeout_s, config.train.iterations)
    lease.acquire()  # a run another live client drives is refused here
    clear_stop(client, config.output.run_url)
    watch_for_notices(client, config.recovery.notice_grace_s)
    try:
        return _drive(client, config, lease, world_size, on_record, timeout)
    except KeyboardInterrupt:
        logger.warning("interrupted: the ranks of %s write a checkpoint and stop; the next daskgan train resumes "
                       "from it", config.output.run_url)
        raise
    finally:
        lease.release()


def _drive(client: Client, config: JobConfig, lease: DriverLease, world_size: int,
           on_record: Callable[[dict[str, Any]], None] | None, timeout: float) -> dict[str, Any]:
    """Dispatch, follow the records, and re-dispatch after a lost worker, a storage outage or a preemption (see
    ``run_job``). Preemptions are not failures: they do not count against ``recovery.max_restarts``."""
    job, restart, restarts, failures = config, None, 0, 0
    grace = GraceCheck(config.recovery.notice_grace_s)
    while True:
        last_seen = 0
        monitor = RunMonitor(client, config.output.run_url)
        try:
            futures = dispatch.run(client, lease.dispatched(train_gan), job, restart=restart, timeout=timeout)
            for record in monitor.records(futures):
                last_seen = lease.iteration = record["iteration"]
                grace.check(record)
                if on_record is not None:
                    on_record(record)
            lease.ensure_held()  # taken over while silent: the ranks, seeing the new lease, checkpointed and stopped
            summary = dispatch.results(futures)[0]
            if not summary.get("preempted"):
                return summary
            raise Preempted(summary["preempted"])
        except (dispatch.WorkerLost, InfrastructureError, Preempted) as failure:
            if isinstance(failure, InfrastructureError) and restart is None and last_seen == 0:
                raise  # storage that never answered this driver: a wrong URL or endpoint, more likely than an outage
            restarts += 1
            failures += not isinstance(failure, Preempted)
            if failures > config.recovery.max_restarts:
                raise RuntimeError(f"giving up after {config.recovery.max_restarts} restarts") from failure
            logger.warning("%s; restart %d, from the newest checkpoint", failure, restarts)
            job = wait_to_restart(client, config, job, failure, restarts, world_size)
            restart = {"restart": restarts, "cause": str(failure), "last_iteration": last_seen,
                       **({"notice_to_checkpoint_s": failure.seconds} if isinstance(failure, Preempted) else {})}
        finally:
            monitor.close()


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
                           record["checkpoint_s"], self.grace_s, needed * 2)


class Preempted(Exception):
    """Workers of the run were given notice (``daskgan.preemption``): its ranks checkpointed and stopped."""

    def __init__(self, notice: dict[str, Any]):
        self.workers, self.seconds = notice["workers"], round(notice["notice_to_checkpoint_s"], 2)
        super().__init__(f"preempted: worker {', '.join(self.workers)} given notice; the checkpoint at iteration "
                         f"{notice['iteration']} was durable {self.seconds:.1f} s after it")


def wait_to_restart(client: Client, config: JobConfig, job: JobConfig, failure: Exception, restarts: int,
                    world_size: int) -> JobConfig:
    """Wait for what failed to come back; returns the job to re-dispatch. Lost workers: until they are replaced
    (``wait_for_workers``). Storage: a wait that doubles with each restart, up to ``wait_for_workers_s``, since
    an outage that outlasted the ranks' own retries is likely to last a while longer."""
    if isinstance(failure, Preempted):
        return restart_config(config, wait_for_workers(client, world_size, failure.workers, config.recovery),
                              world_size)
    if isinstance(failure, dispatch.WorkerLost):
        gone = failure.workers if failure.confirmed else []  # a silent worker may still be there: do not wait it out
        return restart_config(config, wait_for_workers(client, world_size, gone, config.recovery), world_size)
    time.sleep(min(config.recovery.wait_for_workers_s, INFRASTRUCTURE_WAIT_S * 2 ** (restarts - 1)))
    return job


def wait_for_workers(client: Client, wanted: int, lost: list[str], policy: RecoveryConfig) -> int:
    """Wait until the lost workers are gone from the scheduler and ``wanted`` workers are there; return the count.

    After ``policy.wait_for_workers_s`` the job continues with fewer if at least ``policy.min_workers`` remain.
    """
    deadline = time.monotonic() + policy.wait_for_workers_s
    while time.monotonic() < deadline:
        workers = set(dispatch.worker_addresses(client))
        if not workers & set(lost) and len(workers) >= wanted:
            return len(workers)
        time.sleep(0.5)
    available = len(set(dispatch.worker_addresses(client)) - set(lost))
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
            logger.info("detached run %s ended: %s", config.output.run_url,
                        f"stopped ({summary['stopped']})" if summary.get("stopped") else "finished")
        except Exception:
            logger.exception("detached run %s failed", config.output.run_url)

    threading.Thread(target=drive, daemon=True, name=f"daskgan-driver-{config.name}").start()
