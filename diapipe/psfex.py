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
from .psf import spline_fwhm as fwhm  # noqa: F401 - psfex.fwhm is the name callers use

log = logging.getLogger(__name__)

LANCZOS_A = 3
# Star weights are S/N^2 capped at this percentile of the PSF stars' S/N^2
# (100 = inverse variance, which measured best on the simulated survey).
WEIGHT_CAP_PERCENTILE = 100
PIXEL_WEIGHTS = False
STAR_ACCURACY = 0.0
# Spatial variation: "shape" = mean pixel image whose FWHM, e1, e2 vary as
# polynomials (fit_shape_psf); "pixel" = every pixel its own polynomial.
# "auto": "pixel" from PIXEL_MODEL_MIN_STARS stars on, else "shape".
SPATIAL_MODEL = "auto"
PIXEL_MODEL_MIN_STARS = 100
# accuracy floor (fractional size change, and shear) of one star's size/shape estimate.
# Measured (benchmarks/survey_characterize.py, the 17 sparse default-survey exposures):
# the brightest stars' sizes are good to ~0.3%, so a larger floor (0.005), or an
# intrinsic scatter solved for chi^2/dof = 1 (which the tails of faint stars inflate to
# ~2%), hands the corners to the noisiest stars.
SHAPE_FLOOR = 0.001
# The size varies as the optics make it: {1, u, v, u^2 + v^2} (field curvature about an
# unknown axis, and a tilt); a free quadratic lets 2 more noisy terms reach the corners.
RADIAL_SIZE = True
# Wiener-filter the sparse-field shape model's reference image for its pixel noise.
WIENER = True


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


def _deriv(img: np.ndarray, axis: int) -> np.ndarray:
    """Fourth-order central difference d img / d(pixel) along ``axis`` (zero beyond the stamp)."""
    p = np.pad(img, 2)
    sl = lambda k: p[2 + k : p.shape[0] - 2 + k, 2:-2] if axis == 0 else p[2:-2, 2 + k : p.shape[1] - 2 + k]  # noqa: E731
    return (-sl(2) + 8 * sl(1) - 8 * sl(-1) + sl(-2)) / 12.0


def shape_generators(psf0: np.ndarray) -> np.ndarray:
    """Images (3, H, W) of the first-order changes of a centred PSF image under a
    dilation (FWHM x (1 + s)), and the two area-preserving shears (e1, e2).

    Each sums to zero, so a model ``psf0 + sum_k c_k G_k`` keeps its unit sum.
    """
    h, w = psf0.shape
    yy, xx = np.mgrid[:h, :w]
    xx = xx - w // 2
    yy = yy - h // 2
    dx, dy = _deriv(psf0, 1), _deriv(psf0, 0)
    dil = -(2 * psf0 + xx * dx + yy * dy)
    g1 = -(xx * dx - yy * dy)
    g2 = -(yy * dx + xx * dy)
    return np.stack([dil, g1, g2])


def transform_psf(img: np.ndarray, p, prefiltered: bool = False) -> np.ndarray:
    """``img`` (centred, unit-sum) dilated by (1 + s) and sheared by (e1, e2), exactly.

    p = (s, e1, e2): out(r) = img(A^-1 r) / det A with A = (1 + s) [[1 + e1, e2], [e2, 1 - e1]]
    (r = pixel offset from the central pixel, x first), the finite transformation whose
    first-order changes are ``shape_generators``.  Cubic-spline resampling; unit sum.
    prefiltered : ``img`` is already ``ndimage.spline_filter(img, 3, mode="constant")``
        (one filter for many transformations of the same image).
    """
    a = _shape_matrix(p)  # (x, y) -> (x, y)
    ainv = np.linalg.inv(a)[::-1, ::-1]  # in (row, col) = (y, x) order
    c = np.array([img.shape[0] // 2, img.shape[1] // 2], float)
    out = ndimage.affine_transform(img, ainv, offset=c - ainv @ c, order=3, mode="constant", cval=0.0,
                                   prefilter=not prefiltered)
    tot = out.sum()
    return out / tot if tot > 0 else out


def _shape_matrix(p) -> np.ndarray:
    """A = (1 + s) [[1 + e1, e2], [e2, 1 - e1]] / sqrt(1 - e1^2 - e2^2): det A = (1 + s)^2, so
    the shear keeps the area (and the FWHM, the geometric mean of the axes)."""
    s, e1, e2 = (float(v) for v in p)
    e2sq = min(e1 * e1 + e2 * e2, 0.81)
    return (1 + s) / np.sqrt(1 - e2sq) * np.array([[1 + e1, e2], [e2, 1 - e1]])


def _inverse_shape(p):
    """(s, e1, e2) of the inverse transformation of ``p``."""
    return (-p[0] / (1 + p[0]), -p[1], -p[2])


def wiener_denoise(img: np.ndarray, noise_power: float) -> np.ndarray:
    """``img`` with white noise of total variance ``noise_power`` (sum over pixels of the
    per-pixel variances) filtered out: a Wiener filter S / (S + N) on the 2D Fourier
    transform, with the signal power S the azimuthally averaged |FFT|^2 minus N.

    Why: the mean of a few tens of stars still has ~0.5-1% noise per pixel at the
    peak, and the half-maximum FWHM of a noisy image is biased low (its peak is biased
    high): -1% on a 40-star field.  The PSF's power falls off with frequency while the
    noise's is flat, so the filter removes mostly noise; the sum is kept.
    """
    if not noise_power > 0:
        return img
    h, w = img.shape
    f = np.fft.fft2(np.fft.ifftshift(img))
    ky = np.fft.fftfreq(h)[:, None] * h
    kx = np.fft.fftfreq(w)[None, :] * w
    kr = np.round(np.hypot(kx * h / max(h, w), ky * w / max(h, w))).astype(int)
    pw = np.abs(f) ** 2
    prad = np.bincount(kr.ravel(), pw.ravel()) / np.maximum(np.bincount(kr.ravel()), 1)
    sig = np.maximum(prad - noise_power, 0.0)
    filt = (sig / (sig + noise_power))[kr]
    filt[0, 0] = 1.0
    return np.fft.fftshift(np.fft.ifft2(f * filt).real)


def _compose(p, d):
    """Shape parameters of a small change ``d`` applied after ``p`` (dilations multiply)."""
    return np.array([(1 + p[0]) * (1 + d[0]) - 1, p[1] + d[1], p[2] + d[2]])


def fit_shape_psf(stamps: np.ndarray, x: np.ndarray, y: np.ndarray, weights: np.ndarray,
                  order: int, x0: float, y0: float, sx: float, sy: float, n_iter: int = 2,
                  clip: float = 3.0, out_order: int = 4, grid: int = 7,
                  variances: np.ndarray | None = None) -> PixelPsf:
    """Weighted fit of a PixelPsf whose spatial variation is a change of size and shape only.

    The PSF at a position is a reference pixel image (the PSF at (x0, y0)) dilated by
    (1 + s) and sheared by (e1, e2) (``transform_psf``), with s, e1, e2 polynomials of
    ``order`` across the detector: 3 x nterms numbers, which a sparse field (tens of
    stars) constrains where a free pixel basis is noise limited at the corners.
    The transformation is applied exactly (not linearised: a size change of 10% across
    the detector made a first-order model 1-2% too narrow), by Gauss-Newton:
    each star's (s, e1, e2) from the generators of its current model, the
    reference image as the mean of the stars transformed back to (x0, y0).
    The result is an ordinary PixelPsf of order ``out_order``, fitted to the exact
    model rendered on a ``grid`` x ``grid`` raster over the detector.
    variances : optional (N, H, W) variances of the unit-sum stamps; the reference
        image is then Wiener-filtered for its noise (``wiener_denoise``).
    """
    nterms = len(poly_terms(order))
    n, h, w = stamps.shape
    d = stamps.reshape(n, -1)
    wp = np.broadcast_to(weights[:, None, None] if np.ndim(weights) == 1 else weights, (n, h, w)).reshape(n, -1)
    wstar = wp.max(axis=1)
    wsum = np.maximum(wp.sum(axis=0), 1e-300)
    psf0 = ((wp * d).sum(axis=0) / wsum).reshape(h, w)
    if nterms == 1 or n < 2:
        return PixelPsf(psf0[None], order=0, x0=x0, y0=y0, sx=sx, sy=sy)
    t = poly_design(x, y, order, x0, y0, sx, sy)  # (N, nterms)
    ps = np.zeros((n, 3))
    c = np.zeros((3, nterms))
    for it in range(n_iter + 1):
        # each star's size and shape (s, e1, e2): Gauss-Newton steps from its current model
        s2 = np.zeros((n, 3))
        pf = ndimage.spline_filter(psf0, 3, mode="constant")
        # two Gauss-Newton steps from scratch, then one from the previous estimate
        for _gn in range(2 if it == 0 else 1):
            for k in range(n):
                m = transform_psf(pf, ps[k], prefiltered=True).ravel()
                gen = shape_generators(m.reshape(h, w)).reshape(3, -1)
                g = (gen * wp[k]) @ gen.T
                g += 1e-9 * np.trace(g) * np.eye(3)
                gi = np.linalg.inv(g)
                ps[k] = _compose(ps[k], gi @ ((gen * wp[k]) @ (d[k] - m)))
                s2[k] = np.diag(gi)
        c = _robust_poly(t, ps, s2, clip)  # (3, nterms)
        if it == n_iter:
            # the last size/shape fit is to the final reference image, so that its
            # (noise-filtered) core is matched to the stars
            break
        pred = t @ c.T  # (N, 3)
        # reference image: each star (its lost pixels filled by the model) taken back to
        # (x0, y0) by the inverse of its predicted transformation
        back = np.zeros((h, w))
        for k in range(n):
            m = transform_psf(pf, pred[k], prefiltered=True).ravel()
            filled = np.where(wp[k] > 0, d[k], m).reshape(h, w)
            back += wstar[k] * transform_psf(filled, _inverse_shape(pred[k]))
        psf0 = back / max(wstar.sum(), 1e-300)
        if variances is not None:
            # noise power of the weighted mean image (white; the resampling's smoothing ignored)
            npow = float((wstar[:, None, None] ** 2 * variances).sum() / max(wstar.sum(), 1e-300) ** 2)
            psf0 = wiener_denoise(psf0, npow)
    # render the exact model on a raster and express it as pixel polynomials
    g = np.linspace(-1, 1, grid)
    gu, gv = np.meshgrid(g, g)
    gx, gy = x0 + gu.ravel() * sx, y0 + gv.ravel() * sy
    tg = poly_design(gx, gy, order, x0, y0, sx, sy) @ c.T
    pf = ndimage.spline_filter(psf0, 3, mode="constant")
    imgs = np.stack([transform_psf(pf, pk, prefiltered=True).ravel() for pk in tg])
    a = poly_design(gx, gy, out_order, x0, y0, sx, sy)
    comps, *_ = np.linalg.lstsq(a, imgs, rcond=None)
    return PixelPsf(comps.reshape(-1, h, w), order=out_order, x0=x0, y0=y0, sx=sx, sy=sy)


def _robust_poly(t: np.ndarray, vals: np.ndarray, s2: np.ndarray, clip: float) -> np.ndarray:
    """Polynomial coefficients (K, nterms) of per-star values (N, K) with variances s2 (N, K).

    Weights 1 / (s2 x scale + SHAPE_FLOOR^2), the scale such that the robust chi^2
    is 1; a star off by more than ``clip`` robust sigma in any parameter (a galaxy,
    a binary) is dropped.
    """
    n, k = vals.shape
    m = t.shape[1]
    keep = np.ones(n, bool)
    s2 = np.maximum(s2, 1e-30)
    first = True
    coef = np.zeros((k, m))
    for _ in range(8):
        for j in range(k):
            sw = np.sqrt(1.0 / s2[keep, j])
            coef[j] = np.linalg.lstsq(t[keep] * sw[:, None], vals[keep, j] * sw, rcond=None)[0]
        res = vals - t @ coef.T
        # The variances are known up to a scale (star weights are relative): rescale
        # them so the robust chi^2 is 1.
        f = (1.4826 * np.median(np.abs(res[keep]) / np.sqrt(s2[keep]), axis=0)) ** 2
        s2 = s2 * np.maximum(f, 1e-30)
        if first:
            # accuracy floor of the size/shape estimates, as PSFEx's PSF_ACCURACY
            s2 = s2 + SHAPE_FLOOR**2
            first = False
        chi = np.abs(res) / np.sqrt(s2)
        new = (chi < clip).all(axis=1)
        if new.sum() < m + 2 or np.array_equal(new, keep):
            break
        keep = new
    # Spatial model per parameter by leave-one-out cross-validation over the kept
    # stars: with few precise stars a full quadratic extrapolates its noise to the
    # corners.  Candidates: orders 0..order, and for the size (parameter 0) the
    # quadratic in distance from an unknown optical axis, {1, u, v, u^2 + v^2}
    # (defocus / field curvature of a rotationally symmetric camera, and seeing).
    terms = [tuple(tt) for tt in poly_terms(3)][:m]
    for j in range(k):
        wj = 1.0 / s2[keep, j]
        cands = [np.eye(m)[:, : len(poly_terms(o))] for o in range(4) if len(poly_terms(o)) <= m]
        if j == 0 and (2, 0) in terms and (0, 2) in terms:
            radial = np.zeros((m, 4))
            radial[:3, :3] = np.eye(3)
            radial[terms.index((2, 0)), 3] = radial[terms.index((0, 2)), 3] = 1.0
            if keep.sum() >= 3 * radial.shape[1]:
                # the size always gets the optical field curvature (r^2 about the
                # axis): lower orders would only save a parameter the physics needs
                cands = [radial] if RADIAL_SIZE else [c_ for c_ in cands if c_.shape[1] > radial.shape[1]] + [radial]
            else:
                cands.append(radial)
        best = None
        for sel in cands:
            if keep.sum() < sel.shape[1] + 3:
                continue
            a = (t[keep] @ sel) * np.sqrt(wj)[:, None]
            bvec = vals[keep, j] * np.sqrt(wj)
            cj, *_ = np.linalg.lstsq(a, bvec, rcond=None)
            hat = np.einsum("ij,ji->i", a, np.linalg.pinv(a))
            score = (((bvec - a @ cj) / np.maximum(1 - hat, 1e-3)) ** 2).sum()
            log.debug("PSF shape param %d: %d terms, LOO score %.1f", j, sel.shape[1], score)
            if best is None or score < best[0]:
                best = (score, sel @ cj)
        if best is not None:
            coef[j] = best[1]
    return coef


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
        # A free pixel basis where the stars can constrain it; where they are few, only
        # the size and shape vary (the pixel basis is then noise limited at the corners)
        shape = SPATIAL_MODEL == "shape" or (SPATIAL_MODEL == "auto" and used.sum() < PIXEL_MODEL_MIN_STARS)
        fit = fit_shape_psf if shape else fit_pixel_psf
        extra = dict(variances=svar[used]) if shape and WIENER else {}
        psf = fit(stamps[used], x[used], y[used], weights, k, *geom, **extra)
        if psf.order < order:
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
