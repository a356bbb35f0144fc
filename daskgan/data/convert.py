"""``daskgan dataset``: images converted once, on the Dask workers, into an NVlabs-format zip at the training
resolution (the counterpart of NVlabs' ``dataset_tool.py``), so training reads small, uniform, pre-cropped members.

The source (a folder, class subfolders or ``dataset.json`` giving labels, or a zip) is listed once; workers fetch
and convert chunks in parallel (decode, crop or pad to a square, resize with Lanczos as NVlabs, to RGB or
grayscale, re-encode as PNG); the client writes the archive in the source's order — members
``00000/img00000000.png``, ..., stored uncompressed as NVlabs', ``dataset.json`` with the labels — and a report
``<dest>.report.json`` (count, classes, resolution, channels, every skipped input with its reason).
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from typing import Any, Callable

from PIL import Image

from daskgan.data.decode import DECODE_ERRORS
from daskgan.data.index import ImageIndex, fetch_objects, index_images
from daskgan.run import storage
from daskgan.run.storage import StorageOptions

logger = logging.getLogger(__name__)

POLICIES = ("center", "pad")  # crop the central square, or pad the short side with black
CHUNK = 256  # images per worker task


def convert_image(data: bytes, resolution: int, channels: int, policy: str) -> bytes:
    """One image as the archive stores it: square by ``policy``, ``resolution`` pixels, PNG."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB" if channels == 3 else "L")
    width, height = image.size
    side = min(width, height) if policy == "center" else max(width, height)
    if policy == "center":
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif width != height:
        canvas = Image.new(image.mode, (side, side))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    if side != resolution:
        image = image.resize((resolution, resolution), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def convert_chunk(index: ImageIndex, positions: list[int], storage_options: StorageOptions, resolution: int,
                  channels: int, policy: str) -> list[tuple[int, bytes | None, str | None]]:
    """On a worker: (position, PNG bytes or None, why it was skipped) for each image of the chunk."""
    fs, _ = storage.filesystem(index.url, storage_options)
    fetched = fetch_objects(index, fs, [index.paths[p] for p in positions])
    converted = []
    for position in positions:
        data = fetched.get(index.paths[position])
        try:
            if isinstance(data, BaseException) or data is None:
                raise data or FileNotFoundError(index.paths[position])
            converted.append((position, convert_image(data, resolution, channels, policy), None))
        except (FileNotFoundError, *DECODE_ERRORS) as error:
            converted.append((position, None, f"{type(error).__name__}: {error}"))
    return converted


def convert_dataset(client: Any, source_url: str, dest_url: str, resolution: int, channels: int = 3,
                    policy: str = "center", storage_options: StorageOptions | None = None,
                    on_chunk: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Convert ``source_url`` into the NVlabs zip ``dest_url`` on the cluster of ``client``; returns the report.
    ``on_chunk(done, total)`` follows the progress, chunk by chunk."""
    options = storage_options or {}
    index = index_images(source_url, options)
    chunks = [list(range(start, min(start + CHUNK, len(index)))) for start in range(0, len(index), CHUNK)]
    shared = client.scatter(index, broadcast=True)
    futures = client.map(convert_chunk, [shared] * len(chunks), chunks, storage_options=options, resolution=resolution,
                         channels=channels, policy=policy, pure=False)
    kept: list[tuple[str, int]] = []
    skipped: list[dict[str, str]] = []
    fs, path = storage.filesystem(dest_url, options)
    with fs.open(path, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        for done, future in enumerate(futures, 1):  # in the source's order, whatever order the workers finish in
            for position, png, reason in future.result():
                if png is None:
                    skipped.append({"path": index.paths[position], "reason": reason})
                    logger.warning("dataset: skipping %s (%s)", index.paths[position], reason)
                    continue
                name = f"{len(kept) // 1000:05d}/img{len(kept):08d}.png"
                archive.writestr(name, png)
                kept.append((name, index.labels[position]))
            future.release()
            if on_chunk is not None:
                on_chunk(done, len(futures))
        labels = [[name, label] for name, label in kept] if index.classes else None
        archive.writestr("dataset.json", json.dumps({"labels": labels}))
    report = {"source": source_url, "dest": dest_url, "images": len(kept), "classes": list(index.classes),
              "resolution": resolution, "channels": channels, "policy": policy, "skipped": skipped}
    storage.write_json(f"{dest_url}.report.json", report, options)
    return report
