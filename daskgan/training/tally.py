"""What a rank keeps between the loop's syncs, and the one all-reduce that settles it (issue #29).

On a GPU every read of a device tensor waits for the queue of kernels to drain, and every collective waits for the
other ranks. So an iteration reads nothing back: its statistics stay on the device, and the host's own numbers (the
images its stream skipped) are noted. At a sync (records flushed, a grid or metric due, a checkpoint, ADA's
adjustment; ``daskgan.training.loop``) everything kept, the stop verdict and ADA's statistic travel in ONE sum
all-reduce and are read back with one ``.tolist()``. NVlabs' ``torch_utils.training_stats`` keeps device tensors
and reduces them at tick boundaries too; here the records keep one row per iteration, so every iteration's few
values are kept until then.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from daskgan import ranks


class Settled(NamedTuple):
    """A sync's outcome, the same on every rank: per iteration kept, the statistics (mean over the ranks) and the
    distinct images skipped by all ranks so far; the numbers rank 0 shared; ADA's statistic summed over the ranks."""

    stats: list[dict[str, float]]
    skipped: list[int]
    shared: list[float]
    ada: list[float] | None


class Tally:
    """A rank's iterations since the last sync: statistics as device tensors, skipped-image counts as numbers."""

    def __init__(self) -> None:
        self._stats: list[tuple[tuple[str, ...], torch.Tensor]] = []
        self._skipped: list[int] = []
        self._unreadable: list[frozenset[int]] = []  # this rank's skipped images after each kept iteration
        self._summed, self._distinct = 0, 0  # every rank's skips summed, and the distinct ones, at the last sync
        self._seen: tuple[int, frozenset[int]] = (0, frozenset())  # this rank's count and set, taken on a change

    def keep(self, stats: dict[str, torch.Tensor], skipped: int, unreadable: Callable[[], frozenset[int]]) -> None:
        """One iteration: its statistics (0-dim device tensors; the keys may differ between iterations) and this
        rank's count of skipped images (``unreadable`` gives them; taken only when the count moved)."""
        self._stats.append((tuple(stats), torch.stack(list(stats.values())).float()))
        if skipped != self._seen[0]:
            self._seen = (skipped, unreadable())
        self._skipped.append(skipped)
        self._unreadable.append(self._seen[1])

    def settle(self, shared: Sequence[float], ada: torch.Tensor | None = None) -> Settled:
        """Sum everything kept, ``shared`` (rank 0's numbers, such as its stop verdict; zeros on the other ranks,
        so the sums are rank 0's) and ``ada`` over the ranks in one all-reduce; every rank calls it after the same
        iteration."""
        sizes = [len(values) for _, values in self._stats]
        device = ranks.collective_device()
        host = torch.tensor([*map(float, shared), *map(float, self._skipped)], dtype=torch.float64)
        parts = [host.to(device), *(values.to(device, torch.float64) for _, values in self._stats)]
        if ada is not None:
            parts.append(ada.to(device, torch.float64))
        packed = torch.cat(parts)
        dist.all_reduce(packed)
        summed = packed.tolist()  # the sync's one host read
        world_size = dist.get_world_size()
        start = len(shared) + len(self._skipped)
        shared_sums, skipped, rows = summed[:len(shared)], summed[len(shared):start], []
        for (names, _), size in zip(self._stats, sizes):
            rows.append(dict(zip(names, (value / world_size for value in summed[start:start + size]))))
            start += size
        settled = Settled(rows, self._distinct_skipped(skipped), shared_sums,
                          summed[start:] if ada is not None else None)
        self._stats, self._skipped, self._unreadable = [], [], []
        return settled

    def _distinct_skipped(self, summed: Sequence[float]) -> list[int]:
        """The distinct images all ranks had skipped after each kept iteration (ranks read other parts of an
        epoch, and may meet the same bad image): the ranks' sets are gathered only when the sum grew."""
        if not summed or summed[-1] == self._summed:
            return [self._distinct] * len(summed)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._unreadable)
        distinct = []
        for row, total in enumerate(summed):
            if total != self._summed:
                self._summed, self._distinct = total, len(frozenset().union(*(sets[row] for sets in gathered)))
            distinct.append(self._distinct)
        return distinct
