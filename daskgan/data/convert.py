"""``daskgan dataset``: images converted once, on the Dask workers, at the training resolution (the counterpart of
NVlabs' ``dataset_tool.py``), so training reads small, uniform, pre-cropped images: an NVlabs-format zip or
WebDataset-style tar shards.

The source (a folder, class subfolders or ``dataset.json`` giving labels, a zip, or shards) is listed once; workers
fetch and convert chunks in parallel (decode, crop or pad to a square, resize with Lanczos as NVlabs, to RGB or
grayscale, re-encode as PNG).

- zip: one worker task writes the archive in the source's order — members ``00000/img00000000.png``, ...,
  stored uncompressed as NVlabs', ``dataset.json`` with the labels — and commits it only once it is complete;
  the images never pass through the client.
- shards: each worker task converts one shard's images and writes the shard itself (``shard-000000.tar``, ...,
  samples ``<n>.png`` with ``<n>.cls`` labels) and a note of what it holds under ``.progress/``, so a re-run skips
  the shards already written; at the end the client writes the folder's ``dataset-manifest.json.gz`` (every
  image's shard, offset and label: training reads it instead of the shards' headers). Images per shard come from
  ``shard_mb`` and the converted size of the first images.

Both write a report ``<dest>.report.json`` (count, classes, resolution, channels, every skipped input with its
reason). Only inputs that are gone or do not decode are skipped; transient storage errors are retried.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import posixpath
import uuid
import zipfile
from collections import deque
from typing import Any, Callable, Iterator

from distributed import as_completed, worker_client
from PIL import Image

from daskgan.config.coerce import require
from daskgan.config.schema import is_training_resolution
from daskgan.data.decode import DECODE_ERRORS, decoding_one_image, open_image, to_channels
from daskgan.data.index import ImageIndex, fetch_images, index_images
from daskgan.data.manifest import dataset_base, manifest_bytes
from daskgan.data.shard_scan import flatten_samples, samples_in
from daskgan.data.shard_write import tar_shard
from daskgan.errors import ConfigError
from daskgan.run import layout, storage
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

FORMATS = ("zip", "shards")
POLICIES = ("center", "center-wide", "pad")  # central square; central 4:3 band on a black square; pad with black
WIDE_ASPECT = 4 / 3  # center-wide's band (NVlabs' center-crop-wide for LSUN cars' 512x384)
CHUNK = 256  # images per worker task (zip)
PROBE = 64  # images converted first to size the shards
PROGRESS = ".progress"


@decoding_one_image()
def convert_image(data: bytes, resolution: int, channels: int, policy: str) -> bytes:
    """One image as the archive stores it: square by ``policy``, ``resolution`` pixels, PNG (``UnreadableImage``
    for one that does not decode)."""
    with open_image(data) as opened:
        image = to_channels(opened, channels)
    image = _square(image, resolution, policy)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _square(image: Image.Image, resolution: int, policy: str) -> Image.Image:
    """``image`` as a ``resolution`` square: its central square (``center``), its central ``WIDE_ASPECT`` band
    resized to the full width between black bars (``center-wide``), or the whole image between black bars (``pad``)."""
    width, height = image.size
    if policy == "center-wide":
        band_width, band_height = min(width, round(height * WIDE_ASPECT)), min(height, round(width / WIDE_ASPECT))
        left, top = (width - band_width) // 2, (height - band_height) // 2
        band = image.crop((left, top, left + band_width, top + band_height))
        band = band.resize((resolution, max(1, round(resolution / WIDE_ASPECT))), Image.LANCZOS)
        canvas = Image.new(image.mode, (resolution, resolution))
        canvas.paste(band, (0, (resolution - band.height) // 2))
        return canvas
    side = min(width, height) if policy == "center" else max(width, height)
    if policy == "center":
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif width != height:
        canvas = Image.new(image.mode, (side, side))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    return image if side == resolution else image.resize((resolution, resolution), Image.LANCZOS)


def convert_chunk(index: ImageIndex, positions: list[int], storage_options: StorageOptions, resolution: int,
                  channels: int, policy: str) -> list[tuple[int, bytes | None, str | None]]:
    """On a worker: (position, PNG bytes or None, why it was skipped) for each image of the chunk. Only an image
    that is gone or does not decode is skipped: throttling and server errors are fetched again."""
    fs, _ = storage.filesystem(index.url, storage_options)
    fetched = fetch_images(index, fs, [index.paths[p] for p in positions])
    converted = []
    for position in positions:
        data = fetched[index.paths[position]]
        try:
            if not isinstance(data, bytes):
                raise data
            converted.append((position, convert_image(data, resolution, channels, policy), None))
        except (FileNotFoundError, *DECODE_ERRORS) as error:
            converted.append((position, None, f"{type(error).__name__}: {error}"))
    return converted


def convert_dataset(client: Any, source_url: str, dest_url: str, resolution: int, channels: int = 3,
                    policy: str = "center", storage_options: StorageOptions | None = None,
                    on_chunk: Callable[[int, int], None] | None = None, format: str | None = None,
                    shard_mb: float = 256.0) -> dict[str, Any]:
    """Convert ``source_url`` into ``dest_url`` on the cluster of ``client``: an NVlabs zip (``format: zip``, the
    default for a ``.zip`` destination) or tar shards of about ``shard_mb`` MiB in the folder ``dest_url``
    (``shards``, the default otherwise); returns the report. ``on_chunk(done, total)`` follows the progress."""
    options = storage_options or {}
    format = format or ("zip" if dest_url.lower().endswith(".zip") else "shards")
    require(format in FORMATS, "--format", f"must be one of {', '.join(FORMATS)}, got {format!r}")
    require(policy in POLICIES, "--crop", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
    require(is_training_resolution(resolution), "--resolution",
            f"must be a power of two >= 8, as training takes, got {resolution}")
    require(channels in (1, 3), "--channels", f"must be 1 or 3, got {channels}")
    require(shard_mb > 0, "--shard-mb", f"must be more than 0, got {shard_mb}")
    index = index_images(source_url, options)
    settings = {"resolution": resolution, "channels": channels, "policy": policy}
    # a fresh key: the last call's may be on its way out; the zip's writer hands the index on to its converters
    shared = client.scatter(index, broadcast=format == "shards", hash=False)
    if format == "zip":
        images, skipped = _write_zip(client, shared, dest_url, settings, options, on_chunk)
    else:
        images, skipped = _write_shards(client, shared, index, dest_url, settings, options, shard_mb, on_chunk)
    report = {"source": source_url, "dest": dest_url, "format": format, "images": images,
              "classes": list(index.classes), **settings, "skipped": skipped}
    storage.write_json(f"{dest_url.rstrip('/')}.report.json", report, options)
    return report


def _write_zip(client: Any, shared: Any, dest_url: str, settings: dict, options: StorageOptions,
               on_chunk: Callable[[int, int], None] | None) -> tuple[int, list[dict]]:
    """One worker task writes the archive (``write_zip``): the images never pass through the client, which may
    be a laptop far from the cluster and its storage. Its progress comes back as events."""
    topic = f"daskgan-dataset:{uuid.uuid4().hex}"
    if on_chunk is not None:
        client.subscribe_topic(topic, lambda event: on_chunk(*event[1]))
    try:
        images, skipped, chunks = client.submit(write_zip, shared, dest_url, topic, options, pure=False,
                                                **settings).result()
    finally:
        if on_chunk is not None:
            client.unsubscribe_topic(topic)
    if on_chunk is not None:
        on_chunk(chunks, chunks)  # the last event may still be on its way
    return images, skipped


def write_zip(index: ImageIndex, dest_url: str, topic: str, storage_options: StorageOptions, resolution: int,
              channels: int, policy: str) -> tuple[int, list[dict], int]:
    """On a worker: write the converted chunks into the archive in the source's order, logging (done, total)
    chunks to ``topic``. Returns the images written, the inputs skipped and the chunks."""
    chunks = [list(range(start, min(start + CHUNK, len(index)))) for start in range(0, len(index), CHUNK)]
    kept: list[tuple[str, int]] = []
    skipped: list[dict[str, str]] = []
    settings = {"storage_options": storage_options, "resolution": resolution, "channels": channels, "policy": policy}
    with worker_client() as client, storage.writing_whole(dest_url, storage_options) as whole, \
            zipfile.ZipFile(whole, "w", zipfile.ZIP_STORED) as archive:
        for done, converted in enumerate(_converted_in_order(client, index, chunks, settings), 1):
            for position, png, reason in converted:
                if png is None:
                    skipped.append(_skip(index.paths[position], reason))
                    continue
                name = f"{len(kept) // 1000:05d}/img{len(kept):08d}.png"
                archive.writestr(name, png)
                kept.append((name, index.labels[position]))
            client.log_event(topic, (done, len(chunks)))
        labels = [[name, label] for name, label in kept] if index.classes else None
        archive.writestr("dataset.json", json.dumps({"labels": labels}))
    return len(kept), skipped, len(chunks)


def _converted_in_order(client: Any, index: ImageIndex, chunks: list[list[int]], settings: dict
                        ) -> Iterator[list[tuple[int, bytes | None, str | None]]]:
    """``convert_chunk`` of each chunk, in order, converted on the cluster at most two chunks a worker thread
    ahead of the one wanted: the cluster holds those, not a whole dataset converted faster than one writer
    uploads it. Each is let go once taken."""
    shared = client.scatter(index, broadcast=True, hash=False)  # (a fresh key, as in convert_dataset)
    convert = functools.partial(client.submit, convert_chunk, shared, pure=False, **settings)
    waiting = iter(chunks)
    futures = deque(map(convert, itertools.islice(waiting, max(2, 2 * sum(client.nthreads().values())))))
    while futures:
        future = futures.popleft()
        futures.extend(map(convert, itertools.islice(waiting, 1)))
        yield future.result()
        future.release()


def _skip(path: str, reason: str | None) -> dict[str, str]:
    logger.warning("dataset: skipping %s (%s)", path, reason)
    return {"path": path, "reason": reason or ""}


def _write_shards(client: Any, shared: Any, index: ImageIndex, dest_url: str, settings: dict,
                  options: StorageOptions, shard_mb: float,
                  on_chunk: Callable[[int, int], None] | None) -> tuple[int, list[dict]]:
    """Workers convert and write a shard each; shards a previous run wrote (their notes) are kept. The client
    then writes the folder's manifest."""
    notes = _notes_written(dest_url, settings, options)
    per_shard = (next(iter(notes.values()))["images_per_shard"] if notes else
                 _images_per_shard(client, shared, len(index), settings, options, shard_mb))
    starts = range(0, len(index), per_shard)
    todo = [number for number in range(len(starts)) if number not in notes]
    if notes:
        logger.info("dataset: %d of %d shards already written to %s; converting the rest", len(notes), len(starts),
                    dest_url)
    futures = client.map(write_shard, [shared] * len(todo), todo,
                         [list(range(starts[n], min(starts[n] + per_shard, len(index)))) for n in todo],
                         dest_url=dest_url, images_per_shard=per_shard, storage_options=options, pure=False,
                         **settings)
    for future in as_completed(futures):
        note = future.result()
        notes[note["shard"]] = note
        future.release()
        if on_chunk is not None:
            on_chunk(len(notes), len(starts))
    ordered = [notes[number] for number in sorted(notes)]
    written = shard_index(dest_url, ordered, index.classes, options)
    storage.write_bytes(storage.join(dest_url, layout.MANIFEST),
                        manifest_bytes(written, dataset_base(dest_url, options)), options)
    return len(written), [skipped for note in ordered for skipped in note["skipped"]]


def write_shard(index: ImageIndex, number: int, positions: list[int], dest_url: str, images_per_shard: int,
                storage_options: StorageOptions, resolution: int, channels: int, policy: str) -> dict[str, Any]:
    """On a worker: convert the images at ``positions`` and write them as ``shard-<number>.tar`` (samples named by
    source position, ``.png`` with a ``.cls`` label), then the note of what it holds: a note means its shard is
    whole, so a re-run skips it."""
    samples, skipped = [], []
    for position, png, reason in convert_chunk(index, positions, storage_options, resolution, channels, policy):
        if png is None:
            skipped.append(_skip(index.paths[position], reason))
            continue
        label = {"cls": str(index.labels[position]).encode()} if index.classes else {}
        samples.append((f"{position:09d}", {"png": png, **label}))
    note = {"shard": number, "name": None, "members": [], "skipped": skipped, "images_per_shard": images_per_shard,
            "settings": {"resolution": resolution, "channels": channels, "policy": policy}}
    if samples:
        data = tar_shard(samples)
        note["name"] = f"shard-{number:06d}.tar"
        storage.write_bytes(storage.join(dest_url, note["name"]), data, storage_options)
        note["members"] = [list(sample) for sample in samples_in(io.BytesIO(data))]
    storage.write_json(storage.join(dest_url, PROGRESS, f"shard-{number:06d}.json"), note, storage_options)
    return note


def _notes_written(dest_url: str, settings: dict, options: StorageOptions) -> dict[int, dict]:
    """The notes of shards a previous run of the same conversion wrote to ``dest_url`` (another conversion's are
    refused: its shards would mix with these)."""
    folder = storage.join(dest_url, PROGRESS)
    notes = {}
    for name in storage.list_names(folder, options):
        note = storage.read_json(storage.join(folder, name), options)
        if note.get("settings") != settings:
            raise ConfigError(f"{dest_url} holds shards of another conversion ({note.get('settings')}): choose "
                              f"another destination, or delete it")
        notes[int(note["shard"])] = note
    return notes


def _images_per_shard(client: Any, shared: Any, count: int, settings: dict, options: StorageOptions,
                      shard_mb: float) -> int:
    """How many images make about ``shard_mb`` MiB, from the converted size of the first ones (tar headers and
    the label member included)."""
    probe = client.submit(convert_chunk, shared, list(range(min(PROBE, count))), storage_options=options,
                          pure=False, **settings).result()
    sizes = [len(png) + 3 * 512 for _, png, _ in probe if png is not None] or [3 * 512]
    return max(1, int(shard_mb * 2**20 / (sum(sizes) / len(sizes))))


def shard_index(dest_url: str, notes: list[dict], classes: tuple[str, ...], options: StorageOptions) -> ImageIndex:
    """The index of the shards the notes describe (shards numbered as written; empty ones left out)."""
    _, root = storage.filesystem(dest_url, options)
    written = [note for note in notes if note["name"]]
    shards = [posixpath.join(root.rstrip("/"), note["name"]) for note in written]
    paths, entries, labels = flatten_samples(shards, [note["members"] for note in written])
    return ImageIndex(dest_url, tuple(paths), tuple(label or 0 for label in labels), classes,
                      tuple(e.size for e in entries), entries=tuple(entries), shards=tuple(shards))
