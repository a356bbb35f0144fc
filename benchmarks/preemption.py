"""Checkpoint on notice: how long a `dask worker` sent SIGTERM holds on until its run's checkpoint is durable.

For each model, a scheduler and 2 ``dask worker`` processes of their own (loopback addresses, ``--nthreads 1``,
started after the loopback S3 server's environment is set so they inherit it) train it with ``run_job`` on a
small generated dataset (``daskgan.data.synthetic``) on the loopback S3 (moto, its own process), with
``checkpoint_every`` far beyond the run, so the only checkpoint before the end is the one the notice asks for.
After ``--signal-at`` iterations the `dask worker` process (the nanny) of rank 0's worker (the one holding the
summary the driver reads) gets SIGTERM; once it exited a replacement `dask worker` joins and the driver resumes
from the checkpoint. Per model the table gives:

- notice to durable checkpoint: ``notice_to_checkpoint_s`` of the restart's record (the nanny's notice on the
  scheduler to the ranks' checkpoint written; it includes up to ``CHECK_EVERY_S`` for rank 0 to see the notice and
  the rest of the iteration then under way);
- the checkpoint's size in MB (the object the run's pointer named when the signalled process had exited);
- SIGTERM to exit: seconds from the signal to the signalled `dask worker` process's end (the notice, the
  checkpoint, the hand-over of what the worker held, and the nanny ending its worker process);
- SIGTERM to resumed: seconds from the signal to the first record of the restarted run (the replacement's start-up,
  the ranks' start-up and the checkpoint read back);
- the iteration signalled at, the checkpoint's iteration, and iterations redone (0 when nothing was lost);
- the median iteration's training step in seconds (from the records' images/s): the notice lands during an
  iteration, which finishes before the checkpoint is written, so up to one of these is in the first figure.

Models: ``dcgan`` is ``jobs/demo.yaml``'s model (16 px, batch 16 per worker); ``paper256`` is
``jobs/stylegan2-ada-paper256.yaml``'s (its preset scaled for 2 workers, with its model keys) at 256 px with
batch 1 per worker on a CPU (``mbstd_group`` 1 to fit it; fp32, not the job's bf16), a handful of iterations.

Run: ``.venv/bin/python benchmarks/preemption.py [--models dcgan,paper256] [--iterations dcgan=30,paper256=4]``
(about 5 minutes on 2 idle CPU cores: dcgan 30 s, paper256 4 min; twice that on a busy machine).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client

from daskgan.cluster.driver import run_job
from daskgan.config import JobConfig, load_yaml_mapping
from daskgan.data import synthetic
from daskgan.run import checkpoint, layout, records, storage
from daskgan.tools.sandbox import LoopbackS3

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from own_cluster import OwnCluster, process_of_rank  # noqa: E402  (the tests' own processes of a cluster)

JOBS = Path(__file__).resolve().parent.parent / "jobs"


@dataclass(frozen=True)
class Model:
    """A job file whose model (and preset) is benchmarked, the images it trains on and its batch per worker."""

    job: str
    resolution: int
    batch: int
    images: int
    iterations: int
    signal_at: int
    model: dict = field(default_factory=dict)  # keys over the job file's (what a CPU needs)


MODELS = {
    "dcgan": Model("demo.yaml", resolution=16, batch=16, images=64, iterations=30, signal_at=8),
    "paper256": Model("stylegan2-ada-paper256.yaml", resolution=256, batch=1, images=16, iterations=4, signal_at=1,
                      model={"mbstd_group": 1}),
}


@dataclass
class Result:
    """One model's figures (None: not seen)."""

    model: str
    signalled_at: int = 0
    checkpoint_iteration: int = 0
    notice_to_checkpoint_s: float | None = None
    checkpoint_mb: float | None = None
    exit_s: float | None = None
    resumed_s: float | None = None
    redone: int | None = None
    iteration_s: float | None = None  # the median iteration's training step
    iterations: int = 0
    error: str = ""


def job(name: str, spec: Model, bucket: str, options: dict, iterations: int) -> JobConfig:
    """The job file's preset and model, on the generated images, with no checkpoint scheduled within the run."""
    source = load_yaml_mapping(JOBS / spec.job)
    data = {"name": f"bench-preemption-{name}",
            **({"preset": source["preset"]} if source.get("preset") else {}),
            "data": {"url": f"{bucket}/data", "storage_options": options, "resolution": spec.resolution,
                     "batch_size": spec.batch},
            "model": {**source.get("model", {}), **spec.model},
            "train": {"iterations": iterations},
            "output": {"run_url": f"{bucket}/run", "storage_options": options, "flush_every": 1,
                       "grid_every": 1_000_000, "checkpoint_every": 1_000_000},
            "recovery": {"wait_for_workers_s": 300}}
    return JobConfig.from_dict(data, source=spec.job, workers=2)


def measure(name: str, spec: Model, server: LoopbackS3, iterations: int, signal_at: int, log_path: str) -> Result:
    """Train ``name`` on a cluster of its own; SIGTERM rank 0's `dask worker` after ``signal_at`` iterations."""
    bucket, options = f"s3://bench-preemption-{name}", {"endpoint_url": server.endpoint_url}
    storage.filesystem(bucket, options)[0].mkdir(bucket[len("s3://"):])
    synthetic.write_dataset(f"{bucket}/data", images=spec.images, resolution=spec.resolution,
                            storage_options=options)
    config = job(name, spec, bucket, options, iterations)
    result = Result(name)
    processes = OwnCluster(log_path)
    seen: dict[str, float] = {}

    def replace_once_gone(victim: subprocess.Popen) -> None:
        victim.wait()
        result.exit_s = time.monotonic() - seen["signalled"]
        url = checkpoint.latest(config.output.run_url, options)
        if url:
            result.checkpoint_iteration = layout.checkpoint_iteration(Path(url).name)
            result.checkpoint_mb = storage.filesystem(url, options)[0].size(url) / 1e6
        print(f"{name}: the signalled worker exited {result.exit_s:.1f} s after SIGTERM; checkpoint "
              f"{result.checkpoint_iteration} ({result.checkpoint_mb or 0:.1f} MB); a replacement joins", flush=True)
        processes.add_worker()

    def follow(record: dict) -> None:
        print(f"{name}: iteration {record['iteration']} ({record.get('images_per_s', 0):.1f} images/s)", flush=True)
        if record["iteration"] >= signal_at and not result.signalled_at:
            result.signalled_at = record["iteration"]
            seen["signalled"] = time.monotonic()
            victim.send_signal(signal.SIGTERM)
            print(f"{name}: SIGTERM to `dask worker` pid {victim.pid} after iteration {record['iteration']}",
                  flush=True)
            threading.Thread(target=replace_once_gone, args=(victim,), daemon=True).start()
        elif record.get("restart_cause") and result.resumed_s is None and "signalled" in seen:
            result.resumed_s = time.monotonic() - seen["signalled"]

    try:
        _, (_, *workers) = processes.start()
        with Client(processes.address, timeout=60) as client:
            victim = process_of_rank(client, workers, 0)
            summary = run_job(client, config, on_record=follow)
        result.iterations = summary["iterations"]
        table = records.load(config.output.run_url, options)
        result.iteration_s = float((spec.batch * table["world_size"] / table["images_per_s"]).median())
        restarts = table[table["restart_cause"].notna()] if "restart_cause" in table else table.iloc[:0]
        if len(restarts):
            restart = restarts.iloc[0]
            result.notice_to_checkpoint_s = float(restart.get("notice_to_checkpoint_s", float("nan")))
            result.redone = int(restart.get("redone_iterations", 0))
            if not str(restart["restart_cause"]).startswith("preempted"):
                result.error = f"restart: {restart['restart_cause']}"
        else:
            result.error = "no restart recorded"
    except Exception as exc:  # the table says how the model's run ended
        result.error = f"{type(exc).__name__}: {exc}"[:120]
        print(f"{name}: {result.error}", flush=True)
    finally:
        processes.close()
    return result


def cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dcgan,paper256", help=f"some of {','.join(MODELS)}")
    parser.add_argument("--iterations", default="",
                        help="per model, e.g. dcgan=40,paper256=6 (defaults: " +
                             ",".join(f"{name}={spec.iterations}" for name, spec in MODELS.items()) + ")")
    parser.add_argument("--signal-at", default="", help="iteration after which to SIGTERM, per model, e.g. dcgan=10")
    args = parser.parse_args()

    def per_model(text: str) -> dict[str, int]:
        return {name: int(value) for name, value in (item.split("=") for item in text.split(",") if item)}

    names, iterations, signal_at = args.models.split(","), per_model(args.iterations), per_model(args.signal_at)
    log_path = os.path.join(tempfile.mkdtemp(prefix="bench-preemption-"), "cluster.log")
    print(f"cluster log: {log_path}", flush=True)
    results = []
    with LoopbackS3() as server:
        os.environ.update(server.environment())  # the workers' processes inherit it
        for name in names:
            spec = MODELS[name]
            started = time.monotonic()
            results.append(measure(name, spec, server, iterations.get(name, spec.iterations),
                                   signal_at.get(name, spec.signal_at), log_path))
            print(f"{name}: {results[-1]} ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"\ncheckpoint on notice: 2 `dask worker` processes (--nthreads 1) on loopback, loopback S3 (moto), "
          f"{os.cpu_count()} CPUs; rank 0's `dask worker` sent SIGTERM, a replacement started once it exited"
          f"\n\n| model | batch/worker | signalled after | checkpoint at | notice to durable checkpoint s | "
          f"iteration s | checkpoint MB | SIGTERM to exit s | SIGTERM to resumed s | redone | iterations | error |\n"
          f"|---|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print(f"| {result.model} | {MODELS[result.model].batch} | {result.signalled_at} | "
              f"{result.checkpoint_iteration} | {cell(result.notice_to_checkpoint_s, 2)} | "
              f"{cell(result.iteration_s, 2)} | "
              f"{cell(result.checkpoint_mb)} | {cell(result.exit_s)} | {cell(result.resumed_s)} | "
              f"{'–' if result.redone is None else result.redone} | {result.iterations} | {result.error or '–'} |")


if __name__ == "__main__":
    main()
