"""``daskgan compare``: runs and sweeps side by side, ranked by their job's metric, from their run directories alone.

A URL is a run directory (it holds ``config.yaml``) or a folder of them (a sweep: every direct child that is a run
directory). A run is ranked by the metric that ranks its checkpoints (``output.best_metric``, else the first of
``metrics.kinds``), better first by the rule its checkpoints are kept by (lower FID and KID, higher IS:
``HIGHER_IS_BETTER``). Runs ranked by different metrics cannot be ordered against each other: they are grouped by
metric, in the order the URLs first name them; a run without a value of its metric ranks last.
"""

from __future__ import annotations

import dataclasses
import io
import math
import posixpath
import time
from typing import Any, Sequence

import pandas as pd
import yaml

from daskgan.cluster.status import LAST_VALUES, run_status
from daskgan.config.schema import HIGHER_IS_BETTER, metric_that_ranks
from daskgan.errors import NotFound
from daskgan.run import layout, storage
from daskgan.run.records import load
from daskgan.run.storage import StorageOptions
from daskgan.run.summary import SMOOTHED_ABOVE, moving_average

COLUMNS = ("run", "url", "metric", "best", "best_iteration", "best_kimg", "iterations", "iteration", "kimg",
           "loss_G", "loss_D_real", "loss_D_fake", "ada_p", "wall_s", "gpu_hours", "state")
LOSS_PANELS = (("loss_G", ("loss_G",)), ("loss_D (real + fake)", ("loss_D_real", "loss_D_fake")))
PNG = "compare.png"


@dataclasses.dataclass(frozen=True)
class Run:
    """A run directory as compare reads it: its name (the folder's), URL, ranking metric, records and status
    (``daskgan.cluster.status.run_status``: state, progress, last losses and p)."""

    name: str
    url: str
    metric: str
    records: pd.DataFrame
    status: dict[str, Any]


def compare(urls: str | Sequence[str], storage_options: StorageOptions | None = None) -> pd.DataFrame:
    """One row per run of ``urls`` (run directories or folders of them), best first (see the module docstring):
    its metric, best value and the iteration and kimg it was reached at, last losses and p, wall time, GPU-hours
    (workers x hours, from the records' times and world sizes), progress and state."""
    return ranked_table(load_runs(urls, storage_options))


def load_runs(urls: str | Sequence[str], storage_options: StorageOptions | None = None) -> list[Run]:
    """The runs that ``urls`` name, in their order; a URL that holds no run directory is one line naming it."""
    return [_load_run(url, storage_options) for url in _run_urls([urls] if isinstance(urls, str) else urls,
                                                                  storage_options)]


def ranked_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The runs' rows (``COLUMNS``), best first."""
    rows = pd.DataFrame([_row(run) for run in runs], columns=list(COLUMNS))
    measured = rows["best"].notna()
    groups = {metric: order for order, metric in enumerate(dict.fromkeys(rows.loc[measured, "metric"]))}
    keys = pd.DataFrame({"unmeasured": ~measured, "group": rows["metric"].map(groups),
                         "score": rows["best"] * rows["metric"].map(_better_first)})
    order = keys.sort_values(["unmeasured", "group", "score"], kind="stable").index
    return rows.loc[order].reset_index(drop=True)


def _run_urls(urls: Sequence[str], storage_options: StorageOptions | None) -> list[str]:
    """Each URL itself if it is a run directory, else its children that are (a sweep); each run once."""
    found: list[str] = []
    for url in (url.rstrip("/") for url in urls):
        if _is_run(url, storage_options):
            found.append(url)
            continue
        children = [storage.join(url, name) for name in storage.list_names(url, storage_options)]
        runs = [child for child in children if _is_run(child, storage_options)]
        if not runs:
            raise NotFound(f"{url} is neither a daskgan run directory (no {layout.CONFIG}) nor a folder holding any")
        found += runs
    return list(dict.fromkeys(found))


def _is_run(url: str, storage_options: StorageOptions | None) -> bool:
    return storage.exists(layout.config_url(url), storage_options)


def _load_run(url: str, storage_options: StorageOptions | None) -> Run:
    config = yaml.safe_load(storage.read_bytes(layout.config_url(url), storage_options)) or {}
    metric = metric_that_ranks(config.get("output", {}).get("best_metric"), config["metrics"]["kinds"])
    return Run(posixpath.basename(url), url, metric, load(url, storage_options), run_status(url, storage_options))


def _better_first(metric: str) -> int:
    """A metric's sign that sorts its scores best first (as ``checkpoint.save`` keeps the best checkpoints)."""
    return -1 if metric in HIGHER_IS_BETTER else 1


def _row(run: Run) -> dict[str, Any]:
    status = run.status
    return {"run": run.name, "url": run.url, "metric": run.metric, **_best(run), "iterations": status["iterations"],
            "iteration": status["iteration"], **{name: status.get(name, math.nan) for name in LAST_VALUES},
            **_time_used(run.records), "state": status["state"]}


def _best(run: Run) -> dict[str, Any]:
    """The run's best value of its metric and where it was reached (the earliest, on a tie); {} without one."""
    if run.metric not in run.records.columns or run.records[run.metric].isna().all():
        return {}
    scores = run.records[run.metric] * _better_first(run.metric)
    best = run.records.loc[scores.idxmin()]
    return {"best": float(best[run.metric]), "best_iteration": int(best["iteration"]), "best_kimg": float(best["kimg"])}


def _time_used(records: pd.DataFrame) -> dict[str, float]:
    """Wall time from the first record to the last, and GPU-hours: each interval between two records times the
    ranks of the later one (a session's gap before a resume counts too); {} for records without times."""
    if "time" not in records.columns or records["time"].isna().all():
        return {}
    timed = records.dropna(subset=["time"])
    held = (timed["time"].diff() * timed["world_size"]).sum()
    return {"wall_s": float(timed["time"].iloc[-1] - timed["time"].iloc[0]), "gpu_hours": float(held) / 3600}


def compare_figure(runs: Sequence[Run]):
    """A matplotlib figure of the runs' curves, x in kimg: a panel per metric that ranks one of them (every run
    holding that metric drawn in it), then G's and D's losses; a run keeps its colour (and label) in every panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    metrics = dict.fromkeys(run.metric for run in runs if _best(run))
    panels = [*((metric, (metric,)) for metric in metrics), *LOSS_PANELS]
    figure, axes = pyplot.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    for axis, (title, columns) in zip(axes[:, 0], panels):
        for colour, run in enumerate(runs):
            _draw(axis, run, columns, f"C{colour % 10}")
        axis.set_title(title, fontsize=10, loc="left")
        axis.grid(alpha=0.3)
    axes[len(metrics), 0].legend(fontsize=8, loc="upper right")  # G's losses: the panel every run with records is in
    axes[-1, 0].set_xlabel("kimg")
    figure.tight_layout()
    return figure


def _draw(axis, run: Run, columns: tuple[str, ...], colour: str) -> None:
    """``run``'s series (the sum of ``columns``) by kimg, smoothed when per-iteration and long; none if absent."""
    if not set(columns) <= set(run.records.columns):
        return
    rows = run.records.dropna(subset=list(columns))
    values = rows[list(columns)].sum(axis=1)
    smoothed = moving_average(values) if len(rows) > SMOOTHED_ABOVE else values
    axis.plot(rows["kimg"], smoothed, color=colour, label=run.name, marker="o" if len(rows) <= SMOOTHED_ABOVE else None,
              markersize=3)


def write_compare_png(runs: Sequence[Run], out_url: str, storage_options: StorageOptions | None = None) -> str:
    """Draw ``compare_figure`` into ``<out_url>/compare.png`` (a folder or any fsspec URL); returns its URL."""
    from matplotlib import pyplot

    figure = compare_figure(runs)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    pyplot.close(figure)
    url = storage.join(out_url, PNG)
    storage.write_bytes(url, buffer.getvalue(), storage_options)
    return url


def format_table(table: pd.DataFrame) -> str:
    """The ranked table as ``daskgan compare`` prints it: one line per run, best first."""
    shown = pd.DataFrame({
        "#": range(1, len(table) + 1), "run": table["run"].str.ljust(table["run"].str.len().max()),
        "metric": table["metric"],
        "best": table["best"].map(_number), "at kimg": table["best_kimg"].map(_number),
        "iteration": [f"{done} of {total}" for done, total in zip(table["iteration"], table["iterations"])],
        "kimg": table["kimg"].map(_number), "loss_G": table["loss_G"].map(_number),
        "loss_D": (table["loss_D_real"] + table["loss_D_fake"]).map(_number), "p": table["ada_p"].map(_number),
        "wall": table["wall_s"].map(_duration), "GPU-h": table["gpu_hours"].map(_number), "state": table["state"]})
    return shown.to_string(index=False)


def _number(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.4g}"


def _duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"
