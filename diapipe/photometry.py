"""Source photometry on a calexp and its photometric zero point.

* PSF flux: the PSF model, shifted to the source's sub-pixel position, scaled
  by linear least squares (constant sky-dominated weights, optimal for faint
  sources and unbiased for bright ones).  The PixelPsf has unit sum over its
  stamp, so this is the flux inside the stamp.
* Aperture correction: the median ratio of a large-aperture flux to the PSF
  flux over bright isolated stars, applied to PSF fluxes so they estimate the
  total flux the reference catalog quotes.
* Zero point: MAGZERO = refcat AB mag + 2.5 log10(flux in e-), a weighted,
  sigma-clipped mean over matched stars, optionally with a linear colour term
  (refcat colour, off by default).

Units: fluxes in electrons; MAGZERO is the AB magnitude of 1 e-, so
flux_nJy = flux_e * 10**(-0.4 * (MAGZERO - 31.4)).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import sep

from .psf import PixelPsf
from .psfex import cut_stamps, place_model

log = logging.getLogger(__name__)

AB_NJY_ZP = 31.4  # AB magnitude of 1 nJy


def nJy_per_electron(magzero: float) -> float:
    """Flux (nJy) of one electron for a zero point MAGZERO (AB mag of 1 e-)."""
    return 10 ** (-0.4 * (magzero - AB_NJY_ZP))


def psf_flux(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, psf: PixelPsf, x, y,
             seg: np.ndarray | None = None, local_sky: bool = True, half: int | None = None,
             chunk: int = 2000):
    """PSF fluxes and errors (e-) of sources at 0-based (x, y); NaN where the stamp leaves the image.

    The model is fitted by linear least squares with uniform weights over the
    stamp, with (``local_sky``) a free constant so a residual sky error does not
    bias the flux.  Masked pixels and, given the segmentation map ``seg`` (value
    k+1 marks source k), other sources' footprints get zero weight.
    half : fit over the central (2 half + 1)^2 pixels only (default: the PSF stamp).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    half = psf.size // 2 if half is None else min(half, psf.size // 2)
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        model, _, _ = place_model(psf, x[sl], y[sl], half=half)
        data, _, _, ok = cut_stamps(image, x[sl], y[sl], half)
        var, *_ = cut_stamps(variance, x[sl], y[sl], half)
        w, *_ = cut_stamps(~bad, x[sl], y[sl], half)
        if seg is not None:
            sg, *_ = cut_stamps(seg, x[sl], y[sl], half)
            own = np.arange(sl.start, sl.stop)[:, None, None] + 1
            w = w * ((sg == 0) | (sg == own))
        w = w.astype(float)
        if local_sky:
            # normal equations of data = f * model + c over the weighted pixels
            s_mm = (w * model * model).sum(axis=(1, 2))
            s_m = (w * model).sum(axis=(1, 2))
            s_1 = w.sum(axis=(1, 2))
            s_md = (w * model * data).sum(axis=(1, 2))
            s_d = (w * data).sum(axis=(1, 2))
            det = s_mm * s_1 - s_m**2
            with np.errstate(invalid="ignore", divide="ignore"):
                f = (s_1 * s_md - s_m * s_d) / det
                # flux = sum_p g_p d_p with g = (s_1 m - s_m) / det
                g = (s_1[:, None, None] * model - s_m[:, None, None]) / det[:, None, None]
                e = np.sqrt((w * g * g * var).sum(axis=(1, 2)))
        else:
            mm = (w * model * model).sum(axis=(1, 2))
            with np.errstate(invalid="ignore", divide="ignore"):
                f = (w * model * data).sum(axis=(1, 2)) / mm
                e = np.sqrt((w * model * model * var).sum(axis=(1, 2))) / mm
        f[~ok], e[~ok] = np.nan, np.nan
        flux[sl], err[sl] = f, e
    return flux, err


def aperture_flux(image, variance, bad, x, y, radius: float, annulus=None):
    """Circular aperture flux, error (e-) and sep flags at 0-based (x, y), radius in pixels.

    annulus : optional (r_in, r_out) in pixels; its clipped mean is subtracted as local sky.
    """
    from .background import _c_contiguous

    f, e, flag = sep.sum_circle(_c_contiguous(image), np.asarray(x, float), np.asarray(y, float),
                                radius, var=_c_contiguous(variance), mask=np.ascontiguousarray(bad),
                                subpix=5, bkgann=annulus)
    return f, e, flag


def clean_aperture_flux(image: np.ndarray, seg: np.ndarray, bad: np.ndarray, psf: PixelPsf, x, y,
                        own: np.ndarray, psf_fl: np.ndarray, radius: float):
    """Aperture flux (e-) within ``radius`` pixels with other sources' footprints (seg
    values other than ``own``) and masked pixels replaced by the scaled PSF model.

    For the aperture correction in crowded fields: a neighbour inside a large
    aperture would otherwise bias it.  Pixels count when their centre is inside.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    half = int(np.ceil(radius)) + 1
    data, ix, iy, ok = cut_stamps(image, x, y, half)
    sg, *_ = cut_stamps(seg, x, y, half)
    bd, *_ = cut_stamps(bad, x, y, half)
    model, _, _ = place_model(psf, x, y)
    h = psf.size // 2
    big = np.zeros_like(data)
    if h <= half:
        big[:, half - h : half + h + 1, half - h : half + h + 1] = model
    else:
        big = model[:, h - half : h + half + 1, h - half : h + half + 1]
    replace = ((sg != 0) & (sg != np.asarray(own)[:, None, None])) | (bd != 0)
    clean = np.where(replace, np.asarray(psf_fl)[:, None, None] * big, data)
    off = np.arange(-half, half + 1)
    dx = off[None, None, :] - (x - ix)[:, None, None]
    dy = off[None, :, None] - (y - iy)[:, None, None]
    inside = dx * dx + dy * dy <= radius * radius
    flux = (clean * inside).sum(axis=(1, 2))
    flux[~ok] = np.nan
    return flux


def local_sky(image: np.ndarray, seg: np.ndarray, bad: np.ndarray, x, y, r_in: float, r_out: float):
    """Local sky (image units per pixel) in an annulus around each source: the clipped
    mean of pixels outside every detection footprint and unmasked.  NaN if < 20 pixels."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    half = int(np.ceil(r_out)) + 1
    data, ix, iy, ok = cut_stamps(image, x, y, half)
    sg, *_ = cut_stamps(seg, x, y, half)
    bd, *_ = cut_stamps(bad, x, y, half)
    off = np.arange(-half, half + 1)
    dx = off[None, None, :] - (x - ix)[:, None, None]
    dy = off[None, :, None] - (y - iy)[:, None, None]
    r = np.hypot(dx, dy)
    use = ((r >= r_in) & (r < r_out) & (sg == 0) & (bd == 0)).reshape(len(x), -1)
    vals = data.reshape(len(x), -1)
    with warnings.catch_warnings():  # a star without free pixels gets NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        med = _masked_median(vals, use)
        sig = 1.4826 * _masked_median(np.abs(vals - med[:, None]), use)
        use &= np.abs(vals - med[:, None]) < 3 * sig[:, None]
        n_ok = use.sum(axis=1)
        sky = (vals * use).sum(axis=1) / n_ok
    sky[(n_ok < 20) | ~ok] = np.nan
    return sky


def _masked_median(vals: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Median of each row of ``vals`` (N, P) over the entries where ``use``; NaN for none.

    One sort of the whole array (numpy's nanmedian over an axis loops in Python).
    """
    n = use.sum(axis=1)
    s = np.sort(np.where(use, vals, np.inf), axis=1)
    rows = np.arange(len(vals))
    lo = s[rows, np.maximum((n - 1) // 2, 0)]
    hi = s[rows, np.maximum(n // 2, 0)]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def aperture_correction(psf_fl, ap_fl, ap_err, clip: float = 3.0):
    """Median ratio large-aperture / PSF flux over the given stars, its error, and the used mask."""
    ratio = ap_fl / psf_fl
    good = np.isfinite(ratio) & (ap_fl > 0) & (psf_fl > 0)
    if good.sum() < 3:
        return 1.0, np.nan, good
    rel_err = ap_err / ap_fl
    for _ in range(5):
        med = np.median(ratio[good])
        mad = 1.4826 * np.median(np.abs(ratio[good] - med))
        new = good & (np.abs(ratio - med) < clip * max(mad, 1e-4))
        if np.array_equal(new, good):
            break
        good = new
    w = 1 / np.maximum(rel_err[good], 1e-4) ** 2
    value = float(np.sum(w * ratio[good]) / np.sum(w))
    err = float(1.4826 * np.median(np.abs(ratio[good] - value)) / np.sqrt(good.sum()))
    return value, err, good


@dataclass
class ZeroPoint:
    magzero: float  # AB mag of 1 e- (at colour 0 if a colour term is fitted)
    magzero_err: float  # statistical error of the mean (mag)
    scatter: float  # clipped RMS of (ref - instrumental) (mag)
    n_used: int
    colour_coeff: float = 0.0
    used: np.ndarray | None = None


def zero_point(flux, flux_err, ref_mag, ref_mag_err, colour=None, fit_colour=False,
               clip: float = 3.0, sys_floor: float = 0.005) -> ZeroPoint:
    """Clipped weighted zero point from matched stars.

    flux, flux_err : total (aperture-corrected) fluxes in e-.
    ref_mag, ref_mag_err : reference AB magnitudes and errors.
    colour : reference colour per star (mag), used when ``fit_colour``.
    sys_floor : added in quadrature to every star's error (mag), so the very
        brightest stars do not get all the weight.
    """
    flux = np.asarray(flux, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        zp = np.asarray(ref_mag, float) + 2.5 * np.log10(flux)
        err = np.hypot(np.asarray(ref_mag_err, float), 1.0857 * np.asarray(flux_err, float) / flux)
    err = np.hypot(err, sys_floor)
    good = np.isfinite(zp) & np.isfinite(err) & (flux > 0)
    if fit_colour:
        colour = np.asarray(colour, float)
        good &= np.isfinite(colour)
    coeff = 0.0
    if good.sum() < 3:
        raise ValueError(f"only {good.sum()} stars for the zero point")
    for _ in range(10):
        w = 1 / err[good] ** 2
        if fit_colour:
            a_mat = np.stack([np.ones(good.sum()), colour[good]], axis=1)
            sol, *_ = np.linalg.lstsq(a_mat * np.sqrt(w)[:, None], zp[good] * np.sqrt(w), rcond=None)
            value, coeff = sol
            model = value + coeff * colour
        else:
            value = np.sum(w * zp[good]) / np.sum(w)
            model = np.full(len(zp), value)
        resid = (zp - model) / err
        s = 1.4826 * np.median(np.abs(resid[good]))
        new = good & (np.abs(resid) < clip * max(s, 1.0))
        if np.array_equal(new, good):
            break
        good = new
    w = 1 / err[good] ** 2
    scatter = float(np.sqrt(np.mean((zp - model)[good] ** 2)))
    chi2 = np.sum(w * (zp - model)[good] ** 2) / max(good.sum() - 1, 1)
    # error of the mean, inflated if the scatter exceeds the errors
    value_err = float(np.sqrt(max(chi2, 1.0) / np.sum(w)))
    return ZeroPoint(float(value), value_err, scatter, int(good.sum()), float(coeff), good)
