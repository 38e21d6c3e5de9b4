"""Named random streams derived from the seed.

Every random quantity of the market comes from a stream keyed by what it is for and, where it
varies in time, by the hour it belongs to. A stream never depends on how many numbers another
stream drew, so any hour (and any day) can be generated on its own, in any order, and comes out
the same.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

# Hours before the start of the market (the warm-up of the campaign population) are negative;
# SeedSequence keys must not be.
_KEY_OFFSET = 1 << 30


class Stream(IntEnum):
    WORLD = 1
    CAMPAIGNS = 2
    APPEAL = 3
    HOUR_REQUESTS = 4
    HOUR_OUTCOMES = 5
    HOUR_DELAYS = 6
    CALIBRATION = 7


def rng(seed: int, stream: Stream, *key: int) -> np.random.Generator:
    """A generator for ``stream`` at ``key`` (e.g. an hour index, possibly negative)."""
    spawn_key = (int(stream), *(int(k) + _KEY_OFFSET for k in key))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=spawn_key)))
