"""fsspec helpers: the one place where run-directory URLs are joined, read and written.

Everything that touches object storage goes through here so that any fsspec URL (s3://, file://, memory://, gcs://)
works the same way, with the caller's ``storage_options`` (endpoint, profile, anon; credentials preferably from the
environment or the machine's role rather than from the job file).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs

StorageOptions = Mapping[str, Any]


def join(url: str, *parts: str) -> str:
    """Join ``parts`` under ``url``, refusing parts that would escape it (``..``, absolute paths, empty names)."""
    for part in parts:
        pieces = part.split("/")
        if part.startswith("/") or any(p in ("", ".", "..") for p in pieces):
            raise ValueError(f"invalid path component {part!r}: must be a relative name inside {url}")
    return posixpath.join(url.rstrip("/"), *parts)


def filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem serving ``url`` and the path inside it (``${VAR}`` options resolved here).

    Listing caches are off unless asked for: a run directory is written by several processes (ranks, restarted
    workers, the client), and a cached listing in one of them hides objects the others wrote since.
    """
    return url_to_fs(url, **{"use_listings_cache": False, **resolve_references(storage_options or {})})


def resolve_references(options: StorageOptions) -> dict:
    """Copy of ``options`` with every ``${NAME}`` value replaced by that environment variable of this process.

    Credentials are resolved where the storage is opened (on the worker), so the values never enter the job
    config, the task graph, logs or checkpoints.
    """
    from daskgan.config import ENV_REFERENCE

    resolved = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            resolved[name] = resolve_references(value)
            continue
        match = ENV_REFERENCE.match(value) if isinstance(value, str) else None
        if match and match.group(1) not in os.environ:
            raise KeyError(f"storage option {name!r} refers to ${{{match.group(1)}}}, which is not set in the "
                           f"environment of this process (pid {os.getpid()})")
        resolved[name] = os.environ[match.group(1)] if match else value
    return resolved


def write_bytes(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write one whole object (object stores have no partial writes, so readers never see half of it)."""
    write_many({url: data}, storage_options)


def write_many(objects: Mapping[str, bytes], storage_options: StorageOptions | None = None) -> None:
    """Write several whole objects on one filesystem, concurrently where the filesystem can (s3fs does)."""
    if not objects:
        return
    fs, _ = filesystem(next(iter(objects)), storage_options)
    paths = {filesystem(url, storage_options)[1]: data for url, data in objects.items()}
    if not _is_object_store(fs):
        for parent in {posixpath.dirname(p) for p in paths} - {""}:
            fs.makedirs(parent, exist_ok=True)
    fs.pipe(paths)


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def write_json(url: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


def read_json(url: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def list_names(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Names of the objects directly under ``url`` (sorted); empty when the prefix does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(url: str, storage_options: StorageOptions | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    fs.rm(path, recursive=True)


def copy_tree(url: str, local_dir: str, storage_options: StorageOptions | None = None) -> None:
    """Mirror everything under ``url`` into ``local_dir`` (used to keep the demo's results after its S3 stops)."""
    fs, path = filesystem(url, storage_options)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)


def torch_bytes(obj: Any) -> bytes:
    """Serialise ``obj`` with torch.save into memory, so it can be written as one object."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory") for p in protocols)
