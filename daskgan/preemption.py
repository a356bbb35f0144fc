"""Checkpoint on notice: a worker told to go (a spot GPU reclaimed, a pod evicted) leaves only after its run's ranks
have written a checkpoint and stopped, so a preemption costs no iterations.

Kubernetes and the clouds end a worker with SIGTERM and a grace period before SIGKILL. ``dask worker`` answers
SIGTERM by closing its nanny, and the nanny tears its plugins down before it ends the worker process: there
``PreemptionNotice`` (registered by the driver, so every nanny has it, later ones too) posts a notice for its
worker on the scheduler (metadata ``daskgan/notice/<worker address>``), then waits until the worker runs no
training rank any more (and hands what it holds to the other workers), or until its ``grace_s`` ran out.
Rank 0 looks at the notices of its run's workers every ``CHECK_EVERY_S`` (``NoticeWatch``); the ranks agree at
the next iteration to checkpoint and stop, rank 0 returns what it saw, and the driver restarts the run from that
checkpoint once the worker is replaced (``cluster.driver``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from distributed import get_client
from distributed.diagnostics.plugin import NannyPlugin

from daskgan.dispatch import is_rank_of
from daskgan.lease import CHECK_EVERY_S

logger = logging.getLogger(__name__)

NOTICE_KEY = ("daskgan", "notice")  # scheduler metadata: worker address -> the notice it was given
WATCHED_KEY = ("daskgan", "watched")  # worker address -> the run whose rank 0 watches its notices
PLUGIN_NAME = "daskgan-preemption"
TRAINING_FUNCTION = "train_gan"  # the ranks that watch notices; others are not waited for
WAIT_POLL_S = 0.2
EC2_METADATA_URL = "http://169.254.169.254"  # the instance metadata service, as seen from an EC2 instance


class PreemptionNotice(NannyPlugin):
    """On the nanny: hold its closing until the worker's training ranks checkpointed and stopped (up to
    ``grace_s``; the platform kills the worker when its own grace period ends, whatever this waits for)."""

    idempotent = True  # a second driver registering it must not tear down (and so notice) the first's
    name = PLUGIN_NAME

    def __init__(self, grace_s: float):
        self.grace_s = grace_s

    async def teardown(self, nanny: Any) -> None:
        address = nanny.worker_address
        if address is None or not await _watched(nanny.scheduler, address):
            return  # no rank 0 would hear the notice (no run, or ranks not yet training): nothing to wait for
        noticed = time.monotonic()
        logger.warning("worker %s is leaving: its training ranks checkpoint and stop first (waiting up to %.0f s)",
                       address, self.grace_s)
        await nanny.scheduler.set_metadata(keys=[*NOTICE_KEY, address], value={"at": time.time()})
        try:
            while await _training_ranks(nanny.scheduler, address):
                if time.monotonic() - noticed > self.grace_s:
                    logger.warning("worker %s leaves with its ranks still running: %.0f s of grace ran out",
                                   address, self.grace_s)
                    return
                await asyncio.sleep(WAIT_POLL_S)
            logger.warning("worker %s: its ranks stopped %.1f s after the notice; leaving", address,
                           time.monotonic() - noticed)
            await _hand_over_results(nanny.scheduler, address)
        finally:
            await nanny.scheduler.set_metadata(keys=[*NOTICE_KEY, address], value=None)


async def _watched(scheduler: Any, address: str) -> bool:
    """Whether a run's rank 0 watches notices for the worker at ``address`` and its training ranks run there."""
    try:
        watched = await scheduler.get_metadata(keys=[*WATCHED_KEY, address], default=None)
    except Exception:  # the scheduler gone: no run can be told
        return False
    return bool(watched) and bool(await _training_ranks(scheduler, address))


async def _training_ranks(scheduler: Any, address: str) -> list[str]:
    """The keys of training ranks the scheduler has processing on ``address`` (none once it left)."""
    try:
        processing = await scheduler.processing(workers=[address])
    except Exception:  # the worker already gone from the scheduler, or the scheduler itself
        return []
    return [key for key in processing.get(address, []) if is_rank_of(key, TRAINING_FUNCTION)]


async def _hand_over_results(scheduler: Any, address: str) -> None:
    """Copy what the worker holds (rank 0's summary among it) to the other workers before it ends, so the driver
    reads how its ranks stopped rather than a lost worker: the scheduler's own graceful retirement, without its
    closing the worker (the nanny is closing it)."""
    try:
        await scheduler.retire_workers(workers=[address], close_workers=False, remove=False)
    except Exception as error:  # the driver then sees a lost worker, and resumes from the same checkpoint
        logger.warning("worker %s could not hand its results over: %s", address, error)


class NoticeWatch:
    """Rank 0's side: whether any worker of its run has been given notice (looked up at most every
    ``CHECK_EVERY_S``). ``noticed`` keeps what was seen: worker address -> notice. While it is open, the
    workers are marked watched, so their nannies wait for the checkpoint (only) then."""

    def __init__(self, workers: list[str], run_url: str):
        self.workers = set(workers)
        self.noticed: dict[str, dict] = {}
        self._checked_at = time.monotonic()
        self._mark_watched(run_url)

    def close(self) -> None:
        """The iterations ended: the workers' nannies need not wait for this rank 0 any more."""
        self._mark_watched(None)

    def _mark_watched(self, run_url: str | None) -> None:
        client = get_client() if self.workers else None
        for address in self.workers:
            client.set_metadata([*WATCHED_KEY, address], run_url)

    def check(self) -> bool:
        if self.noticed or not self.workers or time.monotonic() - self._checked_at < CHECK_EVERY_S:
            return bool(self.noticed)
        self._checked_at = time.monotonic()
        notices = get_client().get_metadata(list(NOTICE_KEY), default=None) or {}
        self.noticed = {address: notice for address, notice in notices.items()
                        if address in self.workers and notice}
        if self.noticed:
            logger.warning("worker(s) %s given notice: checkpoint and stop", ", ".join(sorted(self.noticed)))
        return bool(self.noticed)

    def seconds_since_notice(self) -> float:
        """From the earliest notice to now, on this host's clock (the nanny's wall clock wrote the notice)."""
        return max(0.0, time.time() - min(notice["at"] for notice in self.noticed.values()))


class SpotInterruptionWatch(NannyPlugin):
    """On each nanny of a spot instance: look at the instance metadata's interruption notice (EC2's
    ``spot/instance-action``, given two minutes before the reclaim) every ``every_s``; once it is there, close the
    nanny, so that ``PreemptionNotice`` has the run checkpoint before the worker leaves."""

    idempotent = True
    name = "daskgan-spot-interruption"

    def __init__(self, metadata_url: str = EC2_METADATA_URL, every_s: float = 5.0):
        self.metadata_url, self.every_s = metadata_url.rstrip("/"), every_s
        self._watching: asyncio.Task | None = None

    async def setup(self, nanny: Any) -> None:
        self._watching = asyncio.create_task(self._watch(nanny))

    async def teardown(self, nanny: Any) -> None:
        if self._watching is not None:
            self._watching.cancel()

    async def _watch(self, nanny: Any) -> None:
        while True:
            try:
                announced = await asyncio.to_thread(self._interruption_announced)
            except OSError as error:  # not on EC2, or its metadata service closed to this container
                logger.warning("spot interruption notices not watched: %s unreachable (%s)", self.metadata_url, error)
                return
            if announced:
                logger.warning("spot interruption notice for this instance: worker %s leaves after its run's "
                               "checkpoint", nanny.worker_address)
                asyncio.create_task(nanny.close(reason="spot interruption notice"))  # its teardown cancels this
                return
            await asyncio.sleep(self.every_s)

    def _interruption_announced(self) -> bool:
        """Whether the instance metadata holds an interruption notice (IMDSv2: a session token first)."""
        token = urllib.request.Request(f"{self.metadata_url}/latest/api/token", method="PUT",
                                       headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with urllib.request.urlopen(token, timeout=2) as answer:
            session = answer.read().decode()
        notice = urllib.request.Request(f"{self.metadata_url}/latest/meta-data/spot/instance-action",
                                        headers={"X-aws-ec2-metadata-token": session})
        try:
            with urllib.request.urlopen(notice, timeout=2):
                return True
        except urllib.error.HTTPError as error:
            if error.code == 404:  # no interruption scheduled
                return False
            raise


def watch_for_notices(client: Any, grace_s: float) -> None:
    """Give every nanny of ``client``'s cluster, and those that join later, the ``PreemptionNotice`` plugin."""
    client.register_plugin(PreemptionNotice(grace_s))
