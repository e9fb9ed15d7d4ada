"""Small robust-statistics helpers shared by the stages (numpy in, numpy out)."""

from __future__ import annotations

import numpy as np


def nanmedian_last(a: np.ndarray) -> np.ndarray:
    """np.nanmedian(a, axis=-1) from one sort (NaN sorts last); NaN where a row has no finite value.

    ~5x faster than np.nanmedian for many short rows (cell and stamp statistics).
    """
    srt = np.sort(a, axis=-1)
    n = np.isfinite(a).sum(axis=-1)
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[..., None], -1)[..., 0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[..., None], -1)[..., 0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)
