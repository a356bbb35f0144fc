"""A bounded local disk cache of dataset objects, shared by the ranks of one host.

Keyed by the object's path and size (an object replaced by one of another size is fetched again). Entries are
written atomically (a reader never sees half a file). The directory is kept under ``max_bytes``: when this
process's estimate passes it, it rescans the directory and removes the oldest entries down to 90% of the bound;
other ranks may evict too, and an entry gone between lookup and read is just a miss. A failed write (disk full,
no permission) costs a warning and turns caching off for this process, never the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil

logger = logging.getLogger(__name__)

EVICT_TO = 0.9  # share of the bound left after an eviction
DEFAULT_SHARE_OF_DISK = 0.8  # without a bound: of the space free at start plus what the cache already holds


class DiskCache:
    """Objects' bytes under ``directory``, at most ``max_bytes`` of them (``None``: 80% of what the disk offers)."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory = directory
        self.writable = True
        self._estimate = sum(size for _, size, _ in self._entries())
        try:
            os.makedirs(directory, exist_ok=True)
            self.max_bytes = max_bytes if max_bytes is not None else self._default_bound(self._estimate)
        except OSError as error:
            self.max_bytes = 0
            self._give_up(error)

    def read(self, path: str, size: int = 0) -> bytes | None:
        try:
            with open(self._file(path, size), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, path: str, data: bytes, size: int = 0) -> None:
        if not self.writable or len(data) > self.max_bytes:
            return
        if self._estimate + len(data) > self.max_bytes:
            self._evict()
        file = self._file(path, size)
        partial = f"{file}.{os.getpid()}.part"
        try:
            os.makedirs(os.path.dirname(file), exist_ok=True)
            with open(partial, "wb") as handle:
                handle.write(data)
            os.replace(partial, file)
            self._estimate += len(data)
        except OSError as error:
            _remove(partial)
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        self.writable = False
        logger.warning("cache_dir %s: cannot write (%s); caching is off for this worker, training goes on",
                       self.directory, error)

    def _evict(self) -> None:
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
        self._estimate = total
        logger.info("cache_dir %s: evicted %d entries, %.1f of %.1f GB used", self.directory, removed, total / 1e9,
                    self.max_bytes / 1e9)

    def _entries(self) -> list[tuple[str, int, float]]:
        """(file, size, modification time) of every complete entry."""
        entries = []
        for folder, _, names in os.walk(self.directory):
            for name in names:
                if name.endswith(".part"):
                    continue
                try:
                    stat = os.stat(os.path.join(folder, name))
                except FileNotFoundError:  # evicted by another rank meanwhile
                    continue
                entries.append((os.path.join(folder, name), stat.st_size, stat.st_mtime))
        return entries

    def _default_bound(self, held: int) -> int:
        return int((shutil.disk_usage(self.directory).free + held) * DEFAULT_SHARE_OF_DISK)

    def _file(self, path: str, size: int) -> str:
        digest = hashlib.sha1(f"{path}|{size}".encode()).hexdigest()
        return os.path.join(self.directory, digest[:2], digest + posixpath.splitext(path)[1])


def _remove(file: str) -> None:
    try:
        os.remove(file)
    except FileNotFoundError:
        pass
