"""Template coadds: select visits, reject single-visit artefacts, stack, and the coadd PSF.

Inputs are warps of one band on one patch (``diapipe.warp``, pixels in nJy).

Selection (``select_visits``): by explicit list, by MJD range, or the N best
seeing visits of a pool; a selection matching nothing is a DiapipeError.

Artefact rejection (``find_artefacts``), in the spirit of LSST's CompareWarp:
every warp is compared with a robust (median) stack in two ways,

* PSF-matched: all warps are convolved to a common Gaussian PSF (the worst
  seeing), so the seeing differences cancel; pixels that deviate by more
  than ``nsigma`` (hysteresis down to ``nsigma_low``) are artefacts - trails,
  asteroids, transients, anything extended or point-like;
* unmatched: a pixel that deviates from the median by more than
  ``nsigma`` sigma plus ``ampfrac`` of the local peak of the median catches
  sharp things (cosmic rays, hot pixels) that smoothing would dilute;

the flagged regions are grown by ``grow`` px (the kernel and PSF wings) and
dropped from that one visit only.  Then the coadd is the weighted mean with one
weight per visit (inverse median variance, or inverse variance x FWHM^2 with
``weighting='psf'``, the point-source optimal choice); per-visit (not per-pixel)
weights keep the coadd PSF well defined: at each point it is the same weighted
mean of the warped PSFs over the visits that contribute there.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
from astropy.io import fits
from scipy import ndimage

from . import masks
from .exposure import Exposure, MaskedImage
from .fileio import DiapipeError
from .psf import PixelPsf
from .warp import COADD_MAGZERO, fit_pixel_psf, photometric_scale, resample_exposure, warp_psf

log = logging.getLogger(__name__)

#: Input pixels with these planes do not enter the mean.
REJECT_PLANES = ("BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT")
#: Planes carried into the coadd where most contributing inputs had them.
CARRY_PLANES = ("BAD", "SAT", "CR", "SUSPECT", "INTRP")


# ------------------------------------------------------------ selection
def select_visits(candidates: list[dict], mode: str = "best_seeing", visits=None, mjd_min=None, mjd_max=None,
                  n_best: int = 5, band=None, data_id=None) -> list[int]:
    """Template visits from ``candidates`` (dicts with visit, band, mjd, seeing).

    mode 'list': exactly ``visits``; 'mjd_range': every candidate with
    mjd_min <= mjd <= mjd_max; 'best_seeing': the ``n_best`` smallest seeing
    among the candidates (restricted to ``visits`` and the MJD range if given).
    Raises DiapipeError if nothing matches.
    """
    pool = [c for c in candidates if band is None or c.get("band") in (None, band)]
    if mode not in ("list", "mjd_range", "best_seeing"):
        raise DiapipeError(f"unknown template selection mode {mode!r} (list, mjd_range, best_seeing)", None, data_id)
    if visits:
        wanted = {int(v) for v in visits}
        pool = [c for c in pool if int(c["visit"]) in wanted]
    if mjd_min is not None:
        pool = [c for c in pool if c.get("mjd") is not None and c["mjd"] >= mjd_min]
    if mjd_max is not None:
        pool = [c for c in pool if c.get("mjd") is not None and c["mjd"] <= mjd_max]
    if mode == "best_seeing":
        pool = sorted(pool, key=lambda c: (c.get("seeing") if c.get("seeing") is not None else np.inf, c["visit"]))
        pool = pool[: int(n_best)]
    if not pool:
        have = sorted(int(c["visit"]) for c in candidates)
        raise DiapipeError(
            f"template selection (mode={mode}, visits={list(visits) if visits else None}, mjd_min={mjd_min}, "
            f"mjd_max={mjd_max}, band={band}) matches no visit among the {len(have)} with data here {have}",
            None, data_id)
    return sorted(int(c["visit"]) for c in pool)


def describe_warp(w: Exposure) -> dict:
    """Selection record of a warp: visit, band, mjd, seeing (arcsec, visit-level if known)."""
    m = w.metadata
    return {"visit": int(m["visit"]), "band": m.get("band"), "mjd": m.get("MJD-OBS"),
            "seeing": m.get("VSEEING", m.get("SEEING"))}


# ----------------------------------------------------------- rejection
def _nz(x):
    """NaN -> 0 (np.nan_to_num without its slow infinity handling; our infinities stay)."""
    x = np.asarray(x)
    return np.where(np.isnan(x), x.dtype.type(0), x)


def _valid(w: Exposure) -> np.ndarray:
    return ~masks.is_set(w.mask, *REJECT_PLANES) & (w.variance > 0) & np.isfinite(w.image)


def _sigma_px(w: Exposure) -> float:
    """Gaussian sigma (px) of the warp's PSF at the centre of its data."""
    if w.psf is None:
        return 1.5
    ok = ~masks.is_set(w.mask[::4, ::4], "NO_DATA")  # every 4th pixel: plenty for a centre
    yc, xc = np.argwhere(ok).mean(axis=0) * 4 if ok.any() else (w.shape[0] / 2, w.shape[1] / 2)
    return _gauss_sigma(w.psf.image(xc, yc))


def _gauss_sigma(stamp) -> float:
    """Sigma (px) of the Gaussian with the stamp's peak-to-flux ratio (robust to Moffat wings)."""
    s = np.asarray(stamp, float)
    return float(np.sqrt(s.sum() / (2 * np.pi * s.max())))


def find_artefacts(warps: list[Exposure], nsigma: float = 5.0, nsigma_low: float = 2.5, ampfrac: float = 0.5,
                   matched_ampfrac: float = 0.2, grow: int | None = None, flux_frac: float = 0.03) -> list[np.ndarray]:
    """Boolean maps, one per warp, of pixels to drop as single-visit artefacts.

    Where >= 3 warps cover a pixel each is compared with their median; where
    only 2 do, the brighter of a significantly discrepant pair is dropped
    (artefacts add light); a pixel seen once cannot be checked.
    """
    n = len(warps)
    shape = warps[0].shape
    out = [np.zeros(shape, bool) for _ in range(n)]
    if n < 2:
        log.warning("only %d warp: no artefact rejection possible", n)
        return out
    valid = np.array([_valid(w) for w in warps])
    # float32 stacks: the warps are float32 on disk, and the comparison needs no more
    img = np.array([np.where(v, w.image, np.nan) for w, v in zip(warps, valid)], dtype=np.float32)
    var = np.array([np.where(v, w.variance, np.nan) for w, v in zip(warps, valid)], dtype=np.float32)
    sig = np.array([_sigma_px(w) for w in warps])
    smax = sig.max()
    if grow is None:
        grow = int(np.ceil(2.355 * smax))
    peak_box = 2 * int(np.ceil(2.355 * smax)) + 1
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns outside the data
        # PSF-matched copies: Gaussian-convolve each warp to the worst seeing
        mimg = np.empty_like(img)
        mvar = np.empty_like(var)
        ref, ref_var, nval, isum, isum_var = _reference(img, var)
        kern = _kernels_from_stars(img, ref, ref_var, valid, smax)
        if kern is None:  # too few stars in common: trust the PSF models
            kern = _matching_kernels(warps, sig)
        for i in range(n):
            mimg[i], mvar[i] = _match_to(img[i], var[i], valid[i], 0.0, kern[i])
        mref, mref_var, mn, msum, msum_var = _reference(mimg, mvar)
        local_peak = ndimage.maximum_filter(_nz(np.abs(ref)), size=peak_box)
        mpeak = ndimage.maximum_filter(_nz(np.abs(mref)), size=peak_box)
        for i in range(n):
            # raw matched significance first: its robust scatter rescales it (never below 1),
            # because smoothing correlated (resampled) noise, and PSF-model mismatch in a crowded
            # field where every pixel is near a star, make the propagated variance too small, and
            # the 2.5-sigma hysteresis level would then percolate through the whole field
            zraw = _matched_z(mimg[i], mvar[i], mref, mref_var, mn, msum, msum_var)
            scale = _robust_scale(zraw)
            # unmatched: sharp outliers, tolerant of seeing differences near stars via the local
            # peak; matched: anything PSF-like or extended; with only two inputs a disagreement is
            # blamed on the brighter one (artefacts add light)
            high, low, sharp, d, dvar, ri = _outliers(img[i], var[i], valid[i], ref, ref_var, nval, isum, isum_var,
                                                      local_peak, mimg[i], mvar[i], mref, mref_var, mn, msum,
                                                      msum_var, mpeak, scale, nsigma, nsigma_low, ampfrac,
                                                      matched_ampfrac)
            # a seeing mismatch moves a star's light around but conserves it; an artefact adds light
            high = (high & ~_flux_conserving(high & ~sharp, d, dvar, ri, int(np.ceil(2 * 2.355 * smax)),
                                             nsigma, flux_frac)) | (high & sharp)
            # the hysteresis level has no slack: an artefact found on the sky next to a star (a trail
            # crossing it) is followed into the star, as long as it stays within 2 FWHM of a seed
            if not high.any():
                continue
            # hysteresis: keep low-threshold regions that contain a high-threshold pixel, but only
            # within 2 FWHM of the seeds (in a crowded field low-level regions percolate everywhere)
            near = masks.grow_box(high, int(np.ceil(2 * 2.355 * smax)))
            low &= near
            lab, nlab = ndimage.label(low)
            keep = np.zeros(nlab + 1, bool)
            keep[np.unique(lab[high])] = True
            keep[0] = False
            flagged = keep[lab]
            if grow > 0:
                flagged = masks.grow_box(flagged, grow)
            out[i] = flagged & valid[i]
    return out


def _flux_conserving(seeds, d, dvar, ref, r: int, nsigma: float, flux_frac: float) -> np.ndarray:
    """Seed regions whose residual integrates to ~0 over a box 2r+1 wider: PSF mismatch, not an artefact.

    ``d`` is the unmatched difference (warp - reference) and ``dvar`` its variance.  A region
    is flux-conserving when |sum d| < nsigma x sqrt(1.3 sum dvar) + flux_frac x sum |ref| over
    the box (1.3: the Lanczos noise correlation of sums; flux_frac: photometric-scale and
    PSF-wing slack).  Cosmic rays, trails, movers and transients all add net light.
    """
    out = np.zeros(seeds.shape, bool)
    if not seeds.any():
        return out
    lab, nlab = ndimage.label(masks.grow_cross(seeds, 2))
    ny, nx = seeds.shape
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - r, 0), min(sl[0].stop + r, ny)
        x0, x1 = max(sl[1].start - r, 0), min(sl[1].stop + r, nx)
        tot = np.nansum(d[y0:y1, x0:x1])
        tol = nsigma * np.sqrt(1.3 * np.nansum(dvar[y0:y1, x0:x1])) + flux_frac * np.nansum(np.abs(ref[y0:y1, x0:x1]))
        if abs(tot) < tol:
            out[sl] |= lab[sl] == k
    return out & seeds


def _kernels_from_stars(img, ref, ref_var, valid, smax, nmax: int = 100, min_stars: int = 10):
    """Gaussian sigma (px) per warp that brings its star cores to the broadest warp's, measured on the data.

    The same bright, locally dominant stars (peaks of the median stack above 50 sigma, no
    brighter peak within 3 FWHM, covered by every warp) are measured in every warp: the
    fraction of a star's flux (box of side 6 FWHM) in its central 3 x 3 pixels.  For a
    Gaussian of sigma s that fraction is erf(1.5 / (s sqrt 2))^2, which gives each warp an
    effective core width; the kernel is the quadrature difference to the broadest.  Empirical
    PSF models of crowded real frames are noisy at the 10% level in their peaks, enough to
    make every star core look like an outlier; the stars themselves are not.
    Returns None if fewer than ``min_stars`` such stars exist.
    """
    from scipy.special import erf

    n = img.shape[0]
    r = int(np.ceil(3 * 2.355 * smax))  # half-box: 3 FWHM
    # candidate stars wherever the median stack exists; each warp is measured on those it covers
    # (dithers and chip gaps leave few places covered by every warp)
    allv = np.isfinite(ref) & np.isfinite(ref_var)
    clean = np.where(allv, ref, 0.0)
    sn = clean / np.sqrt(np.where(allv & (ref_var > 0), ref_var, np.inf))
    mx = ndimage.maximum_filter(clean, size=2 * r + 1)
    ny, nx = clean.shape
    yy, xx = np.nonzero((clean == mx) & (sn > 50))
    inside = (yy >= r) & (yy < ny - r) & (xx >= r) & (xx < nx - r)
    yy, xx = yy[inside], xx[inside]
    if len(yy) < min_stars:
        return None
    order = np.argsort(-clean[yy, xx])[:nmax]
    yy, xx = yy[order], xx[order]
    frac = np.full((n, len(yy)), np.nan)
    for k, (y, x) in enumerate(zip(yy, xx)):
        box = img[:, y - r:y + r + 1, x - r:x + r + 1]
        sky = box[:, [0, -1], :].mean(axis=(1, 2))  # edge rows: local sky
        tot = box.sum(axis=(1, 2)) - sky * box[0].size
        core = img[:, y - 1:y + 2, x - 1:x + 2].sum(axis=(1, 2)) - sky * 9
        frac[:, k] = core / tot  # NaN where the warp does not cover the whole box
    good = np.isfinite(frac) & (frac > 0) & (frac < 1)
    if good.sum(axis=1).min() < min_stars:
        return None
    f = np.array([np.median(fi[g]) for fi, g in zip(frac, good)])
    # invert erf(1.5 / (s sqrt 2))^2 = f for s
    from scipy.special import erfinv

    s_eff = 1.5 / (np.sqrt(2) * erfinv(np.sqrt(np.clip(f, 1e-6, 1 - 1e-9))))
    log.info("PSF matching from %s stars per warp: effective core sigma %s px", good.sum(axis=1), np.round(s_eff, 2))
    return np.sqrt(np.maximum(s_eff.max() ** 2 - s_eff**2, 0.0))


def _matching_kernels(warps, sig) -> np.ndarray:
    """Gaussian sigma (px) per warp that brings its PSF model's peak down to the lowest peak among them.

    Matching peaks (a star's core, where seeing differences leave the largest residuals)
    rather than Gaussian widths: real PSFs differ in their wings (Moffat, tracking, focus),
    and a width from peak/flux then over- or under-smooths the cores.  Without PSF models,
    Gaussian widths ``sig`` are matched to the largest.
    """
    smax = float(np.max(sig))
    stamps = []
    for w in warps:
        if w.psf is None:
            return np.sqrt(np.maximum(smax**2 - np.asarray(sig) ** 2, 0.0))
        ok = ~masks.is_set(w.mask, "NO_DATA")
        yc, xc = np.argwhere(ok).mean(axis=0) if ok.any() else (w.shape[0] / 2, w.shape[1] / 2)
        st = np.clip(np.asarray(w.psf.image(xc, yc), float), 0, None)
        stamps.append(np.pad(st / st.sum(), 3 * int(np.ceil(smax))))
    target = min(st.max() for st in stamps)
    out = []
    for st in stamps:
        lo, hi = 0.0, 2.0 * smax + 1.0
        if st.max() <= target * 1.001:
            out.append(0.0)
            continue
        for _ in range(25):  # bisection: the peak falls monotonically with the kernel width
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ndimage.gaussian_filter(st, mid).max() > target else (lo, mid)
        out.append(0.5 * (lo + hi))
    return np.asarray(out)


def _robust_scale(z) -> float:
    """Scatter of z from its median absolute deviation (1.4826 MAD), at least 1."""
    z = z[np.isfinite(z)]
    if z.size < 100:
        return 1.0
    if z.size > 200_000:  # a regular subsample is plenty for a scale
        z = z[:: z.size // 100_000]
    return float(max(1.0, 1.4826 * np.median(np.abs(z - np.median(z)))))


def _reference(img, var):
    """Robust stack: per-pixel median, its variance ((pi/2) x mean variance / n), n, and the sums.

    Returns (median, its variance, n, sum of values, sum of variances), NaN where n = 0
    (the sums are 0 there).  Compiled: a per-pixel insertion sort of the few (< ~30)
    values is ~10x faster than a sort along the stack axis.
    """
    nv, ny, nx = img.shape
    ref = np.empty((ny, nx), np.float32)
    ref_var = np.empty((ny, nx), np.float32)
    nval = np.empty((ny, nx), np.int64)
    tot = np.empty((ny, nx), np.float32)
    tot_var = np.empty((ny, nx), np.float32)
    _stack_median(img, var, ref, ref_var, nval, tot, tot_var)
    return ref, ref_var, nval, tot, tot_var


@numba.njit(cache=True, nogil=True)
def _stack_median(img, var, ref, ref_var, nval, tot, tot_var):  # pragma: no cover
    nv, ny, nx = img.shape
    buf = np.empty(nv, np.float32)
    for y in range(ny):
        for x in range(nx):
            m = 0
            s = 0.0
            sv = 0.0
            for k in range(nv):
                v = img[k, y, x]
                if np.isfinite(v):
                    # insertion sort as the values arrive
                    q = m
                    while q > 0 and buf[q - 1] > v:
                        buf[q] = buf[q - 1]
                        q -= 1
                    buf[q] = v
                    m += 1
                    s += v
                    sv += var[k, y, x]
            nval[y, x] = m
            tot[y, x] = s
            tot_var[y, x] = sv
            if m == 0:
                ref[y, x] = np.nan
                ref_var[y, x] = np.nan
            else:
                ref[y, x] = 0.5 * (buf[(m - 1) // 2] + buf[m // 2])
                ref_var[y, x] = (np.pi / 2) * sv / (m * m)


@numba.njit(cache=True, nogil=True)
def _others(x, v, ref, ref_var, n, tot, tot_var):  # pragma: no cover
    """Reference value and variance for one warp's pixel: the median, or where only two warps
    cover, the other warp (the stack sum less this warp's own value)."""
    if n == 2:
        if np.isfinite(x):
            return tot - x, tot_var - v
        return tot, tot_var
    return ref, ref_var


@numba.njit(cache=True, nogil=True)
def _matched_z(mx, mv, mref, mref_var, mn, msum, msum_var):  # pragma: no cover
    """(PSF-matched warp - its reference) / propagated sigma, NaN where < 2 matched warps cover."""
    ny, nx = mx.shape
    z = np.empty((ny, nx), np.float32)
    for y in range(ny):
        for x in range(nx):
            if mn[y, x] < 2:
                z[y, x] = np.nan
                continue
            r, rv = _others(mx[y, x], mv[y, x], mref[y, x], mref_var[y, x], mn[y, x], msum[y, x], msum_var[y, x])
            z[y, x] = (mx[y, x] - r) / np.sqrt(mv[y, x] + rv)
    return z


@numba.njit(cache=True, nogil=True)
def _outliers(xi, vi, ok, ref, ref_var, nval, tot, tot_var, local_peak, mx, mv, mref, mref_var, mn, msum, msum_var,
              mpeak, scale, nsigma, nsigma_low, ampfrac, matched_ampfrac):  # pragma: no cover
    """Per-pixel outlier tests of one warp (see ``find_artefacts``).

    Returns high (seed) and low (hysteresis) maps, the unmatched ``sharp`` map, and the
    unmatched difference, its variance and the reference (for the flux-conservation test).
    """
    ny, nx = xi.shape
    high = np.zeros((ny, nx), np.bool_)
    low = np.zeros((ny, nx), np.bool_)
    sharp = np.zeros((ny, nx), np.bool_)
    d = np.empty((ny, nx), np.float32)
    dvar = np.empty((ny, nx), np.float32)
    ri = np.empty((ny, nx), np.float32)
    for y in range(ny):
        for x in range(nx):
            n = nval[y, x]
            r, rv = _others(xi[y, x], vi[y, x], ref[y, x], ref_var[y, x], n, tot[y, x], tot_var[y, x])
            dd = xi[y, x] - r
            d[y, x] = dd
            dvar[y, x] = vi[y, x] + rv
            ri[y, x] = r
            sh = abs(dd) > nsigma * np.sqrt(vi[y, x] + rv) + ampfrac * local_peak[y, x]
            sharp[y, x] = sh
            if n < 2 or not ok[y, x]:
                continue
            m = mn[y, x]
            z = np.nan
            za = 0.0
            zl = 0.0
            if m >= 2:
                mr, mrv = _others(mx[y, x], mv[y, x], mref[y, x], mref_var[y, x], m, msum[y, x], msum_var[y, x])
                msig = np.sqrt(mv[y, x] + mrv) * scale
                z = (mx[y, x] - mr) / msig
                slack = matched_ampfrac * mpeak[y, x] / msig
                za = abs(z) - (slack if not np.isnan(slack) else 0.0)
                zl = abs(z) if not np.isnan(z) else 0.0
            if (n == 2 and dd < 0) or (m == 2 and z < 0):
                continue
            high[y, x] = za > nsigma or sh
            low[y, x] = zl > nsigma_low or sh
    return high, low, sharp, d, dvar, ri


def _match_to(img, var, valid, s_in, s_out):
    """Convolve (image, variance) with the Gaussian that takes sigma s_in to s_out (px)."""
    fill = np.where(valid, img, 0.0)
    vfill = np.where(valid, var, 0.0)
    k = np.sqrt(max(s_out**2 - s_in**2, 0.0))
    if k < 0.3:
        return np.where(valid, img, np.nan), np.where(valid, var, np.nan)
    # normalised convolution: missing pixels do not drag the smoothed value down
    wsum = ndimage.gaussian_filter(valid.astype(np.float32), k, mode="constant")
    sm = ndimage.gaussian_filter(fill, k, mode="constant")
    # variance of the normalised convolution: conv(var, g^2) / wsum^2, and g^2 = G(k/sqrt2) / (4 pi k^2)
    g2 = ndimage.gaussian_filter(vfill, k / np.sqrt(2), mode="constant")
    _normalise(sm, g2, wsum, valid, 1.0 / (4 * np.pi * k**2))
    return sm, g2


@numba.njit(cache=True, nogil=True)
def _normalise(sm, g2, wsum, valid, g2_scale):  # pragma: no cover
    """In place: sm / wsum and g2 x g2_scale / wsum^2, NaN where the kernel saw < 95% valid weight
    (near masked pixels the normalised convolution cannot rebuild a star's core)."""
    ny, nx = sm.shape
    for y in range(ny):
        for x in range(nx):
            w = wsum[y, x]
            if valid[y, x] and w > 0.95:
                sm[y, x] = sm[y, x] / w
                g2[y, x] = g2[y, x] * g2_scale / (w * w)
            else:
                sm[y, x] = np.nan
                g2[y, x] = np.nan


# ------------------------------------------------------- homogenisation
def _data_box(w: Exposure):
    """(x0, y0, x1, y1) bounding box of a warp's pixels with data."""
    from .warp import _bbox

    ok = ~masks.is_set(w.mask, "NO_DATA")
    return _bbox(ok) if ok.any() else (0, 0, w.shape[1], w.shape[0])


def _grid_points(box, grid: int):
    x0, y0, x1, y1 = box
    return [(float(x), float(y)) for y in np.linspace(y0, y1 - 1, grid) for x in np.linspace(x0, x1 - 1, grid)]


def homogenization_target(warps: list[Exposure], margin: float = 1.15, grid: int = 5) -> np.ndarray:
    """The common PSF (unit-sum stamp) every warp is matched to before stacking.

    The broadest of the warps' PSF models over a ``grid`` x ``grid`` of points
    (by FWHM), made 8-fold symmetric (so no visit's ellipticity is favoured)
    and convolved with the Gaussian that widens its FWHM by ``margin``: every
    visit is then matched by a convolution, never a deconvolution.
    """
    from .psf import spline_fwhm

    best, best_fwhm = None, -1.0
    for w in warps:
        if w.psf is None:
            continue
        for x, y in _grid_points(_data_box(w), grid):
            st = w.psf.image(x, y)
            f = spline_fwhm(st)
            if f > best_fwhm:
                best, best_fwhm = st, f
    if best is None:
        raise ValueError("no warp carries a PSF to homogenise to")
    sym = np.zeros_like(best)
    for k in range(4):
        r = np.rot90(best, k)
        sym += r + r.T
    sym /= 8
    se = best_fwhm / 2.3548 * np.sqrt(max(margin**2 - 1.0, 0.0))
    pad = int(np.ceil(4 * se))
    t = ndimage.gaussian_filter(np.pad(sym, pad), se, mode="constant") if se > 0.05 else np.pad(sym, pad)
    return t / t.sum()


def matching_kernel(psf: np.ndarray, target: np.ndarray, reg: float = 1e-4) -> np.ndarray:
    """Kernel K (target's size, unit sum) with psf (*) K = target: a Wiener-regularised Fourier ratio.

    The target is broader than ``psf``, so T/P falls at high frequency and the
    regulariser ``reg`` (relative to |P|^2 at zero frequency) only guards
    against exact zeros of P.
    """
    ts = target.shape[0]
    n = int(2 ** np.ceil(np.log2(2 * ts)))

    def ft(a):
        buf = np.zeros((n, n))
        h = a.shape[0] // 2
        buf[:a.shape[0], :a.shape[1]] = a
        return np.fft.rfft2(np.roll(buf, (-h, -h), axis=(0, 1)))

    P, T = ft(psf), ft(target)
    p2 = np.abs(P) ** 2
    k = np.fft.irfft2(T * np.conj(P) / (p2 + reg * p2.max()), s=(n, n))
    h = ts // 2
    k = np.roll(k, (h, h), axis=(0, 1))[:ts, :ts]
    return k / k.sum()


def _kernel_acf(k: np.ndarray, half: int) -> np.ndarray:
    """Autocorrelation sum_j K_j K_(j+lag) of a kernel for |lags| <= half (centre: sum K^2)."""
    from scipy import signal

    a = signal.correlate(k, k, mode="full")
    c = a.shape[0] // 2
    return a[max(c - half, 0):c + half + 1, max(c - half, 0):c + half + 1]


def homogenized_noise_acf(kernels, weights, half: int = 16) -> np.ndarray:
    """Noise autocorrelation ((2 half + 1)^2, centre 1) of a coadd of homogenised warps.

    Each warp's noise is white noise Lanczos-resampled once (the warp) and then
    convolved with its matching kernel K_i, so its autocorrelation is
    R_1 (*) (K_i * K_i); the coadd's is their mix with ``weights`` = w_i^2 x
    pixel variance of the unconvolved warp.  Subtraction uses it instead of
    fitting a resampling-only model, which does not describe smoothed noise.
    """
    from scipy import signal

    from .subtract import resampling_noise_model

    r1 = resampling_noise_model(1.0, half)
    acc = np.zeros((2 * half + 1, 2 * half + 1))
    for k, wt in zip(kernels, weights):
        full = signal.fftconvolve(_kernel_acf(k, 2 * half), r1, mode="same")
        m = full.shape[0] // 2
        acc += wt * full[m - half:m + half + 1, m - half:m + half + 1]
    return acc / acc[half, half]


def homogenize_warp(w: Exposure, target: np.ndarray, rejected: np.ndarray, grid: int = 5,
                    order: int | None = None, taint_frac: float = 0.002) -> tuple[Exposure, np.ndarray, dict]:
    """One warp convolved to the ``target`` PSF: (warp, rejected map, diagnostics).

    The matching kernel is computed on a ``grid`` x ``grid`` of points from the
    warp's PSF model and fitted as a polynomial of the PSF model's ``order``
    (its square, for the variance, of twice the order); the image is convolved
    once per polynomial term.  Input pixels that may not enter the coadd
    (masked planes, rejected artefacts) taint every output pixel that takes
    more than ``taint_frac`` of its kernel weight from them, and those join
    the rejected map.  The PSF becomes
    the target everywhere.  The variance plane is sum K^2 (*) variance times
    the factor the warp's own resampling correlation adds; NOISECOR grows by
    the inverse (a large aperture's variance does not change).
    """
    from . import kernel as kmod

    if w.psf is None:
        raise ValueError("warp has no PSF model to match")
    order = w.psf.order if order is None else order
    box = _data_box(w)
    pts = _grid_points(box, grid)
    ks = np.array([matching_kernel(w.psf.image(x, y), target) for x, y in pts])
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    n = ks.shape[-1]
    # the kernel and its square as polynomials over the box (a PixelPsf's pixel-basis fit)
    kfit, k2fit = fit_pixel_psf(xs, ys, ks, order, box), fit_pixel_psf(xs, ys, ks**2, 2 * order, box)
    kc, k2c, order = kfit.components, k2fit.components, kfit.order
    x0, y0, sx, sy = kfit.x0, kfit.y0, kfit.sx, kfit.sy
    bad = ~_valid(w) | rejected
    img = np.where(np.isfinite(w.image), w.image, 0).astype(np.float32)
    var = np.where(np.isfinite(w.variance) & (w.variance > 0), w.variance, 0).astype(np.float32)
    half = n // 2

    def convolve(a, comps, o):
        conv = kmod.FFTConvolver(a, half)
        out = np.zeros(a.shape, np.float32)
        for m, t in kmod.poly_maps(o, a.shape, x0, y0, sx, sy):
            cm = conv.convolve(comps[m].astype(np.float32))
            out += cm if m == 0 else t * cm
        return out

    image_h = convolve(img, kc, order)
    kc0 = matching_kernel(w.psf.image(x0, y0), target)
    # sum K^2 (*) var holds for independent pixels; a warp's are correlated by its Lanczos resampling
    # (R_1), so a pixel of K (*) warp has sum_lag (K*K)(lag) R_1(lag) x var: that factor over sum K^2
    from .subtract import resampling_noise_model

    hr = 8
    acf_k = _kernel_acf(kc0, hr)
    corr = float((acf_k * resampling_noise_model(1.0, hr)).sum() / acf_k[hr, hr])
    var_h = np.maximum(convolve(var, k2c, k2fit.order), 0) * np.float32(corr)
    # an output pixel is tainted when more than taint_frac of its kernel weight (sum |K|) sits on
    # pixels that may not enter: one interpolated cosmic ray taints a few px, a saturated core more
    a = np.abs(kc0) / np.abs(kc0).sum()
    taint = (convolve(bad.astype(np.float32), a[None], 0) > taint_frac) if bad.any() else bad
    meta = dict(w.metadata)
    sk2 = float((kc0**2).sum())
    # large apertures keep the warp's noise; pixels have sum K^2 x corr of it
    meta["NOISECOR"] = float(meta.get("NOISECOR", 1.0)) / (sk2 * corr)
    diag = {"visit": meta.get("visit"), "taint_frac": float(taint.mean()), "sum_k2": sk2, "kernel": kc0,
            "neg_frac": float(np.max([np.abs(k).sum() - 1 for k in ks]))}
    out = Exposure(MaskedImage(image_h, w.mask.copy(), var_h), wcs=w.wcs, psf=PixelPsf.constant(target),
                   metadata=meta)
    return out, rejected | taint, diag


# ---------------------------------------------------------------- stack
def visit_weights(warps: list[Exposure], weighting: str = "variance", median_var=None) -> np.ndarray:
    """One weight per warp: 1/median variance, or 1/(median variance x FWHM^2) for 'psf'.

    ``median_var``: the warps' median variances, if the caller has them already.
    """
    if median_var is None:
        median_var = [_median_valid_variance(x) for x in warps]
    w = []
    for x, mv in zip(warps, median_var):
        wt = 1.0 / mv
        if weighting == "psf":
            wt /= _sigma_px(x) ** 2
        w.append(wt)
    return np.asarray(w)


def _median_valid_variance(w: Exposure) -> float:
    """Median variance (nJy^2) of a warp's usable pixels (every 7th: plenty for a median); inf if none."""
    v = w.variance[_valid(w)][::7]
    return float(np.median(v)) if v.size else np.inf


@numba.njit(cache=True, nogil=True)
def _accumulate(img, var, msk, rej, wt, reject_bits, nodata_bit, plane_bits, num, vnum, den, cover, fallback_num,
                plane_sum, use):  # pragma: no cover
    """Add one warp of weight ``wt`` to the coadd sums (one pass instead of ~20 numpy passes).

    Used pixels (no reject plane, variance > 0, finite, not rejected) enter the weighted
    mean; every pixel with data enters ``cover`` (and the fallback mean), and the weight of
    each carried mask plane.  ``use`` gets the used map.
    """
    ny, nx = img.shape
    for y in range(ny):
        for x in range(nx):
            m = msk[y, x]
            v = img[y, x]
            u = (m & reject_bits) == 0 and var[y, x] > 0 and np.isfinite(v) and not rej[y, x]
            use[y, x] = u
            if u:
                num[y, x] += wt * v
                vnum[y, x] += wt * wt * var[y, x]
                den[y, x] += wt
            if (m & nodata_bit) == 0:
                cover[y, x] += wt
                fallback_num[y, x] += wt * v
            for p in range(plane_bits.size):
                if m & plane_bits[p]:
                    plane_sum[p, y, x] += wt


def assemble_coadd(warps: list[Exposure], *, weighting: str = "variance", reject: bool = True, nsigma: float = 5.0,
                   nsigma_low: float = 2.5, ampfrac: float = 0.5, matched_ampfrac: float = 0.2,
                   grow: int | None = None, psf_order: int = 1,
                   psf_grid: int = 5, mask_threshold: float = 1.0, sat_threshold: float = 0.1,
                   homogenize: bool = False, homogenize_margin: float = 1.15, target_psf=None,
                   fill_rejected: bool = True, data_id: dict | None = None,
                   rejected: list | None = None) -> Exposure:
    """Weighted-mean coadd of warps on one patch, with artefact rejection and its PSF.

    Returns an Exposure in nJy (MAGZERO 31.4) with variance, mask (NO_DATA
    where nothing contributes; BAD/CR/... where more than ``mask_threshold``
    of the covering inputs, by weight, had them, and always where no input is
    usable, with SUSPECT; the default 1 propagates them only there, as LSST's
    coadds do not carry BAD or CR: the other inputs give the pixel a value; SAT already above
    ``sat_threshold``, as LSST's maskPropagationThresholds), a PixelPsf, and the inputs
    listed in the metadata (INPUT<k> = visit, WEIGHT<k>), and an extra image
    HDU NIMAGE with the number of visits used per pixel.

    ``homogenize``: after artefact rejection every warp is convolved to one
    common PSF (``homogenization_target``, ``homogenize_margin`` x the broadest
    input FWHM), so the coadd PSF is the same wherever fewer visits cover (a
    plain mean's PSF steps there, which no smooth subtraction kernel follows).
    ``target_psf`` (a unit-sum stamp) overrides that choice: give every patch
    of a band the same one (``homogenization_target`` over all their warps), or
    the templates of neighbouring patches would differ in PSF at their seams.
    The visit weights stay those of the unconvolved warps.

    ``fill_rejected``: a visit's pixel that covers the sky but is not used
    (a bad column, cosmic ray, saturated core or rejected artefact) is
    replaced in the mean by the other visits' mean there, convolved to that
    visit's PSF (``fill_rejected_pixels``), so the coadd PSF stays the full
    mix of the visits instead of stepping at every rejected pixel.  The
    variance stays that of the pixels actually used, and NIMAGE counts them.
    """
    warps = [w for w in warps if w.metadata.get("COVERAGE", 1.0) > 0 and (~masks.is_set(w.mask, "NO_DATA")).any()]
    if not warps:
        raise DiapipeError("no warp with data to coadd", None, data_id)
    shape = warps[0].shape
    for w in warps:
        if w.shape != shape:
            raise DiapipeError(f"warp shapes differ ({w.shape} vs {shape})", None, {**(data_id or {}), "visit": w.metadata.get("visit")})
        if abs(float(w.metadata.get("MAGZERO", COADD_MAGZERO)) - COADD_MAGZERO) > 1e-6:
            raise DiapipeError("warp is not on the coadd zero point", None, {**(data_id or {}), "visit": w.metadata.get("visit")})
    mv = np.array([_median_valid_variance(w) for w in warps])
    wts = visit_weights(warps, weighting, median_var=mv)
    if rejected is None:  # (tests pass their own maps to measure what leaks through)
        rejected = find_artefacts(warps, nsigma=nsigma, nsigma_low=nsigma_low, ampfrac=ampfrac,
                                  matched_ampfrac=matched_ampfrac, grow=grow) \
            if reject else [np.zeros(shape, bool) for _ in warps]
    rejfrac = float(np.mean([r.mean() for r in rejected]))  # artefacts only, before homogenisation's taint
    homog = None
    if homogenize and any(w.psf is not None for w in warps):
        target = (np.asarray(target_psf, float) / np.sum(target_psf) if target_psf is not None
                  else homogenization_target(warps, margin=homogenize_margin, grid=psf_grid))
        out, rej2, diags = [], [], []
        for w, rej in zip(warps, rejected):
            if w.psf is None:
                raise DiapipeError("cannot homogenise a warp without a PSF model", None,
                                   {**(data_id or {}), "visit": w.metadata.get("visit")})
            hw, hr, dg = homogenize_warp(w, target, np.asarray(rej, bool), grid=psf_grid)
            out.append(hw)
            rej2.append(hr)
            diags.append(dg)
            log.info("homogenised visit %s: tainted fraction %.4f, sum K^2 %.3f, sum|K|-1 %.3f",
                     dg["visit"], dg["taint_frac"], dg["sum_k2"], dg["neg_frac"])
        warps, rejected = out, rej2
        mv0 = mv  # the unconvolved warps' pixel variances set the noise mix
        mv = np.array([_median_valid_variance(w) for w in warps])
        homog = (target, diags)
    num = np.zeros(shape)
    den = np.zeros(shape)
    vnum = np.zeros(shape)
    cover = np.zeros(shape)  # weight of every input that has data, used or not
    fallback_num = np.zeros(shape)
    plane_sum = np.zeros((len(CARRY_PLANES), *shape))
    plane_bits = np.array([masks.bit(p) for p in CARRY_PLANES], masks.MASK_DTYPE)
    used_maps = []
    for w, wt, rej in zip(warps, wts, rejected):
        use = np.empty(shape, bool)
        _accumulate(np.asarray(w.image, np.float32), np.asarray(w.variance, np.float32),
                    np.asarray(w.mask, masks.MASK_DTYPE), np.asarray(rej, bool), float(wt),
                    masks.MASK_DTYPE(masks.bits(*REJECT_PLANES)), masks.MASK_DTYPE(masks.bit("NO_DATA")),
                    plane_bits, num, vnum, den, cover, fallback_num, plane_sum, use)
        used_maps.append(use)
    plane_w = dict(zip(CARRY_PLANES, plane_sum))
    image = np.zeros(shape)
    variance = np.zeros(shape)
    good = den > 0
    filled_maps = None
    if fill_rejected and len(warps) > 1:
        fnum, fden, filled_maps = fill_rejected_pixels(warps, wts, used_maps, num, den)
        image[good] = (num[good] + fnum[good]) / (den[good] + fden[good])
        meta_fill = float(np.mean([f.sum() for f in filled_maps])) / max(float(good.sum()), 1.0)
    else:
        image[good] = num[good] / den[good]
        meta_fill = 0.0
    # the variance of the pixels used: a filled value is the other visits' own light, no new information
    variance[good] = vnum[good] / den[good] ** 2
    mask = np.zeros(shape, masks.MASK_DTYPE)
    nodata = cover == 0
    masks.set_plane(mask, nodata, "NO_DATA")
    # pixels with data but no usable input (e.g. a saturated core in every visit): plain mean, flagged
    lost = ~good & ~nodata
    image[lost] = fallback_num[lost] / cover[lost]
    variance[lost] = np.inf
    for p in CARRY_PLANES:
        frac = np.where(cover > 0, plane_w[p] / np.where(cover > 0, cover, 1), 0)
        # A core saturated in the sharpest visits is averaged from the others only, while its
        # wings take every visit: no PSF describes that star, so flag it early.
        thr = sat_threshold if p == "SAT" else mask_threshold
        masks.set_plane(mask, (frac > thr) | (lost & (plane_w[p] > 0)), p)
    masks.set_plane(mask, lost, "SUSPECT")
    variance[~np.isfinite(variance)] = 0.0  # on disk: 0 with SUSPECT/NO_DATA set means "no estimate"
    wcs = warps[0].wcs
    psf_maps = used_maps if filled_maps is None else [u | f for u, f in zip(used_maps, filled_maps)]
    psf = coadd_psf(warps, wts, psf_maps, order=psf_order, grid=psf_grid)
    meta = {"band": warps[0].metadata.get("band"), "BUNIT": "nJy", "MAGZERO": COADD_MAGZERO}
    meta.update(data_id or {})
    meta["NVISITS"] = len(warps)
    meta["VISITS"] = ",".join(str(w.metadata.get("visit")) for w in warps)
    for k, (w, wt) in enumerate(zip(warps, wts)):
        meta[f"INPUT{k}"] = int(w.metadata.get("visit", -1))
        meta[f"WEIGHT{k}"] = float(wt / wts.sum())
    mjds = [w.metadata["MJD-OBS"] for w in warps if "MJD-OBS" in w.metadata]
    if mjds:
        meta["MJD-BEG"], meta["MJD-END"] = float(min(mjds)), float(max(mjds))
    meta["WEIGHTNG"] = weighting
    # large-aperture variance / summed pixel variance, from the warps' resampling correlation
    mv = np.where(np.isfinite(mv), mv, 0.0)
    cw = wts / wts.sum()
    ncor = np.array([float(w.metadata.get("NOISECOR", 1.0)) for w in warps])
    meta["NOISECOR"] = float(np.sum(cw**2 * mv * ncor) / max(np.sum(cw**2 * mv), 1e-300))
    meta["REJFRAC"] = rejfrac
    meta["FILLFRAC"] = meta_fill  # filled pixels per visit / coadd pixels with data
    meta["HOMOGEN"] = homog is not None
    extra = []
    if homog is not None:
        acf = homogenized_noise_acf([d["kernel"] for d in homog[1]], wts ** 2 * np.where(np.isfinite(mv0), mv0, 0))
        h = fits.ImageHDU(acf.astype(np.float32), name="NOISEACF")
        h.header["COMMENT"] = "predicted noise autocorrelation (centre 1): homogenisation kernels x one Lanczos warp"
        h.header["NRESAMP"] = (1, "Lanczos resamplings included")
        extra.append(h)
        from .psf import spline_fwhm

        meta["HOMFWHM"] = spline_fwhm(homog[0])  # px, the common PSF's
        meta["HOMNEG"] = max(d["neg_frac"] for d in homog[1])  # sum|K| - 1: 0 for a positive kernel
    if psf is not None:
        yc, xc = np.argwhere(good).mean(axis=0) if good.any() else (shape[0] / 2, shape[1] / 2)
        from .warp import pixel_scale_arcsec, psf_fwhm

        meta["PSFFWHM"] = psf_fwhm(psf, xc, yc)  # px, as characterize's SEEING
        meta["SEEING"] = float(meta["PSFFWHM"] * pixel_scale_arcsec(wcs))
    # NIMAGE: how many visits enter each pixel.  The coadd PSF is exact only where it is constant
    # over a star (a star on a coverage edge or an input's bad column mixes PSFs pixel by pixel).
    nimage = np.sum(used_maps, axis=0).astype(np.int16)
    hdr = wcs.to_header()
    hdr["COMMENT"] = "number of input visits used per pixel"
    nim = fits.ImageHDU(nimage, header=hdr, name="NIMAGE")
    return Exposure(MaskedImage(image, mask, variance), wcs=wcs.deepcopy(), psf=psf, metadata=meta, extra_hdus=[nim] + extra)


#: Side (px) of the cells within which one matching kernel per visit fills its rejected pixels.
FILL_CELL = 256


def fill_rejected_pixels(warps, wts, used_maps, num, den, cell: int = FILL_CELL, reg: float = 1e-4):
    """Sums (fill numerator, fill weight, filled maps) that put each visit back where it was not used.

    For visit i, a pixel with data (not NO_DATA) that the mean did not use gets the mean of the
    other visits used there, O_i = (num - w_i T_i used_i) / (den - w_i used_i), convolved with the
    kernel that takes their PSF (the weighted mean of their PSFs) to visit i's, and enters the
    mean with weight w_i (``reg``: the Wiener term, relative to max |P|^2; the kernel deconvolves
    when visit i is the sharper).  Without it the coadd PSF at a bad column or cosmic ray of one visit is
    the mix of the others, which no smooth subtraction kernel follows: a bright star there leaves
    a residual in every difference image.  One kernel per visit and ``cell`` x ``cell`` cell
    (PSFs at the cell centre); the convolution is normalised over the pixels O_i exists at.
    Where no other visit is used nothing is filled (the pixel stays lost).  Units: those of the
    warps (nJy).
    """
    from scipy import signal

    shape = num.shape
    fnum = np.zeros(shape)
    fden = np.zeros(shape)
    filled = [np.zeros(shape, bool) for _ in warps]
    nod = masks.bit("NO_DATA")
    size = max((w.psf.size for w in warps if w.psf is not None), default=0)
    if size == 0:
        return fnum, fden, filled
    h = size // 2
    tiny = 1e-6 * float(np.max(wts))  # den - w_i is a rounding residue where visit i was alone
    cell_psfs = {}  # (y0, x0) -> every warp's PSF at that cell's centre, evaluated once for all visits

    def psfs_at(y0, x0, yc, xc):
        if (y0, x0) not in cell_psfs:
            cell_psfs[y0, x0] = [_psf_stamp(wj, xc, yc, size) if wj.psf is not None else None for wj in warps]
        return cell_psfs[y0, x0]

    for i, (w, wt, use) in enumerate(zip(warps, wts, used_maps)):
        if w.psf is None:
            continue
        holes = ~use & ((np.asarray(w.mask) & nod) == 0)
        if not holes.any():
            continue
        others_den = den - wt * use
        holes &= others_den > tiny
        for y0 in range(0, shape[0], cell):
            for x0 in range(0, shape[1], cell):
                y1, x1 = min(y0 + cell, shape[0]), min(x0 + cell, shape[1])
                hc = holes[y0:y1, x0:x1]
                if not hc.any():
                    continue
                yc, xc = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2
                # the others' PSF at the cell centre: weighted mean over the visits used in the cell
                psfs = psfs_at(y0, x0, yc, xc)
                acc, tot = np.zeros((size, size)), 0.0
                for j, (pj, wtj, uj) in enumerate(zip(psfs, wts, used_maps)):
                    if j == i or pj is None or not uj[y0:y1, x0:x1].any():
                        continue
                    acc += wtj * pj
                    tot += wtj
                if tot <= 0:
                    continue
                k = matching_kernel(acc / tot, psfs[i], reg=reg)
                by0, by1, bx0, bx1 = max(y0 - h, 0), min(y1 + h, shape[0]), max(x0 - h, 0), min(x1 + h, shape[1])
                ob = others_den[by0:by1, bx0:bx1]
                ok = ob > tiny
                onum = num[by0:by1, bx0:bx1] - wt * np.where(use[by0:by1, bx0:bx1], w.image[by0:by1, bx0:bx1], 0.0)
                o = np.where(ok, onum / np.where(ok, ob, 1.0), 0.0)
                cv = signal.fftconvolve(o, k, mode="same")
                cw = signal.fftconvolve(ok.astype(float), k, mode="same")
                sub = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
                cvs, cws = cv[sub], cw[sub]
                # normalised convolution; skip where the kernel's support is mostly missing
                fill = hc & (cws > 0.5)
                val = cvs[fill] / cws[fill]
                fnum[y0:y1, x0:x1][fill] += wt * val
                fden[y0:y1, x0:x1][fill] += wt
                filled[i][y0:y1, x0:x1][fill] = True
    return fnum, fden, filled


def _psf_stamp(w: Exposure, x: float, y: float, size: int) -> np.ndarray:
    """The warp's PSF at (x, y), zero-padded to size x size (the largest PSF stamp of a coadd's warps)."""
    st = w.psf.image(x, y)
    return np.pad(st, (size - st.shape[0]) // 2) if st.shape[0] != size else st


def coadd_psf(warps, wts, used_maps, order: int = 1, grid: int = 5) -> PixelPsf | None:
    """PixelPsf of the coadd: at each sample point, the weighted mean of the PSFs of the visits used there."""
    shape = warps[0].shape
    any_used = np.zeros(shape, bool)
    for u in used_maps:
        any_used |= u
    if not any_used.any() or all(w.psf is None for w in warps):
        return None
    # sample where inputs are used; a 5x5 box median of coverage avoids sampling in artefact holes
    ys_, xs_ = np.nonzero(any_used)
    box = (xs_.min(), ys_.min(), xs_.max() + 1, ys_.max() + 1)
    size = max(w.psf.size for w in warps if w.psf is not None)
    px, py, stamps = [], [], []
    for yv in np.linspace(box[1], box[3] - 1, grid):
        for xv in np.linspace(box[0], box[2] - 1, grid):
            xi, yi = int(round(xv)), int(round(yv))
            acc = np.zeros((size, size))
            tot = 0.0
            for w, wt, u in zip(warps, wts, used_maps):
                # the visit counts at this point if it is used in most of the PSF-sized neighbourhood
                y0, y1 = max(0, yi - 3), min(shape[0], yi + 4)
                x0, x1 = max(0, xi - 3), min(shape[1], xi + 4)
                if w.psf is None or u[y0:y1, x0:x1].mean() < 0.5:
                    continue
                acc += wt * _psf_stamp(w, xi, yi, size)
                tot += wt
            if tot > 0:
                stamps.append(acc / tot)
                px.append(xi)
                py.append(yi)
    if not stamps:
        return None
    return fit_pixel_psf(np.array(px, float), np.array(py, float), stamps, order, box)


# --------------------------------------------------- template for science
def template_for(calexp: Exposure, coadds: list[Exposure], *, psf_order: int = 2, psf_grid: int = 5,
                 grid_step: int = 32, mask_kernel: str = "lanczos", path=None) -> Exposure:
    """The coadd(s) resampled onto a science calexp's pixel grid, in the calexp's electrons.

    Where patches overlap, each pixel comes from the patch whose centre is
    nearest (so the seams follow the patch inner boxes).  The template's
    image is on the calexp's zero point (MAGZERO copied; BUNIT electron), its
    variance scaled alike, mask NO_DATA where no coadd covers, and its PSF is
    the coadd PSF resampled to the calexp grid.  DiapipeError if no coadd
    covers the calexp.
    """
    if calexp.wcs is None or "MAGZERO" not in calexp.metadata:
        raise DiapipeError("science calexp needs a WCS and MAGZERO to get a template", path, calexp.data_id)
    scale = photometric_scale(COADD_MAGZERO, float(calexp.metadata["MAGZERO"]))
    shape = calexp.shape
    # nearest patch centre, per calexp pixel (on a coarse grid, then nearest-neighbour upsampled)
    step = 16
    gy, gx = np.mgrid[0:shape[0]:step, 0:shape[1]:step]
    ra, dec = calexp.wcs.all_pix2world(gx.ravel().astype(float), gy.ravel().astype(float), 0)
    dist = []
    for c in coadds:
        cx, cy = c.wcs.wcs_world2pix(ra, dec, 0)
        ny, nx = c.shape
        d = np.maximum(np.abs(cx - (nx - 1) / 2) / nx, np.abs(cy - (ny - 1) / 2) / ny)
        dist.append(d.reshape(gx.shape))
    order = np.argsort(np.array(dist), axis=0) if dist else None
    out = None
    sources = []
    ncors = []
    for rank in range(len(coadds)):
        for k, c in enumerate(coadds):
            pri = (order[rank] == k)
            pri = np.repeat(np.repeat(pri, step, axis=0), step, axis=1)[: shape[0], : shape[1]]
            if not pri.any():
                continue
            out, filled, ncor = resample_exposure(c, calexp.wcs, shape, scale=scale, grid_step=grid_step,
                                                  mask_kernel=mask_kernel, out=out, priority=pri)
            if filled.any():
                sources.append((c, filled))
                ncors.append((ncor * float(c.metadata.get("NOISECOR", 1.0)), filled.sum()))
    if out is None or not sources:
        raise DiapipeError("no template coadd covers this calexp", path, calexp.data_id)
    # merge the per-source filled maps by coadd for the PSF
    by_coadd = {}
    for c, f in sources:
        by_coadd.setdefault(id(c), [c, np.zeros(shape, bool)])[1][...] |= f
    out.psf = warp_psf([tuple(v) for v in by_coadd.values()], calexp.wcs, shape, order=psf_order, grid=psf_grid)
    meta = dict(calexp.data_id)
    meta["BUNIT"] = "electron"
    meta["MAGZERO"] = float(calexp.metadata["MAGZERO"])
    meta["TMPLSCAL"] = scale
    meta["PATCHES"] = ",".join(str(c.metadata.get("patch", "?")) for c in coadds)
    meta["VISITS"] = ";".join(str(c.metadata.get("VISITS", "")) for c in coadds)
    meta["COVERAGE"] = float(np.mean(~masks.is_set(out.mask, "NO_DATA")))
    # large-aperture variance / summed pixel variance; approximate (the coadd's own correlation times this resampling's)
    meta["NOISECOR"] = float(sum(c * n for c, n in ncors) / sum(n for _, n in ncors))
    if out.psf is not None:
        from .warp import psf_fwhm

        meta["PSFFWHM"] = psf_fwhm(out.psf, shape[1] / 2, shape[0] / 2)
    acfs = [h for c in coadds for h in c.extra_hdus if h.name == "NOISEACF"]
    if acfs:
        out.extra_hdus = [resampled_acf(acfs[0])]
    out.metadata = meta
    return out


def resampled_acf(hdu) -> fits.ImageHDU:
    """A NOISEACF HDU after one more Lanczos resampling (coadd -> calexp grid)."""
    from scipy import signal

    from .subtract import resampling_noise_model

    a = np.asarray(hdu.data, float)
    half = a.shape[0] // 2
    out = signal.fftconvolve(a, resampling_noise_model(1.0, half), mode="same")
    out /= out[half, half]
    h = fits.ImageHDU(out.astype(np.float32), header=hdu.header.copy(), name="NOISEACF")
    h.header["NRESAMP"] = (int(hdu.header.get("NRESAMP", 0)) + 1, "Lanczos resamplings included")
    return h


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("coadd", help="coadd warps of one patch and band into a template")
    p.add_argument("--mode", default="best_seeing", choices=["list", "mjd_range", "best_seeing"])
    p.add_argument("--visits", type=int, nargs="*", default=None)
    p.add_argument("--mjd-min", type=float, default=None)
    p.add_argument("--mjd-max", type=float, default=None)
    p.add_argument("--n-best", type=int, default=5)
    p.add_argument("--weighting", default="variance", choices=["variance", "psf"])
    p.add_argument("output")
    p.add_argument("warps", nargs="+")
    p.set_defaults(func=_cli)
    t = subparsers.add_parser("template", help="resample template coadds onto a science calexp")
    t.add_argument("output")
    t.add_argument("calexp")
    t.add_argument("coadds", nargs="+")
    t.set_defaults(func=_cli_template)


def selection_from_config(block: dict) -> dict:
    """The template-selection arguments of a ``coadd`` config block (for select_visits' callers)."""
    return {"mode": block["select"], "visits": block["visits"] or None, "mjd_min": block["mjd_min"],
            "mjd_max": block["mjd_max"], "n_best": block["n_best"]}


def coadd_from_files(warp_paths, output, *, mode="best_seeing", visits=None, mjd_min=None, mjd_max=None, n_best=5,
                     data_id=None, **kwargs) -> Exposure:
    """Read warps, select template visits, coadd and write (used by the rule and the CLI)."""
    warps = [Exposure.read(p) for p in warp_paths]
    with_data = [w for w in warps if w.metadata.get("COVERAGE", 1.0) > 0]
    cands = [describe_warp(w) for w in with_data]
    band = (data_id or {}).get("band")
    chosen = select_visits(cands, mode=mode, visits=visits, mjd_min=mjd_min, mjd_max=mjd_max, n_best=n_best,
                           band=band, data_id=data_id)
    use = [w for w in with_data if int(w.metadata["visit"]) in chosen]
    log.info("coadd %s: %d warps with data, selected visits %s", data_id, len(with_data), chosen)
    co = assemble_coadd(use, data_id=data_id, **kwargs)
    co.write(output)
    return co


def target_psf_files(warp_paths_by_patch: dict, output, *, mode="best_seeing", visits=None, mjd_min=None,
                     mjd_max=None, n_best=5, margin: float = 1.15, grid: int = 5, band=None) -> np.ndarray:
    """The band's common homogenisation PSF from every patch's selected warps; written as a FITS stamp.

    One target for all patches, so templates of neighbouring patches have the
    same PSF at their seams.  Patches whose selection is empty are skipped.
    """
    from .fileio import write_fits
    from .psf import spline_fwhm

    chosen = []
    for patch, paths in warp_paths_by_patch.items():
        warps = [w for w in (Exposure.read(p) for p in paths) if w.metadata.get("COVERAGE", 1.0) > 0]
        try:
            keep = select_visits([describe_warp(w) for w in warps], mode=mode, visits=visits, mjd_min=mjd_min,
                                 mjd_max=mjd_max, n_best=n_best, band=band, data_id={"band": band, "patch": patch})
        except DiapipeError:
            continue
        chosen += [w for w in warps if int(w.metadata["visit"]) in keep and w.psf is not None]
    if not chosen:
        raise DiapipeError("no selected template warp with a PSF to homogenise to", None, {"band": band})
    target = homogenization_target(chosen, margin=margin, grid=grid)
    hdu = fits.PrimaryHDU(target.astype(np.float32))
    hdu.header["BAND"] = band
    hdu.header["HOMFWHM"] = (spline_fwhm(target), "px, FWHM of the common PSF")
    hdu.header["MARGIN"] = (margin, "FWHM factor over the broadest input PSF")
    write_fits(fits.HDUList([hdu]), output)
    return target


def template_files(calexp_path, coadd_paths, output, skymap=None, **kwargs) -> Exposure:
    """Read a calexp and the coadds of the patches it may overlap; write its template_exp.

    ``coadd_paths`` is a list, or a dict {patch: path}; with a dict and a
    skymap only the coadds of patches the calexp's fitted WCS overlaps are read.
    """
    cx = Exposure.read(calexp_path)
    if isinstance(coadd_paths, dict):  # {patch: path}
        paths = list(coadd_paths.values())
        if skymap is not None and cx.wcs is not None:
            want = set(skymap.require_overlap(cx.wcs, cx.shape, path=calexp_path, data_id=cx.data_id))
            paths = [p for k, p in coadd_paths.items() if int(k) in want] or paths
    else:
        paths = list(coadd_paths)
    coadds = [Exposure.read(p) for p in paths]
    t = template_for(cx, coadds, path=calexp_path, **kwargs)
    t.write(output)
    return t


def _cli(args) -> int:
    coadd_from_files(args.warps, args.output, mode=args.mode, visits=args.visits, mjd_min=args.mjd_min,
                     mjd_max=args.mjd_max, n_best=args.n_best, weighting=args.weighting)
    return 0


def _cli_template(args) -> int:
    cx = Exposure.read(args.calexp)
    t = template_for(cx, [Exposure.read(p) for p in args.coadds], path=args.calexp)
    t.write(args.output)
    return 0
