"""Seeds of a run's independent random streams, derived from the job's one ``train.seed``."""

STREAM_STRIDE = 1_000_003  # a prime larger than any epoch, rank or iteration offset, so runs' streams do not meet


def derive_seed(seed: int, offset: int) -> int:
    """The seed of stream ``offset`` (an epoch's permutation, a rank's noise at an iteration) of run ``seed``."""
    return seed * STREAM_STRIDE + offset
