"""Checkpoints in the run directory: ``checkpoints/<iteration>.pt`` objects plus a small ``latest.json`` pointer.

The checkpoint object is written completely first (on a file system under a temporary name, then renamed), the
index and the pointer after it, so a crash mid-write never leaves a "latest" that points at a broken file; a resume
takes the newest checkpoint they name that reads whole, passing over one that a full disk cut short. The newest
``keep`` checkpoints are kept, and with ``keep_best`` also the best by a metric (lower is better for FID and KID,
higher for IS); ``index.json`` lists the kept ones and their scores, so any of them can be resumed from or sampled.
Old checkpoints are deleted last. Nothing secret goes in: the job config is stored with credentials redacted.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import zipfile
from typing import Any

import torch

from daskgan.errors import CheckpointMismatch, CheckpointUnreadable, NotFound, first_line
from daskgan.run import layout, storage
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

FORMAT = 1  # the layout of a checkpoint's dict (daskgan.training.state); raise it when that changes


def save(run_url: str, state: dict[str, Any], iteration: int, keep: int,
         storage_options: StorageOptions | None = None, *, score: float | None = None, keep_best: int = 0,
         metric: str = "fid", higher_is_better: bool = False) -> str:
    """Write ``state`` as the checkpoint of ``iteration`` (with its ``metric`` ``score``, if evaluated), update
    the index and the pointer, then drop what is neither among the newest ``keep`` nor the best ``keep_best``.

    Checkpoints of later iterations belong to a branch the run abandoned by resuming from an earlier one: they
    are dropped too, so the one just written is always the newest and is never deleted."""
    name = layout.checkpoint_name(iteration)
    url = layout.checkpoint_url(run_url, iteration)
    storage.write_bytes(url, storage.torch_bytes(state), storage_options)
    scores = {int(i): value for i, value in index(run_url, storage_options).get("scores", {}).items()}
    if score is not None:
        scores[iteration] = score
    listed = dict(list_checkpoints(run_url, storage_options))
    current = {i: u for i, u in listed.items() if i <= iteration}
    newest = sorted(current)[-keep:]
    sign = -1 if higher_is_better else 1  # IS ranks high to low; FID and KID low to high
    best = sorted((i for i in current if i in scores), key=lambda i: (sign * scores[i], i))[:keep_best]
    _write_index(run_url, current, newest, best, scores, metric, storage_options)
    storage.write_json(layout.pointer_url(run_url), {"iteration": iteration, "name": name}, storage_options)
    _remove(listed, set(listed) - set(newest) - set(best), storage_options)
    logger.info("checkpoint %s written", url)
    return url


def rewind(run_url: str, iteration: int, storage_options: StorageOptions | None = None) -> None:
    """Resuming from ``iteration`` abandons the run's later checkpoints, as its later records are trimmed: drop
    them and their scores, and point ``latest`` at ``iteration`` (or the newest before it), so that a restart
    before the next save comes back here and not to the abandoned branch."""
    listed = dict(list_checkpoints(run_url, storage_options))
    later = {i for i in listed if i > iteration}
    if not later:
        return
    current = {i: u for i, u in listed.items() if i <= iteration}
    old = index(run_url, storage_options)
    scores = {int(i): value for i, value in old.get("scores", {}).items()}
    newest = sorted({e["iteration"] for e in old.get("latest", []) if e["iteration"] in current} | set(current) & {
        max(current, default=None)})
    _write_index(run_url, current, newest, [e["iteration"] for e in old.get("best", []) if e["iteration"] in current],
                 scores,
                 old.get("metric", "fid"), storage_options)
    pointer = layout.pointer_url(run_url)
    if current:
        newest = max(current)
        storage.write_json(pointer, {"iteration": newest, "name": layout.checkpoint_name(newest)}, storage_options)
    elif storage.exists(pointer, storage_options):
        storage.remove(pointer, storage_options)
    _remove(listed, later, storage_options)
    logger.info("resumed from iteration %d: dropped the later checkpoints %s", iteration, sorted(later))


def _write_index(run_url: str, listed: dict[int, str], newest: list[int], best: list[int],
                 scores: dict[int, float], metric: str, storage_options: StorageOptions | None) -> None:
    kept = set(newest) | set(best)
    storage.write_json(layout.index_url(run_url), {
        "metric": metric, "latest": [{"iteration": i, "url": listed[i]} for i in newest],
        "best": [{"iteration": i, "url": listed[i], metric: scores[i]} for i in best],
        "scores": {str(i): scores[i] for i in sorted(kept) if i in scores}}, storage_options)


def _remove(listed: dict[int, str], iterations: set[int], storage_options: StorageOptions | None) -> None:
    """Delete checkpoints last, after the index and pointer no longer name them."""
    for iteration in sorted(iterations):
        storage.remove(listed[iteration], storage_options)


def index(run_url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """The run's checkpoint index: ``latest`` and ``best`` (with scores) as lists of {iteration, url}; {} if none
    (or if it cannot be read: the next save writes it again)."""
    return _read_metadata(layout.index_url(run_url), storage_options) or {}


def list_checkpoints(run_url: str, storage_options: StorageOptions | None = None) -> list[tuple[int, str]]:
    """(iteration, URL) of every checkpoint object in the run directory, oldest first, whether or not a save
    finished with it (resume from ``latest`` instead)."""
    folder = layout.checkpoints_url(run_url)
    named = ((layout.checkpoint_iteration(name), name) for name in storage.list_names(folder, storage_options))
    return [(iteration, storage.join(folder, name)) for iteration, name in named if iteration is not None]


def resolve(url: str, storage_options: StorageOptions | None = None) -> str:
    """The checkpoint a user means by ``url``, wherever one is taken (``generate``, ``sample``, ``train.init_from``,
    ``output.resume``): a run directory (or its ``checkpoints`` folder) means the run's newest checkpoint (see
    ``latest``), its ``checkpoints/latest.json`` or ``index.json`` what they name; a file or object is itself. A
    folder that holds no checkpoints is refused in one line (reading it as a file used to be retried for half a
    minute, and the pointer was read as a checkpoint)."""
    folder, name = posixpath.split(url.rstrip("/"))
    if name in (layout.POINTER, layout.INDEX) and posixpath.basename(folder) == layout.CHECKPOINTS:
        return _newest(posixpath.dirname(folder), url, storage_options)
    if not storage.is_folder(url, storage_options):
        return url
    run_url = folder if name == layout.CHECKPOINTS else url.rstrip("/")
    if not storage.list_names(layout.checkpoints_url(run_url), storage_options):
        raise NotFound(f"{url} is a folder holding no daskgan checkpoint: give a checkpoint, a run directory or its "
                       f"{layout.CHECKPOINTS}/{layout.POINTER}")
    return _newest(run_url, url, storage_options)


def _newest(run_url: str, url: str, storage_options: StorageOptions | None) -> str:
    newest = latest(run_url, storage_options)
    if newest is None:
        raise NotFound(f"{url}: the run {run_url} has no finished checkpoint yet (its checkpoints are listed in "
                       f"{layout.index_url(run_url)})")
    logger.info("%s: the newest checkpoint is %s", url, newest)
    return newest


def latest(run_url: str, storage_options: StorageOptions | None = None) -> str | None:
    """URL of the newest complete checkpoint (see ``newest_readable``), or None when the run has none yet."""
    return newest_readable(run_url, storage_options)[0]


def newest_readable(run_url: str, storage_options: StorageOptions | None = None) -> tuple[str | None, list[str]]:
    """The newest checkpoint a save finished and that can still be read, and what was passed over to find it.

    A checkpoint counts once the pointer or the index names it (they are written after it), so an object of a
    save cut short is never chosen, on object storage either; one that is missing or cut short (a file truncated
    by a full disk) is passed over for the previous one, with a warning. A run whose checkpoints all fail so is
    refused rather than started again from iteration 0, which would drop its records and checkpoints."""
    passed_over = []
    for url in _finished(run_url, storage_options):
        damage = _damage(url, storage_options)
        if damage is None:
            return url, passed_over
        logger.warning("checkpoint %s %s: falling back to the previous one", url, damage)
        passed_over.append(f"{url} {damage}")
    if passed_over:
        raise CheckpointUnreadable(f"none of the checkpoints of {run_url} can be read ({'; '.join(passed_over)}); "
                                   f"resume one explicitly with output.resume, or start a new output.run_url")
    return None, passed_over


def _finished(run_url: str, storage_options: StorageOptions | None) -> list[str]:
    """URLs of the checkpoints whose save finished, the pointer's first, then the index's older ones, newest first
    (each inside this run's directory, wherever the run was copied from)."""
    pointer = _read_metadata(layout.pointer_url(run_url), storage_options)
    indexed = index(run_url, storage_options)
    iterations = {entry["iteration"] for kind in ("latest", "best") for entry in indexed.get(kind, [])}
    newest = [] if pointer is None else [storage.join(layout.checkpoints_url(run_url), pointer["name"])]
    below = pointer["iteration"] if pointer is not None else float("inf")
    return newest + [layout.checkpoint_url(run_url, i) for i in sorted(iterations, reverse=True) if i < below]


def _read_metadata(url: str, storage_options: StorageOptions | None) -> dict[str, Any] | None:
    """The pointer or the index; None if missing or unreadable (written whole since, but a run directory may hold
    one that an earlier version cut short)."""
    if not storage.exists(url, storage_options):
        return None
    try:
        return storage.read_json(url, storage_options)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("%s cannot be read (%s); going by the other checkpoint records", url, first_line(exc))
        return None


@storage.operation
def _damage(url: str, storage_options: StorageOptions | None) -> str | None:
    """Why the checkpoint at ``url`` cannot be resumed from, or None. torch writes a checkpoint as a zip whose
    central directory comes last: reading that directory (only the end of the file: 4 range requests, 4.5 KB of
    a 256 MiB checkpoint) tells a whole one from one cut short without reading the tensors."""
    try:
        with storage.reading(url, storage_options) as handle:
            zipfile.ZipFile(handle)
    except FileNotFoundError:
        return "is missing"
    except zipfile.BadZipFile as exc:
        return f"is cut short (no zip central directory at its end: {first_line(exc)})"
    return None


def load(url: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (tensors, numbers and strings only: no code is unpickled)."""
    return parse(read(url, storage_options), url)


def read(url: str, storage_options: StorageOptions | None = None) -> bytes:
    """A checkpoint's bytes; a missing one says where the run's checkpoints are listed."""
    try:
        return storage.read_bytes(url, storage_options)
    except NotFound as exc:
        raise NotFound(f"checkpoint {url} does not exist ({exc}); the run's checkpoints are listed in "
                       f"{layout.index_url('<run_url>')}") from exc


def parse(data: bytes, url: str) -> dict[str, Any]:
    """A checkpoint from its bytes (``torch.load`` with ``weights_only``)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise CheckpointUnreadable(f"{url} is not a daskgan checkpoint ({first_line(exc)})") from exc
    if not isinstance(state, dict) or "iteration" not in state:
        raise CheckpointUnreadable(f"{url} is not a daskgan checkpoint (it holds no training iteration)")
    return state


def check_compatible(state: dict[str, Any], model: dict[str, Any], url: str) -> None:
    """Refuse a checkpoint whose model description differs from the job's, naming every differing field."""
    saved = state.get("model", {})
    differences = [f"{k}: checkpoint has {saved.get(k)!r}, job has {model.get(k)!r}"
                   for k in sorted(set(saved) | set(model)) if saved.get(k) != model.get(k)]
    if differences:
        raise CheckpointMismatch(f"checkpoint {url} was made for a different model ({'; '.join(differences)})")
