"""``make gpu-check``: every check of the GPU checklist (``../shared/gpu-checklist.md``) in one command, one report.

A GPU machine is lent for about 15 minutes in all, so the checks run as one prepared command, each step in a
process of its own with a time limit (one that hangs or crashes costs its own limit, not the budget) and the whole
within ``--budget-s`` (450 s). In the checklist's order, but for the compiled runs of 2, which come last (their
compiling takes what it takes, and what is left):

1. correctness on CUDA with nccl on one rank: a small StyleGAN2 64 px job trains in fp32, bf16 and fp16 (records
   and grids appear, nothing NaN); a checkpoint resumes bit-exactly (CUDA RNG included), next to two straight runs
   that show whether the GPU repeats itself at all; the default local cluster starts one worker per visible GPU,
   each rank on its own GPU, and two ranks on one GPU are refused by the UUID check at rendezvous;
2. step time in s/kimg of NVlabs' ``paper256`` network (``jobs/stylegan2-ada-paper256.yaml``, 1 kimg at
   ``--batch`` images per GPU), daskgan eager and ``compile: true``, fp32 and bf16, and NVlabs' own ``train.py``
   on the same images and batch (fp32, and its fp16 mixed precision) from a checkout at ``--nvlabs``, if present;
3. ``benchmarks/loader_step.py`` on the GPU with 256 px JPEG shards on the loopback S3 server;
4. peak GPU memory of the configurations of 2 (the ranks' ``torch.cuda.max_memory_allocated``, NVlabs' own);
5. the pytest markers that need CUDA, run if there are any.

The report (``report.md`` and ``report.json`` in the report folder) names the GPU, driver and torch, and gives
each step's status (ok, failed, skipped and why), its figures, and a failure's last output lines; the command
exits with 1 when a step failed.

Without a GPU, the CUDA steps are skipped. ``--cpu-dry-run`` (``make gpu-check-dry-run``) runs every step's code
on the CPU instead, with tiny sizes and torch.compile disabled, so that a slip in this script shows here rather
than on the GPU's clock; those steps are then reported as skipped (no GPU), their dry run passed or failed.

Run: ``make gpu-check`` (or ``python benchmarks/gpu_check.py [REPORT_DIR] [--cpu-dry-run] [--nvlabs PATH]
[--batch N] [--budget-s S] [--only STEP,...]``); the report folder defaults to ``$GPU_REPORT`` or ``gpu-report``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NVLABS = ".gpu-check/stylegan2-ada-pytorch"  # an ignored folder: NVlabs' code is never committed here
BUDGET_S = 450.0  # the checklist's 8 minutes, less the setup's share
DRY_RUN_BUDGET_S = 900.0  # on this project's 2 shared cores a dry run takes 5-7 minutes, mostly process starts
MIN_STEP_S = 15.0  # a step is not started with less time than this left
TAIL_LINES = 25
NO_GPU = "no CUDA device (torch.cuda.is_available() is False)"
PAPER256_JOB = ROOT / "jobs" / "stylegan2-ada-paper256.yaml"


class Skip(Exception):
    """A step that cannot run here (what it needs is absent): reported as skipped, with this reason."""


class CheckFailed(Exception):
    """A check whose result is wrong: the step fails with this line."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class Context:
    """What every step is told: where to work, whether this is a CPU dry run, the NVlabs checkout, the batch."""

    work: Path
    dry_run: bool
    nvlabs: Path
    batch: int
    deadline: float  # time.time() by which the step must be done (its own subprocesses are given what is left)

    def seconds_left(self, margin: float = 5.0) -> float:
        """What a subprocess of the step may take: the time left, less ``margin`` for the step to report it."""
        return max(1.0, self.deadline - time.time() - margin)


@dataclass(frozen=True)
class Step:
    name: str
    item: int  # the checklist's item
    title: str
    run: Callable[[Context, dict], None]  # fills the figures as it goes; raises CheckFailed, Skip or any error
    timeout_s: float
    cuda: bool = True


# ---------------------------------------------------------------- the steps (each runs in a process of its own)


def environment(context: Context, figures: dict) -> None:
    """The machine: GPU, driver, torch, CUDA, cuDNN, NCCL, the commit; and torch's TF32 and cuDNN defaults, which
    decide what fp32 means in the step times."""
    import torch

    cuda = torch.cuda.is_available()
    figures.update(python=sys.version.split()[0], torch=torch.__version__, cuda=cuda, cuda_runtime=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), commit=_command(["git", "rev-parse", "--short", "HEAD"]),
                   gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   nvidia_smi=_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader"]),
                   nccl=str(torch.cuda.nccl.version()) if cuda else None,
                   dask_cuda=importlib.util.find_spec("dask_cuda") is not None, **_torch_settings())


def _command(argv: list[str]) -> str | None:
    """A short command's output, or None where it is missing or fails (no git metadata, no nvidia-smi)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _torch_settings() -> dict:
    import torch

    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def devices(context: Context, figures: dict) -> None:
    """The default local cluster (one worker per visible GPU) and each rank's backend and GPU; then two ranks on
    one GPU, which the rendezvous must refuse by UUID."""
    import torch

    from daskgan import dispatch
    from daskgan.cluster import ClusterSpec, connect
    from daskgan.cluster.specs.local import local_workers

    spec = ClusterSpec()
    figures["cluster"] = local_workers(spec.settings()).describe()
    with connect(spec) as client:
        ranks = dispatch.results(dispatch.run(client, rank_device, timeout=120))
    figures["ranks"] = ranks
    gpus = torch.cuda.device_count()
    check({rank["backend"] for rank in ranks} == {"nccl" if gpus else "gloo"}, "unexpected backend")
    if not gpus:
        figures["shared_gpu"] = "not tried: no GPU"
        return
    check(len(ranks) == gpus, f"{len(ranks)} ranks on {gpus} GPUs: the default is one worker per visible GPU")
    check(len({rank["uuid"] for rank in ranks}) == gpus, "two ranks on one GPU")
    figures["shared_gpu"] = _shared_gpu_refusal(gpus)
    check("ranks share a GPU" in figures["shared_gpu"], "two ranks on one GPU were not refused by the UUID check")


def rank_device() -> dict:
    """What one rank trains on (dispatched to every rank)."""
    import torch
    import torch.distributed as dist

    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return {"rank": dist.get_rank(), "backend": dist.get_backend(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": device,
            "uuid": str(torch.cuda.get_device_properties(device).uuid) if device is not None else None}


def _shared_gpu_refusal(gpus: int) -> str:
    """The error of a dispatch on more workers than GPUs, each seeing only the first GPU (a one-GPU workstation's
    two workers): each takes it as device 0, so only the UUID check at rendezvous can tell."""
    from daskgan import dispatch
    from daskgan.cluster import ClusterSpec, LocalSpec, connect
    from daskgan.errors import first_line

    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    os.environ["CUDA_VISIBLE_DEVICES"] = first  # the workers inherit it
    with connect(ClusterSpec(local=LocalSpec(n_workers=gpus + 1))) as client:
        try:
            dispatch.results(dispatch.run(client, rank_device, timeout=60))
        except Exception as error:
            return f"{type(error).__name__}: {first_line(error)}"
    return "not refused"


EVERY_RECORD = ("loss_G", "loss_D_real", "loss_D_fake", "D_x", "D_G_z")  # in every iteration's record
LAZY_EVERY = 4  # R1 and path length both run every 4th iteration in the correctness jobs


TINY = {"z_dim": 16, "w_dim": 16, "channel_max": 16, "mapping_layers": 2}  # StyleGAN2 in a dry run
NO_RESTARTS = {"max_restarts": 0, "min_workers": None}  # a lost worker (a crash on the GPU) fails the step at once


def small_job(context: Context, run: str, precision: str = "fp32", iterations: int | None = None) -> "JobConfig":  # noqa: F821
    """The correctness job: StyleGAN2 at 64 px (16 in a dry run) with ADA, lazy R1 and path length and an EMA G,
    on one rank, grids and checkpoints every half of its iterations."""
    from run import STYLEGAN2

    from daskgan.config import JobConfig

    resolution, batch, length = (16, 2, 4) if context.dry_run else (64, 16, 20)
    iterations = iterations or length
    return JobConfig.from_dict({
        "name": run, "data": {"url": _dataset(context, resolution, 64), "resolution": resolution,
                              "batch_size": batch},
        "model": {**STYLEGAN2, **(TINY if context.dry_run else {})},
        "train": {"iterations": iterations, "precision": precision, "beta1": 0.0, "beta2": 0.99, "lr_g": 0.0025,
                  "lr_d": 0.0025, "r1_gamma": 0.2, "r1_interval": LAZY_EVERY, "pl_weight": 2.0,
                  "pl_interval": LAZY_EVERY, "ema_kimg": 0.05},
        "augment": {"mode": "ada", "speed_kimg": 10},
        "recovery": NO_RESTARTS,
        "output": {"run_url": f"file://{context.work}/{run}", "flush_every": LAZY_EVERY,
                   "grid_every": length // 2, "checkpoint_every": length // 2, "keep_checkpoints": 4},
    })


def _dataset(context: Context, resolution: int, images: int) -> str:
    """A folder of generated shapes in the work folder, written once and shared by the steps that use it."""
    from daskgan.data import synthetic

    folder = context.work / f"shapes-{resolution}px-{images}"
    if not (folder / "done").exists():
        synthetic.write_dataset(f"file://{folder}", images, resolution)
        (folder / "done").touch()
    return f"file://{folder}"


@contextmanager
def one_rank() -> Iterator["distributed.Client"]:  # noqa: F821
    """A local cluster of one worker (on the GPU, nccl; on a CPU, gloo), as ``daskgan train`` starts one."""
    from daskgan.cluster import ClusterSpec, LocalSpec, connect

    with connect(ClusterSpec(local=LocalSpec(n_workers=1))) as client:
        yield client


def train(client, job) -> dict:
    """The job through the project's own driver, as ``daskgan train`` runs it; rank 0's summary."""
    from daskgan.cluster.driver import run_job

    return run_job(client, job, timeout=120)


def precision_run(precision: str) -> Callable[[Context, dict], None]:
    """The correctness job in ``precision``: every record there, grids where due, nothing NaN or infinite."""
    def run(context: Context, figures: dict) -> None:
        from daskgan.run import records, storage

        job = small_job(context, f"train-{precision}", precision)
        with one_rank() as client:
            train(client, job)
            figures.update(_worker_state(client))
        table = records.load(job.output.run_url)
        grids = storage.list_names(f"{job.output.run_url}/grids")
        last = {name: round(float(table[name].iloc[-1]), 4) for name in EVERY_RECORD}
        figures.update(iterations=len(table), grids=grids, **last,
                       s_per_iteration=round(float((job.data.batch_size / table["images_per_s"]).median()), 4))
        check(table["iteration"].tolist() == list(range(1, job.train.iterations + 1)), "records missing")
        every = job.output.grid_every
        wanted = ["reals.png"] + [f"{i:09d}.png" for i in range(every, job.train.iterations + 1, every)]
        check(set(wanted) <= set(grids), f"grids missing: {sorted(set(wanted) - set(grids))}")
        not_finite = _not_finite(table)
        check(not not_finite, f"NaN or inf in {not_finite}")
    return run


def _not_finite(table) -> list[str]:
    """Columns with a NaN or inf where they must have a number: the losses in every record, every numeric column
    in the records of the iterations that run every lazy term."""
    import numpy as np

    numbers = table.select_dtypes("number")
    regular = numbers[table["iteration"] % LAZY_EVERY == 0]
    always = [name for name in EVERY_RECORD if not np.isfinite(numbers[name]).all()]
    lazy = [name for name in numbers if regular[name].notna().any() and not np.isfinite(regular[name]).all()]
    return sorted(set(always + lazy + [name for name in numbers if np.isinf(numbers[name]).any()]))


def resume(context: Context, figures: dict) -> None:
    """Two straight runs (does the GPU repeat itself?) and one stopped halfway and resumed: its weights must equal
    a straight run's, bit for bit, and its checkpoint hold the rank's CUDA RNG on a GPU."""
    import torch

    from daskgan.run import checkpoint, records

    with one_rank() as client:
        straight = [small_job(context, f"straight-{n}") for n in (1, 2)]
        for job in straight:
            train(client, job)
        halfway = small_job(context, "resumed", iterations=straight[0].train.iterations // 2)
        train(client, halfway)
        resumed = small_job(context, "resumed")
        summary = train(client, resumed)
    state = checkpoint.load(checkpoint.latest(resumed.output.run_url))
    figures.update(resumed_from=summary["resumed_from"], cuda_rng_saved=[r["cuda_rng"] is not None
                                                                           for r in state["ranks"]],
                   straight_runs_differ=_differences(straight[0], straight[1]),
                   resumed_differs=_differences(straight[0], resumed),
                   losses_equal=records.load(resumed.output.run_url)["loss_G"].tolist()
                   == records.load(straight[0].output.run_url)["loss_G"].tolist())
    check(summary["resumed_from"] is not None, "the second job did not resume")
    check(all(figures["cuda_rng_saved"]) == torch.cuda.is_available(), "the checkpoint's CUDA RNG state")
    repeats = "" if not figures["straight_runs_differ"] else (
        f" (two straight runs differ too, in {len(figures['straight_runs_differ'])} tensors: nondeterministic kernels)")
    check(not figures["resumed_differs"] and figures["losses_equal"],
          f"the resumed run differs from a straight one in {len(figures['resumed_differs'])} tensors{repeats}")


def _differences(first, second) -> dict[str, float]:
    """Tensor -> largest absolute difference, for the final weights (G, D, G_ema) of two runs that differ."""
    from daskgan.run import checkpoint

    def final(job) -> dict:
        state = checkpoint.load(checkpoint.latest(job.output.run_url))
        return {f"{network}.{name}": tensor for network in ("G", "D", "G_ema")
                for name, tensor in state[network].items()}

    a, b = final(first), final(second)
    return {name: float((a[name].double() - b[name].double()).abs().max()) for name in a
            if not a[name].equal(b[name])}


def speed_run(compiled: bool, precision: str) -> Callable[[Context, dict], None]:
    """Seconds per kimg of NVlabs' paper256 network for 1 kimg (``--batch`` per GPU), from the records' step
    times after the first iteration (NVlabs' first tick is its first iteration, its second the rest)."""
    def run(context: Context, figures: dict) -> None:
        from daskgan.config import load_job
        from daskgan.run import records

        if context.dry_run and compiled:
            os.environ["TORCHDYNAMO_DISABLE"] = "1"  # the workers inherit it: the dry run tests this script
        name = f"speed-{'compile' if compiled else 'eager'}-{precision}"
        job = load_job(PAPER256_JOB, workers=1, overrides=[*_speed_overrides(context), f"train.precision={precision}",
                                                           f"train.compile={str(compiled).lower()}",
                                                           f"output.run_url=file://{context.work}/{name}"])
        with one_rank() as client:
            train(client, job)
            figures.update(_worker_state(client))
        warm = records.load(job.output.run_url)["images_per_s"].iloc[1:]
        figures.update(batch=job.data.batch_size, iterations=job.train.iterations,
                       s_per_kimg=round(float((1000 / warm).mean()), 2),
                       s_per_kimg_median=round(float(1000 / warm.median()), 2))
    return run


def _speed_overrides(context: Context) -> list[str]:
    """The paper256 job on the shared 256 px images, 1 kimg, no grid or checkpoint before the end; tiny in a dry run."""
    if context.dry_run:
        sizes = [f"data.url={_dataset(context, 16, 16)}", "data.resolution=16", "data.batch_size=2", "train.kimg=0.006",
                 *(f"model.{key}={value}" for key, value in TINY.items())]
    else:
        sizes = [f"data.url={_dataset(context, 256, 256)}", f"data.batch_size={context.batch}", "train.kimg=1"]
    return [*sizes, "data.cache_dir=null", *(f"recovery.{key}={'null' if value is None else value}"
                                             for key, value in NO_RESTARTS.items()),
            "output.grid_every=1000000", "output.checkpoint_every=1000000"]


def _worker_state(client) -> dict:
    """The one worker's peak GPU memory, graph breaks of torch.compile and TF32/cuDNN settings, after its run."""
    (state,) = client.run(worker_state).values()
    return state


def worker_state() -> dict:
    """Run on a worker: its process has trained one run, so its peaks are that run's."""
    import torch

    state = _torch_settings()
    if torch.cuda.is_available():
        state.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    from torch._dynamo.utils import counters

    state.update(graph_breaks=sum(counters["graph_break"].values()),
                 graph_break_reasons=list(counters["graph_break"])[:5])
    return state


# what NVlabs' train.py imports beyond torch, numpy and Pillow (distutils: on Python 3.12, setuptools' copy)
NVLABS_MODULES = ("click", "requests", "psutil", "scipy", "distutils")


def nvlabs_run(mixed: bool) -> Callable[[Context, dict], None]:
    """NVlabs' own train.py on the same images and batch, 1 kimg: its second tick's sec/kimg and its peak memory
    (its stats.jsonl); fp32 (``--fp32 1``) or its default fp16 mixed precision. A dry run runs its ``--dry-run``."""
    def run(context: Context, figures: dict) -> None:
        if not (context.nvlabs / "train.py").exists():
            raise Skip(f"NVlabs' train.py not present at {context.nvlabs} (fetch github:NVlabs/stylegan2-ada-pytorch "
                       f"there beforehand, or give --nvlabs)")
        missing = [name for name in NVLABS_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            raise Skip(f"NVlabs' train.py needs {', '.join(missing)}: pip install "
                       f"{' '.join(name.replace('distutils', 'setuptools') for name in missing)}")
        resolution = 16 if context.dry_run else 256
        data = _dataset(context, resolution, 16 if context.dry_run else 256).removeprefix("file://")
        out = context.work / f"nvlabs-{'mixed' if mixed else 'fp32'}"
        argv = [sys.executable, "train.py", "--outdir", str(out), "--data", data, "--gpus", "1", "--cfg", "paper256",
                "--batch", str(2 if context.dry_run else context.batch), "--kimg", "1", "--snap", "1000",
                "--metrics", "none", "--seed", "0", "--aug", "ada", *([] if mixed else ["--fp32", "1"]),
                *(["--dry-run"] if context.dry_run else [])]
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # pip's ninja
        figures["ninja"] = shutil.which("ninja", path=path) is not None
        log = out.with_suffix(".log")
        with log.open("w") as output:
            returncode = subprocess.run(argv, cwd=context.nvlabs, stdout=output, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PATH": path}, timeout=context.seconds_left()).returncode
        text = log.read_text()
        print(text[-4000:])
        check(returncode == 0, f"train.py exited with {returncode}")
        if not context.dry_run:  # its --dry-run builds nothing
            figures["custom_ops"] = "reference fallback" if "Falling back to slow reference" in text else "compiled"
            figures.update(_nvlabs_stats(out))
    return run


def _nvlabs_stats(out: Path) -> dict:
    """sec/kimg and peak memory of the last tick after the first (tick 0 is the first iteration: start-up)."""
    (stats,) = out.glob("*/stats.jsonl")
    ticks = [json.loads(line) for line in stats.read_text().splitlines()]
    last = [tick for tick in ticks if tick["Progress/tick"]["mean"] >= 1][-1]
    return {"s_per_kimg": round(last["Timing/sec_per_kimg"]["mean"], 2),
            "peak_allocated_gib": round(last["Resources/peak_gpu_mem_gb"]["mean"], 2),
            "kimg": round(last["Progress/kimg"]["mean"], 3)}


def loader(context: Context, figures: dict) -> None:
    """benchmarks/loader_step.py as is: 256 px JPEG shards on the loopback S3 server (64 px PNGs, a few steps of a
    2-channel DCGAN, in a dry run)."""
    sizes = (["--set", "png64", "--images", "128", "--steps", "1", "--warmup", "1", "--channels", "2"]
             if context.dry_run else ["--set", "jpeg256", "--images", "2048"])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader_step.py"), *sizes], capture_output=True,
                          text=True, timeout=context.seconds_left())
    print(done.stdout, done.stderr[-4000:], sep="\n")
    check(done.returncode == 0, f"loader_step.py exited with {done.returncode}")
    figures["table"] = [line for line in done.stdout.splitlines() if line.startswith(("|", "ms per"))]


def cuda_tests(context: Context, figures: dict) -> None:
    """The tests behind a pytest marker whose description names CUDA or a GPU, run where there is one."""
    listed = subprocess.run([sys.executable, "-m", "pytest", "--markers"], capture_output=True, text=True, cwd=ROOT,
                            timeout=60).stdout
    markers = re.findall(r"^@pytest\.mark\.(\w+):(.*)$", listed, re.MULTILINE)
    needing = [name for name, text in markers if re.search(r"\b(cuda|gpus?)\b", text, re.IGNORECASE)]
    figures["cuda_markers"] = needing
    if not needing:
        figures["note"] = "no pytest marker needs CUDA"
        return
    import torch

    if not torch.cuda.is_available():
        raise Skip(NO_GPU)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", " or ".join(needing)], capture_output=True,
                          text=True, cwd=ROOT, timeout=context.seconds_left())
    print(done.stdout[-4000:])
    figures["result"] = done.stdout.strip().splitlines()[-1:] or [""]
    check(done.returncode == 0, f"pytest exited with {done.returncode}")


STEPS = (
    Step("environment", 0, "GPU, driver, torch", environment, 60, cuda=False),
    Step("devices", 1, "one worker per visible GPU; UUID check at rendezvous", devices, 150),
    *(Step(f"train-{p}", 1, f"StyleGAN2 64 px trains in {p} (nccl, one rank)", precision_run(p), 90)
      for p in ("fp32", "bf16", "fp16")),
    Step("resume", 1, "a checkpoint resumes bit-exactly (CUDA RNG included)", resume, 150),
    *(Step(f"speed-eager-{p}", 2, f"paper256 s/kimg, daskgan eager {p}", speed_run(False, p), 120)
      for p in ("fp32", "bf16")),
    Step("nvlabs-fp32", 2, "paper256 s/kimg, NVlabs train.py --fp32 1", nvlabs_run(mixed=False), 240),
    Step("nvlabs-mixed", 2, "paper256 s/kimg, NVlabs train.py (fp16 mixed)", nvlabs_run(mixed=True), 150),
    Step("loader-step", 3, "benchmarks/loader_step.py on the GPU", loader, 150),
    Step("cuda-tests", 5, "pytest markers that need CUDA", cuda_tests, 120, cuda=False),
    # last: how long torch.compile takes is known only once it ran, and it must not take the others' time
    *(Step(f"speed-compile-{p}", 2, f"paper256 s/kimg, daskgan compile: true {p}", speed_run(True, p), 180)
      for p in ("fp32", "bf16")),
)
STEP_NAMES = tuple(step.name for step in STEPS)
RATIOS = {"fp32": ("speed-eager-fp32", "speed-compile-fp32", "nvlabs-fp32"),
          "bf16 (NVlabs: fp16 mixed)": ("speed-eager-bf16", "speed-compile-bf16", "nvlabs-mixed")}


class Figures(dict):
    """A step's figures, written to its result file at every change, so that a step killed at its time limit (a
    compile that takes too long) still reports what it had measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.save()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self.save()

    def save(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self, default=str))
        partial.replace(self.path)  # whole or not at all: a kill may come at any time


def run_step(name: str, context: Context, result: Path) -> None:
    """In the step's own process: run it, its figures (as far as it got) and any skip reason or error in
    ``result``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))  # run.py's job settings, as the other benchmarks import them
    figures = Figures(result)
    try:
        next(step for step in STEPS if step.name == name).run(context, figures)
    except Skip as skip:
        figures["skipped"] = str(skip)
    except Exception as error:  # the traceback goes on to the output's tail
        from daskgan.errors import first_line

        figures["error"] = f"{type(error).__name__}: {first_line(error)}"
        raise
    figures.save()  # a step that measured nothing still reports


# ---------------------------------------------------------------- the harness (the parent process)


def run_all(options: argparse.Namespace) -> dict:
    """Every step in order, each in its own process within its time limit and what is left of the budget."""
    started = time.monotonic()
    entries: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for step in STEPS:
            left = options.budget_s - (time.monotonic() - started)
            cuda = entries[0]["figures"].get("cuda") if entries else None  # None: the environment step failed
            entries.append(_run_or_skip(step, options, Path(work), left, cuda))
    return {"mode": "CPU dry run" if options.cpu_dry_run else "GPU", "budget_s": options.budget_s,
            "seconds": round(time.monotonic() - started, 1), "batch": options.batch, "nvlabs": str(options.nvlabs),
            "steps": entries}


def _run_or_skip(step: Step, options: argparse.Namespace, work: Path, left: float, cuda: bool | None) -> dict:
    entry = {"name": step.name, "item": step.item, "title": step.title, "figures": {}, "seconds": 0.0}
    if options.only and step.name not in (*options.only, "environment"):  # which tells whether there is a GPU
        return {**entry, "status": "skipped", "reason": "not among --only"}
    if step.cuda and not cuda and not options.cpu_dry_run:
        return {**entry, "status": "skipped",
                "reason": NO_GPU if cuda is False else "no GPU known: the environment step did not say"}
    if left < MIN_STEP_S:
        return {**entry, "status": "skipped", "reason": f"the time budget ({options.budget_s:.0f} s) is spent"}
    timeout = min(step.timeout_s, left)
    started = time.monotonic()
    returncode, output, figures = _child(step, options, work, timeout)
    entry.update(seconds=round(time.monotonic() - started, 1), figures=figures)
    if returncode is None:
        return {**entry, "status": "failed", "reason": f"timed out after {timeout:.0f} s", "tail": output}
    if returncode != 0:
        reason = figures.pop("error", None) or _error_line(output)  # a crash may leave no figures
        return {**entry, "status": "failed", "reason": reason, "tail": output}
    if "skipped" in figures:
        return {**entry, "status": "skipped", "reason": figures.pop("skipped")}
    if step.cuda and not cuda:
        return {**entry, "status": "skipped", "reason": f"{NO_GPU}; its CPU dry run (tiny sizes) passed"}
    return {**entry, "status": "ok"}


def _child(step: Step, options: argparse.Namespace, work: Path, timeout: float) -> tuple[int | None, list[str], dict]:
    """Run ``step`` in a new session (its cluster's processes too), killed as a group at ``timeout``; returns its
    exit code (None: timed out), its output's last lines and its figures."""
    result, log = work / f"{step.name}.json", work / f"{step.name}.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--work", str(work),
            "--nvlabs", str(options.nvlabs), "--batch", str(options.batch), "--deadline", str(time.time() + timeout),
            *(["--cpu-dry-run"] if options.cpu_dry_run else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if options.cpu_dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run is a CPU run, on a GPU machine too
    with log.open("w") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        _end_session(process)
    figures = json.loads(result.read_text()) if result.exists() else {}
    return returncode, log.read_text(errors="replace").splitlines()[-TAIL_LINES:], figures


def _end_session(process: subprocess.Popen) -> None:
    """Kill what is left of the step's session: its Dask workers, NVlabs' data loaders, a hung step."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _error_line(lines: list[str]) -> str:
    """The exception's line of a traceback (the last line that names an error), else the last line."""
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Failed|Lost|Interrupt)\b", line)]
    return (named or lines or ["no output"])[-1]


# ---------------------------------------------------------------- the report


def write_report(report: dict, report_dir: Path) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    path = report_dir / "report.md"
    path.write_text("\n".join(markdown(report)) + "\n")
    return path


def markdown(report: dict) -> list[str]:
    steps = {entry["name"]: entry for entry in report["steps"]}
    machine = steps.get("environment", {}).get("figures", {})
    lines = [f"# GPU checks: {', '.join(machine.get('gpus') or ['no GPU'])} ({report['mode']})", "",
             f"torch {machine.get('torch')}, CUDA {machine.get('cuda_runtime')}, cuDNN {machine.get('cudnn')}, NCCL "
             f"{machine.get('nccl')}, nvidia-smi: {machine.get('nvidia_smi')}; commit {machine.get('commit')}; "
             f"{report['seconds']} s of a {report['budget_s']:.0f} s budget", "",
             "| step | item | status | s | what |", "|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['item']} | {e['status']} | {e['seconds']} | {e['title']}"
              f"{': ' + e['reason'] if e.get('reason') else ''} |" for e in report["steps"]]
    lines += ["", *_speed_table(steps, report["mode"] != "GPU"), "", "## Figures", ""]
    for entry in report["steps"]:
        lines += [f"### {entry['name']} ({entry['status']})", "", "```", json.dumps(entry["figures"], indent=1,
                                                                                   default=str), "```", ""]
        if entry.get("tail"):
            lines += ["Last output lines:", "", "```", *entry["tail"], "```", ""]
    return lines


def _speed_table(steps: dict, dry_run: bool) -> list[str]:
    """Items 2 and 4: s/kimg, peak memory and the ratio daskgan / NVlabs, per precision."""
    def figure(name: str, key: str) -> Any:
        return steps.get(name, {}).get("figures", {}).get(key, "-")

    def ratio(name: str, nvlabs: str) -> str:
        ours, theirs = figure(name, "s_per_kimg"), figure(nvlabs, "s_per_kimg")
        both = isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0
        return f"{ours / theirs:.2f}x" if both else "-"

    lines = [f"## Step time (s/kimg) and peak GPU memory (GiB), paper256{' (dry run: tiny sizes)' if dry_run else ''}",
             "",
             "| precision | daskgan eager | daskgan compile | NVlabs | eager / NVlabs | compile / NVlabs |",
             "|---|---|---|---|---|---|"]
    for precision, (eager, compiled, nvlabs) in RATIOS.items():
        cells = [f"{figure(name, 's_per_kimg')} s/kimg, {figure(name, 'peak_allocated_gib')} GiB"
                 for name in (eager, compiled, nvlabs)]
        lines.append(f"| {precision} | {' | '.join(cells)} | {ratio(eager, nvlabs)} | {ratio(compiled, nvlabs)} |")
    return lines + ["", _speed_notes(steps)]


def _speed_notes(steps: dict) -> str:
    """What the s/kimg figures are, and the settings that make them differ beyond the code."""
    def figures(name: str) -> dict:
        return steps.get(name, {}).get("figures", {})

    eager = figures("speed-eager-fp32")
    return (f"s/kimg: daskgan's mean step time after the first iteration (its records), {eager.get('batch', '-')} "
            f"images per GPU; NVlabs' second tick (its first is the first iteration). daskgan's worker: TF32 matmul "
            f"{eager.get('tf32_matmul', '-')}, cuDNN TF32 {eager.get('tf32_cudnn', '-')}, cudnn.benchmark "
            f"{eager.get('cudnn_benchmark', '-')}; NVlabs' train.py: TF32 off, cudnn.benchmark on, custom CUDA ops "
            f"{figures('nvlabs-fp32').get('custom_ops', '-')}. torch.compile's graph breaks: "
            f"{figures('speed-compile-fp32').get('graph_breaks', '-')} (fp32), "
            f"{figures('speed-compile-bf16').get('graph_breaks', '-')} (bf16).")


def memory_status(report: dict) -> dict:
    """Item 4 as an entry of its own: the peaks come from the step-time runs, so it is as good as they are."""
    speeds = [entry for entry in report["steps"] if entry["item"] == 2]
    entry = {"name": "peak-memory", "item": 4, "title": "peak GPU memory of the step-time runs", "seconds": 0.0,
             "figures": {e["name"]: e["figures"].get("peak_allocated_gib") for e in speeds}}
    if not speeds or all(e["status"] == "skipped" for e in speeds):
        return {**entry, "status": "skipped", "reason": "no step-time run on a GPU"}
    measured = any(isinstance(value, (int, float)) for value in entry["figures"].values())
    return {**entry, "status": "ok" if measured else "failed", **({} if measured else {"reason": "no peak measured"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dir", nargs="?", default=os.environ.get("GPU_REPORT", "gpu-report"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step's code on the CPU, tiny sizes")
    parser.add_argument("--nvlabs", type=Path, default=Path(os.environ.get("NVLABS_STYLEGAN2", ROOT / DEFAULT_NVLABS)),
                        help="a checkout of NVlabs' stylegan2-ada-pytorch (default: $NVLABS_STYLEGAN2 or "
                             f"{DEFAULT_NVLABS})")
    parser.add_argument("--batch", type=int, default=32, help="images per GPU in the step-time runs")
    parser.add_argument("--budget-s", type=float, help=f"time for all the steps together (default {BUDGET_S:.0f} s, "
                        f"a dry run {DRY_RUN_BUDGET_S:.0f} s)")
    parser.add_argument("--only", type=lambda text: text.split(","), default=None,
                        help="these steps only (and environment), comma-separated")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # the child process of one step
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    options = parser.parse_args()
    unknown = sorted(set(options.only or ()) - set(STEP_NAMES))
    if unknown:
        parser.error(f"--only: no step {', '.join(unknown)} (steps: {', '.join(STEP_NAMES)})")
    if options.budget_s is None:
        options.budget_s = DRY_RUN_BUDGET_S if options.cpu_dry_run else BUDGET_S
    if options.step:
        context = Context(options.work, options.cpu_dry_run, options.nvlabs.resolve(), options.batch, options.deadline)
        return run_step(options.step, context, options.work / f"{options.step}.json")
    report = run_all(options)
    report["steps"].append(memory_status(report))
    path = write_report(report, Path(options.report_dir))
    for entry in report["steps"]:
        print(f"{entry['name']:20s} {entry['status']:8s} {entry['seconds']:6.1f} s  {entry.get('reason', '')}")
    print(f"report: {path}")
    sys.exit(1 if any(entry["status"] == "failed" for entry in report["steps"]) else 0)


if __name__ == "__main__":
    main()
