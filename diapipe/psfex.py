"""Fit a spatially varying PSF model (a ``diapipe.psf.PixelPsf``), as PSFEx does.

1. PSF stars: isolated, unsaturated, unmasked, high-S/N point sources (the
   stellar locus in half-light radius; galaxies are larger).
2. Each star's stamp is resampled (Lanczos-3) so that its windowed centroid
   falls on the central pixel, and normalised to unit sum.
3. Every pixel of the model is a polynomial of order ``order`` in the detector
   position; the polynomial coefficients of all pixels are one weighted linear
   least-squares solve over the stars.
4. Stars whose stamps disagree with the model (chi^2 per pixel far above the
   others: a neighbour, a cosmic ray ISR missed, a binary, a galaxy) are
   rejected and the fit repeated.

Units: pixels; stamps in the image's units (electrons), the model is unit-sum.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from .psf import PixelPsf, poly_design, poly_terms

log = logging.getLogger(__name__)

LANCZOS_A = 3
# Star weights are S/N^2 capped at this percentile of the PSF stars' S/N^2
# (100 = inverse variance, which measured best on the simulated survey).
WEIGHT_CAP_PERCENTILE = 100
PIXEL_WEIGHTS = False
STAR_ACCURACY = 0.0


def lanczos_weights(s: np.ndarray, a: int = LANCZOS_A) -> np.ndarray:
    """Weights w[:, m + a] (m = -a..a) so that out[i] = sum_m w_m in[i + m] = in(i + s).

    ``s`` is a sub-pixel shift per object (|s| <= ~0.5); weights are
    normalised to unit sum so flux is conserved.
    """
    s = np.atleast_1d(np.asarray(s, float))
    m = np.arange(-a, a + 1)
    t = m[None, :] - s[:, None]
    w = np.sinc(t) * np.sinc(t / a)
    w[np.abs(t) >= a] = 0.0
    return w / w.sum(axis=1, keepdims=True)


def shift_stamps(stamps: np.ndarray, sx: np.ndarray, sy: np.ndarray, a: int = LANCZOS_A) -> np.ndarray:
    """Resample stamps (N, H, W) to out(y, x) = in(y + sy, x + sx); output is (N, H-2a, W-2a).

    The ``a``-pixel border is consumed by the kernel, so cut stamps ``a`` pixels
    larger on each side than needed.
    """
    n, h, w = stamps.shape
    wx = lanczos_weights(sx, a)
    wy = lanczos_weights(sy, a)
    tmp = np.zeros((n, h, w - 2 * a))
    for k in range(2 * a + 1):
        tmp += wx[:, k, None, None] * stamps[:, :, k : k + w - 2 * a]
    out = np.zeros((n, h - 2 * a, w - 2 * a))
    for k in range(2 * a + 1):
        out += wy[:, k, None, None] * tmp[:, k : k + h - 2 * a, :]
    return out


def cut_stamps(image: np.ndarray, x: np.ndarray, y: np.ndarray, half: int):
    """Stamps (N, 2*half+1, 2*half+1) centred on the pixels nearest (x, y), and those pixels.

    Objects whose stamp would leave the image get ``ok = False`` (and zeros).
    """
    ny, nx = image.shape
    ix = np.round(np.asarray(x)).astype(int)
    iy = np.round(np.asarray(y)).astype(int)
    ok = (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    size = 2 * half + 1
    out = np.zeros((len(ix), size, size), dtype=np.float64)
    off = np.arange(-half, half + 1)
    if ok.any():
        yy = iy[ok, None, None] + off[None, :, None]
        xx = ix[ok, None, None] + off[None, None, :]
        out[ok] = image[yy, xx]
    return out, ix, iy, ok


def fwhm(stamp: np.ndarray, zoom: int = 8) -> float:
    """FWHM (pixels) of a centred PSF stamp: area above half maximum of a cubic-spline
    upsampling, as the diameter of the circle of that area (geometric-mean FWHM
    for an elliptical PSF).  Smooth in the PSF width, unlike pixel counting."""
    stamp = np.asarray(stamp, float)
    n = stamp.shape[0]
    c = n // 2
    # only the core matters; a small window keeps the upsampling cheap
    h = min(c, 12)
    core = stamp[c - h : c + h + 1, c - h : c + h + 1]
    up = ndimage.zoom(core, zoom, order=3, mode="nearest", grid_mode=True)
    area = np.count_nonzero(up >= 0.5 * up.max()) / zoom**2
    return float(np.sqrt(4 * area / np.pi))


def fit_pixel_psf(stamps: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray,
                  order: int, x0: float, y0: float, sx: float, sy: float) -> PixelPsf:
    """Weighted least-squares fit of the PixelPsf components to recentred unit-sum stamps.

    weights : (N,) per star, or (N, size, size) per pixel (0 = ignore the pixel,
        e.g. a neighbour's footprint).  Each pixel of the model is its own small
        polynomial fit over the stars.
    """
    nterms = len(poly_terms(order))
    if len(x) < nterms:
        raise ValueError(f"{len(x)} stars cannot constrain a PSF of order {order} ({nterms} terms)")
    t = poly_design(x, y, order, x0, y0, sx, sy)  # (N, nterms)
    n, h, w = stamps.shape
    d = stamps.reshape(n, -1)
    if np.ndim(weights) == 1:
        sw = np.sqrt(weights)[:, None]
        coef, *_ = np.linalg.lstsq(t * sw, d * sw, rcond=None)
        return PixelPsf(coef.reshape(nterms, h, w), order=order, x0=x0, y0=y0, sx=sx, sy=sy)
    wp = weights.reshape(n, -1)  # (N, P)
    # normal equations per pixel: (P, nterms, nterms) and (P, nterms)
    ata = np.einsum("np,ni,nj->pij", wp, t, t)
    atb = np.einsum("np,ni,np->pi", wp, t, d)
    # a pixel seen by too few stars falls back to a lightly damped solution
    ridge = 1e-9 * np.trace(ata, axis1=1, axis2=2)[:, None, None] * np.eye(nterms)
    coef = np.linalg.solve(ata + ridge, atb[..., None])[..., 0]  # (P, nterms)
    return PixelPsf(coef.T.reshape(nterms, h, w), order=order, x0=x0, y0=y0, sx=sx, sy=sy)


def model_stamps(psf: PixelPsf, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit-sum model stamps (N, size, size) centred on the central pixel, vectorised."""
    t = poly_design(x, y, psf.order, psf.x0, psf.y0, psf.sx, psf.sy)
    m = np.tensordot(t, psf.components, axes=1)
    return m / m.sum(axis=(1, 2), keepdims=True)


def build_psf(image: np.ndarray, variance: np.ndarray, x: np.ndarray, y: np.ndarray,
              shape: tuple[int, int], size: int, order: int = 2, n_iter: int = 3,
              clip: float = 4.0, ignore: np.ndarray | None = None, accuracy: float = 0.02,
              sky: np.ndarray | None = None, size_tolerance: float = 0.03):
    """Fit a PixelPsf to stars at (x, y) (0-based pixel centroids) on a background-subtracted image.

    size : model stamp side (odd, px).
    ignore : optional (N, size+6, size+6) boolean stamps (cut like ``cut_stamps``
        with half = size//2 + 3) of pixels to leave out for each star, e.g. its
        neighbours' footprints; they are widened by the resampling kernel.
    accuracy : relative model error per pixel assumed in the outlier test.
    sky : optional local sky per star (image units per pixel), subtracted first, so
        an error of the global background does not become a pedestal in the model.
    Returns (psf, used) where ``used`` is a boolean array over the input stars.
    """
    half = size // 2
    a = LANCZOS_A
    raw, ix, iy, inside = cut_stamps(image, x, y, half + a)
    var, *_ = cut_stamps(variance, x, y, half + a)
    if sky is not None:
        raw = raw - np.where(np.isfinite(sky), sky, 0.0)[:, None, None]
    pix_ok = np.ones((len(x), size, size), bool)
    if ignore is not None:
        # a pixel is lost if any input pixel the Lanczos kernel touches is to be ignored
        grown = ndimage.maximum_filter(ignore.astype(np.uint8), size=(1, 2 * a + 1, 2 * a + 1))
        pix_ok = grown[:, a:-a, a:-a] == 0
        raw = np.where(ignore, 0.0, raw)
    stamps = shift_stamps(raw, x - ix, y - iy)
    svar = var[:, a:-a, a:-a]
    # Normalise by the flux in the stamp; a lost neighbour pixel is filled from a
    # first-pass model below, so only stars with clean cores are worth keeping.
    core = np.zeros((size, size), bool)
    r = max(2, half // 3)
    core[half - r : half + r + 1, half - r : half + r + 1] = True
    good = inside & pix_ok[:, core].all(axis=1)
    flux = stamps.sum(axis=(1, 2))
    good &= (flux > 0) & np.isfinite(flux)
    norm = np.where(good, flux, 1.0)
    stamps = stamps / norm[:, None, None]
    svar = svar / norm[:, None, None] ** 2
    # Each star weighted by its S/N^2 (optionally capped).
    snr2 = 1.0 / np.maximum(svar.mean(axis=(1, 2)) * size * size, 1e-12)
    cap = np.percentile(snr2[good], WEIGHT_CAP_PERCENTILE) if good.any() else 1.0
    # model accuracy floor (PSFEx's PSF_ACCURACY): beyond S/N ~ 1/accuracy a star
    # is not worth more, so a few bright stars cannot decide the variation alone
    star_w = 1.0 / (1.0 / np.minimum(snr2, cap) + STAR_ACCURACY**2)
    ny, nx = shape
    geom = ((nx - 1) / 2, (ny - 1) / 2, max(nx / 2, 1.0), max(ny / 2, 1.0))
    used = good.copy()
    psf = None
    # Optional per-pixel weights as PSFEx: 1 / (noise^2 + (accuracy x PSF)^2); off by
    # default (measured worse than S/N^2 star weights on the simulated survey).
    profile = np.maximum(stamps, 0.0)
    # moment window for the size test: the stars' typical width
    sig_w = fwhm(np.median(stamps[good], axis=0)) / 2.355 if good.any() else size / 8.0
    snr = np.sqrt(np.maximum(snr2, 1e-12))
    for it in range(n_iter + 1):
        k = min(order, _max_order(used.sum()))
        if PIXEL_WEIGHTS:
            weights = pix_ok[used] / (svar[used] + (accuracy * profile[used]) ** 2)
        else:
            weights = star_w[used, None, None] * pix_ok[used]
        psf = fit_pixel_psf(stamps[used], x[used], y[used], weights, k, *geom)
        if k < order:
            psf = _promote(psf, order)
        model = model_stamps(psf, x, y)
        profile = np.maximum(model, 0.0)
        if ignore is not None and it == 0:
            # renormalise each star with its ignored pixels filled by the model
            filled = np.where(pix_ok, stamps, model)
            f2 = filled.sum(axis=(1, 2))
            f2 = np.where(good & (f2 > 0), f2, 1.0)
            stamps = stamps / f2[:, None, None]
            svar = svar / f2[:, None, None] ** 2
        # model error term (as PSFEx's PSF_ACCURACY): bright stars are not rejected for
        # the model's own percent-level imperfection
        err2 = np.maximum(svar, 1e-30) + (accuracy * model) ** 2
        chi2 = (pix_ok * (stamps - model) ** 2 / err2).sum(axis=(1, 2)) / np.maximum(
            pix_ok.sum(axis=(1, 2)), 1)
        med = np.median(chi2[used])
        mad = 1.4826 * np.median(np.abs(chi2[used] - med))
        reject = good & (chi2 > med + clip * max(mad, 0.1 * med))
        # Size test: a galaxy or blend on the stellar locus is broader than the model
        # at its position, and when faint its chi^2 need not stand out.  Compare
        # Gaussian-weighted second moments; their noise scales as 1/(S/N).
        q = _size_excess(stamps, model, sig_w)
        sigma_q = 1.4826 * np.median(np.abs(q[used]) * snr[used])
        reject |= good & (np.abs(q) > clip * sigma_q / snr + size_tolerance)
        new_used = good & ~reject
        if it == n_iter or (np.array_equal(new_used, used) and it > 0):
            break
        used = new_used
    log.info("PSF: %d of %d candidate stars used, order %d, size %d px", used.sum(), len(x), order, size)
    return psf, used


def _size_excess(stamps: np.ndarray, model: np.ndarray, sig_w: float) -> np.ndarray:
    """Fractional excess of each centred stamp's Gaussian-weighted second moment
    (window sigma ``sig_w`` px) over the model's at the same position."""
    n = stamps.shape[-1]
    o = np.arange(n) - n // 2
    r2 = o[None, :] ** 2 + o[:, None] ** 2
    w = np.exp(-0.5 * r2 / sig_w**2)

    def moment(a):
        return (a * w * r2).sum(axis=(1, 2)) / np.maximum((a * w).sum(axis=(1, 2)), 1e-30)

    return moment(stamps) / moment(model) - 1


def _max_order(nstar: int) -> int:
    # at least ~3 stars per polynomial term
    for k in (3, 2, 1, 0):
        if nstar >= 3 * len(poly_terms(k)):
            return k
    return 0


def _promote(psf: PixelPsf, order: int) -> PixelPsf:
    """Same PSF expressed with a higher-order (zero-padded) polynomial."""
    new = np.zeros((len(poly_terms(order)),) + psf.components.shape[1:])
    terms = poly_terms(order)
    for c, t in zip(psf.components, poly_terms(psf.order)):
        new[terms.index(t)] = c
    return PixelPsf(new, order=order, x0=psf.x0, y0=psf.y0, sx=psf.sx, sy=psf.sy)


def place_model(psf: PixelPsf, x: np.ndarray, y: np.ndarray, half: int | None = None):
    """Model stamps (N, size, size) shifted to the stars' sub-pixel positions.

    Stamp k is centred on pixel (round(x_k), round(y_k)); returned with those pixels.
    half : return only the central (2 half + 1)^2 pixels (the model keeps its
        unit sum over the full stamp, so fluxes stay on one scale).
    """
    a = LANCZOS_A
    m = model_stamps(psf, x, y)
    h = psf.size // 2
    if half is not None and half + a < h:
        m = m[:, h - half - a : h + half + a + 1, h - half - a : h + half + a + 1]
    else:
        m = np.pad(m, ((0, 0), (a, a), (a, a)))
    ix = np.round(np.asarray(x)).astype(int)
    iy = np.round(np.asarray(y)).astype(int)
    # out(i) = model(i - f): shift by s = -f
    out = shift_stamps(m, -(x - ix), -(y - iy))
    return out, ix, iy


def star_residuals(image: np.ndarray, psf: PixelPsf, x: np.ndarray, y: np.ndarray, radius: float | None = None):
    """Max |star - scaled model| / star peak, and the fitted fluxes, for stars at (x, y).

    The model is shifted to each star's position and scaled by a least-squares
    amplitude (plus a constant, for any residual sky).  ``radius`` (pixels)
    limits the comparison to the core, where neighbours rarely reach.
    """
    half = psf.size // 2
    model, ix, iy = place_model(psf, x, y)
    data, _, _, ok = cut_stamps(image, x, y, half)
    n = len(x)
    frac = np.full(n, np.nan)
    flux = np.full(n, np.nan)
    off = np.arange(-half, half + 1)
    for k in np.nonzero(ok)[0]:
        a_mat = np.stack([model[k].ravel(), np.ones(model[k].size)], axis=1)
        (f, c), *_ = np.linalg.lstsq(a_mat, data[k].ravel(), rcond=None)
        resid = data[k] - f * model[k] - c
        if radius is not None:
            r = np.hypot(off[None, :] - (x[k] - ix[k]), off[:, None] - (y[k] - iy[k]))
            resid = np.where(r <= radius, resid, 0.0)
        frac[k] = np.abs(resid).max() / (data[k] - c).max()
        flux[k] = f
    return frac, flux
