"""A Dask cluster as a user runs one: `dask scheduler` and `dask worker` as processes of their own on loopback, so
they can be signalled (SIGTERM, as an evicted pod), killed and replaced. Used by the tests' ``own_cluster`` fixture
and by ``benchmarks/preemption.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
from distributed import Client

from daskgan.tools.sandbox import free_port

PACED_ITERATIONS = """import time

from daskgan.training import loop



def paced(unpaced):
    def iteration(*args, **kwargs):
        started = time.perf_counter()
        result = unpaced(*args, **kwargs)
        time.sleep(max(0.0, {seconds} - (time.perf_counter() - started)))
        return result

    iteration.paced = True
    return iteration


if not getattr(loop.train_iteration, "paced", False):  # distributed may run a preload more than once
    loop.train_iteration = paced(loop.train_iteration)
"""


class OwnCluster:
    """A scheduler and single-threaded workers, their output in one log file; ``close`` ends them all."""

    def __init__(self, log_path):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self._env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
        self._log = open(log_path, "a")
        self._preload = Path(log_path).with_name("paced_iterations.py")
        self._worker_options: list[str] = []
        self.started: list[subprocess.Popen] = []

    def pace_iterations(self, seconds: float) -> None:
        """Workers started from now on take at least ``seconds`` per training iteration, as a real network does:
        a run then outlasts the seconds a signal takes to reach its ranks, however loaded this machine is."""
        self._preload.write_text(PACED_ITERATIONS.format(seconds=seconds))
        self._worker_options = ["--preload", str(self._preload)]

    def start(self, workers: int = 2) -> tuple[str, list[subprocess.Popen]]:
        """A scheduler (again at the same address, after a kill) and ``workers`` workers, once all joined:
        (address, [scheduler, *workers])."""
        port = self.address.rsplit(":", 1)[1]
        scheduler = self._process("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", port,
                                  "--dashboard-address", ":0")
        started = [self.add_worker() for _ in range(workers)]
        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        return self.address, [scheduler, *started]

    def add_worker(self) -> subprocess.Popen:
        """One more ``dask worker`` process (a replacement joining)."""
        return self._process("distributed.cli.dask_worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                             *self._worker_options)

    def _process(self, *args: str) -> subprocess.Popen:
        self.started.append(subprocess.Popen([sys.executable, "-m", *args], stdout=self._log, stderr=self._log,
                                             env=self._env))
        return self.started[-1]

    def close(self) -> None:
        for process in reversed(self.started):  # workers (and their worker processes) first, then the scheduler
            if process.poll() is None:
                for child in psutil.Process(process.pid).children(recursive=True):
                    child.kill()
                process.kill()
            process.wait()
        self._log.close()


def process_of_rank(client: Client, processes: list[subprocess.Popen], rank: int) -> subprocess.Popen:
    """The `dask worker` process (the nanny, parent of the worker process) whose worker gets ``rank``."""
    worker_pids = client.run(os.getpid)
    nanny_pid = psutil.Process(worker_pids[sorted(worker_pids)[rank]]).ppid()
    return next(process for process in processes if process.pid == nanny_pid)
