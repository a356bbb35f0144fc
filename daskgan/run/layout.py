"""The run directory's layout, in one place: every name and path in it, the iteration-number spelling, and the
state file's schema. Every module that writes or reads a run directory asks this one, so a new file (or a renamed
one) is one edit here.

Run directory (any fsspec URL)::

    config.yaml                        the job, credentials redacted
    records/<first>-<last>.jsonl       one JSON record per iteration, in parts (object stores cannot append)
    records.parquet                    all records as one table, written when the run ends
    summary.png                        losses, p and metrics of the whole run, drawn when it ends
    grids/<iteration>.png              fixed-z sample grids (``grids/reals.png``: the real images, same layout)
    tb/events.out.tfevents.*           TensorBoard scalars and sample grids
    checkpoints/<iteration>.pt         checkpoint objects
    checkpoints/latest.json            pointer to the newest, moved only after its object is complete
    checkpoints/index.json             the kept checkpoints, newest and best by metric, with scores
    metrics/<iteration>.json           an evaluation's scores and the extractor that produced them
    metrics/<cache name>.pt            cached real-image features or statistics
    dataset-manifest.json.gz           the dataset's listing (a dataset folder may carry one of the same name)
    state.json                         why the ranks stopped early: see ``RunState``

Iterations are spelled with nine digits (``000001000``), so names sort in iteration order.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from daskgan.run import storage
from daskgan.run.storage import StorageOptions

CONFIG = "config.yaml"
RECORD_PARTS = "records"
RECORD_PART_SUFFIX = ".jsonl"
RECORDS_TABLE = "records.parquet"
SUMMARY = "summary.png"
GRIDS = "grids"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
CHECKPOINT_SUFFIX = ".pt"
POINTER = "latest.json"
INDEX = "index.json"
METRICS = "metrics"
MANIFEST = "dataset-manifest.json.gz"
STATE = "state.json"

ITERATION_DIGITS = 9


def iteration_name(iteration: int) -> str:
    """An iteration as run-directory names spell it: zero-padded, so that names sort in iteration order."""
    return f"{iteration:0{ITERATION_DIGITS}d}"


def config_url(run_url: str) -> str:
    return storage.join(run_url, CONFIG)


def record_parts_url(run_url: str) -> str:
    return storage.join(run_url, RECORD_PARTS)


def record_part_url(run_url: str, first: int, last: int) -> str:
    """The part holding the records of iterations ``first`` to ``last``."""
    return storage.join(record_parts_url(run_url), f"{iteration_name(first)}-{iteration_name(last)}"
                                                   f"{RECORD_PART_SUFFIX}")


def record_part_span(name: str) -> tuple[int, int] | None:
    """(first, last) iteration of a record part's file name; None for a name that is no record part."""
    if not name.endswith(RECORD_PART_SUFFIX):
        return None
    first, last = name[:-len(RECORD_PART_SUFFIX)].split("-")
    return int(first), int(last)


def records_table_url(run_url: str) -> str:
    return storage.join(run_url, RECORDS_TABLE)


def summary_url(run_url: str) -> str:
    return storage.join(run_url, SUMMARY)


def grids_url(run_url: str) -> str:
    return storage.join(run_url, GRIDS)


def grid_url(run_url: str, iteration: int, name: str | None = None) -> str:
    """The sample grid of ``iteration``, or the grid called ``name`` (``reals``)."""
    return storage.join(grids_url(run_url), f"{name or iteration_name(iteration)}.png")


def tensorboard_url(run_url: str, *event_file: str) -> str:
    """The TensorBoard folder (``tensorboard --logdir`` it), or an event file in it."""
    return storage.join(run_url, TENSORBOARD, *event_file)


def checkpoints_url(run_url: str) -> str:
    return storage.join(run_url, CHECKPOINTS)


def checkpoint_name(iteration: int) -> str:
    return f"{iteration_name(iteration)}{CHECKPOINT_SUFFIX}"


def checkpoint_url(run_url: str, iteration: int) -> str:
    return storage.join(checkpoints_url(run_url), checkpoint_name(iteration))


def checkpoint_iteration(name: str) -> int | None:
    """The iteration of a checkpoint's file name; None for a name that is no checkpoint's."""
    stem = name[:-len(CHECKPOINT_SUFFIX)]
    return int(stem) if name.endswith(CHECKPOINT_SUFFIX) and stem.isdigit() else None


def pointer_url(run_url: str) -> str:
    return storage.join(checkpoints_url(run_url), POINTER)


def index_url(run_url: str) -> str:
    return storage.join(checkpoints_url(run_url), INDEX)


def metrics_url(run_url: str, name: str) -> str:
    """A file of the metrics folder (a cache of real features, named by the evaluator)."""
    return storage.join(run_url, METRICS, name)


def evaluation_url(run_url: str, iteration: int) -> str:
    """The report of the evaluation at ``iteration``."""
    return metrics_url(run_url, f"{iteration_name(iteration)}.json")


def manifest_url(run_url: str) -> str:
    return storage.join(run_url, MANIFEST)


def state_url(run_url: str) -> str:
    return storage.join(run_url, STATE)


STATES = ("stopped", "failed")


@dataclasses.dataclass(frozen=True)
class RunState:
    """``state.json``: why a run's ranks ended before its last iteration, which ``daskgan status`` reports while
    the newest record is still ``iteration``. One shape, every field always written (null where it does not apply):

    - ``stopped``: a stop request, a released or silent driver made the ranks checkpoint and stop; ``checkpoint``
      is the last one written (null if none was).
    - ``failed``: rank 0 raised an error of the run's own (not a lost peer or scheduler); ``error`` is its first
      line.

    A run that finishes, or stops to be re-dispatched on more workers, writes none.
    """

    state: str
    iteration: int
    checkpoint: Optional[str] = None
    error: Optional[str] = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"run state {self.state!r} is none of {STATES}")


def write_state(run_url: str, state: RunState, storage_options: StorageOptions | None = None) -> None:
    """Write the run's ``state.json`` (over an earlier one)."""
    storage.write_json(state_url(run_url), dataclasses.asdict(state), storage_options)


def read_state(run_url: str, storage_options: StorageOptions | None = None) -> RunState | None:
    """The run's ``state.json``; None when there is none, or it holds no state of ``STATES``."""
    url = state_url(run_url)
    if not storage.exists(url, storage_options):
        return None
    saved = storage.read_json(url, storage_options)
    if saved.get("state") not in STATES:
        return None
    return RunState(saved["state"], saved.get("iteration"), saved.get("checkpoint"), saved.get("error"))
