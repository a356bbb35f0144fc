"""The disk cache has one bound per folder, whatever the number of ranks (processes) writing into it."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import namedtuple
from pathlib import Path

from daskgan.data import cache
from daskgan.data.cache import LEDGER, DiskCache

RANKS, OBJECTS, OBJECT_BYTES, BOUND = 4, 40, 1024, 16 * 1024
DiskUsage = namedtuple("DiskUsage", "total used free")


def held_bytes(folder: Path) -> int:
    """What the folder holds, its ledger aside."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != LEDGER)


def fill_as_a_rank(folder: str, rank: int, start, max_bytes: int | None) -> None:
    """Write ``OBJECTS`` objects of this rank's own into the shared folder, once every rank is ready."""
    disk_cache = DiskCache(folder, max_bytes)
    start.wait()
    for i in range(OBJECTS):
        disk_cache.write(f"rank{rank}/image{i}.png", bytes([rank]) * OBJECT_BYTES, OBJECT_BYTES)
    assert disk_cache.writable


def fill_as_ranks(folder: Path, max_bytes: int | None = BOUND) -> None:
    context = multiprocessing.get_context("fork")
    start = context.Barrier(RANKS)
    ranks = [context.Process(target=fill_as_a_rank, args=(str(folder), rank, start, max_bytes))
             for rank in range(RANKS)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    assert [process.exitcode for process in ranks] == [0] * RANKS


def test_ranks_taking_turns_never_pass_the_folders_bound(tmp_path):
    ranks = [DiskCache(str(tmp_path), BOUND) for _ in range(RANKS)]
    peak = 0
    for i in range(OBJECTS):
        for rank, disk_cache in enumerate(ranks):
            disk_cache.write(f"rank{rank}/image{i}.png", bytes([rank]) * OBJECT_BYTES, OBJECT_BYTES)
            peak = max(peak, held_bytes(tmp_path))
    assert 0 < peak <= BOUND, f"the folder held {peak / BOUND:.1f}x its bound"


def test_ranks_writing_at_once_keep_the_folder_under_its_bound_and_count_it_exactly(tmp_path):
    fill_as_ranks(tmp_path)  # 4 processes x 40 KiB into a 16 KiB bound
    assert 0 < held_bytes(tmp_path) <= BOUND
    assert json.loads((tmp_path / LEDGER).read_text()) == {"bound": BOUND, "held": held_bytes(tmp_path)}


def test_the_default_bound_is_the_folders_first_one_for_every_rank(tmp_path, monkeypatch):
    free = {"bytes": 40 * 1024}  # the ranks' own writes shrink what each rank would see as free

    def disk_usage(path: str) -> DiskUsage:
        return DiskUsage(10 ** 9, 0, free["bytes"])

    def shrinking_disk_usage(path: str) -> DiskUsage:
        usage = disk_usage(path)
        free["bytes"] -= 8 * 1024
        return usage

    monkeypatch.setattr(shutil, "disk_usage", shrinking_disk_usage)
    first = DiskCache(str(tmp_path))
    later = [DiskCache(str(tmp_path)) for _ in range(3)]
    assert first.max_bytes == int(40 * 1024 * cache.DEFAULT_SHARE_OF_DISK)
    assert {c.max_bytes for c in later} == {first.max_bytes}, "one bound for the folder, not one per rank"
    fill_as_ranks(tmp_path, max_bytes=None)
    assert held_bytes(tmp_path) <= first.max_bytes
    assert DiskCache(str(tmp_path), 4096).max_bytes == 4096 == DiskCache(str(tmp_path)).max_bytes, \
        "a bound given anew is the folder's from then on"
    assert not any(name.endswith(".part") for _, _, names in os.walk(tmp_path) for name in names)


def test_a_damaged_ledger_counting_negative_bytes_is_counted_again(tmp_path):
    """A ledger holding ``held: -1 GB`` (damaged, or written by hand) let the folder grow 1 GB past its bound."""
    (tmp_path / LEDGER).write_text(json.dumps({"bound": BOUND, "held": -10**9}))
    disk_cache = DiskCache(str(tmp_path))
    for i in range(OBJECTS):
        disk_cache.write(f"image{i}.png", bytes(OBJECT_BYTES), OBJECT_BYTES)
    assert 0 < held_bytes(tmp_path) <= BOUND, f"the folder held {held_bytes(tmp_path) / BOUND:.1f}x its bound"


def test_a_ledger_lost_or_cut_short_keeps_the_bound_the_rank_was_given(tmp_path):
    """Without its ledger, a rank given a bound took 80% of the free disk as the folder's bound."""
    disk_cache = DiskCache(str(tmp_path), BOUND)
    (tmp_path / LEDGER).write_text('{"bound": 16')  # cut short
    for i in range(OBJECTS):
        disk_cache.write(f"image{i}.png", bytes(OBJECT_BYTES), OBJECT_BYTES)
    assert 0 < held_bytes(tmp_path) <= BOUND, f"the folder held {held_bytes(tmp_path) / BOUND:.1f}x its bound"
