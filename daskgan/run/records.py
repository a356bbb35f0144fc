"""Per-iteration records, sample grids and TensorBoard events: written by rank 0 into the run directory.

Records go in parts (object stores cannot append), joined into one table when the run ends, beside a summary
plot; where each lives is ``daskgan.run.layout``'s.

Live view: each record is also published as a Dask event on the run's topic; ``daskgan.cluster.monitor`` on the
client subscribes to it and yields the records as they arrive.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import pandas as pd
import torch

from daskgan.config.schema import METRICS
from daskgan.run import layout, storage
from daskgan.run.images import image_grid, png_bytes
from daskgan.run.storage import StorageOptions
from daskgan.run.summary import summary_png

logger = logging.getLogger(__name__)

TENSORBOARD_ROLL_BYTES = 4 * 2**20  # S3 has no append: start a new event file rather than re-upload a big one


def topic(run_url: str) -> str:
    """The Dask event topic a run's records are published on."""
    return f"daskgan:{run_url}"


class RunWriter:
    """Rank 0's sink for records, grids and TensorBoard events; buffers and uploads every ``flush_every`` records."""

    def __init__(self, run_url: str, storage_options: StorageOptions | None, *, start_iteration: int,
                 flush_every: int):
        from torch.utils.tensorboard import SummaryWriter

        self.run_url = run_url
        self.storage_options = storage_options
        self.flush_every = flush_every
        self._pending: list[dict[str, Any]] = []
        self._tb_local = tempfile.mkdtemp(prefix="daskgan-tb-")
        self._tb_uploaded: dict[str, int] = {}
        self._summary_writer_cls = SummaryWriter
        # purge_step makes TensorBoard drop steps past the checkpoint that an interrupted earlier session logged
        self._tb = SummaryWriter(self._tb_local, purge_step=start_iteration + 1 if start_iteration else None)
        self._live = _live_publisher(topic(run_url))
        self._restarts: dict[str, Any] = {}
        self._annotations: dict[str, Any] = {}
        trim_records(run_url, start_iteration, storage_options)

    def mark_restart(self, count: int, cause: str, resumed_at: int, redone: int,
                     notice_to_checkpoint_s: float | None = None) -> None:
        """Note a recovery restart: the next record carries its cause (and, after a preemption, the seconds from
        the worker's notice to the durable checkpoint), and every later one the restart count."""
        self._restarts = {"restarts": count, "restart_cause": cause, "redone_iterations": redone}
        if notice_to_checkpoint_s is not None:
            self._restarts["notice_to_checkpoint_s"] = notice_to_checkpoint_s
        self._tb.add_text("recovery/restarts", f"restart {count} at iteration {resumed_at}: {cause} "
                          f"({redone} iterations redone)", resumed_at + 1)

    def annotate_next(self, **fields: Any) -> None:
        """Fields for the next record only (an event between iterations, e.g. a checkpoint that failed)."""
        self._annotations.update(fields)

    def record(self, record: dict[str, Any]) -> None:
        """Keep and publish one iteration's record, stamped with the time rank 0 wrote it (Unix seconds): what
        ``daskgan compare`` takes a run's wall time and GPU-hours from."""
        record = {**record, "time": round(time.time(), 3), **self._restarts, **self._annotations}
        self._restarts = {"restarts": self._restarts["restarts"]} if self._restarts else {}
        self._annotations = {}
        self._live(record)
        self._pending.append(record)
        for name, value in record.items():
            if name not in ("iteration", "time") and isinstance(value, (int, float)):  # TensorBoard has times
                self._tb.add_scalar(_tensorboard_tag(name), value, record["iteration"])
        if "metrics_extractor" in record:  # which network the metrics/ scalars of this step were measured with
            self._tb.add_text("metrics/extractor", record["metrics_extractor"], record["iteration"])
        if len(self._pending) >= self.flush_every:
            self.flush()

    def grid(self, iteration: int, images: torch.Tensor, name: str | None = None) -> str:
        """Save a grid of ``images`` (N, 3, H, W in [-1, 1]) as PNG and as a TensorBoard image; ``name``
        instead of the iteration for a grid that is not a sample (``reals``)."""
        grid = image_grid(images)
        url = layout.grid_url(self.run_url, iteration, name)
        storage.write_bytes(url, png_bytes(grid), self.storage_options)
        self._tb.add_image(f"samples/{name or 'fixed_z'}", grid, iteration)
        return url

    def flush(self) -> None:
        if self._pending:
            first, last = self._pending[0]["iteration"], self._pending[-1]["iteration"]
            storage.write_bytes(layout.record_part_url(self.run_url, first, last), _jsonl(self._pending),
                                self.storage_options)
            self._pending = []
        self._upload_tensorboard()

    def close(self) -> pd.DataFrame:
        """Flush everything and write ``records.parquet``; returns the full record table."""
        self.flush()
        self._tb.close()
        self._upload_tensorboard()
        shutil.rmtree(self._tb_local, ignore_errors=True)
        table = load(self.run_url, self.storage_options)
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        storage.write_many({layout.records_table_url(self.run_url): buffer.getvalue(),
                            layout.summary_url(self.run_url): summary_png(table, title=self.run_url)},
                           self.storage_options)
        return table

    def _upload_tensorboard(self) -> None:
        self._tb.flush()
        changed = {}
        for name in sorted(os.listdir(self._tb_local)):
            size = os.path.getsize(os.path.join(self._tb_local, name))
            if self._tb_uploaded.get(name) != size:
                with open(os.path.join(self._tb_local, name), "rb") as handle:
                    changed[layout.tensorboard_url(self.run_url, name)] = handle.read()
                self._tb_uploaded[name] = size
        storage.write_many(changed, self.storage_options)
        if any(size > TENSORBOARD_ROLL_BYTES for size in self._tb_uploaded.values()) and self._tb.file_writer:
            self._tb.close()
            for name in os.listdir(self._tb_local):  # uploaded and closed: the local copy is no longer needed
                os.remove(os.path.join(self._tb_local, name))
            self._tb_uploaded.clear()
            self._tb = self._summary_writer_cls(self._tb_local)


def load(run_url: str, storage_options: StorageOptions | None = None) -> pd.DataFrame:
    """All records of a run as a DataFrame, one row per iteration, in order (an iteration held by two parts, as a
    trim cut short leaves them, once)."""
    rows = [row for _, _, url in _record_parts(run_url, storage_options)
            for row in _read_jsonl(url, storage_options)]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).drop_duplicates("iteration", keep="last")
    return table.sort_values("iteration", ignore_index=True)


def has_records(run_url: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether a run has written records into ``run_url``."""
    return bool(_record_parts(run_url, storage_options))


def trim_records(run_url: str, last_kept: int, storage_options: StorageOptions | None = None) -> None:
    """Drop records after iteration ``last_kept`` (they are redone after a resume), so none are duplicated.

    A part reaching past ``last_kept`` is written again without them before the old part is deleted, so a trim
    cut short loses nothing (``load`` reads an iteration in both parts once; the next start trims again)."""
    for first, last, url in _record_parts(run_url, storage_options):
        if first > last_kept:
            storage.remove(url, storage_options)
        elif last > last_kept:
            kept = [r for r in _read_jsonl(url, storage_options) if r["iteration"] <= last_kept]
            storage.write_bytes(layout.record_part_url(run_url, first, last_kept), _jsonl(kept), storage_options)
            storage.remove(url, storage_options)


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _live_publisher(event_topic: str):
    """Publish to the Dask scheduler when running inside a worker; a no-op elsewhere (plain scripts, tests)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return lambda record: None
    return lambda record: worker.log_event(event_topic, record)


def _tensorboard_tag(name: str) -> str:
    if name.startswith("loss_"):
        return f"loss/{name[5:]}"
    if name in ("D_x", "D_G_z"):
        return f"D/{name}"
    if name.startswith("ada_"):
        return f"ada/{name[4:]}"
    if name in METRICS:
        return f"metrics/{name}"
    if name in ("restarts", "redone_iterations", "notice_to_checkpoint_s"):
        return f"recovery/{name}"
    return f"progress/{name}"


def _record_parts(run_url: str, storage_options: StorageOptions | None) -> list[tuple[int, int, str]]:
    parts_url = layout.record_parts_url(run_url)
    spans = ((layout.record_part_span(name), name) for name in storage.list_names(parts_url, storage_options))
    return [(*span, storage.join(parts_url, name)) for span, name in spans if span is not None]


def _read_jsonl(url: str, storage_options: StorageOptions | None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_bytes(url, storage_options).decode().splitlines() if line]
