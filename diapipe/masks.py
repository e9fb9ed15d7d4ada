"""Named mask bit planes, as in LSST afw's Mask.

Each plane is one bit of an int32 MASK image; the mapping is written into the
MASK header as ``MP_<NAME> = bit`` so DS9 users and other tools can decode it.
"""

from __future__ import annotations

import numpy as np

#: Plane name -> bit number.  Order is part of the on-disk format: append only.
MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "CR": 2,
    "EDGE": 3,
    "NO_DATA": 4,
    "INTRP": 5,
    "SUSPECT": 6,
    "DETECTED": 7,
    "DETECTED_NEGATIVE": 8,
    "INJECTED": 9,
}

#: Planes that mean "do not trust this pixel" for fitting and statistics.
BAD_PLANES = ("BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT")

MASK_DTYPE = np.int32


def bit(name: str) -> int:
    """Integer value of one mask plane (``1 << bit``)."""
    try:
        return 1 << MASK_PLANES[name]
    except KeyError:
        raise KeyError(f"unknown mask plane {name!r}; known: {sorted(MASK_PLANES)}") from None


def bits(*names: str) -> int:
    """OR of several planes' values."""
    value = 0
    for name in names:
        value |= bit(name)
    return value


def is_set(mask: np.ndarray, *names: str) -> np.ndarray:
    """Boolean array: True where any of the named planes is set."""
    return (np.asarray(mask) & bits(*names)) != 0


def set_plane(mask: np.ndarray, where: np.ndarray, name: str) -> None:
    """Set plane ``name`` in ``mask`` (in place) where ``where`` is True."""
    mask[np.asarray(where, dtype=bool)] |= MASK_DTYPE(bit(name))


def clear_plane(mask: np.ndarray, name: str) -> None:
    """Clear plane ``name`` everywhere in ``mask`` (in place)."""
    mask &= MASK_DTYPE(~bit(name))


def header_cards(planes: dict[str, int] | None = None) -> list[tuple[str, int, str]]:
    """FITS cards describing the planes: ``MP_<NAME> = bit``."""
    planes = MASK_PLANES if planes is None else planes
    # HIERARCH because most names are longer than the 8 characters FITS allows.
    return [(f"HIERARCH MP_{name}", b, "mask plane bit") for name, b in planes.items()]


def planes_from_header(header) -> dict[str, int]:
    """Read the plane -> bit mapping back from a MASK header."""
    planes = {}
    for key, value in header.items():
        if key.startswith("MP_"):
            planes[key[3:]] = int(value)
    return planes or dict(MASK_PLANES)
