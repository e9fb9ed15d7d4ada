"""PSF models carried by an Exposure.

``PixelPsf`` is the PSFEx idea: the PSF image at detector position (x, y) is
a sum of pixel-basis images weighted by polynomial terms in x and y,

    P(x, y) = sum_k  B_k * t_k(x, y),   t_k = ((x - x0)/sx)**i * ((y - y0)/sy)**j,  i + j <= order

Images are sampled on the detector's pixel grid (no oversampling), centred on
the central pixel of a ``size x size`` stamp, and normalised to unit sum when
evaluated.  On disk it is one 3-D image HDU named PSF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits


def poly_terms(order: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of x**i y**j with i + j <= order, in a fixed order."""
    return [(i, n - i) for n in range(order + 1) for i in range(n, -1, -1)]


def poly_design(x, y, order: int, x0: float, y0: float, sx: float, sy: float) -> np.ndarray:
    """Design matrix (N, nterms) of the normalised polynomial terms."""
    u = (np.atleast_1d(np.asarray(x, float)) - x0) / sx
    v = (np.atleast_1d(np.asarray(y, float)) - y0) / sy
    return np.stack([u**i * v**j for i, j in poly_terms(order)], axis=-1)


@dataclass
class PixelPsf:
    """Spatially varying pixel-basis PSF.

    components : (nterms, size, size) float array, one basis image per
        polynomial term (see ``poly_terms``).
    order : polynomial order of the spatial variation.
    x0, y0, sx, sy : normalisation of detector coordinates (pixels).
    """

    components: np.ndarray
    order: int = 0
    x0: float = 0.0
    y0: float = 0.0
    sx: float = 1.0
    sy: float = 1.0

    def __post_init__(self):
        self.components = np.asarray(self.components, dtype=np.float64)
        if self.components.ndim == 2:
            self.components = self.components[None]
        nterms = len(poly_terms(self.order))
        if self.components.shape[0] != nterms:
            raise ValueError(
                f"PixelPsf of order {self.order} needs {nterms} components, got {self.components.shape[0]}"
            )

    @classmethod
    def constant(cls, image: np.ndarray) -> "PixelPsf":
        """A PSF that is the same everywhere."""
        image = np.asarray(image, float)
        return cls(image[None] / image.sum(), order=0)

    @property
    def size(self) -> int:
        """Stamp side in pixels (odd)."""
        return self.components.shape[-1]

    def image(self, x: float, y: float) -> np.ndarray:
        """PSF stamp at detector position (x, y) in pixels, unit sum."""
        t = poly_design(x, y, self.order, self.x0, self.y0, self.sx, self.sy)[0]
        img = np.tensordot(t, self.components, axes=1)
        s = img.sum()
        return img / s if s != 0 else img

    def fwhm(self, x: float, y: float) -> float:
        """FWHM in pixels at (x, y): half-maximum area of the upsampled core (see ``spline_fwhm``)."""
        return spline_fwhm(self.image(x, y))

    def to_hdu(self) -> fits.ImageHDU:
        hdu = fits.ImageHDU(self.components.astype(np.float32), name="PSF")
        h = hdu.header
        h["PSFTYPE"] = ("PIXEL", "pixel basis x polynomial (PSFEx-like)")
        h["PSFORDER"] = (self.order, "polynomial order of spatial variation")
        h["PSFX0"], h["PSFY0"] = self.x0, self.y0
        h["PSFSX"], h["PSFSY"] = self.sx, self.sy
        return hdu

    @classmethod
    def from_hdu(cls, hdu) -> "PixelPsf":
        h = hdu.header
        return cls(
            np.asarray(hdu.data, np.float64),
            order=int(h.get("PSFORDER", 0)),
            x0=float(h.get("PSFX0", 0.0)),
            y0=float(h.get("PSFY0", 0.0)),
            sx=float(h.get("PSFSX", 1.0)),
            sy=float(h.get("PSFSY", 1.0)),
        )

    def __eq__(self, other):
        return (
            isinstance(other, PixelPsf)
            and self.order == other.order
            and (self.x0, self.y0, self.sx, self.sy) == (other.x0, other.y0, other.sx, other.sy)
            and self.components.shape == other.components.shape
            and np.array_equal(self.components.astype(np.float32), other.components.astype(np.float32))
        )


def moments_fwhm(stamp: np.ndarray) -> float:
    """Gaussian-equivalent FWHM (pixels) of a centred stamp from its second moments."""
    stamp = np.asarray(stamp, float)
    ny, nx = stamp.shape
    y, x = np.mgrid[:ny, :nx]
    w = np.clip(stamp, 0, None)
    s = w.sum()
    xc, yc = (w * x).sum() / s, (w * y).sum() / s
    ixx = (w * (x - xc) ** 2).sum() / s
    iyy = (w * (y - yc) ** 2).sum() / s
    return float(2.3548 * np.sqrt(0.5 * (ixx + iyy)))


def spline_fwhm(stamp: np.ndarray, zoom: int = 8) -> float:
    """FWHM (pixels) of a centred PSF stamp: area above half maximum of a cubic-spline
    upsampling, as the diameter of the circle of that area (geometric-mean FWHM
    for an elliptical PSF).  Robust to Moffat wings (second moments are not: they
    give ~1.9x the core width for the simulated PSF) and smooth in the PSF width,
    unlike pixel counting."""
    from scipy import ndimage

    stamp = np.asarray(stamp, float)
    c = stamp.shape[0] // 2
    # only the core matters; a small window keeps the upsampling cheap
    h = min(c, 12)
    core = stamp[c - h : c + h + 1, c - h : c + h + 1]
    up = ndimage.zoom(core, zoom, order=3, mode="nearest", grid_mode=True)
    area = np.count_nonzero(up >= 0.5 * up.max()) / zoom**2
    return float(np.sqrt(4 * area / np.pi))


def half_max_fwhm(stamp: np.ndarray) -> float:
    """FWHM (pixels) from the area above half maximum, sqrt(4 A / pi).

    Robust to Moffat wings, unlike second moments; valid for FWHM >~ 2 px.
    """
    stamp = np.asarray(stamp, float)
    area = np.count_nonzero(stamp >= 0.5 * stamp.max())
    return float(np.sqrt(4.0 * area / np.pi))
