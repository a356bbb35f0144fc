"""Tar shards read in training: whole, a shard per GET, a window of them at a time (``ShardReader``; the windows
are ``shard_epochs``'), the next window's shards fetched while one is read. A single image (grids, evaluation
reals) is one ranged GET.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from daskgan.data.shard_epochs import Window
from daskgan.data.shard_scan import TarMember
from daskgan.run import storage


def read_members_ranged(fs: Any, shards: tuple[str, ...], members: dict[str, TarMember]) -> dict[str, Any]:
    """Single images, one ranged GET each (grids, evaluation reals); a failed fetch maps to its error."""
    names = list(members)
    fetched = fs.cat_ranges([shards[members[n].shard] for n in names], [members[n].offset for n in names],
                            [members[n].offset + members[n].size for n in names], on_error="return")
    return dict(zip(names, fetched))


class ShardReader:
    """One rank's shards, whole: the shards of the window being read, and the next window's fetched ahead
    (``ahead`` GETs in flight). Earlier windows' shards are let go, so at most two windows are held."""

    def __init__(self, fs: Any, shards: tuple[str, ...], members: dict[str, TarMember], ahead: int):
        self._fs, self._shards, self._members = fs, shards, members
        self._pool = ThreadPoolExecutor(max(1, ahead), thread_name_prefix="daskgan-shard")
        self._fetches: dict[int, Future] = {}
        self._window_of: dict[int, int] = {}
        self._windows: list[Window] = []
        self._then: tuple[int, ...] = ()
        self._lock = threading.Lock()

    def plan(self, windows: list[Window], offset: int = 0, then: tuple[int, ...] = ()) -> None:
        """The epoch's windows, in reading order; the one holding image ``offset`` of the epoch is fetched at once.
        ``then``: the shards of the next epoch's first window, fetched while the last window is read (an epoch of
        a small dataset is read in a fraction of a second: waiting for the next one's first GETs would halve it)."""
        self._windows, self._then = windows, then
        self._window_of = {shard: number for number, window in enumerate(windows) for shard in window.shards}
        for number, window in enumerate(windows):
            if offset < len(window.order):
                with self._lock:  # another epoch: other windows, but this one's shards may be on their way
                    self._fetches = {s: f for s, f in self._fetches.items() if s in window.shards}
                self._fetch_window(number)
                return
            offset -= len(window.order)

    def read(self, paths: list[str]) -> dict[str, Any]:
        """The images at ``paths`` (members of the planned shards), or the error their shard's fetch met."""
        needed = sorted({self._members[path].shard for path in paths})
        current = min(self._window_of.get(shard, 0) for shard in needed)
        self._release_before(current)
        for number in {self._window_of.get(shard, 0) for shard in needed} | {current + 1}:
            self._fetch_window(number)
        shard_bytes = {}
        for shard in needed:
            try:
                shard_bytes[shard] = self._fetch(shard).result()
            except Exception as error:  # handed back per image, for the stream's retry or stop
                shard_bytes[shard] = error
                with self._lock:
                    self._fetches.pop(shard, None)  # the next read fetches it again
        result = {}
        for path in paths:
            member, data = self._members[path], shard_bytes[self._members[path].shard]
            result[path] = data if isinstance(data, Exception) else data[member.offset:member.offset + member.size]
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch_window(self, number: int) -> None:
        """Fetch window ``number``'s shards; one past the last window is the next epoch's first."""
        for shard in self._windows[number].shards if number < len(self._windows) else self._then:
            self._fetch(shard)

    def _fetch(self, shard: int) -> Future:
        with self._lock:
            if shard not in self._fetches:
                self._fetches[shard] = self._pool.submit(self._get, self._shards[shard])
            return self._fetches[shard]

    def _get(self, path: str) -> bytes:
        """A shard in one GET (no HEAD first, no ranges: several shards are in flight instead)."""
        data = storage.cat_objects(self._fs, [path])[path]
        if isinstance(data, BaseException):
            raise data
        return data

    def _release_before(self, window: int) -> None:
        """Let go of the shards of windows before ``window`` (the next epoch's first window is kept once the last
        one is read: it was fetched for it)."""
        keep = set(self._then) if window == len(self._windows) - 1 else set()
        with self._lock:
            for shard in [s for s in self._fetches if self._window_of.get(s, -1) < window and s not in keep]:
                del self._fetches[shard]
