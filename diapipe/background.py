"""Sky background: a mesh of sigma-clipped modes, spline-interpolated (SExtractor / sep).

The image is cut into ``mesh_size`` x ``mesh_size`` pixel cells; in each the
sky is a clipped mode estimate from the unmasked pixels (sep.Background), the
mesh is median-filtered over ``filter_size`` cells (so a bright star or a bad
cell does not leave a bump) and interpolated back to every pixel with a
bicubic spline.  Masked pixels (BAD, SAT, CR, ... and, on the second pass, the
footprints of detected sources) do not enter the cell statistics.

Units: whatever the image is in (electrons for diapipe exposures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep
from astropy.io import fits


@dataclass
class Background:
    """A fitted background model.

    mesh : (nmy, nmx) cell sky levels (image units), after the median filter.
    mesh_size : cell side in pixels.
    shape : (ny, nx) of the image the model belongs to.
    level, rms : global median sky level and noise (image units).
    """

    mesh: np.ndarray
    mesh_size: int
    filter_size: int
    shape: tuple[int, int]
    level: float
    rms: float
    _image: np.ndarray | None = None

    def image(self) -> np.ndarray:
        """Full-resolution background image (float32, shape ``shape``)."""
        return self._image

    def to_hdu(self) -> fits.ImageHDU:
        """The mesh as a small image HDU (BKGMESH) with its geometry in the header."""
        hdu = fits.ImageHDU(self.mesh.astype(np.float32), name="BKGMESH")
        h = hdu.header
        h["BKGMESH"] = (self.mesh_size, "background cell side (px)")
        h["BKGFILT"] = (self.filter_size, "median filter over cells")
        h["BKGLEVEL"] = (self.level, "global background level (e-)")
        h["BKGRMS"] = (self.rms, "global background noise (e-)")
        h["COMMENT"] = "Cell sky levels; the full model is their bicubic-spline interpolation (sep)."
        return hdu


def _c_contiguous(a, dtype=np.float32):
    a = np.asarray(a)
    # sep wants native byte order and C order (FITS data come big-endian).
    return np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("="))


def estimate(image: np.ndarray, bad: np.ndarray | None = None, mesh_size: int = 128,
             filter_size: int = 3) -> Background:
    """Fit the background of ``image`` ignoring pixels where ``bad`` is True.

    mesh_size : cell side in pixels; choose several times the largest source
        so objects do not pull the sky up, small enough to follow real gradients.
    filter_size : median filter over cells (odd, 1 = none).
    """
    data = _c_contiguous(image)
    mask = None if bad is None else np.ascontiguousarray(bad, dtype=np.uint8)
    b = sep.Background(data, mask=mask, bw=mesh_size, bh=mesh_size, fw=filter_size, fh=filter_size)
    ny, nx = data.shape
    nmy, nmx = -(-ny // mesh_size), -(-nx // mesh_size)
    # The mesh values themselves: sample the spline at cell centres (exact at the nodes).
    back = b.back(dtype=np.float32)
    cy = np.minimum((np.arange(nmy) + 0.5) * mesh_size, ny - 1).astype(int)
    cx = np.minimum((np.arange(nmx) + 0.5) * mesh_size, nx - 1).astype(int)
    mesh = back[np.ix_(cy, cx)]
    return Background(mesh, mesh_size, filter_size, (ny, nx),
                      float(b.globalback), float(b.globalrms), _image=back)


def source_mask(shape, x, y, npix, fwhm: float, grow: float = 2.0) -> np.ndarray:
    """Boolean mask of discs around detected sources, for a background re-estimate.

    A source's isophotal footprint misses its faint wings, which would pull the
    sky up; each disc has radius ``grow`` x the footprint's equivalent radius,
    and at least the footprint radius + 2 FWHM (pixels).
    """
    ny, nx = shape
    out = np.zeros(shape, bool)
    r_iso = np.sqrt(np.asarray(npix, float) / np.pi)
    radius = np.maximum(grow * r_iso, r_iso + 2 * fwhm)
    discs: dict[int, np.ndarray] = {}  # one disc template per integer radius
    for xc, yc, r in zip(np.asarray(x, float), np.asarray(y, float), radius):
        ri = int(np.ceil(r))
        disc = discs.get(ri)
        if disc is None:
            o = np.arange(-ri, ri + 1)
            disc = discs[ri] = o[None, :] ** 2 + o[:, None] ** 2 <= ri * ri
        ix, iy = int(round(xc)), int(round(yc))
        x0, x1 = max(ix - ri, 0), min(ix + ri + 1, nx)
        y0, y1 = max(iy - ri, 0), min(iy + ri + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        out[y0:y1, x0:x1] |= disc[y0 - (iy - ri) : y1 - (iy - ri), x0 - (ix - ri) : x1 - (ix - ri)]
    return out
