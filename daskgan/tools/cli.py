"""Command line: ``daskgan train jobs/<job>.yaml [--cluster cluster/<spec>.yaml]``,
``daskgan cluster render cluster/<spec>.yaml``, ``daskgan generate <checkpoint> --seeds 0-7 --out <dir>`` and
``daskgan sample <checkpoint> --out <dir>``."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from contextlib import ExitStack, contextmanager

import yaml

from daskgan import dispatch
from daskgan.cluster import ClusterSpec, MissingExtra, connect, load_cluster_spec, render
from daskgan.config import ConfigError, load_job
from daskgan.run import storage
from daskgan.tools import sandbox

logger = logging.getLogger("daskgan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="daskgan", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="daskgan's log level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a GAN job on a Dask cluster")
    train.add_argument("job", help="job YAML file, e.g. jobs/demo.yaml")
    train.add_argument("--cluster", help="cluster spec YAML (default: a local cluster of 2 worker processes)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar, log lines only (also when stderr is not a terminal)")
    train.set_defaults(run=train_command)
    cluster = commands.add_parser("cluster", help="cluster specs").add_subparsers(dest="action", required=True)
    render_parser = cluster.add_parser("render", help="print the object the cluster backend would get")
    render_parser.add_argument("spec", help="cluster spec YAML, e.g. cluster/kubernetes.yaml")
    render_parser.set_defaults(run=render_command)
    generate = commands.add_parser("generate", help="images from a checkpoint, one PNG per seed")
    generate.add_argument("checkpoint", help="checkpoint URL or path (…/checkpoints/000001000.pt)")
    generate.add_argument("--seeds", default="0-7", help="seeds, e.g. 0-7 or 1,5,9 (default 0-7)")
    generate.add_argument("--trunc", type=float, default=1.0, help="truncation psi (StyleGAN2; default 1)")
    generate.add_argument("--class", dest="class_index", type=int, help="class index, for conditional models")
    generate.add_argument("--out", required=True, help="output folder or URL")
    generate.add_argument("--endpoint-url", help="S3 endpoint for s3:// URLs (credentials from the environment)")
    generate.set_defaults(run=generate_command)
    sample = commands.add_parser("sample", help="class-conditional sample grids and interpolations")
    sample.add_argument("checkpoint", help="checkpoint URL or path")
    sample.add_argument("--out", required=True, help="output folder or URL")
    sample.add_argument("--classes", help="classes, e.g. 0-3 or 1,5 (default: all)")
    sample.add_argument("--per-class", type=int, default=8, help="samples per class (default 8)")
    sample.add_argument("--steps", type=int, default=8, help="interpolation steps (default 8)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--trunc", type=float, help="truncation: psi for StyleGAN2, z threshold otherwise")
    sample.add_argument("--endpoint-url", help="S3 endpoint for s3:// URLs (credentials from the environment)")
    sample.set_defaults(run=sample_command)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return args.run(args)
    except (ConfigError, MissingExtra) as exc:
        print(f"daskgan: {exc}", file=sys.stderr)
        return 2


def generate_command(args: argparse.Namespace) -> int:
    from daskgan.tools.generate import generate, parse_seeds

    with _request_errors():
        written = generate(args.checkpoint, parse_seeds(args.seeds), args.out, args.trunc, _options(args),
                           args.class_index)
    print(f"daskgan: wrote {len(written)} images to {args.out}")
    return 0


def sample_command(args: argparse.Namespace) -> int:
    from daskgan.tools.generate import parse_seeds
    from daskgan.tools.sample import sample

    with _request_errors():
        written = sample(args.checkpoint, args.out, classes=parse_seeds(args.classes) if args.classes else None,
                         per_class=args.per_class, steps=args.steps, seed=args.seed, truncation=args.trunc,
                         storage_options=_options(args))
    print(f"daskgan: wrote {', '.join(url.rsplit('/', 1)[1] for url in written)} to {args.out}")
    return 0


def _options(args: argparse.Namespace) -> dict:
    return {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}


@contextmanager
def _request_errors():
    """A request the checkpoint cannot serve (truncation, classes) ends with one line, like a bad job file."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def render_command(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(render(load_cluster_spec(args.spec)), sort_keys=False), end="")
    return 0


def train_command(args: argparse.Namespace) -> int:
    spec = load_cluster_spec(args.cluster) if args.cluster else ClusterSpec().validate()
    job = load_job(args.job, workers=spec.planned_workers() or 1)  # refuse a bad job before starting anything
    with ExitStack() as stack:
        endpoint = None
        if job.sandbox and job.sandbox.s3_server:
            server = stack.enter_context(sandbox.LoopbackS3())
            stack.enter_context(sandbox.environment(server.environment()))  # workers started below inherit it
            endpoint = server.endpoint_url
        client = stack.enter_context(connect(spec))
        workers = len(dispatch.worker_addresses(client))
        logger.info("cluster: %d workers; dashboard %s", workers, client.dashboard_link)
        if job.preset and workers != job.preset_workers:
            job = load_job(args.job, workers=workers)  # the preset scales with the workers actually there
        job = sandbox.prepare(job, endpoint) if job.sandbox else job
        # a bar's \r updates only help on a terminal; logs and CI get a log line every flush_every iterations
        summary = _train_with_progress(client, job, show_bar=not args.no_progress and sys.stderr.isatty())
        local_copy = job.sandbox.copy_results_to if job.sandbox else None
        if local_copy:
            _replace_local_copy(job.output.run_url, local_copy, job.output.storage_options)
    _report(summary, local_copy, stopped_server=endpoint is not None)
    return 0


def _train_with_progress(client, job, show_bar: bool) -> dict:
    from tqdm import tqdm

    from daskgan.cluster.driver import run_job

    with tqdm(total=job.train.iterations, unit="it", disable=not show_bar, dynamic_ncols=True) as bar:
        def show(record: dict) -> None:
            bar.update(record["iteration"] - bar.n)
            bar.set_postfix(loss_G=f"{record['loss_G']:.3f}", loss_D=f"{record['loss_D_real'] + record['loss_D_fake']:.3f}",
                            img_s=f"{record['images_per_s']:.0f}", refresh=False)
            if not show_bar and (record["iteration"] % job.output.flush_every == 0 or "fid" in record):
                scores = "".join(f", {k} {record[k]:.4g}" for k in ("fid", "kid", "ada_p") if k in record)
                logger.info("iteration %d: loss_G %.3f%s", record["iteration"], record["loss_G"], scores)

        return run_job(client, job, on_record=show)


def _replace_local_copy(run_url: str, local_dir: str, storage_options: dict) -> None:
    """Mirror the run directory into ``local_dir``, replacing an earlier copy so no stale files mix in."""
    if os.path.exists(os.path.join(local_dir, "config.yaml")):
        shutil.rmtree(local_dir)
    elif os.path.exists(local_dir) and os.listdir(local_dir):
        raise FileExistsError(f"{local_dir} exists and is not a daskgan run copy; choose another copy_results_to")
    storage.copy_tree(run_url, local_dir, storage_options)


def _report(summary: dict, local_copy: str | None, stopped_server: bool) -> None:
    run_url = summary["run_url"]
    lines = [f"daskgan: trained {summary['iterations']} iterations; run directory {run_url}",
             f"  records:     {run_url}/records.parquet (and records/*.jsonl)",
             f"  grids:       {run_url}/grids/",
             f"  tensorboard: tensorboard --logdir {run_url}/tb",
             f"  checkpoint:  {summary['checkpoint']}"]
    if summary.get("skipped_images"):
        lines.append(f"  skipped {summary['skipped_images']} unreadable images (see the workers' log)")
    if local_copy:
        where = os.path.abspath(local_copy)
        note = "the loopback S3 server has stopped; " if stopped_server else ""
        lines += [f"  {note}a copy of the run directory is in {where}",
                  f"    grids: {where}/grids/   records: {where}/records.parquet",
                  f"    tensorboard --logdir {where}/tb"]
    print("\n".join(lines))


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("daskgan").setLevel(level.upper())


if __name__ == "__main__":
    sys.exit(main())
