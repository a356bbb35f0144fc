"""Command line: train a job on a Dask cluster; follow, stop and inspect its runs (status, attach, runs, stop) and
rank them (compare); convert a dataset on the cluster; generate, sample and import weights (see README.md's
"Command line")."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from typing import Callable, NoReturn

import yaml

from daskgan import dispatch
from daskgan.cluster import ClusterSpec, connect, connect_existing, default_cluster_spec, load_cluster_spec, render
from daskgan.config import JobConfig, load_job
from daskgan.config.schema import METRICS
from daskgan.errors import ConfigError, InfrastructureError, UserError, first_line
from daskgan.run import layout, storage
from daskgan.tools import sandbox

logger = logging.getLogger("daskgan")


DEFAULT_CLUSTER_HELP = ("cluster spec YAML (default: the scheduler at DASK_SCHEDULER_ADDRESS if set, else a local "
                        "cluster of one worker per GPU, or 2 CPU workers)")
RUNNING_CLUSTER_HELP = ("cluster spec YAML of the running cluster (kind: scheduler or kubernetes): it is looked at, "
                        "never started")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_SEED = 2**32 - 1  # a StyleGAN2 z is numpy's RandomState(seed).randn, as NVlabs draw it: seeds fit 32 bits


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``daskgan: <what>; see ...--help``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"daskgan: {message}; see '{self.prog} --help'\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return args.run(args)
    except (UserError, InfrastructureError) as exc:
        if args.debug:
            raise
        print(f"daskgan: {first_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, UserError) else 1
    except KeyboardInterrupt:
        print("daskgan: interrupted", file=sys.stderr)
        return 130


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with a command's ``key=value`` overrides taken from anywhere after its positionals:
    argparse alone refuses ``train job.yaml --cluster c.yaml train.iterations=3`` (positionals after an option)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [arg for arg in extra if _is_override(arg)]
        extra = [arg for arg in extra if not _is_override(arg)]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


OVERRIDES_HELP = "settings over the job file's, e.g. train.iterations=3 data.batch_size=8 (values are YAML)"


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="daskgan", description=__doc__)
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="daskgan's log level (default INFO)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its line")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = commands.add_parser("train", help="train a GAN job on a Dask cluster")
    train.add_argument("job", help="job YAML file, e.g. jobs/demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    train.add_argument("--cluster", help=DEFAULT_CLUSTER_HELP)
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar, log lines only (also when stderr is not a terminal)")
    train.add_argument("--detach", action="store_true",
                       help="drive the run from the cluster's scheduler and return: it outlives this client")
    train.add_argument("--dry-run", action="store_true",
                       help="print the job as this cluster would train it (presets and kimg resolved for its "
                            "workers, credentials redacted) and train nothing")
    train.add_argument("--workers", type=_integer(1), metavar="N",
                       help="train on N workers reserved for this run on the cluster's scheduler, waiting in its "
                            "queue until they are free (recovery.workers; default: every worker, unreserved)")
    train.add_argument("--priority", type=int, metavar="P",
                       help="with --workers: queued runs of a higher priority start first (recovery.priority, 0)")
    train.add_argument("--attempts", type=int, default=1,
                       help="drive the run up to N times when the driver fails for a reason other than the job's "
                            "own (storage or the cluster down beyond the run's restarts); a DaskJob's runner uses 3")
    train.set_defaults(run=train_command)
    status = commands.add_parser("status", help="where a run stands: state, iteration, losses, speed, ETA")
    status.add_argument("run_url", help="the run directory (output.run_url)")
    status.add_argument("--cluster", help="cluster spec YAML of a running cluster: also ask whether a driver is live "
                                          "there")
    _add_job_option(status)
    _add_endpoint_option(status)
    status.set_defaults(run=status_command)
    dataset = commands.add_parser("dataset", help="convert images once, on the cluster, into an NVlabs-format zip "
                                                  "or tar shards")
    dataset.add_argument("source", help="a folder of images (class subfolders or dataset.json), a zip or tar shards")
    dataset.add_argument("dest", help="the zip to write (s3://bucket/shapes-64.zip) or the shards' folder")
    dataset.add_argument("--format", choices=("zip", "shards"),
                         help="zip (NVlabs) or shards (WebDataset tar); default: zip for a .zip destination")
    dataset.add_argument("--shard-mb", type=_positive, default=256.0, help="shards: about this many MiB each (256)")
    dataset.add_argument("--resolution", type=int, required=True, help="square size in pixels")
    dataset.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 (RGB) or 1 (grayscale)")
    dataset.add_argument("--crop", choices=("center", "center-wide", "pad"), default="center",
                         help="make images square by cropping the centre (default), by the central 4:3 band "
                              "between black bars (NVlabs' center-crop-wide), or by padding with black")
    dataset.add_argument("--cluster", help=DEFAULT_CLUSTER_HELP)
    _add_endpoint_option(dataset)
    dataset.set_defaults(run=dataset_command)
    runs = commands.add_parser("runs", help="the trainings queued and with a live driver on a cluster")
    runs.add_argument("--cluster", required=True, help=RUNNING_CLUSTER_HELP)
    _add_job_option(runs)
    runs.set_defaults(run=runs_command)
    dashboard = commands.add_parser("dashboard", help="a read-only web page of a cluster's queued, running and ended "
                                                      "runs: curves and newest sample grids, refreshing live")
    dashboard.add_argument("--cluster", required=True, help=RUNNING_CLUSTER_HELP)
    _add_job_option(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to serve on (default 127.0.0.1: this machine only; the page has no login)")
    dashboard.add_argument("--port", type=_integer(0, 65535), default=8790, help="port (default 8790; 0: a free one)")
    _add_endpoint_option(dashboard)
    dashboard.set_defaults(run=dashboard_command)
    compare = commands.add_parser("compare", help="runs and sweeps ranked by their job's metric, and compare.png of "
                                                  "their curves")
    compare.add_argument("urls", nargs="+", metavar="run-or-sweep-url",
                         help="a run directory, or a folder of them (a sweep: each child run directory)")
    compare.add_argument("--out", default=".", help="folder or URL to write compare.png in (default: here)")
    _add_endpoint_option(compare)
    compare.set_defaults(run=compare_command)
    sweep = commands.add_parser("sweep", help="one run per point of a grid of settings, queued on a shared cluster, "
                                              "with optional successive halving")
    sweep.add_argument("job", help="job YAML file; its output.run_url is the sweep's folder, one run directory each")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=V1,V2,...",
                       help="settings to sweep (values are YAML, comma-separated; one value: set for every run)")
    sweep.add_argument("--workers-per-run", type=_integer(1), required=True, metavar="N",
                       help="each run trains on N workers reserved for it, waiting in the cluster's queue")
    sweep.add_argument("--halving-kimg", type=_kimg_list, metavar="K1,K2,...",
                       help="successive halving: at each of these kimg the better half of the runs by the job's "
                            "metric goes on, the others stop with a checkpoint and free their workers")
    sweep.add_argument("--cluster", help=DEFAULT_CLUSTER_HELP)
    sweep.add_argument("--detach", action="store_true",
                       help="drive the sweep from the cluster's scheduler and return: it outlives this client")
    sweep.set_defaults(run=sweep_command)
    attach = commands.add_parser("attach", help="follow a running training live")
    attach.add_argument("run_url", help="the run directory (output.run_url)")
    attach.add_argument("--cluster", required=True, help=RUNNING_CLUSTER_HELP)
    _add_job_option(attach)
    attach.set_defaults(run=attach_command)
    stop = commands.add_parser("stop", help="stop a running training (checkpoint, then stop), or take a queued one "
                                            "out of the queue")
    stop.add_argument("run_url", help="the run directory (output.run_url)")
    stop.add_argument("--cluster", required=True, help=RUNNING_CLUSTER_HELP)
    _add_job_option(stop)
    stop.add_argument("--now", action="store_true", help="stop without a final checkpoint")
    stop.set_defaults(run=stop_command)
    cluster = commands.add_parser("cluster", help="cluster specs").add_subparsers(
        dest="action", required=True, parser_class=OneLineParser)
    render_parser = cluster.add_parser("render", help="print the object the cluster backend would get")
    render_parser.add_argument("spec", help="cluster spec YAML, e.g. cluster/kubernetes.yaml")
    render_parser.add_argument("--job", help="a job YAML: print the DaskJob that trains it on this cluster "
                                             "(kind: kubernetes; with the ConfigMap holding the job file)")
    render_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"with --job: {OVERRIDES_HELP}")
    render_parser.set_defaults(run=render_command)
    generate = commands.add_parser("generate", help="images from a checkpoint, one PNG per seed")
    generate.add_argument("checkpoint", help=f"checkpoint URL or path (…/{layout.CHECKPOINTS}/"
                                             f"{layout.checkpoint_name(1000)}), or an NVlabs network pickle")
    generate.add_argument("--seeds", default="0-7", type=_seeds, help="seeds, e.g. 0-7 or 1,5,9 (default 0-7)")
    generate.add_argument("--class", dest="class_index", type=int, help="class index, for conditional models")
    _add_output_options(generate)
    generate.set_defaults(run=generate_command)
    importer = commands.add_parser("import", help="an NVlabs StyleGAN2-ADA network pickle or a BigGAN-PyTorch "
                                   "weights folder as a daskgan checkpoint")
    importer.add_argument("source", help="NVlabs pickle URL or path (network-snapshot-*.pkl, ffhq.pkl, ...), or a "
                          "BigGAN-PyTorch weights folder (G.pth, D.pth, state_dict.pth)")
    importer.add_argument("--out", required=True, help="checkpoint URL or path to write (…/imported.pt)")
    _add_endpoint_option(importer)
    importer.set_defaults(run=import_command)
    sample = commands.add_parser("sample", help="class-conditional sample grids and interpolations")
    sample.add_argument("checkpoint", help="checkpoint URL or path, or an NVlabs network pickle")
    sample.add_argument("--classes", type=_numbers, help="classes, e.g. 0-3 or 1,5 (default: all)")
    sample.add_argument("--per-class", type=_integer(1), default=8, help="samples per class (default 8)")
    sample.add_argument("--steps", type=_integer(1), default=8, help="interpolation steps (default 8)")
    sample.add_argument("--seed", type=_integer(0, MAX_SEED), default=0,
                        help="the first seed: a row's samples take --seed to --seed + --per-class - 1 (default 0)")
    sample.add_argument("--standing-stats", type=_integer(0), default=0, metavar="N",
                        help="BatchNorm statistics averaged over N batches before sampling (BigGAN; default off)")
    _add_output_options(sample)
    sample.set_defaults(run=sample_command)
    return parser


def _add_job_option(command: argparse.ArgumentParser) -> None:
    """``--job``: look at a DaskJob's cluster rather than the spec's own (runs, status, attach, stop)."""
    command.add_argument("--job", help="kind: kubernetes: the job YAML of a DaskJob (daskgan cluster render --job): "
                                       "look at its cluster, <spec name>-<job name>")


def _existing_cluster(args: argparse.Namespace):
    """A Client of the running cluster of ``--cluster`` (and ``--job``); nothing is started."""
    spec = load_cluster_spec(args.cluster)
    if args.job is None:
        return connect_existing(spec)
    if spec.kind != "kubernetes":
        raise ConfigError(f"--job: a DaskJob's cluster is found through a kubernetes cluster spec; {args.cluster} "
                          f"is kind: {spec.kind}")
    from daskgan.cluster.daskjob import daskjob_name

    k8s = spec.settings()
    return connect_existing(spec, daskjob_name(k8s, load_job(args.job, workers=k8s.n_workers).name))


def _add_endpoint_option(command: argparse.ArgumentParser) -> None:
    """``--endpoint-url``, for every command that reads or writes s3:// URLs itself; ``_options`` turns it into
    storage options."""
    command.add_argument("--endpoint-url", help="S3 endpoint for s3:// URLs (credentials from the environment)")


def _add_output_options(command: argparse.ArgumentParser) -> None:
    """What ``generate`` and ``sample`` share: truncation, where to write, the S3 endpoint."""
    command.add_argument("--trunc", type=_finite,
                         help="truncation: psi for StyleGAN2 (1 = none), the z threshold for other families "
                              "(default: none)")
    command.add_argument("--out", required=True, help="output folder or URL")
    _add_endpoint_option(command)


def _numbers(text: str) -> list[int]:
    from daskgan.tools.generate import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seeds(text: str) -> list[int]:
    seeds = _numbers(text)
    if max(seeds) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds go from 0 to {MAX_SEED}, got {text!r}")
    return seeds


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` (to ``high``), so that a value the command cannot use is a
    usage line, not a traceback from deep in the drawing."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low or high is not None and value > high:
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return whole_number


def _kimg_list(text: str) -> list[float]:
    """An argparse type: comma-separated kimg, e.g. ``2,4``."""
    return [_positive(part) for part in text.split(",")]


def _finite(text: str) -> float:
    """An argparse type: a number other than nan and infinity (which would draw NaN images or silently none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def generate_command(args: argparse.Namespace) -> int:
    from daskgan.tools.generate import generate

    written = generate(args.checkpoint, args.seeds, args.out, args.trunc, _options(args), args.class_index)
    print(f"daskgan: wrote {len(written)} images to {args.out}")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from daskgan.pretrained import import_weights

    state = import_weights(args.source, _options(args))
    storage.write_bytes(args.out, storage.torch_bytes(state), _options(args))
    model = state["model"]
    print(f"daskgan: wrote {args.out}: {model['family']} {model['resolution']}x{model['resolution']}, "
          f"{model['num_classes'] or 'no'} classes, networks {', '.join(k for k in ('G', 'G_ema', 'D') if k in state)}")
    return 0


def sample_command(args: argparse.Namespace) -> int:
    from daskgan.tools.sample import sample

    if args.seed + args.per_class + 1 > MAX_SEED:  # the interpolations' ends follow the rows' samples
        raise UserError(f"--seed: sample draws seeds {args.seed} to {args.seed + args.per_class + 1}, beyond "
                        f"{MAX_SEED}; give a smaller --seed")
    written = sample(args.checkpoint, args.out, classes=args.classes, per_class=args.per_class, steps=args.steps,
                     seed=args.seed, truncation=args.trunc, storage_options=_options(args),
                     standing_stats=args.standing_stats)
    print(f"daskgan: wrote {', '.join(url.rsplit('/', 1)[1] for url in written)} to {args.out}")
    return 0


def _options(args: argparse.Namespace) -> dict:
    return {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}


def status_command(args: argparse.Namespace) -> int:
    from daskgan.cluster.status import format_status, run_status

    with ExitStack() as stack:
        client = stack.enter_context(_existing_cluster(args)) if args.cluster else None
        print(format_status(run_status(args.run_url, _options(args), client)))
    return 0


def dataset_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from daskgan.data.convert import convert_dataset

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if not show_bar and done * 10 // total > shown[-1] * 10 // total:  # a log line every tenth
            logger.info("dataset: %d of %d chunks converted", done, total)
            shown.append(done)

    show_bar, shown = sys.stderr.isatty(), [0]  # a bar's \r updates only help on a terminal
    spec = load_cluster_spec(args.cluster) if args.cluster else default_cluster_spec()
    with connect(spec) as client, tqdm(unit="chunk", disable=not show_bar) as bar:
        report = convert_dataset(client, args.source, args.dest, args.resolution, args.channels, args.crop,
                                 _options(args), on_chunk=progress, format=args.format, shard_mb=args.shard_mb)
    for skipped in report["skipped"]:
        print(f"  skipped {skipped['path']}: {skipped['reason']}")
    print(f"daskgan: wrote {report['images']} images ({len(report['classes']) or 'no'} classes, "
          f"{args.resolution}px, {args.channels} channel(s)) to {args.dest}; {len(report['skipped'])} skipped; "
          f"report {args.dest.rstrip('/')}.report.json")
    return 0


def format_progress(progress: dict) -> str:
    """What a driver published of its run (``LiveProgress``): newest values, metrics, speed and ETA, one line."""
    from daskgan.cluster.status import format_speed, format_values

    metrics = [f"{name} {seen['value']:.4g} at iteration {seen['iteration']}"
               for name, seen in progress.get("metrics", {}).items()]
    speed = [format_speed(progress)] if "iterations_per_s" in progress else []
    return "; ".join(part for part in (format_values(progress), *metrics, *speed) if part)


def runs_command(args: argparse.Namespace) -> int:
    from daskgan.cluster.status import cluster_runs

    with _existing_cluster(args) as client:
        runs = cluster_runs(client)
    for queued in runs["queued"]:
        since = time.strftime("%H:%M:%S UTC", time.gmtime(queued["since"]))
        print(f"{queued['run_url']}: queued, position {queued['position']}, {queued['asked']} worker(s) asked, "
              f"waiting since {since} ({time.time() - queued['since']:.0f} s)")
    for lease in runs["running"]:
        driver = (f"driven by {lease['driver']}" if lease["live"] else
                  f"stale: its driver {lease['driver']} stopped beating (killed or cut off)")
        workers = f", on {', '.join(lease['workers'])}" if lease["workers"] else ""
        print(f"{lease['run_url']}: iteration {lease['iteration']} of {lease['iterations']}, {driver}{workers}")
        progress = format_progress(lease.get("progress") or {})
        if progress:
            print(f"  {progress}")
    for ended in runs["ended"]:
        at = time.strftime("%H:%M:%S UTC", time.gmtime(ended["ended_at"]))
        print(f"{ended['run_url']}: ended {at}, {ended['outcome']}, at iteration {ended['iteration']} of "
              f"{ended['iterations']}")
    stale = sum(not lease["live"] for lease in runs["running"])
    print(f"daskgan: {len(runs['running']) - stale} run(s) with a live driver on this cluster, {stale} stale, "
          f"{len(runs['queued'])} queued, {len(runs['ended'])} ended in the last day")
    return 0


def dashboard_command(args: argparse.Namespace) -> int:
    from daskgan.tools.dashboard import Dashboard

    with _existing_cluster(args) as client:
        try:
            server = Dashboard(client, _options(args), args.host, args.port)
        except OSError as error:
            raise UserError(f"--host {args.host} --port {args.port}: cannot serve there ({error.strerror})") from None
        print(f"daskgan: the cluster's runs at {server.url} (Ctrl-C ends it)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from daskgan.tools.compare import format_table, load_runs, ranked_table, write_compare_png

    runs = load_runs(args.urls, _options(args))
    print(format_table(ranked_table(runs)))
    written = write_compare_png(runs, args.out, _options(args))
    where = written if "://" in written else os.path.abspath(written)
    print(f"daskgan: {len(runs)} run{'s' if len(runs) > 1 else ''} compared; curves in {where}")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from daskgan.cluster.sweep import detach_sweep, plan_sweep, run_sweep

    sweep = plan_sweep(args.job, args.overrides, args.workers_per_run, args.halving_kimg or ())
    spec = load_cluster_spec(args.cluster) if args.cluster else default_cluster_spec()
    if sweep.base.sandbox or (args.detach and spec.kind != "scheduler"):
        raise ConfigError("sweep: needs a job without a sandbox, and with --detach a cluster that outlives this "
                          "command (a `scheduler` cluster spec)")
    with connect(spec) as client:
        if args.detach:
            address = detach_sweep(client, sweep)
            print(f"daskgan: {len(sweep.points)} runs of {sweep.url} are driven from the scheduler at {address}; "
                  f"see them with daskgan runs, rank them with daskgan compare {sweep.url}")
            return 0
        outcomes = run_sweep(client, sweep)["outcomes"]
    for point in sweep.points:
        print(f"  {point.name}: {outcomes.get(point.name)}")
    print(f"daskgan: swept {len(sweep.points)} runs in {sweep.url} (manifest sweep.json there); rank them with "
          f"daskgan compare {sweep.url}")
    return 0


def attach_command(args: argparse.Namespace) -> int:
    from daskgan.cluster.attach import attach

    shown = [0.0]

    def show(record: dict) -> None:  # a line a second at most
        if time.monotonic() - shown[0] >= 1.0:
            shown[0] = time.monotonic()
            print(f"iteration {record['iteration']} of {record['iterations']}: loss_G {record['loss_G']:.3f}",
                  flush=True)

    with _existing_cluster(args) as client:
        followed = attach(client, args.run_url, show)
    last = followed["last_record"].get("iteration", "none")
    ended = ("let go" if followed["ended"] == "released" else
             f"{followed['driver']} stopped beating (killed or cut off; its ranks checkpoint and stop)")
    print(f"daskgan: {args.run_url}'s driver {ended} after iteration {last} (followed {followed['followed_s']:.0f} s)")
    return 0


def stop_command(args: argparse.Namespace) -> int:
    from daskgan.cluster.status import stop_run

    with _existing_cluster(args) as client:
        stopped = stop_run(client, args.run_url, now=args.now)["stopped"]
    print(f"daskgan: took {args.run_url} out of the cluster's queue" if stopped == "queued" else
          f"daskgan: asked {args.run_url} to stop{' now' if stopped == 'now' else ' after a checkpoint'}")
    return 0


def render_command(args: argparse.Namespace) -> int:
    spec = load_cluster_spec(args.spec)
    if args.job is None:
        if args.overrides:
            raise ConfigError(f"{args.overrides[0]}: overrides apply to a job: give --job")
        print(yaml.safe_dump(render(spec), sort_keys=False), end="")
        return 0
    from daskgan.cluster.daskjob import daskjob_manifests, to_yaml

    if spec.kind != "kubernetes":
        raise ConfigError(f"--job: a DaskJob needs a kubernetes cluster spec; {args.spec} is kind: {spec.kind}")
    print(to_yaml(daskjob_manifests(spec.settings(), args.job, args.overrides)), end="")
    return 0


def train_command(args: argparse.Namespace) -> int:
    if args.attempts < 1:
        raise ConfigError(f"--attempts: must be >= 1, got {args.attempts}")
    args.overrides += _reservation_overrides(args)
    spec = load_cluster_spec(args.cluster) if args.cluster else default_cluster_spec()
    if args.dry_run:
        print(_job_for_cluster(args, spec).to_yaml(), end="")
        return 0
    # refuse a bad job before starting anything
    job = load_job(args.job, workers=spec.planned_workers() or 1, overrides=args.overrides)
    with ExitStack() as stack:
        endpoint = None
        if job.sandbox and job.sandbox.s3_server:
            server = stack.enter_context(sandbox.LoopbackS3())
            stack.enter_context(sandbox.environment(server.environment()))  # workers started below inherit it
            endpoint = server.endpoint_url
        client = stack.enter_context(connect(spec))
        workers = len(dispatch.worker_addresses(client))
        logger.info("cluster: %d workers; dashboard %s", workers, client.dashboard_link)
        if job.recovery.run_size(workers) != job.workers:  # resolved for the workers the run actually gets
            job = load_job(args.job, workers=workers, overrides=args.overrides)
        job = sandbox.prepare(job, endpoint) if job.sandbox else job
        if args.detach:
            return _detach(client, job, spec)
        # a bar's \r updates only help on a terminal; logs and CI get a log line every flush_every iterations
        summary = _train_with_progress(client, job, not args.no_progress and sys.stderr.isatty(), args.attempts)
        local_copy = job.sandbox.copy_results_to if job.sandbox else None
        if local_copy:
            sandbox.copy_results(job.output.run_url, local_copy, job.output.storage_options)
    _report(summary, local_copy, stopped_server=endpoint is not None)
    return 0


def _reservation_overrides(args: argparse.Namespace) -> list[str]:
    """``--workers`` and ``--priority`` as the job keys they stand for, after (so over) the command's own."""
    return ([f"recovery.workers={args.workers}"] if args.workers is not None else []) + \
        ([f"recovery.priority={args.priority}"] if args.priority is not None else [])


def _job_for_cluster(args: argparse.Namespace, spec: ClusterSpec) -> JobConfig:
    """The job as ``train`` would resolve it on ``spec``'s cluster, starting nothing: for the workers the spec
    would start, or those a running scheduler (``kind: scheduler``) has now."""
    workers = spec.planned_workers()
    if workers is None:
        with connect(spec) as client:
            workers = len(dispatch.worker_addresses(client))
    return load_job(args.job, workers=workers, overrides=args.overrides)


def _detach(client, job, spec: ClusterSpec) -> int:
    from daskgan.cluster.driver import detach

    if spec.kind != "scheduler" or job.sandbox:
        raise ConfigError("--detach: needs a cluster that outlives this command (a `scheduler` cluster spec) and "
                          "a job without a sandbox")
    address = detach(client, job)
    print(f"daskgan: {job.output.run_url} is driven from the scheduler at {address}; follow it with daskgan attach, "
          f"see it with daskgan status, end it with daskgan stop")
    return 0


def _train_with_progress(client, job, show_bar: bool, attempts: int = 1) -> dict:
    from tqdm import tqdm

    from daskgan.cluster.driver import run_job_attempts

    with tqdm(total=job.train.iterations, unit="it", disable=not show_bar, dynamic_ncols=True) as bar:
        def show(record: dict) -> None:
            bar.update(record["iteration"] - bar.n)
            bar.set_postfix(loss_G=f"{record['loss_G']:.3f}",
                            loss_D=f"{record['loss_D_real'] + record['loss_D_fake']:.3f}",
                            img_s=f"{record['images_per_s']:.0f}", refresh=False)
            if not show_bar and (record["iteration"] % job.output.flush_every == 0 or "fid" in record):
                scores = "".join(f", {k} {record[k]:.4g}" for k in (*METRICS, "ada_p") if k in record)
                logger.info("iteration %d: loss_G %.3f%s", record["iteration"], record["loss_G"], scores)

        return run_job_attempts(client, job, attempts, on_record=show)


def _metric_trends(summary: dict) -> list[str]:
    """One line per metric: its value at the first and the last evaluation of the run."""
    evaluations = summary.get("evaluations") or []
    lines = []
    for kind in METRICS:
        scored = [e for e in evaluations if kind in e]
        if scored:
            first, last = scored[0], scored[-1]
            lines.append(f"  {kind} ({last['extractor']}): {first[kind]:.4g} at iteration {first['iteration']} -> "
                         f"{last[kind]:.4g} at iteration {last['iteration']} ({len(scored)} evaluations)")
    return lines


def _report(summary: dict, local_copy: str | None, stopped_server: bool) -> None:
    run_url = summary["run_url"]
    if summary.get("stopped") == "queued":
        print(f"daskgan: {run_url} was taken out of the cluster's queue (daskgan stop) before it started")
        return
    done = (f"stopped at iteration {summary['last_iteration']} of {summary['iterations']} ({summary['stopped']})"
            if summary.get("stopped") else f"trained {summary['iterations']} iterations")
    lines = [f"daskgan: {done}; run directory {run_url}",
             f"  records:     {layout.records_table_url(run_url)} (and {layout.RECORD_PARTS}/*"
             f"{layout.RECORD_PART_SUFFIX})",
             f"  grids:       {layout.grids_url(run_url)}/",
             f"  tensorboard: tensorboard --logdir {layout.tensorboard_url(run_url)}",
             f"  checkpoint:  {summary['checkpoint']}"]
    lines += [f"  summary:     {layout.summary_url(run_url)} (losses, p, metrics)", *_metric_trends(summary)]
    if summary.get("skipped_images"):
        lines.append(f"  skipped {summary['skipped_images']} unreadable images (see the workers' log)")
    if local_copy:
        where = os.path.abspath(local_copy)
        note = "the loopback S3 server has stopped; " if stopped_server else ""
        lines += [f"  {note}a copy of the run directory is in {where}",
                  f"    grids: {layout.grids_url(where)}/   records: {layout.records_table_url(where)}",
                  f"    tensorboard --logdir {layout.tensorboard_url(where)}"]
    print("\n".join(lines))


def _configure_logging(level: str) -> None:
    """Progress (below WARNING) on stdout, problems on stderr: a failed command's stderr is its error line."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    progress, problems = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems.setLevel(logging.WARNING)
    for handler in (progress, problems):
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.WARNING, handlers=[progress, problems])
    logging.getLogger("daskgan").setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
