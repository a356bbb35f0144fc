"""Images inside a zip archive in object storage (NVlabs' ``dataset_tool.py`` format), read member by member
with range requests: the central directory is read once (a few ranged GETs at the archive's end), then each
image costs one ranged GET of its local header and data; the archive is never downloaded whole.

NVlabs' layout: ``00000/img00000000.png``, ... and an optional ``dataset.json`` holding
``{"labels": [["00000/img00000000.png", 6], ...]}`` (or ``null`` for an unlabelled dataset); images are taken in
sorted member-name order, as their ``ImageFolderDataset`` does.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

from daskgan.data.decode import UnreadableImage
from daskgan.data.inflate import MAX_DOCUMENT_BYTES, MAX_MEMBER_BYTES, TooLarge, inflate
from daskgan.errors import NotFound
from daskgan.run.storage import is_transient

LOCAL_HEADER = 30  # fixed part of a zip local file header
HEADER_SLACK = 64  # bytes fetched beyond the central directory's extra-field length, for the local header's own


@dataclass(frozen=True)
class ZipEntry:
    """Where a member's bytes are: its local header's offset, compressed size, method and uncompressed size."""

    offset: int
    compressed_size: int
    method: int
    size: int

    def as_list(self) -> list[int]:
        return [self.offset, self.compressed_size, self.method, self.size]


def list_zip(fs: Any, path: str, url: str, suffixes: tuple[str, ...]) -> tuple[list[str], dict[str, ZipEntry], Any]:
    """The archive's image member names (sorted), where each lies, and ``dataset.json``'s ``labels`` (or None)."""
    try:
        with fs.open(path, "rb", block_size=2**20) as handle, zipfile.ZipFile(handle) as archive:
            infos = {info.filename: info for info in archive.infolist() if not info.is_dir()}
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as error:  # a short file fails its seeks
        if isinstance(error.__context__, OSError) and is_transient(error.__context__):
            raise error.__context__  # zipfile calls any failed read of the archive's end "not a zip file"
        raise NotFound(f"data.url: {url} is not a readable zip archive ({error})") from None
    names = sorted(name for name in infos if name.lower().endswith(suffixes))
    entries = {name: _entry(infos[name]) for name in names}
    for name in names:
        _check_method(entries[name], name, url)
    labels = _dataset_json(fs, path, infos["dataset.json"], url).get("labels") if "dataset.json" in infos else None
    return names, entries, labels


def _entry(info: zipfile.ZipInfo) -> ZipEntry:
    return ZipEntry(info.header_offset, info.compress_size, info.compress_type, info.file_size)


def _check_method(entry: ZipEntry, name: str, url: str) -> None:
    if entry.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise NotFound(f"data.url: {url}: member {name} uses zip compression method {entry.method}; only stored "
                       f"and deflated members are read")


def _dataset_json(fs: Any, path: str, info: zipfile.ZipInfo, url: str) -> dict:
    """``dataset.json``'s document, read as image members are, within its declared size and
    ``MAX_DOCUMENT_BYTES``: zipfile's own reader inflates a deflated member as far as its stream goes, whatever
    size it declares (200 KB declaring 16 bytes took 437 MiB), and bzip2 further still."""
    entry = _entry(info)
    _refuse_large_dataset_json(max(entry.size, entry.compressed_size), url)
    _check_method(entry, info.filename, url)
    data = _member_bytes(fs, path, entry, fs.cat_file(path, start=entry.offset, end=_member_end(info.filename,
                                                                                                 entry)))
    if isinstance(data, CorruptMember):
        raise NotFound(f"data.url: {url}: dataset.json is unreadable ({data})")
    if isinstance(data, BaseException):
        raise data
    return _parse_dataset_json(data, url)


def folder_dataset_json(fs: Any, path: str, listed_size: int, url: str) -> dict:
    """The document of a folder dataset's ``dataset.json`` (an object beside the images), within
    ``MAX_DOCUMENT_BYTES`` by its listed size and by what is read: the object may have grown since it was listed."""
    _refuse_large_dataset_json(listed_size, url)
    data = fs.cat_file(path, start=0, end=MAX_DOCUMENT_BYTES + 1)
    _refuse_large_dataset_json(len(data), url)
    return _parse_dataset_json(data, url)


def _refuse_large_dataset_json(size: int, url: str) -> None:
    if size > MAX_DOCUMENT_BYTES:
        raise NotFound(f"data.url: {url}: dataset.json declares {size} bytes, over the limit of "
                       f"{MAX_DOCUMENT_BYTES}; not read")


def _parse_dataset_json(data: bytes, url: str) -> dict:
    """NVlabs' ``{"labels": ...}`` object, or one line saying why not: json raises RecursionError for a document
    nested too deeply, and anything but an object has no ``labels`` to look up."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise NotFound(f"data.url: {url}: dataset.json is not JSON ({type(error).__name__}: {error})") from None
    if not isinstance(document, dict):
        raise NotFound(f"data.url: {url}: dataset.json holds a {type(document).__name__}, not NVlabs' object "
                       f"{{\"labels\": ...}}")
    return document


def _member_end(name: str, entry: ZipEntry) -> int:
    """Where a ranged GET of a member's local header and data ends (the local extra field guessed)."""
    return entry.offset + LOCAL_HEADER + len(name.encode()) + HEADER_SLACK + entry.compressed_size


def read_members(fs: Any, path: str, entries: dict[str, ZipEntry]) -> dict[str, bytes | BaseException]:
    """The uncompressed bytes of several members, fetched concurrently (one ranged GET each); a member whose
    fetch failed maps to the error, for the caller's retry or skip. A member declaring more than
    ``MAX_MEMBER_BYTES`` is not fetched: it maps to a ``CorruptMember``, skipped and counted."""
    result: dict[str, bytes | BaseException] = {
        **oversized({name: max(entry.size, entry.compressed_size) for name, entry in entries.items()})}
    names = [name for name in entries if name not in result]
    starts = [entries[n].offset for n in names]
    ends = [_member_end(n, entries[n]) for n in names]
    fetched = fs.cat_ranges([path] * len(names), starts, ends, on_error="return")
    for name, raw in zip(names, fetched):
        if isinstance(raw, BaseException):
            result[name] = raw
            continue
        result[name] = _member_bytes(fs, path, entries[name], raw)
    return result


class CorruptMember(UnreadableImage):
    """A member whose stored bytes cannot be read back, or an image too large to fetch: skipped and counted like
    an image that does not decode."""


def oversized(sizes: Mapping[str, int]) -> dict[str, CorruptMember]:
    """Of the images' declared sizes (zip members' own, objects' as listed), those over ``MAX_MEMBER_BYTES``,
    each with why it is skipped without being fetched: no training image is that large, and a crafted dataset
    could otherwise make every rank download (or inflate) gigabytes per image."""
    return {name: CorruptMember(f"declares {size} bytes, over the limit of {MAX_MEMBER_BYTES} for an image")
            for name, size in sizes.items() if size > MAX_MEMBER_BYTES}


def _member_bytes(fs: Any, path: str, entry: ZipEntry, raw: bytes) -> bytes | BaseException:
    if raw[:4] != b"PK\x03\x04":
        return CorruptMember(f"no local header at offset {entry.offset}")
    name_length, extra_length = struct.unpack("<HH", raw[26:30])
    start = LOCAL_HEADER + name_length + extra_length
    data = raw[start:start + entry.compressed_size]
    try:
        if len(data) < entry.compressed_size:  # a local extra field longer than the slack: fetch exactly
            data = fs.cat_file(path, start=entry.offset + start, end=entry.offset + start + entry.compressed_size)
    except Exception as error:  # handed back as the first GET's errors are, for the caller's retry or skip
        return error
    try:
        return inflate(data, entry.size) if entry.method == zipfile.ZIP_DEFLATED else data
    except (zlib.error, TooLarge) as error:  # a bomb declares a small size: it inflates no further than that
        return CorruptMember(f"member at offset {entry.offset} does not inflate to its {entry.size} bytes ({error})")
