"""Real/bogus classification of diaSources: features, training, scoring, evaluation.

Most detections in a difference image are bogus (subtraction residuals of
stars and galaxy cores, cosmic rays, bad columns, trails, edges).  This module
turns each diaSource's cutout triplet (science, template, difference; plus the
difference variance and mask when available) into a vector of *scale-free*
features -- every length is in units of the science PSF FWHM and every flux is
in units of the noise -- so a model trained on one camera can face another.
A scikit-learn classifier trained on injected fakes (real) versus everything
else (bogus) gives each diaSource a calibrated probability, ``reliability``.

Conventions
-----------
* Cutouts are (N, S, S) stacks centred on the diaSource (the pixel nearest to
  its centroid), S odd.  Science and template may carry a sky pedestal; each
  stamp's border median is subtracted.  NaN pixels are "no data".
* ``fwhm`` is the science PSF FWHM in pixels per diaSource.
* Detections may be negative (a source fading from the template); features
  are computed after flipping the sign so the detection is positive, with the
  brighter epoch ("new") and the fainter ("old") swapped accordingly.
* Models are saved with skops (no pickle) together with FEATURE_VERSION; a
  model built for other features is refused with a DiapipeError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from . import masks
from .fileio import DiapipeError, atomic_path, write_parquet, write_text
from .stats import nanmedian_last

log = logging.getLogger("diapipe.realbogus")

#: Bump whenever a feature's definition changes: saved models record it and a
#: model trained on other definitions is refused.
FEATURE_VERSION = 4

_SIG2FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))

#: name -> description (units).  The order is the model's column order.
FEATURES: dict[str, str] = {
    "snr": "S/N of a PSF-shaped (Gaussian of the science FWHM) amplitude fit to the difference cutout at the "
    "detection centroid, noise from the robust (MAD) scatter of the difference cutout (dimensionless).",
    "is_negative": "1 if the detection is negative in the difference (source brighter in the template), else 0.",
    "psf_chi2": "Reduced chi-square of that PSF fit within 1.5 FWHM of the centroid (1 for a perfect point source "
    "in white noise).",
    "psf_resid_frac": "Sum of |difference - PSF model| over sum of |PSF model| within 1.5 FWHM: flux-normalised "
    "misfit, independent of brightness.",
    "fwhm_ratio": "Size of the difference source (Gaussian-weighted second moments, window deconvolved) over the PSF "
    "size; ~1 for point sources, <1 for cosmic rays, >1 for trails and extended residuals (clipped to [0, 3]).",
    "ellipticity": "|e| = sqrt((Ixx-Iyy)^2 + (2Ixy)^2)/(Ixx+Iyy) of the weighted second moments of the difference "
    "source (0 round, -> 1 line-like).",
    "sharpness": "Difference pixel at the centroid over the PSF-fit model's value in that pixel: ~1 for a PSF, "
    ">>1 for cosmic rays and hot pixels (clipped to [-10, 10]).",
    "centroid_offset": "Distance between the difference centroid and the cutout centre beyond the 0.71 px (half a "
    "pixel diagonal) that centring a stamp on the nearest pixel leaves anyway (FWHM): 0 for a source where the "
    "cutout was centred, whatever the camera's sampling.",
    "new_snr": "Aperture (radius 1 FWHM) S/N in the brighter epoch (science for positive detections): is there "
    "anything at this position in the new image.",
    "old_snr": "Aperture (radius 1 FWHM) S/N in the fainter epoch (template for positive detections): a source "
    "already there (star, galaxy core) makes residuals likely.",
    "old_offset": "Distance from the difference centroid to the light centroid (Gaussian-weighted, window = PSF) "
    "of the old epoch (FWHM); NaN when the old epoch has nothing there (aperture S/N < 3). ~0 for variable "
    "stars, ~0.3-0.5 for misregistration dipoles.",
    "new_offset": "Same for the new epoch (FWHM); NaN when its aperture S/N < 3.",
    "ratio_diff_new": "Difference aperture flux over new-epoch aperture flux (noise-floored, clipped to [-2, 2]); "
    "~1 for a new point source on empty sky.",
    "log_ratio_diff_old": "log10 of difference aperture flux over old-epoch aperture flux, both noise-floored: large "
    "for new sources, small for residuals of bright stars.",
    "neg_frac_r1": "Fraction of good pixels within 1 FWHM with normalised difference < -3 sigma.",
    "neg_frac_r2": "Fraction of good pixels within 2 FWHM with normalised difference < -3 sigma.",
    "pos_frac_r2": "Fraction of good pixels within 2 FWHM with normalised difference > +3 sigma.",
    "neg_sum_ratio_r2": "Sum of negative over sum of positive normalised difference pixels within 2 FWHM "
    "(both beyond 2 sigma; 0 for a clean positive source, ~1 for a dipole).",
    "sum_abs_ratio_r2": "Sum over absolute sum of the normalised difference within 2 FWHM (+1 clean source, ~0 "
    "for dipoles and rings).",
    "min_over_peak_r2": "Most negative normalised difference pixel within 2 FWHM over the peak (dipole depth).",
    "dipole_sep": "Distance between the centroids of the >2 sigma positive and < -2 sigma negative lobes within 3 "
    "FWHM (FWHM); 0 when there is no negative lobe.",
    "dipole_flux_ratio": "Negative-lobe flux over positive-lobe flux within 3 FWHM (pixels beyond 2 sigma).",
    "annulus_rms": "RMS of the normalised difference in the 1.5-3 FWHM annulus (1 for pure noise; rings and "
    "residual structure raise it).",
    "annulus_flux_ratio": "Sum of the normalised difference in the 1.5-3 FWHM annulus over the PSF-fit flux "
    "(negative for PSF-mismatch rings around a positive core).",
    "outer_rms": "RMS of the normalised difference beyond 2 FWHM over the whole cutout (1 for pure noise).",
    "outer_sig_frac": "Fraction of good pixels beyond 2 FWHM with |normalised difference| > 5 sigma (other "
    "residuals, bleed trails, columns).",
    "line_max_snr": "Largest S/N of the normalised difference summed along a line through the centroid (16 angles), "
    "using only pixels beyond 2 FWHM: satellite trails and bad columns.",
    "line_col_snr": "S/N of the normalised difference summed along the centroid's column beyond 2 FWHM "
    "(bad columns, bleed trails).",
    "edge_distance": "Distance from the centroid to the nearest no-data (NaN or EDGE/NO_DATA) pixel (FWHM), capped "
    "at the cutout half-width.",
    "nan_frac": "Fraction of cutout pixels that are NaN in any of science, template, difference (an all-NaN "
    "science or template stamp counts as not given: its features are NaN, its pixels are not counted).",
    "mask_bad_frac": "Fraction of pixels within 2 FWHM flagged BAD, SAT, CR or SUSPECT (NaN if no mask given).",
    "mask_sat_frac": "Fraction of pixels within 2 FWHM flagged SAT (NaN if no mask given).",
    "mask_cr_frac": "Fraction of pixels within 2 FWHM flagged CR (NaN if no mask given).",
    "mask_edge_frac": "Fraction of cutout pixels flagged EDGE or NO_DATA (NaN if no mask given).",
    "noise_ratio": "Robust scatter of the difference cutout over the square root of its median variance plane "
    "(NaN if no variance given): correlated or under-estimated noise.",
    "ref_distance": "Distance to the nearest reference-catalog source, diaSource column refDistance (pixels) "
    "divided by the FWHM (NaN if not given).",
    "seeing_ratio": "Science PSF FWHM over template PSF FWHM (NaN if the template FWHM is not given).",
}
FEATURE_NAMES: list[str] = list(FEATURES)

# Largest offset of a source from its stamp's centre pixel when the stamp is cut at the nearest pixel.
_CENTRING_PX = 0.5 * np.sqrt(2.0)
# Pixels nearer than this to the border serve as the sky estimate of each stamp.
_BORDER = 3
_LINE_ANGLES = np.linspace(0.0, np.pi, 16, endpoint=False)


# --------------------------------------------------------------------------- features
def _robust_sigma(values: np.ndarray) -> np.ndarray:
    """1.4826 MAD per row of a (N, M) array with NaNs ignored; NaN if a row is empty."""
    med = nanmedian_last(values)
    return 1.4826 * nanmedian_last(np.abs(values - med[:, None]))


def _gaussian_filter_fft(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Convolve each (S, S) image of a stack with a unit-sum Gaussian of its own sigma (pixels)."""
    n, ny, nx = img.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    k2 = (kx**2 + ky**2)[None]
    tf = np.exp(-2.0 * np.pi**2 * sigma[:, None, None] ** 2 * k2)
    return np.fft.irfft2(np.fft.rfft2(img) * tf, s=(ny, nx))


def compute_features(
    science,
    template,
    difference,
    fwhm,
    variance=None,
    mask=None,
    template_fwhm=None,
    ref_distance=None,
    chunk: int = 2048,
) -> pd.DataFrame:
    """Features (columns FEATURE_NAMES) of N cutout triplets.

    science, template, difference : (N, S, S) arrays (counts of any unit; NaN = no data).
    fwhm : science PSF FWHM in pixels, scalar or (N,).
    variance : optional (N, S, S) variance of the difference (same units squared).
    mask : optional (N, S, S) integer mask of the difference (diapipe.masks planes).
    template_fwhm : optional template PSF FWHM in pixels, scalar or (N,).
    ref_distance : optional distance (pixels) to the nearest reference source, (N,).
    """
    difference = np.asarray(difference, dtype=np.float64)
    if difference.ndim == 2:
        difference = difference[None]
    science = np.asarray(science, dtype=np.float64).reshape(difference.shape)
    template = np.asarray(template, dtype=np.float64).reshape(difference.shape)
    n, ny, nx = difference.shape
    if ny != nx or ny % 2 == 0 or ny < 9:
        raise ValueError(f"cutouts must be square with an odd side >= 9 pixels, got {ny}x{nx}")
    fwhm = np.broadcast_to(np.asarray(fwhm, dtype=np.float64), (n,))
    if np.any(~np.isfinite(fwhm)) or np.any(fwhm <= 0):
        raise ValueError("fwhm must be positive and finite")

    def opt(a, shape):
        return None if a is None else np.broadcast_to(np.asarray(a, dtype=np.float64), shape)

    tfwhm = opt(template_fwhm, (n,))
    refd = opt(ref_distance, (n,))
    out = []
    for i0 in range(0, n, chunk):
        sl = slice(i0, min(n, i0 + chunk))
        out.append(
            _features_chunk(
                science[sl],
                template[sl],
                difference[sl],
                fwhm[sl],
                None if variance is None else np.asarray(variance[sl], dtype=np.float64),
                None if mask is None else np.asarray(mask[sl]),
                None if tfwhm is None else tfwhm[sl],
                None if refd is None else refd[sl],
            )
        )
    return pd.concat(out, ignore_index=True)[FEATURE_NAMES] if out else pd.DataFrame(columns=FEATURE_NAMES)


def _features_chunk(sci, ref, diff, fwhm, var, mask, tfwhm, refd) -> pd.DataFrame:
    n, S, _ = diff.shape
    c = (S - 1) / 2.0
    yy, xx = np.mgrid[:S, :S].astype(np.float64)
    flat = lambda a: a.reshape(n, -1)  # noqa: E731
    sig = fwhm / _SIG2FWHM  # PSF sigma in pixels
    f = {}

    # --- which pixels to trust; an all-NaN science or template stamp means "not given"
    sci_missing = ~np.isfinite(sci).any(axis=(1, 2))
    ref_missing = ~np.isfinite(ref).any(axis=(1, 2))
    sci = np.where(sci_missing[:, None, None], 0.0, sci)
    ref = np.where(ref_missing[:, None, None], 0.0, ref)
    finite = np.isfinite(sci) & np.isfinite(ref) & np.isfinite(diff)
    good = finite.copy()
    if mask is not None:
        # Only pixels without data are left out.  BAD/SAT/CR pixels carry the very artefacts the
        # classifier must see (the mask fractions are features of their own), and the difference
        # image's BAD plane is grown by the matching kernel (half of a tiny-survey diffexp).
        good &= (mask & masks.bits("EDGE", "NO_DATA")) == 0
    f["nan_frac"] = 1.0 - finite.mean(axis=(1, 2))

    # --- sky levels (border medians) and robust noise of each image
    border = np.zeros((S, S), bool)
    border[:_BORDER] = border[-_BORDER:] = True
    border[:, :_BORDER] = border[:, -_BORDER:] = True
    R0 = np.hypot(xx - c, yy - c)[None] / fwhm[:, None, None]  # distance to stamp centre (FWHM)
    outer0 = good & (R0 > 2.0)
    few = outer0.sum(axis=(1, 2)) < 20
    outer0[few] = good[few]  # tiny cutouts in FWHM units: use every pixel

    def sky_and_sigma(img):
        b = np.where(border[None] & finite, img, np.nan)
        sky = nanmedian_last(flat(b))
        sky = np.where(np.isfinite(sky), sky, nanmedian_last(flat(np.where(finite, img, np.nan))))
        sky = np.where(np.isfinite(sky), sky, 0.0)
        s = _robust_sigma(flat(np.where(outer0, img - sky[:, None, None], np.nan)))
        return sky, s

    sky_s, sig_s = sky_and_sigma(sci)
    sky_t, sig_t = sky_and_sigma(ref)
    sky_d, sig_d = sky_and_sigma(diff)
    tiny = 1e-12
    for s in (sig_s, sig_t, sig_d):
        bad = ~np.isfinite(s) | (s <= 0)
        s[bad] = np.nanmax(np.r_[s[~bad], 1.0]) if bad.any() else 1.0
        np.maximum(s, tiny, out=s)

    w = good.astype(np.float64)
    d0 = np.where(good, (diff - sky_d[:, None, None]) / sig_d[:, None, None], 0.0)
    sci0 = np.where(good, sci - sky_s[:, None, None], 0.0)
    ref0 = np.where(good, ref - sky_t[:, None, None], 0.0)

    # --- detection: peak of the PSF-matched |difference| near the centre
    filt = _gaussian_filter_fft(d0, sig)
    win = R0 <= np.maximum(1.0, 2.0 / fwhm)[:, None, None]
    score = np.where(win, np.abs(filt), -1.0)
    ipk = flat(score).argmax(axis=1)
    py, px = np.divmod(ipk, S)
    sign = np.where(flat(filt)[np.arange(n), ipk] >= 0, 1.0, -1.0)
    f["is_negative"] = (sign < 0).astype(np.float64)
    d = d0 * sign[:, None, None]
    new = np.where((sign > 0)[:, None, None], sci0, ref0)
    old = np.where((sign > 0)[:, None, None], ref0, sci0)
    sig_new = np.where(sign > 0, sig_s, sig_t)
    sig_old = np.where(sign > 0, sig_t, sig_s)

    # centroid: first moments of the positive part of the smoothed image in the 3x3 box at the peak
    fs = filt * sign[:, None, None]
    off = np.array([-1, 0, 1])
    oy, ox = np.meshgrid(off, off, indexing="ij")
    gy = np.clip(py[:, None, None] + oy[None], 0, S - 1)
    gx = np.clip(px[:, None, None] + ox[None], 0, S - 1)
    box = fs[np.arange(n)[:, None, None], gy, gx]
    # three-point Gaussian (log-parabola) interpolation of the smoothed peak: exact for a Gaussian,
    # free of the pixel-locking of a moment centroid when the PSF is undersampled
    def interp3(m, z, p):
        with np.errstate(all="ignore"):
            lm, lz, lp = np.log(m), np.log(z), np.log(p)
            off = 0.5 * (lm - lp) / (lm - 2 * lz + lp)
            lin = 0.5 * (m - p) / (m - 2 * z + p)  # plain parabola if a value is not positive
        off = np.where((m > 0) & (z > 0) & (p > 0), off, lin)
        return np.clip(np.nan_to_num(off, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)

    xc = px + interp3(box[:, 1, 0], box[:, 1, 1], box[:, 1, 2])
    yc = py + interp3(box[:, 0, 1], box[:, 1, 1], box[:, 2, 1])
    # beyond the nearest-pixel centring of the stamp: that part is in pixels, not FWHM, and ZTF's
    # 2.3-px stamps (median 0.18 FWHM of it) looked displaced next to our 5-7 px seeing
    f["centroid_offset"] = np.maximum(np.hypot(xc - c, yc - c) - _CENTRING_PX, 0.0) / fwhm

    dx = xx[None] - xc[:, None, None]
    dy = yy[None] - yc[:, None, None]
    rp2 = dx**2 + dy**2  # pixels^2
    r = np.sqrt(rp2) / fwhm[:, None, None]  # FWHM units
    s2 = sig[:, None, None] ** 2

    # --- PSF fit (Gaussian of the science FWHM, amplitude only; sky already removed)
    P = np.exp(-rp2 / (2 * s2)) / (2 * np.pi * s2)
    fit = w * (r < 1.5)
    spp = (fit * P * P).sum(axis=(1, 2)) + tiny
    flux = (fit * P * d).sum(axis=(1, 2)) / spp  # in sigma-units x pixels
    f["snr"] = flux * np.sqrt(spp)
    res = d - flux[:, None, None] * P
    nfit = fit.sum(axis=(1, 2))
    f["psf_chi2"] = (fit * res**2).sum(axis=(1, 2)) / np.maximum(nfit - 1, 1)
    model_abs = (fit * np.abs(flux[:, None, None] * P)).sum(axis=(1, 2)) + tiny
    f["psf_resid_frac"] = np.minimum((fit * np.abs(res)).sum(axis=(1, 2)) / model_abs, 100.0)

    # --- size and shape: Gaussian-weighted moments, window sigma 1.5 x PSF sigma
    sw2 = (1.5 * sig[:, None, None]) ** 2
    # unclipped pixels: clipping the noise at zero would bias the size up, more so for larger FWHM
    W = w * np.exp(-rp2 / (2 * sw2)) * d
    m0 = W.sum(axis=(1, 2))
    m0 = np.where(m0 > tiny, m0, tiny)
    ixx = (W * dx**2).sum(axis=(1, 2)) / m0
    iyy = (W * dy**2).sum(axis=(1, 2)) / m0
    ixy = (W * dx * dy).sum(axis=(1, 2)) / m0
    t = 0.5 * (ixx + iyy)
    t = np.where(m0 > tiny, t, np.inf)  # no positive signal: undefined, treated as very large
    inv = 1.0 / np.maximum(t, tiny) - 1.0 / sw2[:, 0, 0]  # window deconvolution
    size = np.where(inv > 0, 1.0 / np.sqrt(np.maximum(inv, tiny)), 3.0 * sig)
    f["fwhm_ratio"] = np.clip(size / sig, 0.0, 3.0)
    f["ellipticity"] = np.clip(np.sqrt((ixx - iyy) ** 2 + (2 * ixy) ** 2) / np.maximum(ixx + iyy, tiny), 0, 1)

    # --- sharpness: the pixel at the centroid against the PSF model's value there (1 for a PSF)
    rows = np.arange(n)
    iy = np.clip(np.floor(yc + 0.5).astype(int), 0, S - 1)
    ix = np.clip(np.floor(xc + 0.5).astype(int), 0, S - 1)
    model_pk = flux * P[rows, iy, ix]
    f["sharpness"] = np.clip(d[rows, iy, ix] / np.where(np.abs(model_pk) > 0.5, model_pk, 0.5), -10, 10)
    peak = d[np.arange(n)[:, None, None], gy, gx].max(axis=(1, 2))

    # --- flux ratios in a 1-FWHM aperture
    ap = w * (r < 1.0)
    nap = ap.sum(axis=(1, 2)) + tiny
    Fd = (ap * d).sum(axis=(1, 2))  # sigma_d units
    Fn = (ap * new).sum(axis=(1, 2))
    Fo = (ap * old).sum(axis=(1, 2))
    en = sig_new * np.sqrt(nap)
    eo = sig_old * np.sqrt(nap)
    f["new_snr"] = Fn / en
    f["old_snr"] = Fo / eo
    for key, img, snr_ap in (("old_offset", old, f["old_snr"]), ("new_offset", new, f["new_snr"])):
        f[key] = np.where(snr_ap >= 3, _light_offset(img, w, xx, yy, xc, yc, sig), np.nan) / fwhm
    Fd_counts = Fd * sig_d  # back to image units for ratios
    ed = sig_d * np.sqrt(nap)
    f["ratio_diff_new"] = np.clip(Fd_counts / (np.abs(Fn) + en), -2, 2)
    f["log_ratio_diff_old"] = np.log10((np.abs(Fd_counts) + ed) / (np.abs(Fo) + eo))

    # --- pixel statistics of the normalised difference
    in1 = w * (r < 1.0)
    in2 = w * (r < 2.0)
    n1 = in1.sum(axis=(1, 2)) + tiny
    n2 = in2.sum(axis=(1, 2)) + tiny
    f["neg_frac_r1"] = (in1 * (d < -3)).sum(axis=(1, 2)) / n1
    f["neg_frac_r2"] = (in2 * (d < -3)).sum(axis=(1, 2)) / n2
    f["pos_frac_r2"] = (in2 * (d > 3)).sum(axis=(1, 2)) / n2
    pos2 = (in2 * np.where(d > 2, d, 0)).sum(axis=(1, 2))
    neg2 = (in2 * np.where(d < -2, -d, 0)).sum(axis=(1, 2))
    f["neg_sum_ratio_r2"] = np.minimum(neg2 / (pos2 + 1.0), 10.0)
    f["sum_abs_ratio_r2"] = (in2 * d).sum(axis=(1, 2)) / ((in2 * np.abs(d)).sum(axis=(1, 2)) + tiny)
    dmin = np.where(in2 > 0, d, np.inf).min(axis=(1, 2))
    f["min_over_peak_r2"] = np.clip(dmin / np.maximum(peak, 1.0), -2, 1)

    # --- dipole lobes within 3 FWHM
    in3 = w * (r < 3.0)
    pw = in3 * np.where(d > 2, d, 0)
    nw = in3 * np.where(d < -2, -d, 0)
    ps, ns = pw.sum(axis=(1, 2)), nw.sum(axis=(1, 2))
    pxc = (pw * xx).sum(axis=(1, 2)) / (ps + tiny)
    pyc = (pw * yy).sum(axis=(1, 2)) / (ps + tiny)
    nxc = (nw * xx).sum(axis=(1, 2)) / (ns + tiny)
    nyc = (nw * yy).sum(axis=(1, 2)) / (ns + tiny)
    f["dipole_sep"] = np.where((ns > 0) & (ps > 0), np.hypot(pxc - nxc, pyc - nyc) / fwhm, 0.0)
    f["dipole_flux_ratio"] = np.minimum(ns / (ps + 1.0), 10.0)

    # --- annulus and outer region
    ann = w * (r >= 1.5) * (r < 3.0)
    nann = ann.sum(axis=(1, 2))
    f["annulus_rms"] = np.where(nann > 0, np.sqrt((ann * d * d).sum(axis=(1, 2)) / np.maximum(nann, 1)), np.nan)
    f["annulus_flux_ratio"] = np.clip((ann * d).sum(axis=(1, 2)) / np.maximum(np.abs(flux), 1.0), -5, 5)
    outer = w * (r > 2.0)
    nout = outer.sum(axis=(1, 2))
    f["outer_rms"] = np.where(nout > 0, np.sqrt((outer * d * d).sum(axis=(1, 2)) / np.maximum(nout, 1)), np.nan)
    f["outer_sig_frac"] = np.where(nout > 0, (outer * (np.abs(d) > 5)).sum(axis=(1, 2)) / np.maximum(nout, 1), np.nan)

    # --- lines through the centroid (trails, columns), beyond 2 FWHM
    best = np.full(n, -np.inf)
    col = None
    for ang in _LINE_ANGLES:
        perp = np.abs(-np.sin(ang) * dx + np.cos(ang) * dy)
        lw = outer * (perp < 0.5)
        nl = lw.sum(axis=(1, 2))
        snr_l = np.where(nl > 0, (lw * d).sum(axis=(1, 2)) / np.sqrt(np.maximum(nl, 1)), 0.0)
        best = np.maximum(best, snr_l)
        if np.isclose(ang, np.pi / 2):
            col = snr_l
    f["line_max_snr"] = best
    f["line_col_snr"] = col

    # --- edges and masks
    nodata = ~finite
    if mask is not None:
        nodata = nodata | ((mask & masks.bits("EDGE", "NO_DATA")) != 0)
    half = (S - 1) / 2.0 / fwhm
    dist = np.where(nodata, np.sqrt(rp2), np.inf).min(axis=(1, 2)) / fwhm
    f["edge_distance"] = np.minimum(dist, half)
    if mask is not None:
        near = r < 2.0
        nn = near.sum(axis=(1, 2)) + tiny
        frac = lambda *planes: (near & ((mask & masks.bits(*planes)) != 0)).sum(axis=(1, 2)) / nn  # noqa: E731
        f["mask_bad_frac"] = frac("BAD", "SAT", "CR", "SUSPECT")
        f["mask_sat_frac"] = frac("SAT")
        f["mask_cr_frac"] = frac("CR")
        f["mask_edge_frac"] = ((mask & masks.bits("EDGE", "NO_DATA")) != 0).mean(axis=(1, 2))
    else:
        for k in ("mask_bad_frac", "mask_sat_frac", "mask_cr_frac", "mask_edge_frac"):
            f[k] = np.full(n, np.nan)
    if var is not None:
        mv = nanmedian_last(flat(np.where(good & np.isfinite(var) & (var > 0), var, np.nan)))
        f["noise_ratio"] = sig_d / np.sqrt(mv)
    else:
        f["noise_ratio"] = np.full(n, np.nan)
    new_missing = np.where(sign > 0, sci_missing, ref_missing)
    old_missing = np.where(sign > 0, ref_missing, sci_missing)
    for key in ("new_snr", "ratio_diff_new", "new_offset"):
        f[key] = np.where(new_missing, np.nan, f[key])
    for key in ("old_snr", "log_ratio_diff_old", "old_offset"):
        f[key] = np.where(old_missing, np.nan, f[key])
    f["ref_distance"] = np.full(n, np.nan) if refd is None else refd / fwhm
    f["seeing_ratio"] = np.full(n, np.nan) if tfwhm is None else fwhm / tfwhm
    return pd.DataFrame({k: np.asarray(f[k], dtype=np.float64) for k in FEATURE_NAMES})


def _light_offset(img, w, xx, yy, xc, yc, sig, iterations=3):
    """Distance (pixels) from (xc, yc) to the Gaussian-weighted (window sigma = PSF sigma) centroid of img."""
    x, y = xc.copy(), yc.copy()
    pos = w * np.clip(img, 0, None)
    for _ in range(iterations):
        W = pos * np.exp(-((xx[None] - x[:, None, None]) ** 2 + (yy[None] - y[:, None, None]) ** 2)
                         / (2 * sig[:, None, None] ** 2))
        s = W.sum(axis=(1, 2))
        ok = s > 0
        x = np.where(ok, (W * xx[None]).sum(axis=(1, 2)) / np.where(ok, s, 1), x)
        y = np.where(ok, (W * yy[None]).sum(axis=(1, 2)) / np.where(ok, s, 1), y)
    return np.hypot(x - xc, y - yc)


def feature_doc() -> str:
    """Markdown table documenting every feature (docs/realbogus-features.md)."""
    lines = [
        "# Real/bogus features",
        "",
        f"Generated from `diapipe.realbogus.FEATURES` (FEATURE_VERSION = {FEATURE_VERSION}) by "
        "`diapipe realbogus feature-doc`; do not edit by hand.",
        "",
        "All lengths are in units of the science PSF FWHM and all fluxes in units of the noise, so the "
        "features mean the same on any camera. The difference cutout is normalised by its robust (MAD) "
        "scatter after subtracting its border median, and its sign is flipped for negative detections.",
        "",
        "| # | feature | description |",
        "|---|---|---|",
    ]
    for i, (k, v) in enumerate(FEATURES.items()):
        lines.append(f"| {i} | `{k}` | {v} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- training
#: Candidate classifiers compared by grouped cross-validation.
MODEL_NAMES = ("hgb", "rf")

#: Types a saved model may contain besides skops' defaults; anything else is refused on load.
TRUSTED_TYPES = [
    "sklearn.isotonic.IsotonicRegression",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.Interval",
    "sklearn._loss._loss.CyHalfBinomialLoss",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "sklearn.model_selection._split.GroupKFold",
    "builtins.slice",
    "numpy.dtype",
    "collections.OrderedDict",
]
_META_MEMBER = "diapipe_metadata.json"


@dataclass
class TrainConfig:
    """Training settings (the ``realbogus`` config block)."""

    target_fpr: float = 0.01  # false-positive rate the threshold is chosen for (fraction)
    n_folds: int = 4  # GroupKFold folds (grouped by visit)
    holdout_fraction: float = 0.25  # fraction of visits held out for evaluation
    calibration: str = "isotonic"  # 'isotonic' or 'sigmoid'
    models: tuple = MODEL_NAMES  # candidates compared by cross-validation
    select_metric: str = "mdr_at_fpr1"  # CV metric to minimise when picking the model
    seed: int = 0
    n_jobs: int = 1  # threads for fitting (OpenMP for HGB, joblib for RF)
    hgb_max_iter: int = 200
    rf_n_estimators: int = 200
    # leaves of >= 5 diaSources: a few per cent of wrong labels are averaged out instead of memorised
    # (5% flipped labels, synthetic set: degradation factor 3.0 with leaves of 2 -> 1.25 with 5)
    rf_min_samples_leaf: int = 5
    # every visit held out once in this many visit folds (0 = the single hold-out only; the workflow's
    # config turns it on, library callers on large sets may not want the extra trainings)
    outer_folds: int = 0
    synthetic_visits: int = 0  # visits of synthetic triplets added to the training rows (0 = none)
    # fraction of training labels flipped in a cross-validated robustness test of every candidate: a
    # candidate whose CV metrics degrade by SELECT_NOISE_MAX_FACTOR or more is not chosen; if none is
    # below it, the one that degrades least is (0 = off)
    select_label_noise: float = 0.0
    synthetic_per_visit: int = 300  # synthetic detections per synthetic visit

    @classmethod
    def from_config(cls, block: dict | None) -> "TrainConfig":
        block = dict(block or {})
        known = {k: block[k] for k in cls.__dataclass_fields__ if k in block}
        if "models" in known:
            known["models"] = tuple(known["models"])
        return cls(**known)


@dataclass
class RealBogusModel:
    """A calibrated classifier with what it needs to be used safely."""

    estimator: dict  # {'classifier': fitted classifier, 'calibrator': fitted calibrator, 'method': str}
    feature_names: list
    threshold: float  # reliability cut for the target FPR
    metadata: dict = field(default_factory=dict)

    def reliability(self, features: pd.DataFrame, threads: int = 1) -> np.ndarray:
        """Calibrated probability that each row is real (0..1); ``threads`` caps OpenMP threads."""
        missing = [k for k in self.feature_names if k not in features.columns]
        if missing:
            raise DiapipeError(f"feature table lacks columns the model needs: {missing}")
        X = features[self.feature_names].to_numpy(dtype=np.float64)
        if len(X) == 0:
            return np.zeros(0)
        # OpenMP threads on a busy machine spin and crawl: cap them at the job's share of cores
        with threadpool_limits(limits=threads):
            return calibrated_scores(self.estimator, X)


def make_estimator(name: str, cfg: TrainConfig):
    """An unfitted candidate classifier ('hgb' or 'rf'); both accept NaN features."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    if name == "hgb":
        return HistGradientBoostingClassifier(
            # shallow, strongly regularised trees: robust to a few per cent of wrong labels
            max_iter=cfg.hgb_max_iter, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=40,
            l2_regularization=2.0, early_stopping=False, random_state=cfg.seed,
        )
    if name == "rf":
        return RandomForestClassifier(
            n_estimators=cfg.rf_n_estimators, min_samples_leaf=cfg.rf_min_samples_leaf, max_features="sqrt",
            n_jobs=cfg.n_jobs,
            random_state=cfg.seed,
        )
    raise ValueError(f"unknown model {name!r}; known: {MODEL_NAMES}")


def holdout_visits(groups, fraction: float, seed: int) -> np.ndarray:
    """Visits held out for evaluation: a seeded random ``fraction`` of the distinct groups (>= 1)."""
    from .seeds import rng_for

    uniq = np.unique(np.asarray(groups))
    if len(uniq) < 3:
        raise DiapipeError(f"need at least 3 visits to hold some out, got {len(uniq)}")
    k = max(1, int(round(fraction * len(uniq))))
    rng = rng_for(seed, "realbogus_holdout")
    return np.sort(rng.choice(uniq, size=k, replace=False))


def _raw_method(est) -> str:
    # what CalibratedClassifierCV calibrates: decision_function if there is one
    return "decision_function" if hasattr(est, "decision_function") else "predict_proba"


def _oof_scores(est, X, y, splits, extra=None) -> np.ndarray:
    """Out-of-fold raw scores; ``extra`` = (X, y) rows added to every fold's training set, never scored."""
    from sklearn.base import clone

    out = np.full(len(y), np.nan)
    for tr, va in splits:
        Xf, yf = X[tr], y[tr]
        if extra is not None:
            Xf, yf = np.vstack([Xf, extra[0]]), np.r_[yf, extra[1]]
        out[va] = raw_scores(clone(est).fit(Xf, yf), X[va])
    return out


def threshold_for_fpr(labels, scores, target_fpr: float) -> float:
    """Smallest score cut whose false-positive rate (bogus with score >= cut) is <= target_fpr."""
    labels = np.asarray(labels).astype(bool)
    bogus = np.sort(np.asarray(scores)[~labels])
    if len(bogus) == 0:
        return 0.5
    cand = np.unique(np.r_[np.asarray(scores), 1.0 + 1e-9])
    # number of bogus >= t, decreasing in t; integers so 30/3000 is exactly "1%"
    n_ge = len(bogus) - np.searchsorted(bogus, cand, side="left")
    ok = np.nonzero(n_ge <= np.floor(target_fpr * len(bogus) + 1e-9))[0]
    return float(cand[ok[0]])


def _fit_calibrator(raw, y, method: str):
    """Calibrator from raw out-of-fold scores to probabilities: isotonic, or Platt's sigmoid."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    if method == "isotonic":
        return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, y)
    if method == "sigmoid":
        return LogisticRegression(C=1e6).fit(np.asarray(raw)[:, None], y)
    raise ValueError(f"unknown calibration {method!r}; use 'isotonic' or 'sigmoid'")


def _apply_calibrator(cal, raw) -> np.ndarray:
    if hasattr(cal, "predict_proba"):
        return cal.predict_proba(np.asarray(raw)[:, None])[:, 1]
    return np.clip(cal.predict(raw), 0.0, 1.0)


def raw_scores(clf, X) -> np.ndarray:
    """Uncalibrated score of a fitted classifier (decision_function if it has one, else P(real))."""
    if _raw_method(clf) == "decision_function":
        return clf.decision_function(X)
    return clf.predict_proba(X)[:, 1]


#: Weight of the tie-break term in the reliability (its largest change to a calibrated probability).
_TIEBREAK = 1e-4


def _reliability_from_raw(estimator: dict, raw) -> np.ndarray:
    """Calibrated probability of raw scores, strictly increasing in the raw score.

    Isotonic calibration is a step function: every diaSource of a step gets the same reliability, so
    the ranking metrics (ROC, MDR at FPR 1 %) lose the classifier's own ordering and a single bogus in
    the top step makes FPR < 1 % unreachable on a few hundred bogus.  A term of weight 1e-4 increasing
    with the raw score (logistic in the standardised raw score) breaks the ties and changes no
    probability by more than 1e-4.
    """
    raw = np.asarray(raw, float)
    p = _apply_calibrator(estimator["calibrator"], raw)
    tb = estimator.get("tiebreak")
    if tb is None:
        return p
    from scipy.special import expit

    return (1.0 - _TIEBREAK) * p + _TIEBREAK * expit((raw - tb[0]) / tb[1])


def calibrated_scores(estimator: dict, X) -> np.ndarray:
    """Reliability of rows X from a {'classifier', 'calibrator'[, 'tiebreak']} dict."""
    return _reliability_from_raw(estimator, raw_scores(estimator["classifier"], X))


def data_hash(features: pd.DataFrame, labels, groups) -> str:
    """sha256 of the training table (features in model order, labels, visits)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(features.to_numpy(dtype=np.float64)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int8)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(groups, dtype=np.int64)).tobytes())
    h.update(json.dumps(list(features.columns)).encode())
    return h.hexdigest()


def library_versions() -> dict:
    import sklearn
    import skops

    return {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
            "scikit-learn": sklearn.__version__, "skops": skops.__version__}


def train(features: pd.DataFrame, labels, groups, cfg: TrainConfig | None = None, extra=None):
    """Pick a classifier by grouped CV, calibrate it and choose the threshold.

    features : table with (at least) FEATURE_NAMES; labels : 1 real / 0 bogus;
    groups : visit of each row (no visit is split between folds).
    extra : optional (features table, labels) of additional training rows (e.g. synthetic triplets): in
        every fold's training set and in the final fit, never in the out-of-fold scores that choose the
        model, the calibration and the threshold.
    Returns (RealBogusModel, report dict with the CV comparison).
    All rows passed are used for training: hold visits out before calling.
    """
    cfg = cfg or TrainConfig()
    with threadpool_limits(limits=cfg.n_jobs):
        return _train(features, labels, groups, cfg, extra)


#: flipped-label draws of the robustness test in the model choice (``TrainConfig.select_label_noise``)
SELECT_NOISE_DRAWS = 3
#: a candidate is robust below this CV degradation factor: the issue's bar is 2 on the held-out visits,
#: whose smaller counts scatter more (measured on the default survey: HGB 1.9-2.5 in CV and 2.95
#: held out; RF 1.1-1.2 in CV and 1.0-1.5 held out)
SELECT_NOISE_MAX_FACTOR = 1.5


def _choose_model(cv: dict, models, metric: str) -> str:
    """The candidate with the lowest CV ``metric``; differences within its binomial standard error are ties.

    A rate measured on n detections (MDR on the reals, FPR on the bogus) scatters by
    sqrt(p (1 - p) / n): with ~350 bogus in the default survey, 1% FPR is 3.5 detections, and
    the MDR there moved between the two candidates from run to run with the features' float
    rounding.  Ties go to the higher CV AUC, which uses every detection.
    """
    n_key = "n_real" if metric == "mdr_at_fpr1" else "n_bogus"
    best = min(models, key=lambda k: cv[k][metric])
    p, n = cv[best][metric], max(cv[best][n_key], 1)
    se = np.sqrt(max(p * (1 - p), 1.0 / n) / n)
    tied = [k for k in models if cv[k][metric] - cv[best][metric] <= se]
    return max(tied, key=lambda k: cv[k]["auc"])


def _train(features, labels, groups, cfg, extra=None):
    from sklearn.model_selection import GroupKFold

    X = features[FEATURE_NAMES].to_numpy(dtype=np.float64)
    y = np.asarray(labels).astype(int)
    g = np.asarray(groups)
    if len(np.unique(y)) < 2:
        raise DiapipeError("training set needs both real and bogus detections")
    n_folds = min(cfg.n_folds, len(np.unique(g)))
    if n_folds < 2:
        raise DiapipeError("need at least 2 training visits for grouped cross-validation")
    splits = list(GroupKFold(n_splits=n_folds).split(X, y, g))
    ex = None
    if extra is not None and len(extra[1]):
        ex = (extra[0][FEATURE_NAMES].to_numpy(dtype=np.float64), np.asarray(extra[1]).astype(int))
    report = {"n_train": int(len(y)), "n_real": int(y.sum()), "n_bogus": int((1 - y).sum()),
              "n_visits": int(len(np.unique(g))), "n_folds": n_folds, "cv": {},
              "n_extra": 0 if ex is None else int(len(ex[1]))}
    oof = {}
    for name in cfg.models:
        t0 = time.perf_counter()
        raw = _oof_scores(make_estimator(name, cfg), X, y, splits, extra=ex)
        oof[name] = raw
        m = roc_metrics(y, raw)
        m["fit_seconds"] = round(time.perf_counter() - t0, 2)
        report["cv"][name] = m
        log.info("CV %s: AUC %.5f, MDR@FPR1%% %.4f, FPR@MDR1%% %.4f (%.1f s)", name, m["auc"],
                 m["mdr_at_fpr1"], m["fpr_at_mdr1"], m["fit_seconds"])
    candidates = list(cfg.models)
    if cfg.select_label_noise > 0 and len(candidates) > 1:
        from .seeds import rng_for

        # the same rows flipped for every candidate, in SELECT_NOISE_DRAWS draws (one draw's factor
        # scatters by ~0.5: HGB measured 1.5 in one and 2.9 in another); the out-of-fold scores are
        # judged on the true labels, and the median factor over the draws decides
        rng = rng_for(cfg.seed, "realbogus_select_label_noise")
        flips = [rng.random(len(y)) < cfg.select_label_noise for _ in range(SELECT_NOISE_DRAWS)]
        robust = []
        for name in candidates:
            facs = []
            for flip in flips:
                raw1 = _oof_scores(make_estimator(name, cfg), X, np.where(flip, 1 - y, y), splits, extra=ex)
                _, _, fac = _factors(y, oof[name], raw1)
                fac.pop("_floors")
                facs.append(max(fac.values()))
            f = float(np.median(facs))
            report["cv"][name]["label_noise_factor"] = round(f, 4)
            log.info("CV %s with %.0f%% of the labels flipped: degradation factor %.2f (median of %s)", name,
                     100 * cfg.select_label_noise, f, ", ".join(f"{x:.2f}" for x in facs))
            if f < SELECT_NOISE_MAX_FACTOR:
                robust.append(name)
        # none below the margin: the most robust one (the held-out check is the real test)
        candidates = robust or [min(candidates, key=lambda k: report["cv"][k]["label_noise_factor"])]
    best = _choose_model(report["cv"], candidates, cfg.select_metric)
    report["chosen"] = best
    report["robust_candidates"] = candidates
    # Calibration as CalibratedClassifierCV(ensemble=False) does it, without refitting the folds: the
    # calibrator learns from the out-of-fold scores, the classifier is refitted on all training visits.
    t0 = time.perf_counter()
    calibrator = _fit_calibrator(oof[best], y, cfg.calibration)
    clf = make_estimator(best, cfg).fit(*((X, y) if ex is None else (np.vstack([X, ex[0]]), np.r_[y, ex[1]])))
    r = np.asarray(oof[best], float)
    scale = float(np.std(r)) or 1.0
    cal = {"classifier": clf, "calibrator": calibrator, "method": cfg.calibration,
           "tiebreak": [float(np.median(r)), scale]}
    oof_cal = _reliability_from_raw(cal, r)
    threshold = threshold_for_fpr(y, oof_cal, cfg.target_fpr)
    report["calibrated_fit_seconds"] = round(time.perf_counter() - t0, 2)
    report["threshold"] = threshold
    report["cv_calibrated"] = roc_metrics(y, oof_cal)
    report["cv_calibrated"]["confusion"] = confusion(y, oof_cal, threshold)
    meta = {
        "feature_version": FEATURE_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "model": best,
        "calibration": cfg.calibration,
        "threshold": threshold,
        "target_fpr": cfg.target_fpr,
        "training_data_sha256": data_hash(features[FEATURE_NAMES], y, g),
        "extra_training_rows": 0 if ex is None else int(len(ex[1])),
        "extra_training_data_sha256": None if ex is None else data_hash(
            pd.DataFrame(ex[0], columns=FEATURE_NAMES), ex[1], np.zeros(len(ex[1]), np.int64)),
        "n_train": int(len(y)),
        "train_visits": sorted(int(v) for v in np.unique(g)),
        "library_versions": library_versions(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cv": report["cv"],
    }
    return RealBogusModel(cal, list(FEATURE_NAMES), threshold, meta), report


# --------------------------------------------------------------------------- saving
def save_model(model: RealBogusModel, path) -> None:
    """Write the model with skops (no pickle) and its metadata as a JSON member of the same zip."""
    import skops.io as sio

    path = Path(path)
    meta = dict(model.metadata, feature_names=list(model.feature_names), threshold=float(model.threshold),
                feature_version=model.metadata.get("feature_version", FEATURE_VERSION))
    with atomic_path(path) as tmp:
        sio.dump(model.estimator, tmp)
        with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_META_MEMBER, json.dumps(meta, indent=1, sort_keys=True))


def read_model_metadata(path) -> dict:
    """The JSON metadata of a saved model, without loading the estimator."""
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read(_META_MEMBER))
    except FileNotFoundError:
        raise DiapipeError("real/bogus model file not found", path) from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise DiapipeError(f"not a diapipe real/bogus model (skops zip with {_META_MEMBER}): {exc}", path) from None


def load_model(path) -> RealBogusModel:
    """Load a model saved by save_model; refuse other feature versions and unexpected types."""
    import skops.io as sio

    meta = read_model_metadata(path)
    version = meta.get("feature_version")
    if version != FEATURE_VERSION:
        raise DiapipeError(
            f"real/bogus model was trained on feature version {version}, this diapipe computes version "
            f"{FEATURE_VERSION}; retrain it (rule train_realbogus) or use a matching diapipe", path)
    if list(meta.get("feature_names", [])) != FEATURE_NAMES:
        raise DiapipeError("real/bogus model's feature list differs from this diapipe's FEATURE_NAMES", path)
    untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in TRUSTED_TYPES]
    if untrusted:
        raise DiapipeError(f"real/bogus model contains types not on the trusted list: {untrusted}", path)
    est = sio.load(path, trusted=TRUSTED_TYPES)
    return RealBogusModel(est, list(meta["feature_names"]), float(meta["threshold"]), meta)


# --------------------------------------------------------------------------- metrics
def roc_metrics(labels, scores) -> dict:
    """AUC, MDR at FPR 1% and FPR at MDR 1% (threshold-free, from the ROC curve)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels).astype(int)
    fpr, tpr, _ = roc_curve(y, scores)
    ok = fpr <= 0.01
    mdr1 = 1.0 - (tpr[ok].max() if ok.any() else 0.0)
    ok = tpr >= 0.99
    fpr1 = fpr[ok].min() if ok.any() else 1.0
    return {"auc": float(roc_auc_score(y, scores)), "mdr_at_fpr1": float(mdr1), "fpr_at_mdr1": float(fpr1),
            "n_real": int(y.sum()), "n_bogus": int((1 - y).sum())}


def confusion(labels, scores, threshold) -> dict:
    """Counts at a reliability cut (real = score >= threshold)."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(scores) >= threshold
    tp, fn = int((y & p).sum()), int((y & ~p).sum())
    fp, tn = int((~y & p).sum()), int((~y & ~p).sum())
    return {"threshold": float(threshold), "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "fpr": fp / max(fp + tn, 1), "mdr": fn / max(tp + fn, 1), "purity": tp / max(tp + fp, 1),
            "completeness": tp / max(tp + fn, 1)}


def evaluate(labels, scores, threshold, snr=None, kinds=None, detected=None, injected_snr=None) -> dict:
    """Everything the report needs: ROC, MDR/FPR figures, purity & completeness vs threshold,
    completeness vs S/N with and without the cut, confusion matrix at ``threshold``.

    snr : S/N of each detection (for completeness vs S/N of the real ones).
    kinds : optional label per row (e.g. bogus kind) for per-kind pass fractions.
    injected_snr : optional S/N of every injected fake, detected or not (completeness without the cut
        is then detected/injected; otherwise it is 1 by construction).
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    out = roc_metrics(y, s)
    fpr, tpr, thr = roc_curve(y, s)
    keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, min(len(fpr), 400)).astype(int)])
    out["roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
                  "threshold": np.minimum(thr[keep], 1.0).tolist()}
    grid = np.round(np.linspace(0, 1, 101), 2)
    pur, comp = [], []
    for t in grid:
        c = confusion(y, s, t)
        pur.append(c["purity"] if c["tp"] + c["fp"] else 1.0)
        comp.append(c["completeness"])
    out["vs_threshold"] = {"threshold": grid.tolist(), "purity": pur, "completeness": comp}
    out["confusion"] = confusion(y, s, threshold)
    if snr is not None:
        snr = np.abs(np.asarray(snr, dtype=float))
        edges = np.array([5, 7, 10, 15, 20, 30, 50, 100, 300, np.inf])
        real = y == 1
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = real & (snr >= lo) & (snr < hi)
            n_det = int(sel.sum())
            n_pass = int((sel & (s >= threshold)).sum())
            n_inj = None
            if injected_snr is not None:
                inj = np.abs(np.asarray(injected_snr, float))
                n_inj = int(((inj >= lo) & (inj < hi)).sum())
            rows.append({"snr_lo": float(lo), "snr_hi": float(hi), "n_detected": n_det, "n_pass": n_pass,
                         "n_injected": n_inj,
                         "completeness_no_cut": (n_det / n_inj if n_inj else (1.0 if n_det else None)),
                         "completeness_cut": (n_pass / n_inj if n_inj else (n_pass / n_det if n_det else None))})
        out["completeness_vs_snr"] = rows
    if kinds is not None:
        kinds = np.asarray(kinds)
        out["pass_fraction_by_kind"] = {
            str(k): {"n": int((kinds == k).sum()), "pass": float((s[kinds == k] >= threshold).mean())}
            for k in np.unique(kinds)}
    return out


def permutation_importances(model: RealBogusModel, features, labels, n_repeats=3, max_rows=4000, seed=0):
    """Permutation importance (drop in average precision) of each feature on held-out data."""
    from sklearn.inspection import permutation_importance

    X = features[model.feature_names].to_numpy(dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if len(y) > max_rows:
        idx = np.random.default_rng(seed).choice(len(y), max_rows, replace=False)
        X, y = X[idx], y[idx]
    from sklearn.metrics import average_precision_score

    def scorer(clf, Xs, ys):
        return average_precision_score(ys, _reliability_from_raw(model.estimator, raw_scores(clf, Xs)))

    r = permutation_importance(model.estimator["classifier"], X, y, scoring=scorer, n_repeats=n_repeats, random_state=seed,
                               n_jobs=1)
    order = np.argsort(-r.importances_mean)
    return {model.feature_names[i]: {"mean": float(r.importances_mean[i]), "std": float(r.importances_std[i])}
            for i in order}


def plot_metrics(metrics: dict, outdir) -> list[Path]:
    """ROC, purity/completeness vs threshold, completeness vs S/N and importances as PNGs in ``outdir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name):
        p = outdir / name
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
        plt.close(fig)
        paths.append(p)

    roc = metrics["roc"]
    fig, ax = plt.subplots(figsize=(5, 4))
    mdr = 1 - np.asarray(roc["tpr"])
    ax.plot(np.clip(roc["fpr"], 1e-5, 1), np.clip(mdr, 1e-5, 1), "-")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.axvline(0.01, ls=":", c="grey"), ax.axhline(0.01, ls=":", c="grey")
    c = metrics["confusion"]
    ax.plot(max(c["fpr"], 1e-5), max(c["mdr"], 1e-5), "o", c="C3", label=f"threshold {c['threshold']:.3f}")
    ax.set_xlabel("false-positive rate"), ax.set_ylabel("missed-detection rate")
    ax.set_title(f"AUC {metrics['auc']:.5f}; MDR@FPR1% {metrics['mdr_at_fpr1']:.4f}")
    ax.legend()
    save(fig, "roc.png")

    vt = metrics["vs_threshold"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(vt["threshold"], vt["purity"], label="purity")
    ax.plot(vt["threshold"], vt["completeness"], label="completeness")
    ax.axvline(c["threshold"], ls=":", c="grey")
    ax.set_xlabel("reliability threshold"), ax.set_ylim(0, 1.02), ax.legend()
    save(fig, "purity_completeness.png")

    if metrics.get("completeness_vs_snr"):
        rows = [r for r in metrics["completeness_vs_snr"] if r["n_detected"]]
        x = [np.sqrt(r["snr_lo"] * min(r["snr_hi"], 1000)) for r in rows]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(x, [r["completeness_no_cut"] for r in rows], "o-", label="detected, no cut")
        ax.plot(x, [r["completeness_cut"] for r in rows], "s-", label="reliability >= threshold")
        ax.set_xscale("log"), ax.set_xlabel("S/N"), ax.set_ylabel("completeness"), ax.set_ylim(0, 1.02)
        ax.legend()
        save(fig, "completeness_snr.png")

    if metrics.get("importances"):
        imp = list(metrics["importances"].items())[:20][::-1]
        fig, ax = plt.subplots(figsize=(5, 6))
        ax.barh([k for k, _ in imp], [v["mean"] for _, v in imp], xerr=[v["std"] for _, v in imp])
        ax.set_xlabel("permutation importance (drop in average precision)")
        save(fig, "importances.png")
    return paths


# --------------------------------------------------------------------------- pipeline products
#: truthClass values (diapipe.completeness.classify) that count as real astrophysical detections.
REAL_CLASSES = ("fake", "transient", "variable", "mover")


def _cut(arr, x, y, size, fill=np.nan, dtype=np.float32):
    """size x size cutout centred on the pixel nearest (x, y), as diapipe.measure cuts them."""
    from .measure import _cutout

    return _cutout(arr, x, y, size, fill=fill, dtype=dtype)


def _pixel_scale_arcsec(exposure) -> float:
    if exposure.wcs is None:
        return float("nan")
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(exposure.wcs.celestial)) * 3600.0)


#: Cutouts for the features reach this many FWHM from the diaSource (the outer-region features need > 3).
STAMP_HALF_FWHM = 4.0


def features_for_exposure(dia: pd.DataFrame, cutouts: dict | None, diffexp, template=None,
                          science=None) -> pd.DataFrame:
    """Features of one difference exposure's diaSources (diaSourceId + FEATURE_NAMES).

    dia : the diaSrc table (x, y in pixels; refDistance in arcsec).
    cutouts : {'science','template','difference': (n, S, S)} in diaSrc row order (diapipe.measure);
        used when ``science`` and ``template`` exposures are not given or when they reach
        STAMP_HALF_FWHM x FWHM.  Otherwise stamps of that half-width are cut from the exposures
        (a 31-pixel cutout is only ~2 FWHM at 7-pixel seeing).
    diffexp : the difference Exposure (PSF for the FWHM; variance and mask are cut here).
    template, science : optional template and science Exposures on the diffexp's pixel grid.
    """
    n = len(dia)
    if n == 0:
        return pd.DataFrame({"diaSourceId": np.zeros(0, np.int64), **{k: np.zeros(0) for k in FEATURE_NAMES}})
    x, y = dia["x"].to_numpy(float), dia["y"].to_numpy(float)
    fwhm = _psf_fwhm(diffexp, x, y)
    need = 2 * int(np.ceil(STAMP_HALF_FWHM * np.max(fwhm))) + 1
    if cutouts is not None and cutouts["difference"].shape[0] != n:
        raise DiapipeError(f"{cutouts['difference'].shape[0]} cutouts for {n} diaSources",
                           data_id=getattr(diffexp, "data_id", None))
    if science is not None and template is not None and (cutouts is None or cutouts["difference"].shape[-1] < need):
        cutouts = {key: np.stack([_cut(img, a, b, need) for a, b in zip(x, y)])
                   for key, img in (("science", science.image), ("template", template.image),
                                    ("difference", diffexp.image))}
    elif cutouts is None:
        raise DiapipeError("no cutouts and no science/template exposures to cut them from",
                           data_id=getattr(diffexp, "data_id", None))
    size = cutouts["difference"].shape[-1]
    tfwhm = _psf_fwhm(template, x, y) if template is not None and template.psf is not None else None
    var = np.stack([_cut(diffexp.variance, a, b, size) for a, b in zip(x, y)])
    msk = np.stack([_cut(diffexp.mask, a, b, size, fill=masks.bit("NO_DATA"), dtype=masks.MASK_DTYPE)
                    for a, b in zip(x, y)])
    refd = None
    if "refDistance" in dia.columns:
        refd = dia["refDistance"].to_numpy(float) / _pixel_scale_arcsec(diffexp)  # arcsec -> pixels
    f = compute_features(cutouts["science"], cutouts["template"], cutouts["difference"], fwhm, variance=var,
                         mask=msk, template_fwhm=tfwhm, ref_distance=refd)
    f.insert(0, "diaSourceId", dia["diaSourceId"].to_numpy(np.int64))
    return f


def _psf_fwhm(exposure, x, y) -> np.ndarray:
    """PSF FWHM (pixels) at each position, evaluated on a coarse grid of the detector (PSFs vary slowly).

    From the area above half maximum (diapipe.psf.half_max_fwhm): second moments of a PSF with
    Moffat wings overestimate the core width (12.6 px instead of 7.1 px on the simulated survey).
    """
    from .psf import half_max_fwhm as moments_fwhm  # noqa: N813 - the core width, see above

    if exposure.psf is None:
        seeing = exposure.metadata.get("SEEING") or exposure.metadata.get("FWHM")
        if seeing is None:
            raise DiapipeError("difference exposure has no PSF and no SEEING keyword", data_id=exposure.data_id)
        return np.full(len(x), float(seeing))
    ny, nx = exposure.shape
    gx, gy = np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5)
    grid = np.array([[moments_fwhm(exposure.psf.image(a, b)) for a in gx] for b in gy])
    from scipy.interpolate import RegularGridInterpolator

    interp = RegularGridInterpolator((gy, gx), grid, bounds_error=False, fill_value=None)
    return interp(np.c_[np.clip(y, 0, ny - 1), np.clip(x, 0, nx - 1)])


def run_features(dia_path, cutouts_path, diffexp_path, output, template_path=None, science_path=None) -> pd.DataFrame:
    """File-level: one exposure's diaSrc + cutouts + diffexp (+ template, science) -> features Parquet."""
    from .exposure import Exposure
    from .measure import read_cutouts

    try:
        dia = pd.read_parquet(dia_path)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is one clear error
        raise DiapipeError(f"cannot read diaSrc table ({exc})", dia_path) from exc
    try:
        ids, cubes = read_cutouts(cutouts_path)
    except Exception as exc:  # noqa: BLE001
        raise DiapipeError(f"cannot read cutouts ({exc})", cutouts_path) from exc
    if len(ids) != len(dia) or not np.array_equal(ids["diaSourceId"].to_numpy(), dia["diaSourceId"].to_numpy()):
        raise DiapipeError("cutouts do not match the diaSrc table row for row", cutouts_path)
    diffexp = Exposure.read(diffexp_path)
    template = Exposure.read(template_path) if template_path else None
    science = Exposure.read(science_path) if science_path else None
    feats = features_for_exposure(dia, cubes, diffexp, template, science)
    write_parquet(feats, output)
    return feats


def labels_from_classes(classes: pd.DataFrame) -> pd.Series:
    """1 for real (fake, transient, variable, mover), 0 for bogus (artefact, false); index diaSourceId."""
    return pd.Series(classes["truthClass"].isin(REAL_CLASSES).astype(int).to_numpy(),
                     index=classes["diaSourceId"].to_numpy(np.int64))


def _load_features(paths) -> pd.DataFrame:
    tabs = [pd.read_parquet(p) for p in paths]
    tabs = [t for t in tabs if len(t)]
    return pd.concat(tabs, ignore_index=True) if tabs else pd.DataFrame(columns=["diaSourceId", *FEATURE_NAMES])


def train_and_evaluate(features: pd.DataFrame, labels, groups, cfg: TrainConfig, snr=None, kinds=None,
                       label_noise: float = 0.0, importances: bool = True, extra=None):
    """Hold visits out, train on the rest, evaluate on the held-out visits.

    ``extra`` = (features, labels) of rows that only ever train (see ``train``).

    Returns (model, metrics dict).  With label_noise > 0 also retrains with that fraction of training labels
    flipped and records the metrics of both (metrics['label_noise']).
    """
    labels = np.asarray(labels).astype(int)
    groups = np.asarray(groups)
    held = holdout_visits(groups, cfg.holdout_fraction, cfg.seed)
    te = np.isin(groups, held)
    if labels[te].min() == labels[te].max():
        raise DiapipeError("held-out visits have only one class; need more visits or diaSources")
    t0 = time.perf_counter()
    model, report = train(features[~te], labels[~te], groups[~te], cfg, extra=extra)
    train_s = time.perf_counter() - t0
    model.metadata["heldout_visits"] = [int(v) for v in held]
    with threadpool_limits(limits=cfg.n_jobs):
        s = model.reliability(features[te], threads=cfg.n_jobs)
    ev = evaluate(labels[te], s, model.threshold, snr=None if snr is None else np.asarray(snr)[te],
                  kinds=None if kinds is None else np.asarray(kinds)[te])
    metrics = {"feature_version": FEATURE_VERSION, "model": report["chosen"], "threshold": model.threshold,
               "target_fpr": cfg.target_fpr, "train_seconds": round(train_s, 2), "training": report,
               "heldout_visits": [int(v) for v in held], "heldout": ev,
               "training_data_sha256": model.metadata["training_data_sha256"]}
    if importances:
        with threadpool_limits(limits=cfg.n_jobs):
            metrics["heldout"]["importances"] = permutation_importances(model, features[te], labels[te],
                                                                        seed=cfg.seed)
    if label_noise > 0:
        metrics["label_noise"] = label_noise_experiment(features[~te], labels[~te], groups[~te], features[te],
                                                        labels[te], report["chosen"], cfg, label_noise,
                                                        clean_scores=s, groups_te=groups[te], extra=extra)
    if cfg.outer_folds >= 2 and len(np.unique(groups)) >= 3:
        t0 = time.perf_counter()
        try:
            metrics["heldout_all_visits"] = pooled_heldout(features, labels, groups, cfg, snr=snr, kinds=kinds,
                                                           label_noise=label_noise, extra=extra,
                                                           model_name=report["chosen"])
            metrics["heldout_all_visits"]["seconds"] = round(time.perf_counter() - t0, 1)
        except DiapipeError as exc:  # an evaluation, not the model: say why and carry on
            log.warning("pooled evaluation skipped: %s", exc)
            metrics["heldout_all_visits_skipped"] = str(exc)
    return model, metrics


def pooled_heldout(features: pd.DataFrame, labels, groups, cfg: TrainConfig, snr=None, kinds=None,
                   label_noise: float = 0.0, extra=None, model_name: str | None = None) -> dict:
    """Every visit held out once: ``cfg.outer_folds`` visit folds, each predicted by a model (model choice,
    calibration, threshold) trained on the other folds only; metrics of the pooled held-out predictions.

    ``model_name``: the model kind every fold trains (the one chosen on the training visits), instead of
    repeating the choice in each fold.  The choice with its label-noise robustness test is 8 of every 10
    CV fits, and this evaluation measures the chosen model kind, not the choosing: with it, the train rule
    takes ~1 minute instead of ~3 on the default survey.

    With one quarter of the visits held out, a survey of 8 science visits keeps ~100 bogus for the metrics
    and FPR 1 % is one event; pooling the folds uses every labelled diaSource.  The confusion matrix
    applies each fold's own threshold.  With label_noise > 0 each fold is also trained with that fraction
    of its training labels flipped (the same rows in every fold) and the pooled metrics are compared
    (``label_noise``, see ``compare_label_noise``).
    """
    from sklearn.model_selection import GroupKFold

    from .seeds import rng_for

    y = np.asarray(labels).astype(int)
    g = np.asarray(groups)
    k = min(cfg.outer_folds, len(np.unique(g)))
    s = np.full(len(y), np.nan)
    thr = np.full(len(y), np.nan)
    s1 = np.full(len(y), np.nan)
    flip = rng_for(cfg.seed, "realbogus_label_noise_pooled").random(len(y)) < label_noise
    noisy = np.where(flip, 1 - y, y)
    if model_name is not None:
        cfg = TrainConfig(**{**cfg.__dict__, "models": (model_name,)})
    chosen = []
    for tr, te in GroupKFold(n_splits=k).split(features, y, g):
        if y[tr].min() == y[tr].max() or len(np.unique(g[tr])) < 2:
            raise DiapipeError("a visit fold leaves a training set with one class or one visit; "
                               "set realbogus.outer_folds lower or 0")
        m, rep = train(features.iloc[tr], y[tr], g[tr], cfg, extra=extra)
        chosen.append(rep["chosen"])
        with threadpool_limits(limits=cfg.n_jobs):
            s[te] = m.reliability(features.iloc[te], threads=cfg.n_jobs)
        thr[te] = m.threshold
        if label_noise > 0:
            m1, _ = train(features.iloc[tr], noisy[tr], g[tr], TrainConfig(**{**cfg.__dict__,
                                                                               "models": (rep["chosen"],)}),
                          extra=extra)
            with threadpool_limits(limits=cfg.n_jobs):
                s1[te] = m1.reliability(features.iloc[te], threads=cfg.n_jobs)
    ev = evaluate(y, s, 0.5, snr=None if snr is None else np.asarray(snr),
                  kinds=None)
    passed = s >= thr
    ev["confusion"] = confusion(y, passed.astype(float), 0.5)
    ev["confusion"]["threshold"] = "per fold"
    ev["fold_thresholds"] = sorted({float(t) for t in thr})
    ev["fold_models"] = chosen
    ev.pop("vs_threshold", None)
    if kinds is not None:
        kinds = np.asarray(kinds)
        ev["pass_fraction_by_kind"] = {str(q): {"n": int((kinds == q).sum()), "pass": float(passed[kinds == q].mean())}
                                       for q in np.unique(kinds)}
    if snr is not None:  # completeness vs S/N with each fold's threshold
        snr_a = np.abs(np.asarray(snr, float))
        for row in ev.get("completeness_vs_snr", []):
            sel = (y == 1) & (snr_a >= row["snr_lo"]) & (snr_a < row["snr_hi"])
            row["n_pass"] = int((sel & passed).sum())
            row["completeness_cut"] = row["n_pass"] / row["n_detected"] if row["n_detected"] else None
    ev["n_folds"] = int(k)
    ev["visits"] = sorted(int(v) for v in np.unique(g))
    if label_noise > 0:
        ev["label_noise"] = compare_label_noise(y, s, s1, groups=g, seed=cfg.seed)
        ev["label_noise"].update(fraction_flipped=float(flip.mean()), n_flipped=int(flip.sum()))
    return ev


def _noise_metrics(y, s) -> dict:
    m = roc_metrics(y, s)
    return {"auc_deficit": 1 - m["auc"], "mdr_at_fpr1": m["mdr_at_fpr1"], "fpr_at_mdr1": m["fpr_at_mdr1"]}


def _factors(y, s0, s1) -> tuple[dict, dict, dict]:
    """Degradation factors (noisy + floor) / (clean + floor), floor = one event of the relevant class."""
    y = np.asarray(y).astype(int)
    nr, nb = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    # one misranked diaSource moves 1-AUC by up to 1/min(n_real, n_bogus)
    floors = {"auc_deficit": 1.0 / min(nr, nb), "mdr_at_fpr1": 1.0 / nr, "fpr_at_mdr1": 1.0 / nb}
    v0, v1 = _noise_metrics(y, s0), _noise_metrics(y, s1)
    # rounded so that one event against none is exactly 2, not 1.9999999 (1 - TPR in floating point)
    return v0, v1, {k: round((v1[k] + floors[k]) / (v0[k] + floors[k]), 9) for k in v0} | {"_floors": floors}


def compare_label_noise(y, s_clean, s_noisy, groups=None, seed=0, n_boot=200) -> dict:
    """Held-out metrics (clean labels) of a model trained on clean vs on noisy labels, with their spread.

    The factor of each metric m (1-AUC, MDR at FPR 1 %, FPR at MDR 1 %) is (m_noisy + floor) / (m_clean +
    floor), floor = one held-out event of the relevant class (the resolution of the measurement).  A
    difference of one or two events is within the noise of these counts, so the same factors are
    measured on ``n_boot`` bootstrap resamples of the held-out set (whole visits when there are >= 5 of
    them, else diaSources within each class).  ``passes_factor_2``: the measured factor is below 2;
    ``passes_factor_2_bootstrap``: the median factor over the resamples is below 2 (the typical held-out
    set, not only the one drawn); ``p_factor_ge_2`` says how often a resample reaches 2, and
    ``significant_degradation`` is p >= 0.95 (a degradation beyond the counting noise).
    """
    from .seeds import rng_for

    y = np.asarray(y).astype(int)
    s0, s1 = np.asarray(s_clean, float), np.asarray(s_noisy, float)
    v0, v1, fac = _factors(y, s0, s1)
    floors = fac.pop("_floors")
    nr, nb = int(y.sum()), int((1 - y).sum())
    events = {"mdr_at_fpr1": {"n_real": nr, "clean": int(round(v0["mdr_at_fpr1"] * nr)),
                              "noisy": int(round(v1["mdr_at_fpr1"] * nr))},
              "fpr_at_mdr1": {"n_bogus": nb, "clean": int(round(v0["fpr_at_mdr1"] * nb)),
                              "noisy": int(round(v1["fpr_at_mdr1"] * nb))}}
    rng = rng_for(seed, "realbogus_label_noise_bootstrap")
    uniq = np.unique(groups) if groups is not None else np.zeros(0)
    by_visit = len(uniq) >= 5
    idx_r, idx_b = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    boot = []
    for _ in range(n_boot):
        if by_visit:
            pick = rng.choice(uniq, len(uniq), replace=True)
            i = np.concatenate([np.nonzero(groups == v)[0] for v in pick])
        else:
            i = np.r_[rng.choice(idx_r, len(idx_r)), rng.choice(idx_b, len(idx_b))]
        if y[i].min() == y[i].max():
            continue
        _, _, f = _factors(y[i], s0[i], s1[i])
        f.pop("_floors")
        boot.append(max(f.values()))
    boot = np.asarray(boot)
    mx = max(fac.values())
    return {"clean": v0, "noisy": v1, "floors": floors, "events": events, "degradation_factor": fac,
            "max_factor": mx, "passes_factor_2": bool(mx < 2.0),
            "passes_factor_2_bootstrap": bool(len(boot) and np.median(boot) < 2.0),
            "significant_degradation": bool(len(boot) and (boot >= 2).mean() >= 0.95),
            "bootstrap": {"unit": "visit" if by_visit else "diaSource (within class)", "n": int(len(boot)),
                          "max_factor_median": float(np.median(boot)) if len(boot) else None,
                          "max_factor_95": [float(q) for q in np.percentile(boot, [2.5, 97.5])] if len(boot) else None,
                          "p_factor_ge_2": float((boot >= 2).mean()) if len(boot) else None}}


def label_noise_experiment(Xtr, ytr, gtr, Xte, yte, model_name, cfg, fraction=0.05, clean_scores=None,
                           groups_te=None, extra=None) -> dict:
    """Retrain ``model_name`` with ``fraction`` of the training labels flipped; compare held-out metrics
    (clean labels) with ``compare_label_noise``.  ``clean_scores``: held-out reliabilities of the model
    trained on the clean labels with the same settings (trained here if not given)."""
    from .seeds import rng_for

    ytr = np.asarray(ytr).astype(int)
    yte = np.asarray(yte).astype(int)
    rng = rng_for(cfg.seed, "realbogus_label_noise")
    flip = rng.random(len(ytr)) < fraction
    noisy = np.where(flip, 1 - ytr, ytr)
    cfg1 = TrainConfig(**{**cfg.__dict__, "models": (model_name,)})
    if clean_scores is None:
        m0, _ = train(Xtr, ytr, gtr, cfg1, extra=extra)
        clean_scores = m0.reliability(Xte, threads=cfg.n_jobs)
    s0 = np.asarray(clean_scores, float)
    m1, _ = train(Xtr, noisy, gtr, cfg1, extra=extra)
    s1 = m1.reliability(Xte, threads=cfg.n_jobs)
    out = compare_label_noise(yte, s0, s1, groups=None if groups_te is None else np.asarray(groups_te),
                              seed=cfg.seed)
    out.update(fraction_flipped=float(flip.mean()), n_flipped=int(flip.sum()), model=model_name,
               noisy_confusion=confusion(yte, s1, m1.threshold))
    return out


def run_train(feature_paths, classes_path, dia_path, model_out, metrics_out, plots_dir=None, config=None):
    """File-level: train on the survey's labelled diaSources; write the model, metrics JSON and plots."""
    cfg = TrainConfig.from_config(config)
    feats = _load_features(feature_paths)
    classes = pd.read_parquet(classes_path)
    # the detection S/N is kept apart from the feature 'snr' (the cutout PSF-fit S/N)
    dia = pd.read_parquet(dia_path, columns=["diaSourceId", "visit", "snr"]).rename(columns={"snr": "detSnr"})
    tab = feats.merge(classes[["diaSourceId", "truthClass"]], on="diaSourceId", how="inner").merge(
        dia, on="diaSourceId", how="inner")
    if len(tab) < len(feats):
        log.warning("%d diaSources have features but no truth class; left out", len(feats) - len(tab))
    y = tab["truthClass"].isin(REAL_CLASSES).astype(int).to_numpy()
    log.info("training set: %d diaSources (%d real, %d bogus) in %d visits", len(y), y.sum(), len(y) - y.sum(),
             tab["visit"].nunique())
    noise = float((config or {}).get("label_noise_check", 0.0))
    extra = synthetic_training_rows(cfg)
    model, metrics = train_and_evaluate(tab, y, tab["visit"].to_numpy(), cfg, snr=tab["detSnr"].to_numpy(),
                                        kinds=tab["truthClass"].to_numpy(), label_noise=noise, extra=extra)
    save_model(model, model_out)
    _write_metrics(metrics, metrics_out, plots_dir)
    return model, metrics


def synthetic_training_rows(cfg: TrainConfig):
    """(features, labels) of ``cfg.synthetic_visits`` x ``cfg.synthetic_per_visit`` synthetic triplets
    (diapipe.realbogus_synth, seeded by cfg.seed), or None: extra training rows of every bogus kind."""
    if cfg.synthetic_visits <= 0:
        return None
    from .realbogus_synth import make_synthetic, synthetic_features

    cut, tab = make_synthetic(cfg.synthetic_visits, cfg.synthetic_per_visit, seed=cfg.seed, size=41)
    log.info("synthetic training rows: %d (%d real)", len(tab), int(tab["label"].sum()))
    return synthetic_features(cut, tab), tab["label"].to_numpy()


def _write_metrics(metrics, metrics_out, plots_dir=None):
    if plots_dir:
        ho = dict(metrics["heldout"] if "heldout" in metrics else metrics)
        plot_metrics(ho, plots_dir)
    write_text(json.dumps(metrics, indent=1, default=_json_default), metrics_out)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_score(dia_path, feature_paths, model_path, output, threads: int = 1) -> pd.DataFrame:
    """File-level: add ``reliability`` (and ``isReliable`` = reliability >= model threshold) to diaSources."""
    model = load_model(model_path)
    dia = pd.read_parquet(dia_path)
    feats = _load_features(feature_paths)
    missing = ~dia["diaSourceId"].isin(feats["diaSourceId"]).to_numpy()
    if missing.any():
        raise DiapipeError(f"{int(missing.sum())} diaSources have no features (e.g. diaSourceId "
                           f"{int(dia.loc[missing, 'diaSourceId'].iloc[0])})", dia_path)
    tab = feats.drop_duplicates("diaSourceId").set_index("diaSourceId").reindex(dia["diaSourceId"].to_numpy())
    out = dia.copy()
    out["reliability"] = model.reliability(tab, threads=threads).astype(np.float32)
    out["isReliable"] = out["reliability"] >= model.threshold
    write_parquet(out, output)
    return out


def completeness_vs_injected_snr(fakes: pd.DataFrame, scored: pd.DataFrame, threshold: float) -> list[dict]:
    """Completeness of injected fakes per S/N bin: detected (no cut) and detected with reliability >= threshold.

    fakes : diapipe.completeness matched-fakes table (detected, diaSourceId, snrDiff or snrCalexp).
    """
    col = "snrDiff" if "snrDiff" in fakes.columns and fakes["snrDiff"].notna().any() else "snrCalexp"
    rel = scored.set_index("diaSourceId")["reliability"]
    det = fakes["detected"].astype(bool).to_numpy()
    r = rel.reindex(fakes["diaSourceId"].to_numpy()).to_numpy(float)
    passed = det & (np.nan_to_num(r, nan=-1.0) >= threshold)
    snr = fakes[col].to_numpy(float)
    edges = [2, 3, 4, 5, 6, 7, 8, 10, 15, 20, 30, 50, 100, np.inf]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (snr >= lo) & (snr < hi)
        n = int(sel.sum())
        if n:
            rows.append({"snr_lo": lo, "snr_hi": hi, "snr_column": col, "n_injected": n,
                         "n_detected": int(det[sel].sum()), "n_pass": int(passed[sel].sum()),
                         "completeness_no_cut": float(det[sel].mean()), "completeness_cut": float(passed[sel].mean())})
    return rows


def run_evaluate(scored_path, classes_path, model_path, metrics_out, plots_dir=None, fakes_path=None) -> dict:
    """File-level: metrics of the scores in a scored diaSources table against the truth classes
    (and, given the matched-fakes table, completeness of the injected fakes vs S/N with and without the cut)."""
    meta = read_model_metadata(model_path)
    scored = pd.read_parquet(scored_path)
    classes = pd.read_parquet(classes_path)[["diaSourceId", "truthClass"]]
    tab = scored.merge(classes, on="diaSourceId", how="inner")
    y = tab["truthClass"].isin(REAL_CLASSES).astype(int).to_numpy()
    if len(np.unique(y)) < 2:
        raise DiapipeError("evaluation needs both real and bogus diaSources", classes_path)
    ev = evaluate(y, tab["reliability"].to_numpy(float), float(meta["threshold"]), snr=tab["snr"].to_numpy(float),
                  kinds=tab["truthClass"].to_numpy())
    held = set(meta.get("heldout_visits", []))
    train_visits = set(meta.get("train_visits", []))
    metrics = {"model": meta.get("model"), "threshold": meta["threshold"],
               "model_training_data_sha256": meta.get("training_data_sha256"),
               "note": ("all diaSources of this run; rows of visits the model was trained on are optimistic"
                        if train_visits & set(tab["visit"].unique()) else "no visit of this run was used in training"),
               "all": ev}
    if fakes_path:
        fk = pd.read_parquet(fakes_path)
        if len(fk):
            ev["completeness_vs_snr"] = completeness_vs_injected_snr(fk, scored, float(meta["threshold"]))
    sel = tab["visit"].isin(held).to_numpy() if held else np.zeros(len(tab), bool)
    if sel.any() and len(np.unique(y[sel])) == 2:
        metrics["heldout"] = evaluate(y[sel], tab["reliability"].to_numpy(float)[sel], float(meta["threshold"]))
    if plots_dir:
        plot_metrics(ev, plots_dir)
    write_text(json.dumps(metrics, indent=1, default=_json_default), metrics_out)
    return metrics


# --------------------------------------------------------------------------- other surveys' stamps
_TRIPLET_SUFFIXES = {"science": "sci", "template": "ref", "difference": "diff"}


def estimate_fwhm(science: np.ndarray) -> np.ndarray:
    """FWHM (pixels) of the central source of each science stamp, from its area above half maximum.

    The transient (or its host) sits at the stamp centre: subtract the border median, find the
    brightest pixel within 3 pixels of the centre and measure the connected area above half of it,
    FWHM = sqrt(4 A / pi).  NaN where there is no positive central peak.  A host galaxy makes this
    far wider than the PSF (12.8 px for a ZTF SN on a bright nucleus), and pixel counting is
    quantised at 2 px seeing: ``estimate_fwhm_stars`` measures the PSF itself.
    """
    from scipy import ndimage

    science = np.atleast_3d(science) if science.ndim == 3 else science[None]
    n, S, _ = science.shape
    c = S // 2
    out = np.full(n, np.nan)
    for i, img in enumerate(science):
        img = np.where(np.isfinite(img), img, np.nan)
        b = np.concatenate([img[:_BORDER].ravel(), img[-_BORDER:].ravel(), img[:, :_BORDER].ravel(),
                            img[:, -_BORDER:].ravel()])
        img = np.nan_to_num(img - np.nanmedian(b), nan=0.0)
        box = img[c - 3 : c + 4, c - 3 : c + 4]
        j = np.unravel_index(np.argmax(box), box.shape)
        py, px = c - 3 + j[0], c - 3 + j[1]
        peak = img[py, px]
        if peak <= 0:
            continue
        lab, _ = ndimage.label(img >= 0.5 * peak)
        area = np.count_nonzero(lab == lab[py, px])
        out[i] = np.sqrt(4.0 * area / np.pi)
    return out


def _moffat_fit_fwhm(box: np.ndarray) -> float:
    """Half-maximum FWHM (pixels) of a circular Moffat + constant least-squares fit to a small star box.

    The FWHM the survey features use is the half-maximum width of the PSF core; a Moffat with free
    index reproduces it where a Gaussian fit is ~8 % wider (wings).  Sampled at pixel centres.
    """
    from scipy import optimize

    h = box.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    ok = np.isfinite(box)
    if ok.sum() < box.size * 0.8:
        return np.nan

    def resid(p):
        a, x0, y0, fw, beta, b = p
        alpha2 = fw * fw / (4.0 * (2.0 ** (1.0 / beta) - 1.0))
        return (a * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha2) ** (-beta) + b - box)[ok]

    p0 = [float(box[h, h]), 0.0, 0.0, 2.5, 3.0, 0.0]
    try:
        r = optimize.least_squares(resid, p0, bounds=([0, -2, -2, 0.5, 1.5, -np.inf], [np.inf, 2, 2, 15, 10, np.inf]))
    except ValueError:
        return np.nan
    return float(r.x[3]) if r.success else np.nan


def estimate_fwhm_stars(science: np.ndarray, min_peak_snr: float = 20.0, centre_radius: float = 4.0,
                        galaxy_factor: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """PSF FWHM (pixels) of each science stamp from the point sources in it, as an astronomer would.

    Stamps from other surveys carry no PSF.  The central source is the transient and often its host, so
    it is left out (``centre_radius`` pixels); every other local maximum whose peak exceeds
    ``min_peak_snr`` x the stamp's robust noise, 5 pixels or more from the border, gets a circular
    Moffat fit (11 x 11 pixels).  Fits wider than ``galaxy_factor`` x the median over all stamps are
    galaxies and are dropped; a stamp's FWHM is the median of its stars.  Stamps without stars take the
    median of the stamps that have them (one camera, similar seeing).
    Returns (fwhm per stamp, number of stars used per stamp); all NaN if no stamp has a star.
    """
    from scipy import ndimage

    science = np.asarray(science, np.float64)
    science = science if science.ndim == 3 else science[None]
    n, S, _ = science.shape
    c = (S - 1) / 2.0
    fits_ = []
    for img in science:
        b = np.concatenate([img[:_BORDER].ravel(), img[-_BORDER:].ravel(), img[:, :_BORDER].ravel(),
                            img[:, -_BORDER:].ravel()])
        im = img - np.nanmedian(b)
        sig = 1.4826 * np.nanmedian(np.abs(im - np.nanmedian(im)))
        found = []
        if np.isfinite(sig) and sig > 0:
            filled = np.nan_to_num(im, nan=-np.inf)
            peaks = np.argwhere((filled == ndimage.maximum_filter(filled, 5)) & (filled > min_peak_snr * sig))
            for y, x in peaks:
                if min(x, y, S - 1 - x, S - 1 - y) < 5 or np.hypot(x - c, y - c) < centre_radius:
                    continue
                fw = _moffat_fit_fwhm(im[y - 5 : y + 6, x - 5 : x + 6])
                if np.isfinite(fw):
                    found.append(fw)
        fits_.append(np.asarray(found))
    everything = np.concatenate(fits_) if fits_ else np.zeros(0)
    if not len(everything):
        return np.full(n, np.nan), np.zeros(n, int)
    ref = np.median(everything)
    stars = [f[f < galaxy_factor * ref] for f in fits_]
    per = np.array([np.median(f) if len(f) else np.nan for f in stars])
    fill = np.nanmedian(per) if np.isfinite(per).any() else ref
    return np.where(np.isfinite(per), per, fill), np.array([len(f) for f in stars])


def read_triplet_dir(directory) -> tuple[pd.DataFrame, dict]:
    """Read ``{objectId}_{candid}_{sci,ref,diff}.fits`` cutout triplets (ZTF alert naming).

    Returns (table with objectId, candid, stem; {'science','template','difference': (n, S, S)}).
    Incomplete triplets and stamps of another size are an error naming the file.
    """
    from astropy.io import fits

    directory = Path(directory)
    stems = sorted(p.name[: -len("_sci.fits")] for p in directory.glob("*_sci.fits"))
    if not stems:
        raise DiapipeError("no *_sci.fits cutouts found", directory)
    cubes = {k: [] for k in _TRIPLET_SUFFIXES}
    rows = []
    shape = None
    for stem in stems:
        for key, suffix in _TRIPLET_SUFFIXES.items():
            p = directory / f"{stem}_{suffix}.fits"
            if not p.exists():
                raise DiapipeError(f"incomplete triplet: {p.name} missing", p)
            try:
                with fits.open(p, memmap=False) as hdul:
                    data = next((h.data for h in hdul if h.data is not None and np.ndim(h.data) == 2), None)
            except OSError as exc:
                raise DiapipeError(f"cannot read FITS cutout ({exc})", p) from exc
            if data is None:
                raise DiapipeError("no 2-d image in FITS cutout", p)
            data = np.asarray(data, np.float64)
            if shape is None:
                shape = data.shape
            if data.shape != shape or shape[0] != shape[1] or shape[0] % 2 == 0:
                raise DiapipeError(f"cutout shape {data.shape}; need square odd stamps all of {shape}", p)
            cubes[key].append(data)
        obj, _, candid = stem.rpartition("_")
        rows.append({"objectId": obj or stem, "candid": candid, "stem": stem})
    return pd.DataFrame(rows), {k: np.stack(v) for k, v in cubes.items()}


#: How ``score_cutouts`` finds the PSF FWHM of stamps that carry none.
FWHM_METHODS = ("stars", "stars-science", "stars-median", "central", "central-median")


def score_cutouts(model: RealBogusModel, table: pd.DataFrame, cubes: dict, fwhm=None, method: str = "stars"):
    """Features + reliability of cutout triplets; ``fwhm`` (pixels) if known, else estimated.

    Without ``fwhm`` (``estimate_fwhm_stars`` on each epoch; stamps without stars take the median of the
    others):
    'stars' = the broader of the science and template star FWHMs: the difference image has the PSF of
    the blurrier epoch (the sharper one is convolved to match it), and the survey features use the
    difference image's PSF;  'stars-science' = the science stars only;  'stars-median' = the median of
    'stars' for every stamp;  'central' / 'central-median' = the area above half maximum of the central
    source (``estimate_fwhm``; biased by hosts and quantised at 2 px seeing; kept for comparison).
    """
    est = estimate_fwhm(cubes["science"])
    star_sci, n_stars = estimate_fwhm_stars(cubes["science"])
    star_ref, _ = estimate_fwhm_stars(cubes["template"])
    star_diff = np.fmax(star_sci, star_ref)
    if fwhm is not None:
        use = np.full(len(est), float(fwhm))
    elif method not in FWHM_METHODS:
        raise ValueError(f"unknown FWHM method {method!r}; known: {FWHM_METHODS}")
    else:
        src = {"stars": star_diff, "stars-science": star_sci, "stars-median": star_diff}.get(method, est)
        if not np.isfinite(src).any():  # no star in any stamp: the central source is all there is
            src = est
        good = src[np.isfinite(src)]
        med = np.median(good) if len(good) else 2.5
        use = np.full(len(est), med) if method.endswith("median") else np.where(np.isfinite(src), src, med)
        use = np.clip(use, 1.0, 20.0)
    feats = compute_features(cubes["science"], cubes["template"], cubes["difference"], use)
    out = table.reset_index(drop=True).copy()
    out["fwhm"] = use
    out["fwhm_estimate"] = est
    out["fwhm_stars_science"] = star_sci
    out["fwhm_stars_template"] = star_ref
    out["n_psf_stars"] = n_stars
    out = pd.concat([out, feats], axis=1)
    out["reliability"] = model.reliability(feats)
    out["isReliable"] = out["reliability"] >= model.threshold
    return out


# --------------------------------------------------------------------------- synthetic training
def train_synthetic(n_visits=40, per_visit=400, seed=0, cfg: TrainConfig | None = None, label_noise=0.0,
                    importances=True, size=41):
    """Train and evaluate on synthetic triplets (diapipe.realbogus_synth); returns (model, metrics, data)."""
    from .realbogus_synth import make_synthetic, synthetic_features

    cfg = cfg or TrainConfig(seed=seed)
    t0 = time.perf_counter()
    cut, tab = make_synthetic(n_visits, per_visit, seed=seed, size=size)
    t1 = time.perf_counter()
    feats = synthetic_features(cut, tab)
    t2 = time.perf_counter()
    model, metrics = train_and_evaluate(feats, tab["label"].to_numpy(), tab["visit"].to_numpy(), cfg,
                                        snr=tab["det_snr"].to_numpy(), kinds=tab["kind"].to_numpy(),
                                        label_noise=label_noise, importances=importances)
    metrics["data"] = {"source": "synthetic triplets (diapipe.realbogus_synth), not the simulated survey",
                       "n_visits": n_visits, "per_visit": per_visit, "seed": seed, "n": int(len(tab)),
                       "cutout_size": size, "generate_seconds": round(t1 - t0, 1),
                       "feature_seconds": round(t2 - t1, 1)}
    model.metadata["training_data"] = metrics["data"]["source"]
    return model, metrics, (cut, tab, feats)


# --------------------------------------------------------------------------- command line
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("realbogus", help="real/bogus classification of diaSources")
    sub = p.add_subparsers(dest="realbogus_command", required=True)

    s = sub.add_parser("score-cutouts", help="score a folder of {objectId}_{candid}_{sci,ref,diff}.fits triplets")
    s.add_argument("directory")
    s.add_argument("--model", required=True, help="model file (.skops) from train_realbogus or train-synthetic")
    s.add_argument("-o", "--output", required=True, help="output Parquet table (features + reliability)")
    s.add_argument("--fwhm", type=float, default=None, help="PSF FWHM in pixels (default: measured on the "
                   "point sources of each science stamp, see --fwhm-method)")
    s.add_argument("--fwhm-method", choices=FWHM_METHODS, default="stars",
                   help="how to estimate the FWHM without --fwhm: 'stars' (the broader of the science and "
                   "template stars' FWHM = the difference PSF; stamps without stars: the folder median), "
                   "'stars-science', 'stars-median', 'central', 'central-median' (central source; biased by hosts)")
    s.set_defaults(func=_cli_score_cutouts)

    t = sub.add_parser("train-synthetic", help="train and evaluate a model on synthetic cutout triplets")
    t.add_argument("--model", required=True, help="output model file (.skops)")
    t.add_argument("--metrics", required=True, help="output metrics JSON")
    t.add_argument("--plots", default=None, help="directory for PNG plots")
    t.add_argument("--visits", type=int, default=40)
    t.add_argument("--per-visit", type=int, default=400)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--label-noise", type=float, default=0.05, help="fraction of labels flipped in the check")
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=_cli_train_synthetic)

    r = sub.add_parser("train", help="train and evaluate on a finished run's products (as rule train_realbogus)")
    r.add_argument("results", help="the run's results directory (realbogus/features/*/*.parquet, "
                   "completeness/classes.parquet, diaSources.parquet)")
    r.add_argument("-o", "--out", required=True, help="directory for model.skops, metrics.json and plots/")
    r.add_argument("--config", nargs="+", default=["config/config.yaml"], help="config files (realbogus block, seed)")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="realbogus settings to override")
    r.add_argument("--threads", type=int, default=2)
    r.set_defaults(func=_cli_train_run)

    d = sub.add_parser("feature-doc", help="write the feature documentation (Markdown)")
    d.add_argument("-o", "--output", default="docs/realbogus-features.md")
    d.set_defaults(func=lambda a: write_text(feature_doc(), a.output))

    i = sub.add_parser("info", help="print a model file's metadata")
    i.add_argument("model")
    i.set_defaults(func=lambda a: print(json.dumps(read_model_metadata(a.model), indent=1)))


def _cli_score_cutouts(args) -> int:
    model = load_model(args.model)
    table, cubes = read_triplet_dir(args.directory)
    out = score_cutouts(model, table, cubes, fwhm=args.fwhm, method=args.fwhm_method)
    write_parquet(out, args.output)
    n_pass = int(out["isReliable"].sum())
    print(f"{len(out)} triplets, FWHM {np.median(out['fwhm']):.2f} px, {n_pass} ({n_pass / len(out):.1%}) with "
          f"reliability >= {model.threshold:.4f}; wrote {args.output}")
    return 0


def _cli_train_run(args) -> int:
    import yaml

    from . import config as dconfig
    from .logs import setup

    setup()
    conf = dconfig.load(*args.config)
    block = dict(conf["realbogus"], seed=conf["seed"], n_jobs=args.threads)
    for kv in args.set:
        k, _, v = kv.partition("=")
        block[k] = yaml.safe_load(v)
    res, out = Path(args.results), Path(args.out)
    paths = sorted(res.glob("realbogus/features/*/*.parquet"))
    if not paths:
        raise DiapipeError("no feature tables realbogus/features/*/*.parquet", res)
    _, m = run_train(paths, res / "completeness" / "classes.parquet", res / "diaSources.parquet",
                     out / "model.skops", out / "metrics.json", plots_dir=out / "plots", config=block)
    for key in ("heldout", "heldout_all_visits"):
        if key in m:
            h, c = m[key], m[key]["confusion"]
            print(f"{key}: {h['n_real']} real, {h['n_bogus']} bogus: AUC {h['auc']:.5f}, MDR@FPR1% "
                  f"{h['mdr_at_fpr1']:.4f}, FPR@MDR1% {h['fpr_at_mdr1']:.4f}; at the threshold TP {c['tp']} "
                  f"FN {c['fn']} FP {c['fp']} TN {c['tn']}")
    for key, ln in (("single hold-out", m.get("label_noise")),
                    ("pooled", m.get("heldout_all_visits", {}).get("label_noise"))):
        if ln:
            print(f"label noise ({key}): factor {ln['max_factor']:.2f}, events {ln['events']}, "
                  f"bootstrap {ln['bootstrap']}")
    return 0


def _cli_train_synthetic(args) -> int:
    from .logs import setup

    setup()
    cfg = TrainConfig(seed=args.seed, n_jobs=args.threads)
    model, metrics, _ = train_synthetic(args.visits, args.per_visit, args.seed, cfg, label_noise=args.label_noise)
    save_model(model, args.model)
    _write_metrics(metrics, args.metrics, args.plots)
    h = metrics["heldout"]
    print(f"{metrics['model']}: held-out AUC {h['auc']:.5f}, MDR@FPR1% {h['mdr_at_fpr1']:.4f}, "
          f"FPR@MDR1% {h['fpr_at_mdr1']:.4f}, threshold {model.threshold:.4f}")
    return 0
