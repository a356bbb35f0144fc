"""Seeds of a run's independent random streams, derived from the job's one ``train.seed``.

Every stream has a name (``"noise"``, ``"augment"``, ``"epoch"``, ``"window"``, ...) and indices (a rank, an
iteration, an epoch, ...); its seed is a hash of the run's seed, the name and the indices, so two streams share a
seed only if they are the same stream. Offsets added to one seed made neighbours meet: rank r's augmentation drew
rank r + 1's noise, and rank r's noise the data permutation of epoch r.
"""

from __future__ import annotations

import hashlib

SEED_BYTES = 8  # torch's manual_seed takes any seed below 2**64


def stream_seed(seed: int, stream: str, *indices: int) -> int:
    """The seed of ``stream`` at ``indices`` (e.g. ``stream_seed(s, "noise", rank, iteration)``) in run ``seed``."""
    identity = repr((int(seed), str(stream), *(int(index) for index in indices)))  # repr keeps the parts apart
    return int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=SEED_BYTES).digest(), "big")
