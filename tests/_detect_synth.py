"""Synthetic difference exposures for the detect / measure / fakes tests (and the benchmark).

A circular Gaussian PSF of known FWHM, white Gaussian noise of known sigma and
point sources placed with the exact (analytic) PSF at sub-pixel positions.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from diapipe.exposure import Exposure, MaskedImage
from diapipe.psf import PixelPsf

MAGZERO = 31.4  # 1 e- = 1 nJy, so electrons and nJy coincide in the tests


def gaussian_stamp(fwhm, size=25, dx=0.0, dy=0.0):
    s = fwhm / 2.3548
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    g = np.exp(-0.5 * ((x - dx) ** 2 + (y - dy) ** 2) / s**2)
    return g / (2 * np.pi * s * s)


def optimal_snr(flux, fwhm, sigma, size=25):
    """S/N_opt = flux / sqrt(1 / sum(P^2 / V)) for constant variance sigma^2."""
    p = gaussian_stamp(fwhm, size)
    p = p / p.sum()
    return flux * np.sqrt((p**2).sum()) / sigma


def add_point(image, x, y, flux, fwhm, size=25):
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    st = flux * gaussian_stamp(fwhm, size, x - ix, y - iy)
    h = size // 2
    ny, nx = image.shape
    y0, x0 = iy - h, ix - h
    ya, yb, xa, xb = max(0, y0), min(ny, y0 + size), max(0, x0), min(nx, x0 + size)
    image[ya:yb, xa:xb] += st[ya - y0 : yb - y0, xa - x0 : xb - x0]


def simple_wcs(nx, ny, scale_arcsec=0.2, ra=150.0, dec=2.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.cd = np.array([[-scale_arcsec / 3600, 0], [0, scale_arcsec / 3600]])
    return w


def make_diffexp(shape=(512, 512), fwhm=3.5, sigma=10.0, sources=(), seed=1, visit=7, detector=1,
                 psf=True):
    """Difference exposure: noise + sources [(x, y, flux_e), ...]; variance = sigma^2."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    image = rng.normal(0.0, sigma, shape)
    for x, y, f in sources:
        add_point(image, x, y, f, fwhm)
    mi = MaskedImage(image, None, np.full(shape, sigma**2))
    meta = {"visit": visit, "detector": detector, "band": "r", "MAGZERO": MAGZERO,
            "MJD-OBS": 60000.0, "EXPTIME": 30.0}
    return Exposure(mi, wcs=simple_wcs(nx, ny), psf=PixelPsf.constant(gaussian_stamp(fwhm)) if psf else None,
                    metadata=meta)
