"""fsspec helpers: the one place where run-directory URLs are joined, read and written.

Everything that touches object storage goes through here so that any fsspec URL (s3://, file://, memory://, gcs://)
works the same way, with the caller's ``storage_options`` (endpoint, profile, anon; credentials preferably from the
environment or the machine's role rather than from the job file). Failures name the URL: a missing bucket or
object (or a folder where an object is read) raises ``NotFound``, refused or missing credentials
``StorageAccessError`` (both one line in the CLI), at once: only failures that may pass are retried.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import io
import json
import logging
import posixpath
import random
import time
import uuid
from typing import IO, Any, Callable, Iterator, Mapping, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

from daskgan.config.credentials import resolve_references
from daskgan.config.schema import RETRY_SECONDS, RETRY_TRIES
from daskgan.errors import NotFound, StorageAccessError, StorageUnavailable, first_line

try:  # s3fs lets botocore's "no credentials" through untranslated
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    MISSING_CREDENTIALS: tuple[type[Exception], ...] = (NoCredentialsError, PartialCredentialsError)
except ImportError:
    MISSING_CREDENTIALS = ()

CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment, an AWS profile, the machine's "
                      "role, or storage_options key/secret as ${ENV} references")
Operation = TypeVar("Operation", bound=Callable[..., Any])
StorageOptions = Mapping[str, Any]
logger = logging.getLogger(__name__)
RANGE_READ_BYTES = 2**20  # what ``reading`` fetches at a time (s3fs reads 50 MiB ahead by default)


# what the storage answers the same however often it is asked: retrying them only delays the user's one line
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, *MISSING_CREDENTIALS)


def is_transient(error: BaseException) -> bool:
    """Whether a storage failure may pass if tried again: throttling (503 SlowDown), server errors (500), resets
    and timeouts. A missing object, a folder where an object was asked for (or an object where a folder was), a
    refused or missing credential and a programming error are not: every ``OSError`` else is."""
    if isinstance(error, PERMANENT):
        return False
    return isinstance(error, (OSError, TimeoutError)) or type(error).__module__.startswith(("botocore", "aiohttp"))


class Backoff:
    """Exponential backoff with full jitter, bounded by a number of tries and a total time."""

    def __init__(self, tries: int = RETRY_TRIES, max_seconds: float = RETRY_SECONDS, base_s: float = 0.5,
                 cap_s: float = 20.0):
        self.tries, self.max_seconds, self.base_s, self.cap_s = tries, max_seconds, base_s, cap_s
        self.failures = 0
        self._started = time.monotonic()

    def wait(self, what: str, error: BaseException) -> None:
        """Sleep before the next try, or raise ``StorageUnavailable`` once the tries or the time are used up."""
        delay = self.next_delay(what, error)
        logger.warning("%s: %s (%s); retry %d in %.1fs", what, type(error).__name__, first_line(error),
                       self.failures, delay)
        time.sleep(delay)

    def next_delay(self, what: str, error: BaseException, in_a_row: int | None = None) -> float:
        """The wait before the next try (``StorageUnavailable`` once the tries or the time are used up).

        The wait grows with this operation's failures, and no faster than ``in_a_row``, the storage's failures in
        a row (any answer resets them) where a window of fetches keeps count: under random throttling an unlucky
        image then waits as little as the others, while a storage that answers nothing sees every wait grow."""
        self.failures += 1
        exponent = self.failures if in_a_row is None else min(self.failures, in_a_row)
        delay = random.uniform(0, min(self.cap_s, self.base_s * 2 ** min(exponent - 1, 32)))
        elapsed = time.monotonic() - self._started
        if self.failures >= self.tries or elapsed + delay > self.max_seconds:
            raise StorageUnavailable(f"{what}: still failing after {self.failures} tries in {elapsed:.0f}s "
                                     f"({type(error).__name__}: {first_line(error)})") from error
        return delay


_RETRY_BOUNDS: contextvars.ContextVar[tuple[int, float]] = contextvars.ContextVar(
    "retry_bounds", default=(RETRY_TRIES, RETRY_SECONDS))


@contextlib.contextmanager
def retry_bounds(tries: int, seconds: float) -> Iterator[None]:
    """Within this block (in this thread), storage operations retry at most ``tries`` times within ``seconds``: a
    job's ``data.retry_tries``/``retry_seconds`` bound the operations on its dataset as they bound its image reads,
    rather than the defaults that other operations (the run directory's) keep."""
    token = _RETRY_BOUNDS.set((tries, seconds))
    try:
        yield
    finally:
        _RETRY_BOUNDS.reset(token)


def retrying(function: Operation) -> Operation:
    """Retry ``function(url_or_objects, ...)`` on transient storage errors (see ``Backoff``), within the bounds
    ``retry_bounds`` sets."""

    @functools.wraps(function)
    def retried(target: str | Mapping[str, bytes], *args: Any, **kwargs: Any) -> Any:
        backoff = Backoff(*_RETRY_BOUNDS.get())
        while True:
            try:
                return function(target, *args, **kwargs)
            except Exception as error:
                if not is_transient(error):
                    raise
                what = target if isinstance(target, str) else f"{len(target)} objects from {next(iter(target))}"
                backoff.wait(f"{function.__name__} {what}", error)

    return retried  # type: ignore[return-value]


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


S3_READ_CONNECTIONS = 64
# one try of ``data.retry_tries`` used to be botocore's attempts of a request (its legacy mode's 5), which a
# stream's filesystem now leaves to the stream (see ``for_reading_many``)
CLIENT_ATTEMPTS_PER_TRY = 5


def for_reading_many(url: str, storage_options: StorageOptions | None) -> StorageOptions:
    """``storage_options`` for a stream reading many objects of an S3 bucket at once.

    botocore's pool holds 10 connections, so at 100 ms to a first byte a rank would read at most 100 objects/s
    (measured through a delaying proxy: 116 images/s with 10, 474 with 64, where the server's own rate capped it).
    And botocore's retries are off: it sleeps (up to 1, 2, 4, 8 s) inside the request, holding the stream's slot,
    and under the stream's own retries its sleeps multiply (see ``benchmarks/throttle.py``); the stream retries
    each image itself, keeping its other fetches going meanwhile.
    An explicit ``config_kwargs.max_pool_connections`` or ``retries`` wins; other stores are left as they are."""
    options = dict(storage_options or {})
    if urlsplit(url).scheme not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", S3_READ_CONNECTIONS)
    config.setdefault("retries", {"total_max_attempts": 1})
    return {**options, "config_kwargs": config}


def cat_objects(fs: fsspec.AbstractFileSystem, paths: list[str], on_error: str = "return") -> dict[str, Any]:
    """The whole contents of many small objects, fetched concurrently, one GET each.

    s3fs asks each object's size (a HEAD) before a whole-object GET so that it could split a large one into
    concurrent ranges; told to read in one piece (``max_concurrency=1``) it skips that round trip, halving the
    requests for dataset images."""
    cat_file = getattr(fs, "_cat_file", None)  # async filesystems (s3fs, gcsfs); local ones have none
    whole = {"max_concurrency": 1} if cat_file and "max_concurrency" in inspect.signature(cat_file).parameters else {}
    return fs.cat(paths, on_error=on_error, **whole)


def explain_errors(function: Operation) -> Operation:
    """Turn a storage failure of ``function(url_or_objects, ...)`` into one that names the URL and what to do."""

    @functools.wraps(function)
    def with_explained_errors(target: str | Mapping[str, bytes], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(target, *args, **kwargs)
        except Exception as error:
            explained = explained_error(target if isinstance(target, str) else next(iter(target), ""), error)
            if explained is error:
                raise
            raise explained from error

    return with_explained_errors  # type: ignore[return-value]


def explained_error(url: str, error: Exception) -> Exception:
    """``error`` of an operation on ``url`` as the user should see it: a missing bucket or object as ``NotFound``,
    refused or missing credentials as ``StorageAccessError`` naming where they are looked for; others unchanged."""
    if isinstance(error, (NotFound, StorageAccessError)):
        return error
    if isinstance(error, FileNotFoundError):
        missing = "its bucket does not exist" if "bucket" in str(error).lower() else "no such object or folder"
        return NotFound(f"{url}: {missing}")
    if isinstance(error, IsADirectoryError):
        return NotFound(f"{url}: a folder, not a file or object")
    if isinstance(error, NotADirectoryError):
        return NotFound(f"{url}: no such object or folder (a part of its path is a file)")
    if isinstance(error, PermissionError):
        return StorageAccessError(f"{url}: access denied ({first_line(error)}); credentials are taken from "
                                  f"{CREDENTIAL_SOURCES}")
    if isinstance(error, MISSING_CREDENTIALS):
        return StorageAccessError(f"{url}: no credentials found ({first_line(error)}); set {CREDENTIAL_SOURCES}")
    return error


def operation(function: Operation) -> Operation:
    """A storage operation: retried on transient failures, then failures explained (see the module docstring)."""
    return explain_errors(retrying(function))


@explain_errors
def write_bytes(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write one whole object: readers see the old one or the new one, never half of it (see ``write_many``)."""
    write_many({url: data}, storage_options)


@operation
def write_many(objects: Mapping[str, bytes], storage_options: StorageOptions | None = None) -> None:
    """Write several whole objects on one filesystem, concurrently where the filesystem can (s3fs does).

    Object stores have no partial writes. A file system (local, NFS) truncates a file and then writes it, so a
    write cut short (a full disk, a kill) would leave half a file under the final name, which a resume then
    chooses: there each object is written under a temporary name and renamed over the old one."""
    if not objects:
        return
    fs, _ = filesystem(next(iter(objects)), storage_options)
    paths = {filesystem(url, storage_options)[1]: data for url, data in objects.items()}
    if _is_object_store(fs):
        fs.pipe(paths)
        return
    for parent in {posixpath.dirname(p) for p in paths} - {""}:
        fs.makedirs(parent, exist_ok=True)
    for path, data in paths.items():
        _replace_file(fs, path, data)


def _replace_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` beside ``path`` under a hidden temporary name (never listed as a record part or a
    checkpoint), then rename it onto ``path`` (atomic on POSIX, NFS included); an interrupted write leaves
    nothing behind, a killed process a hidden ``.partial`` file at most."""
    parent, name = posixpath.split(path)
    temporary = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.partial")
    try:
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    except BaseException:
        with contextlib.suppress(Exception):  # the error being raised says more than a failed clean-up
            fs.rm(temporary)
        raise


@contextlib.contextmanager
def writing_whole(url: str, storage_options: StorageOptions | None = None) -> Iterator[IO[bytes]]:
    """A file written as a stream (a zip too large to hold in memory) that appears whole or not at all: after an
    error or an interrupt nothing is left at ``url``, since an archive cut short can still read as a smaller one.
    Local folders are made as needed."""
    fs, path = filesystem(url, storage_options)
    if not _is_object_store(fs) and posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    handle = fs.open(path, "wb", autocommit=False)  # s3fs: a multipart upload; local: a temporary file
    try:
        yield handle
        handle.close()
        handle.commit()
    except BaseException:
        with contextlib.suppress(Exception):  # the error being raised says more than a failed clean-up
            handle.discard()
        raise


@operation
def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


@contextlib.contextmanager
def reading(url: str, storage_options: StorageOptions | None = None) -> Iterator[IO[bytes]]:
    """A seekable reader of one object that fetches only the ranges read (a zip's directory at its end, say),
    not the whole object."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb", block_size=RANGE_READ_BYTES) as handle:
        yield handle


@explain_errors
def write_json(url: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode(), storage_options)


@explain_errors
def read_json(url: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options))


@operation
def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


@operation
def is_folder(url: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether ``url`` is a folder (on object storage: a prefix with objects under it), not a file or object."""
    fs, path = filesystem(url, storage_options)
    return fs.isdir(path)


@operation
def list_names(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """Names of the objects directly under ``url`` (sorted); empty when the prefix does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


@operation
def remove(url: str, storage_options: StorageOptions | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    fs.rm(path, recursive=True)


@explain_errors
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
