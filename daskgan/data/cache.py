"""A bounded local disk cache of dataset objects, shared by the ranks of one host.

Keyed by the object's path and size (an object replaced by one of another size is fetched again). Entries are
written atomically (a reader never sees half a file). A folder has one bound, however many ranks and runs use it:
the bound and the bytes the folder holds are kept in a ledger inside it (``LEDGER``), which every write reads and
updates under an exclusive lock on the ledger, so what all the ranks wrote counts (each rank keeping its own count
and its own default bound let 8 ranks fill 8 bounds). The bound is ``max_bytes`` where given (the latest given
wins), else 80% of the disk space the folder could have when it was first used. A write that would pass the bound
first rescans the folder and removes the oldest entries down to 90% of it; an entry gone between lookup and read is
just a miss. A failed write (disk full, no permission) costs a warning and turns caching off for this process,
never the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
from contextlib import contextmanager
from typing import IO, Iterator

logger = logging.getLogger(__name__)

EVICT_TO = 0.9  # share of the bound left after an eviction
DEFAULT_SHARE_OF_DISK = 0.8  # without a bound: of the space free at first use plus what the cache already holds
LEDGER = ".ledger.json"  # {"bound": bytes, "held": bytes} of the folder, locked while read and updated
LEDGER_BYTES = 64  # the ledger's JSON, padded with spaces to one length


class DiskCache:
    """Objects' bytes under ``directory``, at most ``max_bytes`` of them (``None``: the folder's recorded bound, or
    80% of what the disk offers when it is the folder's first use)."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory = directory
        self.writable = True
        self.max_bytes = 0
        self._given = None if max_bytes is None else int(max_bytes)  # the bound again if the ledger is lost
        try:
            os.makedirs(directory, exist_ok=True)
            with self._ledger() as ledger:
                if self._given is not None:
                    ledger["bound"] = self._given
                self.max_bytes = ledger["bound"]
        except OSError as error:
            self._give_up(error)

    def read(self, path: str, size: int = 0) -> bytes | None:
        try:
            with open(self._file(path, size), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, path: str, data: bytes, size: int = 0) -> None:
        if not self.writable:
            return
        file = self._file(path, size)
        try:
            with self._ledger() as ledger:
                self.max_bytes = ledger["bound"]
                if len(data) > self.max_bytes or os.path.exists(file):  # too big, or another rank just wrote it
                    return
                if ledger["held"] + len(data) > self.max_bytes:
                    ledger["held"] = self._evict()
                write_atomically(file, data)
                ledger["held"] += len(data)
        except OSError as error:
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        self.writable = False
        logger.warning("cache_dir %s: cannot write (%s); caching is off for this worker, training goes on",
                       self.directory, error)

    @contextmanager
    def _ledger(self) -> Iterator[dict]:
        """The folder's bound and bytes held, locked against every other process using the folder until the block
        ends; changes made in the block are recorded when it ends without an error."""
        descriptor = os.open(os.path.join(self.directory, LEDGER), os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(descriptor, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
            ledger = _read_ledger(handle)
            recorded = dict(ledger)
            if "held" not in ledger:  # the folder's first use, or a damaged ledger: count what is there
                ledger["held"] = sum(size for _, size, _ in self._entries())
            if "bound" not in ledger:
                ledger["bound"] = self._default_bound(ledger["held"]) if self._given is None else self._given
            yield ledger
            if ledger != recorded:  # rewritten in place: ext4 flushes a file truncated to 0 on close (~4 ms)
                handle.seek(0)
                handle.write(json.dumps(ledger).ljust(LEDGER_BYTES))
                handle.truncate()

    def _evict(self) -> int:
        """Remove the oldest entries (leftovers of writes cut short among them) down to ``EVICT_TO`` of the bound;
        returns the bytes the folder holds then. Called with the ledger locked, so no rank is writing."""
        entries = sorted(self._entries(), key=lambda entry: entry[2])  # oldest first
        total = sum(size for _, size, _ in entries)
        target = self.max_bytes * EVICT_TO
        removed = 0
        for file, size, _ in entries:
            if total <= target:
                break
            _remove(file)
            total -= size
            removed += 1
        logger.info("cache_dir %s: evicted %d entries, %.1f of %.1f GB used", self.directory, removed, total / 1e9,
                    self.max_bytes / 1e9)
        return total

    def _entries(self) -> list[tuple[str, int, float]]:
        """(file, size, modification time) of every file the cache holds, the ledger aside."""
        entries = []
        ledger = os.path.join(self.directory, LEDGER)
        for folder, _, names in os.walk(self.directory):
            for file in (os.path.join(folder, name) for name in names):
                try:
                    stat = os.stat(file)
                except FileNotFoundError:  # removed meanwhile
                    continue
                if file != ledger:
                    entries.append((file, stat.st_size, stat.st_mtime))
        return entries

    def _default_bound(self, held: int) -> int:
        return int((shutil.disk_usage(self.directory).free + held) * DEFAULT_SHARE_OF_DISK)

    def _file(self, path: str, size: int) -> str:
        digest = hashlib.sha1(f"{path}|{size}".encode()).hexdigest()
        return os.path.join(self.directory, digest[:2], digest + posixpath.splitext(path)[1])


def _read_ledger(handle: IO[str]) -> dict:
    """The ledger's fields that are whole numbers of bytes (a negative count would let the folder grow without
    bound); a ledger cut short or damaged counts as empty (recomputed)."""
    handle.seek(0)
    try:
        ledger = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    if not isinstance(ledger, dict):
        return {}
    return {name: value for name, value in ledger.items() if name in ("bound", "held")
            and isinstance(value, int) and not isinstance(value, bool) and value >= 0}


def write_atomically(file: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``file``, then rename it: a reader sees the whole file or none."""
    partial = f"{file}.{os.getpid()}.part"
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, file)
    except OSError:
        _remove(partial)
        raise


def _remove(file: str) -> None:
    try:
        os.remove(file)
    except FileNotFoundError:
        pass
