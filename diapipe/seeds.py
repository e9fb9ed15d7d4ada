"""Random generators seeded from the config seed and a dataId.

Same config, same bytes: a job's draws depend only on (seed, purpose, dataId),
never on which jobs ran before it or on how many cores there were.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, purpose: str, **data_id) -> np.random.Generator:
    """A numpy Generator for one purpose ('sky', 'noise', 'fakes', ...) and dataId."""
    key = purpose + "|" + "|".join(f"{k}={data_id[k]}" for k in sorted(data_id))
    digest = hashlib.sha256(key.encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))
