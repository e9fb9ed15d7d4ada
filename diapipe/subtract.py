"""Image subtraction: calexp - template -> diffexp.

Methods
-------
``al``   Alard-Lupton PSF matching (``diapipe.kernel``): a spatially varying
         kernel and differential background fitted on star stamps and applied
         to the sharper image (one FFT convolution per spatial term), then
         optionally the decorrelation afterburner of Reiss & Lupton (2016),
         as LSST ip_diffim's DecorrelateALKernelTask.
``zogy`` Zackay, Ofek & Gal-Yam (2016) (``diapipe.zogy``), on tiles with the
         PSF models evaluated per tile and the flux ratio from the AL stamp
         fit; also writes S_corr (HDU SCORR).  ZOGY assumes perfect
         registration: the residual shift that the AL kernel's centroid
         measures (ZOGYDX, ZOGYDY at the centre) is removed from the template
         per tile by a Fourier phase ramp, which keeps its noise white.

Conventions
-----------
* The difference is science - template in the science image's flux units
  (electrons for calexps): the kernel sum is the flux ratio science/template.
* Convolution direction (header CONVDIR): ``template`` convolves the
  template with K (template (*) K ~ science); ``science`` convolves the
  science image (science (*) K ~ template, the difference is divided by the
  kernel sum).  We never deconvolve: if the requested image is the sharper
  one by more than ``flip_tolerance``, the other one is convolved and
  CONVFLIP=T records it.
* Variance: var_sci + K^2 (*) var_tmpl (template mode), then corrected for
  the decorrelation filter.  With ``empirical_noise`` (default) each input's
  blank-sky noise is first measured against its variance plane
  (``measure_noise``): the plane is rescaled (SVARSCAL, TVARSCAL, as LSST's
  ScaleVarianceTask) and the pixel correlation, fitted by the noise model of
  n Lanczos-3 resamplings (SNRESAMP, TNRESAMP; ~2 for a template coadd
  resampled onto the calexp), enters the convolved image's variance
  (sum_ij K_i K_j cov_ij instead of K^2 (*) var) and the afterburner.  Mask: science mask OR template mask grown by the
  kernel footprint; pixels lacking data in either input are NO_DATA, with
  NaN image and variance.  Pixels within a kernel half-width of the border
  are EDGE.
* Diagnostics: extra HDUs KERNEL (spatial kernel components, PixelPsf-like
  layout), KGRID (kernel images on a 3x3 grid), STAMPS (stamps used and
  rejected, with chi2), KSUMMAP (flux-ratio map on a coarse grid), SCORR
  (ZOGY only); header KSUM, FLUXRAT, KCHI2, NSTAMP, NREJ, KORDER, BGORDER,
  KFALLBK, CONVDIR, CONVREQ, CONVFLIP, PRECONV, DECORR, SUBMETH, KSIZE,
  KSIGMAS, PSFSIGS, PSFSIGT, OVERLAP, NGOODPIX, DIFFRMS, SUBTIME, EMPNOISE,
  SVARSCAL, TVARSCAL, SNOISCOR, TNOISCOR, SNRESAMP, TNRESAMP, DBGMED,
  DBGRMS, DBGNCELL, DBGORDER, ...
* Residual background (``residual_background``): the stamp fit's differential
  background sees only bright-star stamps, where it trades off against the
  kernel wings; on the default survey it left the diffexps on a -0.3 to -2
  e-/px pedestal.  After the difference is formed, a polynomial of order
  ``background_order`` is fitted to the clipped means of a coarse mesh of
  blank-sky cells (no bad/EDGE pixels, no DETECTED/INJECTED footprints, no
  smoothed-S/N > 4 source pixels of either input) and subtracted: DBGMED is
  its median over the good pixels [image units/px], DBGRMS the scatter of
  the cell levels about it.
* When the science PSF is the sharper one (and ``template`` was asked for)
  the science image is convolved instead (CONVFLIP=T, default); or, with
  ``sharper_science: preconvolve``, it is first convolved with its own PSF
  and the template matched to that (PRECONV=T, ip_diffim's way).
* Errors in variables (``debias_noise``): the convolved image's own noise
  enters the stamp normal equations and shrinks the kernel, its sum when the
  noisy science image is convolved, its sharp part when the seeing is nearly
  equal.  Its expected term is subtracted from each stamp's matrix, floored
  at half the raw curvature in every direction so that faint stamps cannot
  make it indefinite (``kernel.debiased``); the local fits that judge stamps
  for clipping use the raw matrices.

Stamps: isolated stars found in both images, unsaturated, spread over the
detector.  A masked pixel in a stamp does not reject it: masked pixels of the
image matched to, and pixels within the kernel's reach of a masked pixel of
the convolved image, get zero weight; a stamp goes only when its star's core
or more than a tenth of it is left without weight.  (Rejecting every stamp
with a masked pixel lost the brightest stars: at 0.2 % hot pixels nearly
every kernel-extended window holds one.)

Spatial order: ``spatial_order`` (4) is the most the kernel may vary; with
``spatial_order_cv`` (default) each order 0..spatial_order is fitted to 3/4 of
the stamps and scored on the fourth (4 folds, median reduced chi2, header
KCVCHI<order>), and the order used (KORDER) is the highest one within
``spatial_order_cv_tolerance`` (5%) of the best score.  The held-out chi2 is
ruled by the many faint stamps, which barely tell the orders apart (on the
default survey the orders 0-4 score within 1-4% of each other), while the
brightest stars need the spatial detail (their own local kernels differ from a
low-order model by more than their noise, as much where the template's coverage
is constant as where it steps; docs/subtract.md): on the 16 default-survey
diffexps the 15x15 boxes around the 50 brightest stars have std(D/sigma) within
2% of 1 on 16/16 with this rule up to order 4 (order 4 on 15, 3 on the one with
too few stamps for 4), 13/16 up to order 3 and 7/16 at a fixed order 2 (with the
debiased normal equations; before them 15/16, 12/16 and 7/16, and 4/16 with the lowest
order within 0.5% of the best, the earlier rule).  An order that predicts clearly worse
is refused: on a 512^2 synthetic pair where the noisy science image is convolved,
order 4 scores 10% above the best held-out chi2 and order 2 is used (star boxes 0.987,
kernel sum 0.798 for a true flux ratio of 0.8).

Fallbacks (documented, written to the header as KFALLBK): with too few
usable stars the spatial order is lowered step by step ("order<N>"); with
fewer than ``min_stamps`` stars the kernel is derived from the two PSF
models ("psfmodel"), its sum from the zero points (MAGZERO) if both images
carry one.  No overlap between the images, or missing PSFs with no stars to
measure them, is a DiapipeError naming the dataId.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import numba
import numpy as np
import scipy.fft as sfft
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage

from . import kernel as kmod
from . import masks
from .exposure import Exposure, MaskedImage
from .fileio import DiapipeError
from .psf import PixelPsf, poly_design, poly_terms
from .stats import nanmedian_last

log = logging.getLogger("diapipe.subtract")


@dataclass
class SubtractConfig:
    """Settings of the subtract stage (the ``subtract:`` config block; units in pixels unless said)."""

    method: str = "al"  # al | zogy
    convolve: str = "template"  # template | science | auto
    flip_tolerance: float = 0.03  # relative PSF-sigma margin before refusing to deconvolve
    sharper_science: str = "convolve_science"  # convolve_science | preconvolve: what to do when the science PSF is sharper
    decorrelate: bool = True
    decorrelation_max_gain: float = 100.0  # cap on the afterburner's gain at high spatial frequency (preconvolution only)
    empirical_noise: bool = True  # measure each input's blank-sky variance scale and noise correlation, and propagate them
    basis: str = "alard-lupton"  # alard-lupton | delta
    basis_degrees: list = field(default_factory=lambda: [4, 2, 2])
    basis_beta: float = 2.0
    basis_min_sigma: float = 0.7
    kernel_size_sigma: float = 4.0  # kernel half-size in units of the larger PSF sigma
    kernel_half_min: int = 5
    kernel_half_max: int = 17
    spatial_order: int = 4
    spatial_order_cv: bool = True  # choose 0..spatial_order by held-out stamp chi2 (kernel.heldout_chi2)
    spatial_order_cv_tolerance: float = 0.05  # the highest order whose held-out chi2 is within this of the best
    background_order: int = 1
    constant_ksum: bool = True
    stamp_half_size_sigma: float = 5.0  # stamp half-size in units of the larger PSF sigma (>= kernel half)
    stamp_min_snr: float = 20.0
    max_stamps: int = 250
    stamps_per_cell: int = 2
    cell_size: int = 0  # 0: automatic, so that the cells can hold max_stamps
    saturation_fraction: float = 0.8
    isolation_fraction: float = 0.2  # reject a stamp with a neighbour brighter than this fraction of its star
    min_stamps: int = 5
    stamps_per_term: float = 3.0
    clip_sigma: float = 10.0
    max_iter: int = 3
    regularization: float = 0.0
    debias_noise: str = "auto"  # auto | on | off: remove the convolved image's noise term from the normal equations (auto: with the Alard-Lupton basis, or when the science image is the convolved one)
    min_overlap_fraction: float = 0.05
    zogy_tile_size: int = 512  # ZOGY tile side [px] (PSFs evaluated per tile); 0: one tile

    @classmethod
    def from_dict(cls, d: dict | None) -> "SubtractConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown subtract settings {sorted(unknown)}")
        if isinstance(d.get("debias_noise"), bool):  # YAML 1.1 reads an unquoted on / off as true / false
            d["debias_noise"] = "on" if d["debias_noise"] else "off"
        return cls(**d)


# ---------------------------------------------------------------- PSF measurement
def measure_psf(image, variance=None, mask=None, size: int | None = None, order: int = 0,
                nsigma: float = 30.0, saturation: float | None = None) -> PixelPsf:
    """PSF from the image itself: bright isolated stars, recentred and median-stacked.

    For files that carry no PSF model (plain FITS from other pipelines).
    Returns a PixelPsf of spatial ``order`` (0 = constant).  Raises
    ValueError when fewer than 3 usable stars are found.
    """
    img = np.asarray(image, float)
    bad = ~np.isfinite(img)
    if mask is not None:
        bad |= masks.is_set(mask, *masks.BAD_PLANES)
    img = np.where(bad, 0.0, img)
    sig = np.sqrt(np.median(variance[~bad])) if variance is not None else _robust_sigma(img[~bad])
    # first pass: rough size from a few stars
    half = 12 if size is None else size // 2
    xs, ys, pk = kmod.find_peaks(img, sig, bad, nsigma, half + 3)
    if saturation is not None:
        keep = pk < 0.8 * saturation
        xs, ys, pk = xs[keep], ys[keep], pk[keep]
    if len(xs) < 3:
        raise ValueError(f"only {len(xs)} stars above {nsigma} sigma to measure a PSF")
    from scipy.spatial import cKDTree

    xf, yf, _ = kmod.find_peaks(img, sig, bad, 5.0, 2)
    tree = cKDTree(np.c_[xf, yf])
    iso = np.array([len(tree.query_ball_point((x, y), half)) <= 1 for x, y in zip(xs, ys)])
    xs, ys, pk = xs[iso], ys[iso], pk[iso]
    order_idx = np.argsort(-pk)[:200]
    stamps, pos = [], []
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    for n in order_idx:
        x, y = xs[n], ys[n]
        win = (slice(y - half, y + half + 1), slice(x - half, x + half + 1))
        st = img[win]
        if bad[win].any():
            continue
        edge = np.r_[st[0], st[-1], st[:, 0], st[:, -1]]
        st = st - np.median(edge)
        core = st * (xx**2 + yy**2 <= 9)
        if core.sum() <= 0:
            continue
        dx = (core * xx).sum() / core.sum()
        dy = (core * yy).sum() / core.sum()
        if abs(dx) > 1.5 or abs(dy) > 1.5:
            continue
        st = ndimage.shift(st, (-dy, -dx), order=3, mode="constant")
        s = st.sum()
        if s <= 0:
            continue
        stamps.append(st / s)
        pos.append((x + dx, y + dy))
    if len(stamps) < 3:
        raise ValueError(f"only {len(stamps)} isolated unmasked stars to measure a PSF")
    stamps = np.array(stamps)
    med = np.median(stamps, axis=0)
    # reject stars unlike the median (galaxies, blends)
    dev = np.sqrt(((stamps - med) ** 2).sum(axis=(1, 2)))
    ok = dev <= np.median(dev) + 3 * 1.4826 * np.median(np.abs(dev - np.median(dev)))
    stamps, pos = stamps[ok], np.array(pos)[ok]
    ny, nx = img.shape
    x0, y0, sx, sy = (nx - 1) / 2, (ny - 1) / 2, nx / 2, ny / 2
    if order > 0 and len(stamps) >= 6 * len(poly_terms(order)):
        A = poly_design(pos[:, 0], pos[:, 1], order, x0, y0, sx, sy)
        coef, *_ = np.linalg.lstsq(A, stamps.reshape(len(stamps), -1), rcond=None)
        comps = coef.reshape(-1, *stamps.shape[1:])
        return PixelPsf(comps, order, x0, y0, sx, sy)
    psf = np.median(stamps, axis=0)
    psf = np.clip(psf, 0, None) if psf.min() < -0.01 * psf.max() else psf
    return PixelPsf(psf[None] / psf.sum(), 0, x0, y0, sx, sy)


def sky_median(values, good=None, step: int = 3) -> float:
    """Median of an image over ``good`` pixels, on a (step x step)-subsampled grid (a sky level needs no more)."""
    v = np.asarray(values)[::step, ::step]
    if good is not None:
        v = v[np.asarray(good)[::step, ::step]]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def _robust_sigma(values) -> float:
    v = np.asarray(values, float).ravel()
    if v.size > 250_000:  # a robust scatter needs no more pixels than that (0.2% precision)
        v = v[:: (v.size // 250_000) | 1]  # an odd stride: not one column in every 2^k
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan")
    med = np.median(v)
    return float(1.4826 * np.median(np.abs(v - med)))


# ---------------------------------------------------------------- residual background
#: Pixels of the science (DETECTED/INJECTED) and template (DETECTED) footprints, and masked
#: pixels, are not blank sky for the residual-background fit.
BLANK_EXCLUDE = ("DETECTED", "DETECTED_NEGATIVE", "INJECTED", "INTRP")
#: Smoothed S/N above which an input's pixels are source light, not blank sky (see subtract()).
BLANK_NSIGMA = 4.0


def source_mask(image, variance, good, sigma: float, nsigma: float = BLANK_NSIGMA, grow: int = 0, cell: int = 64):
    """Pixels of sources in ``image``: smoothed (Gaussian of ``sigma`` px) S/N above ``nsigma``, grown by ``grow`` px.

    For the blank-sky selection of the residual background: a detection mask
    misses the faint wings of stars, where a PSF-matching residual is not sky.
    The local sky is the median of ``cell``-px cells; the noise of the smoothed
    image is sqrt(variance) / (2 sqrt(pi) sigma) (white noise).  The smoothing
    and growing run on ``b`` x ``b`` binned pixels (b = floor(sigma), so the
    binned Gaussian keeps sigma/b >= 1 px): the mask only selects blank-sky
    mesh cells, and at 4096^2 the full-resolution filters took 5 s.
    """
    ny, nx = image.shape
    cy, cx = -(-ny // cell), -(-nx // cell)
    b = int(np.clip(np.floor(sigma), 1, cell // 2))
    while cell % b:
        b -= 1
    pad = np.zeros((cy * cell, cx * cell), np.float32)
    ok = np.zeros(pad.shape, bool)
    ok[:ny, :nx] = good & np.isfinite(image)
    np.copyto(pad[:ny, :nx], image, where=ok[:ny, :nx], casting="unsafe")
    # binned mean of the good pixels (NaN where a bin has none)
    tot = sum(pad[i::b, j::b] for i in range(b) for j in range(b))
    n = sum(ok[i::b, j::b].astype(np.float32) for i in range(b) for j in range(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        binned = (tot / n).astype(np.float32)
    hb = cell // b
    sky = nanmedian_last(binned.reshape(cy, hb, cx, hb).transpose(0, 2, 1, 3).reshape(cy, cx, -1))
    sky = np.where(np.isfinite(sky), sky, np.nanmedian(sky) if np.isfinite(sky).any() else 0.0)
    binned = np.nan_to_num(binned - np.repeat(np.repeat(sky.astype(np.float32), hb, 0), hb, 1))
    sm = ndimage.gaussian_filter(binned, sigma / b)
    # a mean of b^2 white pixels smoothed by sigma/b binned px has the full-resolution noise
    noise = np.sqrt(np.maximum(sky_median(variance, good), 1e-12)) / (2 * np.sqrt(np.pi) * sigma)
    src = sm > nsigma * noise
    if grow > 0:
        gb = int(np.ceil(grow / b))
        src = ndimage.maximum_filter(src.view(np.uint8), size=2 * gb + 1).astype(bool)
    return np.repeat(np.repeat(src, b, 0), b, 1)[:ny, :nx]


@numba.njit(cache=True, nogil=True)
def _cell_levels(diff, ok, cell, min_blank, level_map, n_map):  # pragma: no cover
    """Per mesh cell: the mean of the ``ok`` pixels within 4 sigma (MAD) of their median.

    A mean, not the median: photon noise is skewed (gamma = 1/sqrt(N_e-)), and the median of
    a skewed distribution sits gamma/6 sigma below its mean (-0.009 sigma at 300 e- of sky
    and 5 e- read noise).  Detection and PSF photometry are linear in the pixels, so the
    level they need removed is the mean; a median left the default survey's differences
    on a +0.004 sigma/px pedestal, +0.07 sigma in the matched filter.  The clipping keeps
    the robustness to the sources that the blank-sky mask misses; at 4 sigma, not 3, because
    clipping a skewed distribution symmetrically cuts more of its long side (-0.0023 sigma
    at 3, -0.0002 at 4, on that noise).
    Cells with fewer than max(50, min_blank x cell area) pixels stay NaN (one pass over
    the image instead of ~3 numpy medians per cell).
    """
    ny, nx = diff.shape
    buf = np.empty(cell * cell, np.float32)
    dev = np.empty(cell * cell, np.float32)
    for cy in range(level_map.shape[0]):
        for cx in range(level_map.shape[1]):
            y0, x0 = cy * cell, cx * cell
            y1, x1 = min(y0 + cell, ny), min(x0 + cell, nx)
            n = 0
            for y in range(y0, y1):
                for x in range(x0, x1):
                    if ok[y, x]:
                        buf[n] = diff[y, x]
                        n += 1
            if n < max(50, min_blank * (y1 - y0) * (x1 - x0)):
                continue
            v = buf[:n]
            med = np.median(v)
            for i in range(n):
                dev[i] = abs(v[i] - med)
            sig = 1.4826 * np.median(dev[:n])
            level = med
            if sig > 0:
                m = 0
                tot = 0.0
                for i in range(n):
                    if abs(v[i] - med) < 4.0 * sig:
                        tot += v[i]
                        m += 1
                level = tot / m
                n = m
            level_map[cy, cx] = level
            n_map[cy, cx] = n


def residual_background(diff, good, order: int, cell: int = 0, min_blank: float = 0.2, clip: float = 4.0):
    """Differential background left in a difference image, measured on its blank sky.

    The kernel fit's background polynomial is fitted on bright-star stamps only,
    where it is degenerate with the kernel wings and the stars' halos: on the
    default survey it left the diffexps on a -0.3 to -0.9 e-/px pedestal (with
    bogus gradients of up to 2 e-/px at the detector edges), which a PSF fit
    without a sky term turns into -1..-3% of every source's flux.  Here, as the
    SExtractor / LSST background mesh: the clipped mean of the blank pixels (``good``)
    of each cell of a coarse mesh (``_cell_levels``: a mean, as LSST's MEANCLIP), then a polynomial of ``order`` in x, y fitted
    to the cell levels (weighted by their pixel counts, outlying cells clipped
    at ``clip`` robust sigma).

    Returns (map (image units, float32, to be subtracted), info dict with
    ``median`` (of the map over ``good``), ``rms`` (robust scatter of the cell
    levels about the fit), ``ncell`` (cells used), ``order`` (used)), or
    (None, info) when there is too little blank sky.
    """
    ny, nx = diff.shape
    cell = cell or int(np.clip(min(nx, ny) // 16, 32, 256))
    ok = good & np.isfinite(diff)
    cy, cx = -(-ny // cell), -(-nx // cell)
    level_map = np.full((cy, cx), np.nan)
    n_map = np.zeros((cy, cx), np.int64)
    _cell_levels(np.asarray(diff, np.float32), ok, cell, min_blank, level_map, n_map)
    use_cell = np.isfinite(level_map)
    iy, ix = np.nonzero(use_cell)
    xs = ix * cell + (np.minimum((ix + 1) * cell, nx) - ix * cell - 1) / 2.0
    ys = iy * cell + (np.minimum((iy + 1) * cell, ny) - iy * cell - 1) / 2.0
    levels, ns = level_map[use_cell], n_map[use_cell]
    info = {"median": 0.0, "rms": float("nan"), "ncell": len(levels), "order": -1}
    if not len(levels):
        return None, info
    # the order the cells can carry: 3 cells per polynomial term, else a lower order
    while order > 0 and len(levels) < 3 * len(poly_terms(order)):
        order -= 1
    x0, y0, sx, sy = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    A = poly_design(xs, ys, order, x0, y0, sx, sy)
    use = np.ones(len(levels), bool)
    w = np.sqrt(ns.astype(float))
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(A[use] * w[use, None], levels[use] * w[use], rcond=None)
        res = levels - A @ coef
        s = 1.4826 * np.median(np.abs(res[use])) if use.sum() > 2 else 0.0
        new = np.abs(res) <= clip * s if s > 0 else use
        if new.sum() < len(coef) or np.array_equal(new, use):
            break
        use = new
    bmap = np.zeros(diff.shape, np.float32)
    for m, t in kmod.poly_maps(order, diff.shape, x0, y0, sx, sy):
        bmap += np.float32(coef[m]) * t
    info.update(median=sky_median(bmap, good), rms=float(1.4826 * np.median(np.abs(res[use]))),
                ncell=int(use.sum()), order=order)
    return bmap, info


# ---------------------------------------------------------------- empirical noise
#: Half-size [px] of the noise autocorrelation model: two Lanczos-3 resamplings (warp, then
#: coadd -> calexp grid) correlate pixels up to ~8 px apart (|rho| ~ 0.005-0.03 at 3-4 px,
#: which the afterburner, amplifying high frequencies, still feels at the percent level).
NOISE_CORR_HALF = 8
#: Largest rms difference (short lags) between a measured noise autocorrelation and the
#: resampling model for the model to be used (our templates: ~0.005).
MAX_MODEL_MISFIT = 0.03
# neighbour noise correlation above which 'blank sky' is taken to be source light, not noise
MAX_NOISE_RHO1 = 0.5
#: At most this many pixels (a central window) enter the noise measurement: the
#: correlation is local, and 256k px give the variance scale to 0.3% (sqrt(2/N)) and each
#: correlation coefficient to ~0.002.
NOISE_MAX_PIXELS = 1 << 18


def _robust_var(values) -> float:
    """(IQR / 1.349)^2: the variance of the Gaussian core, insensitive to sparse outliers."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(((q3 - q1) / 1.3489795) ** 2)


def measure_noise(image, variance, good, half: int = 2, src_nsigma: float = 4.0, clip: float = 5.0,
                  grow: int = 4, smooth: float = 1.5) -> tuple[float, np.ndarray, float]:
    """Blank-sky noise of an image relative to its variance plane: (scale, rho, fraction used).

    ``scale`` = variance of image / sqrt(variance) over blank sky (1 when the
    variance plane is right; LSST's ScaleVarianceTask measures the same);
    ``rho`` = the normalised noise autocorrelation on lags |dx|, |dy| <= half
    ((2 half + 1)^2 stamp, rho[half, half] = 1), symmetrised; white noise gives
    a delta.  Resampled images (a template coadd Lanczos-warped twice) have
    rho(1 px) ~ 0.2: a kernel convolving them sums correlated pixels, whose
    variance is sum_ij K_i K_j cov_ij, not K^2 (*) var.
    Blank sky: ``good`` pixels, not within ``grow`` px of a source (the image
    smoothed by a Gaussian of ``smooth`` px above ``src_nsigma`` of its own
    scatter) or of a ``clip``-sigma pixel.  The covariance at 12-16 px lags,
    where resampling leaves none, is the pedestal a residual background adds
    to every lag; it is subtracted.  Raises ValueError with fewer than 10^4
    blank pixels.
    """
    ny, nx = np.shape(image)
    # a central window of at most NOISE_MAX_PIXELS
    wy = min(ny, max(64, int(np.sqrt(NOISE_MAX_PIXELS * ny / nx))))
    wx = min(nx, max(64, NOISE_MAX_PIXELS // wy))
    y0, x0 = (ny - wy) // 2, (nx - wx) // 2
    win = (slice(y0, y0 + wy), slice(x0, x0 + wx))
    img = np.asarray(image, np.float32)[win]
    var = np.asarray(variance, np.float32)[win]
    ok = np.asarray(good, bool)[win] & np.isfinite(img) & np.isfinite(var) & (var > 0)
    if ok.sum() < 10_000:
        raise ValueError(f"only {int(ok.sum())} unmasked pixels to measure the noise")
    n = np.zeros(img.shape, np.float32)
    n[ok] = img[ok] / np.sqrt(var[ok])
    n[ok] -= np.float32(np.median(n[ok][::5]))  # residual sky level
    # sources: a PSF-scale matched filter finds faint ones whose light would pass for correlated noise
    okf = ok.astype(np.float32)
    sm = ndimage.gaussian_filter(n, smooth, truncate=3.0) / np.maximum(
        ndimage.gaussian_filter(okf, smooth, truncate=3.0), 1e-3)
    src = (sm > src_nsigma * np.sqrt(_robust_var(sm[ok][::5]))) | (np.abs(n) > clip * np.sqrt(_robust_var(n[ok][::5])))
    sky = ok & ~masks.grow_box(src, grow)  # = binary_dilation by the 3x3 square, grow times
    if sky.sum() < 10_000:
        raise ValueError(f"only {int(sky.sum())} blank-sky pixels to measure the noise")
    # Lags as offsets in the flattened window: one contiguous dot product each (2D slices
    # were copied by every dot).  The last 16 columns are left out, so a pair that wraps
    # from one row into the next always has one pixel there and adds nothing.
    sky[:, -16:] = False
    m = np.where(sky, n, 0).astype(np.float32).ravel()
    sk = sky.astype(np.float32).ravel()
    npix = m.size

    def cov(dy, dx):  # mean product over pairs of blank pixels (lag dy >= 0, |dx| <= 16)
        off = dy * wx + dx
        npair = float(np.dot(sk[: npix - off], sk[off:]))
        return float(np.dot(m[: npix - off], m[off:])) / max(npair, 1.0)

    pedestal = float(np.median([cov(dy, dx) for dy, dx in ((0, 12), (12, 0), (12, 12), (12, -12), (0, 16),
                                                               (16, 0), (16, 8), (8, 16), (16, -8))]))
    c = np.zeros((2 * half + 1, 2 * half + 1))
    for dy in range(0, half + 1):
        for dx in range(-half, half + 1):
            if dy == 0 and dx < 0:
                continue
            c[half + dy, half + dx] = c[half - dy, half - dx] = cov(dy, dx) - pedestal
    # the plain mean square over blank sky (sources and 5-sigma pixels are out): an IQR estimate
    # would scatter by ~1% on a million pixels
    scale = float(c[half, half])
    return scale, c / c[half, half], float(sky.mean())


@functools.lru_cache(maxsize=8)
def _lanczos_power(n: int, a: int = 3) -> np.ndarray:
    """Noise power spectrum (n x n, mean 1) of white noise after one Lanczos-a resampling at a random phase."""
    f = (np.arange(64) + 0.5) / 64
    x = f[:, None] - np.arange(-a + 1, a + 1)[None, :]
    w = np.sinc(x) * np.sinc(x / a)  # the normalised Lanczos-a taps of diapipe.warp
    w /= w.sum(axis=1, keepdims=True)
    c = np.mean([np.correlate(x, x, "full") for x in w], axis=0)  # phase-averaged 1-D autocovariance
    c /= c[len(c) // 2]
    h = len(c) // 2
    line = np.zeros(n)
    line[: h + 1], line[-h:] = c[h:], c[:h]
    p1 = np.real(np.fft.fft(line))
    return np.maximum(np.outer(p1, p1), 0.0)


def resampling_noise_model(nresamp: float, half: int = NOISE_CORR_HALF, a: int = 3) -> np.ndarray:
    """Noise autocorrelation ((2 half + 1)^2, centre 1) of white noise resampled ``nresamp`` times by Lanczos-a.

    Each resampling at a random sub-pixel phase multiplies the noise power
    spectrum by the phase-averaged |W(k)|^2 of the Lanczos kernel; after a warp
    and the coadd -> calexp resampling (nresamp = 2) neighbours correlate by
    0.196 (side) and 0.038 (diagonal), 2 px by -0.128.  Non-integer values
    interpolate (a coadd of differently resampled inputs).
    """
    return _resampling_models(np.array([float(nresamp)]), half, a)[0]


def _resampling_models(powers: np.ndarray, half: int, a: int = 3) -> np.ndarray:
    """resampling_noise_model for each of ``powers`` (len x (2 half + 1)^2), in one FFT call."""
    n = 8 * (half + 4)
    P = _lanczos_power(n, a)[None] ** np.asarray(powers, float)[:, None, None]
    r = np.real(np.fft.ifft2(P, axes=(1, 2)))
    r = np.roll(r, (half, half), axis=(1, 2))[:, : 2 * half + 1, : 2 * half + 1]
    return r / r[:, half, half][:, None, None]


#: numbers of resamplings tried by fit_resampling_model
RESAMP_GRID = np.linspace(0.0, 4.0, 81)


@functools.lru_cache(maxsize=4)
def _resampling_model_grid(half: int) -> np.ndarray:
    """resampling_noise_model(p, half) for p in RESAMP_GRID, computed once per half."""
    return _resampling_models(RESAMP_GRID, half)


def fit_resampling_model(rho: np.ndarray, reach: int = 2, return_misfit: bool = False):
    """Number of Lanczos-3 resamplings whose noise correlation best matches a measured one.

    Fitted on the lags within ``reach`` px, where resampling correlation is
    strong and the faint-source light that biases every lag slightly upward
    matters least; the model then stands for the whole (noisy, biased) stamp.
    With ``return_misfit`` also the rms difference model - measured over those
    lags (~0.005 for our templates; large for noise correlated otherwise, e.g.
    other pipelines' stacks, which the model does not describe).
    """
    half = rho.shape[0] // 2
    sl = slice(half - reach, half + reach + 1)
    meas = rho[sl, sl]
    use = np.ones(meas.shape, bool)
    use[reach, reach] = False
    grid = RESAMP_GRID
    cost = list(np.sum((_resampling_model_grid(reach)[:, use] - meas[use]) ** 2, axis=1))
    k = int(np.argmin(cost))
    best = float(grid[k])
    if 0 < k < len(grid) - 1:  # parabola through the minimum
        c0, c1, c2 = cost[k - 1], cost[k], cost[k + 1]
        den = c0 - 2 * c1 + c2
        if den > 0:
            best = float(grid[k] + 0.5 * (c0 - c2) / den * (grid[1] - grid[0]))
    if not return_misfit:
        return best
    misfit = float(np.sqrt(np.mean((resampling_noise_model(best, reach)[use] - meas[use]) ** 2)))
    return best, misfit


def noise_gram(stamps, rho) -> np.ndarray:
    """G_mn = sum_ij a_m(i) a_n(j) rho(i - j): inner products of stamps under a noise correlation.

    With rho = delta this is the plain <a_m, a_n>; ``stamps`` (k, m, m), rho (r, r) odd.
    """
    a = np.asarray(stamps, float)
    if rho is None:
        flat = a.reshape(len(a), -1)
        return flat @ flat.T
    h = rho.shape[0] // 2
    ar = np.array([_conv_full(x, rho) for x in a])  # (k, m + 2h, m + 2h)
    ap = np.pad(a, ((0, 0), (h, h), (h, h)))
    return ap.reshape(len(a), -1) @ ar.reshape(len(a), -1).T


# ---------------------------------------------------------------- helpers
def _grow_planes(mask: np.ndarray, half: int, planes) -> np.ndarray:
    """Mask with each of ``planes`` dilated by a (2 half + 1)^2 box (the kernel footprint)."""
    out = mask.copy()
    for name in planes:
        b = masks.bit(name)
        sel = (mask & b) != 0
        if sel.any():
            out[masks.grow_box(sel, half)] |= masks.MASK_DTYPE(b)
    return out


def _psf_at_centre(psf: PixelPsf, shape) -> np.ndarray:
    ny, nx = shape
    return psf.image((nx - 1) / 2.0, (ny - 1) / 2.0)


def _pad_same(img, k):
    """Centre-crop or zero-pad a square stamp to k x k."""
    n = img.shape[0]
    if n == k:
        return img
    if n > k:
        o = (n - k) // 2
        return img[o : o + k, o : o + k]
    out = np.zeros((k, k))
    o = (k - n) // 2
    out[o : o + n, o : o + n] = img
    return out


def _conv_full(a, b):
    """Full linear convolution of two small stamps (size a + b - 1), via numpy FFT."""
    s0 = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    return np.fft.irfft2(np.fft.rfft2(a, s0) * np.fft.rfft2(b, s0), s0)


def _conv_small(a, b):
    """Linear convolution of two small stamps via FFT, cropped to a's size ('same').

    (numpy FFT rather than scipy.signal, whose import alone costs seconds.)
    """
    s0 = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    full = np.fft.irfft2(np.fft.rfft2(a, s0) * np.fft.rfft2(b, s0), s0)
    oy, ox = (b.shape[0] - 1) // 2, (b.shape[1] - 1) // 2
    return full[oy : oy + a.shape[0], ox : ox + a.shape[1]]


def decorrelation_kernel(kern: np.ndarray, var_unconv: float, var_conv: float, ksum: float,
                         size: int | None = None, pre: np.ndarray | None = None, max_gain: float = 100.0,
                         rho_unconv: np.ndarray | None = None, rho_conv: np.ndarray | None = None):
    """Reiss & Lupton (2016) afterburner for D = U (*) P - C (*) K  (P = delta unless preconvolved).

    phi(k) = sqrt(N(0) / N(k)) with N(k) = s_u^2 |P(k)|^2 R_u(k) + s_c^2 |K(k)|^2 R_c(k) the noise
    power spectrum of the difference, whitens it while keeping phi(0) = 1 (fluxes unchanged),
    as ip_diffim's DecorrelateALKernelTask.  R_u, R_c are the inputs' own noise spectra (the
    Fourier transforms of their measured autocorrelations ``rho_unconv``, ``rho_conv``; 1 for
    white noise, the ip_diffim assumption): a resampled template's noise is already correlated
    before the kernel correlates it further.  The whitened difference then has pixel variance
    N(0) = s_u^2 R_u(0) + s_c^2 ksum^2 R_c(0).  The gain is capped at ``max_gain``.
    Returns the real-space kernel (size x size, unit sum).
    """
    k = kern.shape[0]
    size = size or (2 * k + 1)
    kp_ = max(k, pre.shape[0] if pre is not None else 0)
    n = sfft.next_fast_len(4 * max(kp_, size))

    def ft(img):
        m = img.shape[0]
        a = np.zeros((n, n))
        a[:m, :m] = img
        return np.fft.fft2(np.roll(a, (-(m // 2), -(m // 2)), axis=(0, 1)))

    Kf = ft(kern)
    P2 = 1.0 if pre is None else np.abs(ft(pre / pre.sum())) ** 2
    Ru = 1.0 if rho_unconv is None else noise_spectrum(rho_unconv, ft)
    Rc = 1.0 if rho_conv is None else noise_spectrum(rho_conv, ft)
    num = var_unconv * _at_zero(Ru) + var_conv * ksum**2 * _at_zero(Rc)
    den = var_unconv * P2 * Ru + var_conv * np.abs(Kf) ** 2 * Rc
    phi_hat = np.sqrt(num / np.maximum(den, num / max_gain**2))
    phi = np.real(np.fft.fftshift(np.fft.ifft2(phi_hat)))
    c = n // 2
    h = size // 2
    phi = phi[c - h : c + h + 1, c - h : c + h + 1]
    return phi / phi.sum()


def noise_spectrum(rho: np.ndarray, ft) -> np.ndarray:
    """Noise power spectrum (mean 1) of a measured autocorrelation stamp, on ``ft``'s grid.

    A measured rho is truncated and noisy, so its transform can dip below zero
    where the true spectrum is small: floor it at 2% of the mean (a power
    spectrum is non-negative).
    """
    return np.maximum(np.real(ft(rho)), 0.02)


def _at_zero(spec) -> float:
    return float(spec if np.isscalar(spec) else spec.flat[0])


# ---------------------------------------------------------------- main entry
def subtract(science: Exposure, template: Exposure, config: SubtractConfig | dict | None = None,
             data_id: dict | None = None, science_path=None, template_path=None) -> Exposure:
    """Difference exposure science - template (science flux units) with variance, mask, PSF and diagnostics.

    Both exposures must be on one pixel grid (the template already warped
    onto the science exposure).  PSFs are measured from the images when an
    exposure carries none.
    """
    cfg = config if isinstance(config, SubtractConfig) else SubtractConfig.from_dict(config)
    data_id = data_id if data_id is not None else science.data_id
    t_start = time.perf_counter()
    if science.shape != template.shape:
        raise DiapipeError(
            f"science {science.shape} and template {template.shape} are not on one pixel grid",
            template_path, data_id)
    shape = science.shape
    ny, nx = shape
    bad_planes = masks.BAD_PLANES
    sci = science.image.astype(np.float32)
    tpl = template.image.astype(np.float32)
    vs = science.variance.astype(np.float32)
    vt = template.variance.astype(np.float32)
    nodata_s = ~np.isfinite(sci) | ~np.isfinite(vs) | masks.is_set(science.mask, "NO_DATA")
    nodata_t = ~np.isfinite(tpl) | ~np.isfinite(vt) | masks.is_set(template.mask, "NO_DATA") | (vt <= 0)
    nodata_s |= vs <= 0
    overlap = float(np.mean(~nodata_s & ~nodata_t))
    if overlap < cfg.min_overlap_fraction:
        raise DiapipeError(
            f"template does not overlap the science exposure: {100 * overlap:.1f}% of pixels have data in "
            f"both (need {100 * cfg.min_overlap_fraction:.0f}%)", template_path, data_id)
    sci[nodata_s], tpl[nodata_t] = 0.0, 0.0
    vs[nodata_s], vt[nodata_t] = 0.0, 0.0
    bad_s = masks.is_set(science.mask, *bad_planes) | nodata_s
    bad_t = masks.is_set(template.mask, *bad_planes) | nodata_t
    bad = bad_s | bad_t
    # each input's blank-sky noise against its variance plane: rescale the plane (ScaleVariance)
    # and keep the autocorrelation (a resampled template's noise is correlated) for the propagation
    rho_s = rho_t = None
    noise_hdr = {}
    if cfg.empirical_noise:
        scale_s, rho_s, nres_s = _input_noise(sci, vs, science.mask, nodata_s, "science", science_path, data_id)
        scale_t, rho_t, nres_t = _input_noise(tpl, vt, template.mask, nodata_t, "template", template_path, data_id,
                                              acf=_carried_acf(template))
        noise_hdr = {
            "SVARSCAL": (round(scale_s, 5), "science variance plane x this (measured on blank sky)"),
            "TVARSCAL": (round(scale_t, 5), "template variance plane x this (measured on blank sky)"),
            "SNOISCOR": (_corr_sum(rho_s), "science noise: sum of autocorrelation (1 = white)"),
            "TNOISCOR": (_corr_sum(rho_t), "template noise: sum of autocorrelation (1 = white)"),
            "SNRESAMP": (round(nres_s, 3), "science noise correlation = this many Lanczos-3 resamplings"),
            "TNRESAMP": (round(nres_t, 3), "template noise correlation = this many Lanczos-3 resamplings"),
        }
    noise_hdr["EMPNOISE"] = (bool(cfg.empirical_noise), "measured input noise scale and correlation used")

    # PSFs: carried or measured
    psf_s = science.psf or _measure_or_fail(sci, vs, science.mask | np.where(nodata_s, masks.bit("NO_DATA"), 0),
                                            "science", science_path, data_id, science.metadata)
    psf_t = template.psf or _measure_or_fail(tpl, vt, template.mask | np.where(nodata_t, masks.bit("NO_DATA"), 0),
                                             "template", template_path, data_id, template.metadata)
    sig_s = kmod.gaussian_sigma(_psf_at_centre(psf_s, shape))
    sig_t = kmod.gaussian_sigma(_psf_at_centre(psf_t, shape))

    # convolution direction: never deconvolve
    want = cfg.convolve
    if want == "auto":
        direction = "template" if sig_s >= sig_t else "science"
    else:
        direction = want
    flipped = False
    pre = None  # science preconvolution kernel (its own PSF), when the science is the sharper image
    if direction == "template" and sig_s < sig_t * (1 - cfg.flip_tolerance):
        if cfg.sharper_science == "preconvolve":
            pre = _psf_at_centre(psf_s, shape)
        else:
            direction, flipped = "science", True
    elif direction == "science" and sig_t < sig_s * (1 - cfg.flip_tolerance):
        direction, flipped = "template", True
    if flipped:
        log.warning("convolve=%s would deconvolve (PSF sigma sci %.2f, tmpl %.2f px): convolving the %s instead",
                    want, sig_s, sig_t, direction)
    if pre is not None:
        # ip_diffim's preconvolution: match the template to science (*) P_sci, whose PSF
        # (P_sci (*) P_sci) is broader than the template's, instead of deconvolving.
        log.info("science PSF sharper than the template's: preconvolving the science image with its PSF")
        sci_pc = kmod.FFTConvolver(sci, pre.shape[0] // 2).convolve(pre.astype(np.float32))
        vs_pc = vs * np.float32((pre**2).sum())  # for the stamp weights only
        psf_pc = PixelPsf(np.array([_conv_small(c, pre) for c in psf_s.components]), psf_s.order,
                          psf_s.x0, psf_s.y0, psf_s.sx, psf_s.sy)
        src, tgt, vsrc, vtgt, psf_src, psf_tgt = tpl, sci_pc, vt, vs_pc, psf_t, psf_pc
        sig_src, sig_tgt = sig_t, kmod.gaussian_sigma(_psf_at_centre(psf_pc, shape))
    elif direction == "template":
        src, tgt, vsrc, vtgt, psf_src, psf_tgt = tpl, sci, vt, vs, psf_t, psf_s
        sig_src, sig_tgt = sig_t, sig_s
    else:
        src, tgt, vsrc, vtgt, psf_src, psf_tgt = sci, tpl, vs, vt, psf_s, psf_t
        sig_src, sig_tgt = sig_s, sig_t

    meta_s, meta_t = science.metadata, template.metadata
    header = {
        "SUBMETH": (cfg.method.upper(), "subtraction method (AL or ZOGY)"),
        "CONVREQ": (want, "requested convolution direction"),
        "CONVDIR": (direction, "image convolved with the matching kernel"),
        "CONVFLIP": (flipped, "direction changed to avoid deconvolution"),
        "PRECONV": (pre is not None, "science preconvolved with its own PSF"),
        "PSFSIGS": (round(sig_s, 4), "science PSF Gaussian sigma at centre [px]"),
        "PSFSIGT": (round(sig_t, 4), "template PSF Gaussian sigma at centre [px]"),
        "OVERLAP": (round(overlap, 5), "fraction of pixels with data in both images"),
        **noise_hdr,
    }

    # the matching kernel (needed by ZOGY too, for the flux ratio)
    basis, spec = kmod.make_basis(sig_src, sig_tgt, cfg)
    half_k = spec.half
    half_stamp = max(half_k + 2, int(np.ceil(cfg.stamp_half_size_sigma * max(sig_src, sig_tgt))))
    kcfg = cfg
    if cfg.method == "zogy" and cfg.spatial_order > 1:
        # ZOGY takes only the flux ratio and the misregistration from the kernel: an offset and a linear
        # term (scale or rotation residual) describe a registered pair's; higher orders add noise to them
        kcfg = replace(cfg, spatial_order=1)
    sol = _fit_kernel(src, tgt, vsrc, vtgt, bad, bad_t if direction == "template" else bad_s, basis, spec,
                      half_stamp, kcfg, psf_src, psf_tgt, meta_s, meta_t, direction, data_id)
    if cfg.empirical_noise:
        # the measured variance scales enter the noise propagation, not the stamp selection and weights
        # (a few per cent must not move a marginal star across the S/N or clipping thresholds)
        vs *= np.float32(scale_s)  # in place: vsrc / vtgt are these arrays
        vt *= np.float32(scale_t)
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    ksum_c = float(sol.ksum(xc, yc)[0])
    if not np.isfinite(ksum_c) or ksum_c <= 0:
        raise DiapipeError(f"kernel fit gave a non-positive flux ratio ({ksum_c})", template_path, data_id)
    flux_ratio = ksum_c if direction == "template" else 1.0 / ksum_c  # F_sci / F_tmpl
    header.update({
        "KBASIS": (spec.kind, "kernel basis"),
        "KSIZE": (2 * half_k + 1, "kernel side [px]"),
        "KSIGMAS": (",".join(f"{s:.3f}" for s in spec.sigmas) or "-", "basis Gaussian sigmas [px]"),
        "KORDER": (sol.spatial_order, "kernel spatial polynomial order used"),
        "KORDREQ": (kcfg.spatial_order, "kernel spatial order requested (the maximum with KORDCV; ZOGY: <= 1)"),
        "KORDCV": (sol.cv_chi2 is not None, "order chosen by held-out stamp chi2 (KCVCHI<order>)"),
        "BGORDER": (sol.bg_order, "differential background polynomial order"),
        "KFALLBK": (sol.fallback, "kernel fallback (none, order<N>, psfmodel)"),
        "KSUM": (round(ksum_c, 6), "kernel sum at the detector centre"),
        "FLUXRAT": (round(flux_ratio, 6), "flux ratio science/template"),
        "KCHI2": (round(sol.chi2, 4) if np.isfinite(sol.chi2) else -1.0, "mean reduced chi2 of used stamps"),
        **{f"KCVCHI{o}": (round(v, 4) if np.isfinite(v) else -1.0, f"held-out stamp chi2, spatial order {o}")
           for o, v in (sol.cv_chi2 or {}).items()},
        "NSTAMP": (sol.n_stamps, "stamps used in the kernel fit"),
        "NREJ": (sol.n_rejected, "stamps rejected by clipping"),
        "STAMPHW": (half_stamp, "stamp half-width [px]"),
    })

    # output mask: the convolved image's bad pixels spread over the kernel footprint
    m_s = science.mask.copy()
    m_t = template.mask.copy()
    masks.set_plane(m_s, nodata_s, "NO_DATA")
    masks.set_plane(m_t, nodata_t, "NO_DATA")
    grow_planes = bad_planes + ("INTRP",)
    if direction == "template":
        m_t = _grow_planes(m_t, half_k, grow_planes)
    else:
        m_s = _grow_planes(m_s, half_k, grow_planes)
    # only the science image's DETECTED/INJECTED planes mean something for the difference
    out_mask = m_s | (m_t & masks.MASK_DTYPE(masks.bits(*bad_planes, "INTRP")))
    nodata = masks.is_set(out_mask, "NO_DATA")
    edge = np.zeros(shape, bool)
    edge[:half_k, :] = edge[-half_k:, :] = True
    edge[:, :half_k] = edge[:, -half_k:] = True
    masks.set_plane(out_mask, edge, "EDGE")

    extra = []
    if cfg.method == "zogy":
        from .zogy import zogy_tiled

        # ZOGY wants one PSF per image: follow a varying PSF tile by tile
        shift_at = _zogy_misregistration(sol, psf_s, psf_t, direction, pre)
        z = zogy_tiled(sci, tpl, vs, vt, psf_s.image, psf_t.image, flux_ratio, np.sqrt(sky_median(vs, ~bad)),
                       np.sqrt(sky_median(vt, ~bad)), tile=cfg.zogy_tile_size, ref_shift_at=shift_at)
        header["ZOGYNTIL"] = (len(z["psfs"]), "ZOGY tiles (PSFs evaluated per tile)")
        dxc, dyc = shift_at(xc, yc)
        header["ZOGYDX"] = (round(dxc, 4), "template misregistration removed at centre, x [px]")
        header["ZOGYDY"] = (round(dyc, 4), "template misregistration removed at centre, y [px]")
        diff, var = z["D"], z["variance"]
        hz = max(psf_s.size, psf_t.size) // 2
        edge_z = np.zeros(shape, bool)
        edge_z[:hz, :] = edge_z[-hz:, :] = True
        edge_z[:, :hz] = edge_z[:, -hz:] = True
        masks.set_plane(out_mask, edge_z, "EDGE")
        if direction == "template":
            out_mask |= _grow_planes(m_t, hz, ("NO_DATA",)) & masks.MASK_DTYPE(masks.bit("NO_DATA"))
        out_mask = _grow_planes(out_mask, hz, ("NO_DATA",))
        nodata = masks.is_set(out_mask, "NO_DATA")
        diff_psf = _tile_psf_model(z["psfs"], shape)
        score = z["score"]
        score[nodata] = np.nan
        extra.append(fits.ImageHDU(score, name="SCORR"))
        header["ZOGYFD"] = (z["flux_zero_point"], "ZOGY F_D of the unit-noise D")
        header["DECORR"] = (False, "AL decorrelation applied (ZOGY noise is white)")
    else:
        bad_out = masks.is_set(out_mask, *bad_planes)
        rho_src, rho_tgt = (rho_t, rho_s) if direction == "template" else (rho_s, rho_t)
        diff, var, diff_psf = _al_difference(sol, src, tgt, vsrc, vs if pre is not None else vtgt, bad,
                                             direction, cfg, psf_s, header, pre, bad_out, rho_src, rho_tgt)
        # the afterburner spreads what is left at bad pixels over its own footprint: mask that too
        out_mask = _grow_planes(out_mask, header.get("DECRAD", (0,))[0], bad_planes)
        nodata = masks.is_set(out_mask, "NO_DATA")

    diff[nodata] = np.nan
    var[nodata] = np.nan
    masks.set_plane(out_mask, nodata, "NO_DATA")
    good = ~masks.is_set(out_mask, *bad_planes)
    if not good.any():
        raise DiapipeError("no valid pixels left in the difference image", template_path, data_id)
    # the differential background left by the stamp fit, measured on blank sky and removed
    # (a pedestal biases every PSF flux measured without a sky term)
    blank = good & ~masks.is_set(out_mask, *BLANK_EXCLUDE) & ~masks.is_set(template.mask, "DETECTED")
    sig_big = max(sig_s, sig_t)
    # and the faint wings the detection masks miss.  At 4 sigma, not 3: a 3-sigma cut also
    # removes the noise's own upward excursions (2.5-3% of the pixels once grown) and leaves
    # white noise 0.003-0.006 sigma/px low; at 4 sigma the bias is < 0.0004.
    for img_, var_ in ((tpl, vt), (sci, vs)):
        blank &= ~source_mask(img_, var_, ~bad, sig_big, BLANK_NSIGMA, int(np.ceil(2 * sig_big)))
    bmap, binfo = residual_background(diff, blank, cfg.background_order)
    if bmap is not None:
        diff -= bmap
    else:
        log.warning("subtract %s: no blank sky to measure the residual background on; none removed", data_id)
    header.update({
        "DBGMED": (round(binfo["median"], 4), "residual background removed: median [image units/px]"),
        "DBGRMS": (round(binfo["rms"], 4) if np.isfinite(binfo["rms"]) else -1.0,
                   "scatter of blank-sky cell levels about it [/px]"),
        "DBGNCELL": (binfo["ncell"], "blank-sky mesh cells used for the residual background"),
        "DBGORDER": (binfo["order"], "residual background polynomial order (-1: none)"),
    })
    header["NGOODPIX"] = (int(good.sum()), "pixels without BAD/SAT/CR/EDGE/NO_DATA/SUSPECT")
    header["DIFFRMS"] = (round(_robust_sigma((diff / np.sqrt(var))[good & (var > 0)]), 4),
                         "robust std of diff/sqrt(var) over good pixels")
    header["SUBTIME"] = (round(time.perf_counter() - t_start, 3), "subtraction wall time [s]")
    extra = _diagnostic_hdus(sol, shape, direction) + extra

    meta = {k: v for k, v in science.metadata.items()}
    meta.update({k: v for k, (v, _) in header.items()})
    if "MAGZERO" in meta_s:
        meta["MAGZERO"] = meta_s["MAGZERO"]
    diffexp = Exposure(MaskedImage(diff, out_mask, var), wcs=science.wcs, psf=diff_psf, metadata=meta,
                       extra_hdus=extra)
    log.info("subtract %s: %s, convolved %s, KSUM %.4f, %d stamps (%d rejected), chi2 %.2f, diff rms %.3f, %.2f s",
             data_id, cfg.method, direction, ksum_c, sol.n_stamps, sol.n_rejected, sol.chi2,
             header["DIFFRMS"][0], header["SUBTIME"][0])
    return diffexp


def _centroid(stamp) -> np.ndarray:
    """First moment (x, y) of a centred odd stamp relative to its centre pixel [px]."""
    st = np.asarray(stamp, float)
    h = st.shape[0] // 2
    g = np.arange(-h, h + 1)
    tot = st.sum()
    return np.array([(st.sum(axis=0) * g).sum(), (st.sum(axis=1) * g).sum()]) / tot


def _zogy_misregistration(sol, psf_s, psf_t, direction, pre):
    """Callable (x, y) -> (dx, dy) px: where the template's sources sit relative to the science's.

    The AL kernel fitted on the stamps absorbs any residual shift between the two images;
    its centroid, less the centroid difference of the PSF models it maps between, is that
    shift.  ZOGY assumes perfect registration and leaves a dipole at every star without it.
    """
    if sol is None or sol.fallback == "psfmodel":  # a kernel from the PSF models knows no shift
        return lambda x, y: (0.0, 0.0)

    def shift(x, y):
        ck = _centroid(sol.kernel(x, y))
        cs, ct = _centroid(psf_s.image(x, y)), _centroid(psf_t.image(x, y))
        if direction == "science":  # template ~ K (*) science
            d = ck + cs - ct
        else:  # science (or science (*) pre) ~ K (*) template
            d = cs - ct - ck + (_centroid(pre) if pre is not None else 0.0)
        return float(d[0]), float(d[1])

    return shift


def _tile_psf_model(tile_psfs, shape) -> PixelPsf:
    """PixelPsf (order 1 if there are enough tiles) through the P_D of each ZOGY tile."""
    ny, nx = shape
    x0, y0, sx, sy = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    if len(tile_psfs) < 4:
        centre = tile_psfs[len(tile_psfs) // 2][1]
        return PixelPsf(centre[None] / centre.sum(), 0, x0, y0, sx, sy)
    xy = np.array([((b[0] + b[1] - 1) / 2.0, (b[2] + b[3] - 1) / 2.0) for b, _ in tile_psfs])
    stamps = np.array([p for _, p in tile_psfs])
    A = poly_design(xy[:, 0], xy[:, 1], 1, x0, y0, sx, sy)
    coef, *_ = np.linalg.lstsq(A, stamps.reshape(len(stamps), -1), rcond=None)
    return PixelPsf(coef.reshape(-1, *stamps.shape[1:]), 1, x0, y0, sx, sy)


def _corr_sum(rho) -> float:
    """Large-aperture noise variance / summed pixel variance of a noise autocorrelation (1 if white)."""
    return 1.0 if rho is None else round(float(rho.sum()), 4)


def _carried_acf(exp) -> np.ndarray | None:
    """The noise autocorrelation an input carries (NOISEACF HDU of a homogenised template), cropped."""
    for h in getattr(exp, "extra_hdus", []) or []:
        if h.name == "NOISEACF":
            a = np.asarray(h.data, float)
            c, k = a.shape[0] // 2, NOISE_CORR_HALF
            if c >= k:
                a = a[c - k:c + k + 1, c - k:c + k + 1]
                return a / a[k, k]
    return None


def _input_noise(img, var, mask, nodata, which, path, data_id, acf=None):
    """(variance scale, noise autocorrelation) of one input over its blank sky; (1, None) if unmeasurable.

    ``acf``: the autocorrelation the input carries (a homogenised template's NOISEACF); it
    is used as the noise model, and only the variance scale is measured.
    """
    good = ~nodata & ~masks.is_set(mask, *masks.BAD_PLANES, "INTRP", "DETECTED", "DETECTED_NEGATIVE", "INJECTED")
    try:
        scale, rho_meas, frac = measure_noise(img, var, good)
    except ValueError as exc:
        log.warning("%s %s: noise not measured (%s); its variance plane is taken as white and right",
                    which, data_id, exc)
        return (1.0, acf, -1.0) if acf is not None else (1.0, None, 0.0)
    if acf is not None:
        h, hm = NOISE_CORR_HALF, rho_meas.shape[0] // 2
        log.info("%s %s: blank-sky noise^2 / variance = %.4f, carried noise correlation rho(1 px) %.3f "
                 "(measured %.3f; sum %.3f) on %.0f%% of the pixels", which, data_id, scale, acf[h, h + 1],
                 rho_meas[hm, hm + 1], _corr_sum(acf), 100 * frac)
        return scale, acf, -1.0
    # the measured stamp is noisy and biased upward at every lag by faint-source light (a sum over
    # 289 lags adds that up): its strong short lags fix the resampling model, which is used instead
    nres, misfit = fit_resampling_model(rho_meas, return_misfit=True)
    rho1 = float(rho_meas[rho_meas.shape[0] // 2, rho_meas.shape[0] // 2 + 1])
    # A neighbour correlation far above any resampling's (two Lanczos-3 passes give ~0.2) means the
    # "blank sky" is source light (crowded fields such as the SAAO frames): its scale is not noise.
    if misfit > MAX_MODEL_MISFIT and (rho1 > MAX_NOISE_RHO1 or not (0.5 < scale < 2.0)):
        log.warning("%s %s: no blank sky to measure the noise on (rho(1 px) = %.3f, noise^2/variance %.2f, "
                    "a crowded field?); its variance plane is taken as white and right", which, data_id,
                    rho1, scale)
        return 1.0, None, -1.0
    rho = resampling_noise_model(nres) if nres >= 0.05 else None
    if rho is not None and misfit > MAX_MODEL_MISFIT:
        log.warning("%s %s: noise correlation (rho(1 px) = %.3f) unlike Lanczos resampling (rms misfit %.3f): "
                    "only its variance scale is used", which, data_id, rho_meas[rho_meas.shape[0] // 2,
                                                                                   rho_meas.shape[0] // 2 + 1], misfit)
        rho, nres = None, -1.0
    if not (0.5 < scale < 2.0):
        log.warning("%s %s: blank-sky noise is %.2f x what its variance plane says (%s); rescaling it",
                    which, data_id, np.sqrt(scale), path)
    log.info("%s %s: blank-sky noise^2 / variance = %.4f, noise correlation of %.2f Lanczos resamplings "
             "(rho(1 px) measured %.3f, model %.3f; sum %.3f) on %.0f%% of the pixels", which, data_id, scale, nres,
             rho_meas[rho_meas.shape[0] // 2, rho_meas.shape[0] // 2 + 1],
             0.0 if rho is None else rho[NOISE_CORR_HALF, NOISE_CORR_HALF + 1],
             _corr_sum(rho), 100 * frac)
    return scale, rho, nres


def _measure_or_fail(img, var, mask, which, path, data_id, meta):
    try:
        sat = meta.get("SATURATE")
        return measure_psf(img, var, mask, saturation=float(sat) if sat else None)
    except ValueError as exc:
        raise DiapipeError(f"{which} image carries no PSF and none could be measured ({exc})", path, data_id) from exc


def _debias(cfg, direction) -> bool:
    """Noise debiasing of the normal equations (``kernel.debiased``).

    Needed when the noisy science image is convolved (the kernel sum), and, whichever image
    is convolved, when the seeing is nearly equal (the sharp part of a near-delta kernel): on
    the default survey the star boxes of the equal-seeing visit go from 1.034 / 1.018 to
    1.012 / 0.996.  ``auto`` debiases always with the Alard-Lupton basis; the delta basis,
    hundreds of free pixels held by its ``regularization``, only when the science image is
    convolved (debiased, a 256^2 test pair's blank-sky noise goes 0.993 -> 0.989).
    """
    mode = cfg.debias_noise
    return mode == "on" or (mode == "auto" and (direction == "science" or cfg.basis != "delta"))


def _fit_kernel(src, tgt, vsrc, vtgt, bad, bad_src, basis, spec, half_stamp, cfg, psf_src, psf_tgt, meta_s, meta_t,
                direction, data_id):
    """Stamp fit with fallbacks: requested spatial order, lower orders, then the PSF models.

    ``bad``: masked or no-data pixels of either image; ``bad_src``: those of the convolved one.
    """
    shape = src.shape
    saturation = None
    sat_s, sat_t = meta_s.get("SATURATE"), meta_t.get("SATURATE")
    if sat_s and sat_t:
        saturation = (float(sat_s), float(sat_t)) if direction == "template" else (float(sat_t), float(sat_s))
    # Pixels the stamp fit ignores: masked pixels of the image matched to (tgt), and every pixel
    # within the kernel's reach of a masked pixel of the convolved image (src), which the
    # convolution smears.  Stamps may then hold a hot pixel or a cosmic ray away from their star.
    zero_weight = bad | masks.grow_box(bad_src, spec.half)
    xs, ys, _ = kmod.select_stamps(src, tgt, vsrc, vtgt, bad, half_stamp, spec.half, cfg, saturation,
                                   zero_weight=zero_weight)
    if len(xs) < 2 * cfg.min_stamps and cfg.stamp_min_snr > 10.0:
        # small or sparse field: accept fainter stars before giving up spatial order
        from copy import copy

        low = copy(cfg)
        low.stamp_min_snr = 10.0
        xs2, ys2, _ = kmod.select_stamps(src, tgt, vsrc, vtgt, bad, half_stamp, spec.half, low, saturation,
                                         zero_weight=zero_weight)
        if len(xs2) > len(xs):
            log.info("%d stamp candidates at S/N >= %g; %d at S/N >= 10", len(xs), cfg.stamp_min_snr, len(xs2))
            xs, ys = xs2, ys2
    weight = np.zeros(shape, np.float32)
    okv = ((vsrc + vtgt) > 0) & ~zero_weight
    weight[okv] = 1.0 / (vsrc[okv] + vtgt[okv])
    sysm = kmod.stamp_system(src, tgt, weight, xs, ys, basis, half_stamp,
                             var_src=vsrc if _debias(cfg, direction) else None)
    why = "no stamps"

    def bg_order(order):  # below the requested kernel order the background order drops with it
        return min(cfg.background_order, order) if order < cfg.spatial_order else cfg.background_order

    max_order, cv = cfg.spatial_order, None
    if cfg.spatial_order_cv and cfg.spatial_order > 0:
        # the spatial order the stamps support: lowest held-out chi2 (a lower order within 0.5 % wins)
        cv = {o: kmod.heldout_chi2(sysm, basis, cfg, shape, o, bg_order(o)) for o in range(cfg.spatial_order + 1)}
        fin = {o: v for o, v in cv.items() if np.isfinite(v)}
        if fin:
            best = min(fin.values())
            # the most flexible order that predicts nearly as well as the best: the held-out chi2 is ruled
            # by the many faint stamps, which barely tell the orders apart, while the brightest stars need
            # the spatial detail; a clearly worse order (noise-fitting, e.g. debiased science-convolved fits)
            # is still refused
            max_order = max(o for o, v in fin.items() if v <= best * (1 + cfg.spatial_order_cv_tolerance))
            log.info("kernel spatial order by held-out stamp chi2 %s: %d",
                     {o: round(v, 4) for o, v in cv.items()}, max_order)
    for order in range(max_order, -1, -1):
        sol, why = kmod.fit_spatial(sysm, basis, cfg, shape, order, bg_order(order))
        if sol is not None:
            sol.basis_spec = spec
            sol.cv_chi2 = cv
            # a fallback: an order below the one requested because the stamps cannot fit that one
            # (CV choosing a lower order that predicts better is not)
            forced = order < max_order or (cv is not None and not np.isfinite(cv[cfg.spatial_order]))
            sol.fallback = f"order{order}" if forced and order < cfg.spatial_order else "none"
            if order < max_order:
                log.warning("kernel fit %s: %s; fell back to spatial order %d", data_id,
                            f"too few stamps for order {cfg.spatial_order}", order)
            return sol
        log.info("spatial order %d impossible: %s", order, why)
    # the PSF models, scaled by the zero points
    zs, zt = meta_s.get("MAGZERO"), meta_t.get("MAGZERO")
    if zs is not None and zt is not None:
        ratio_st = 10 ** (0.4 * (float(zs) - float(zt)))  # F_sci / F_tmpl
        src_of_ratio = "magzero"
    else:
        ratio_st, src_of_ratio = 1.0, "assumed"
    ratio = ratio_st if direction == "template" else 1.0 / ratio_st
    sol = kmod.fit_kernel_from_psfs(psf_src, psf_tgt, basis, cfg, shape, ratio, cfg.spatial_order)
    if sol is None:
        raise DiapipeError(f"cannot fit a matching kernel ({why}) and the PSF-model fallback failed", None, data_id)
    log.warning("kernel fit %s: %s; kernel derived from the PSF models (flux ratio %s = %.4f)",
                data_id, why, src_of_ratio, ratio_st)
    sol.basis_spec = spec
    sol.fallback = "psfmodel"
    sol.stamps = sysm and {
        "x": sysm.x, "y": sysm.y, "ksum_local": np.full(len(sysm.x), np.nan),
        "chi2_local": np.full(len(sysm.x), np.nan), "chi2_spatial": np.full(len(sysm.x), np.nan),
        "used": np.zeros(len(sysm.x), bool), "reason": np.array(["too_few"] * len(sysm.x)),
    }
    sol.n_rejected = len(sysm.x)
    return sol


def _al_difference(sol, src, tgt, vsrc, vtgt, bad, direction, cfg, psf_s, header, pre=None, bad_out=None,
                   rho_src=None, rho_tgt=None):
    """Apply the kernel, form the difference, propagate variance, decorrelate; also the diffexp PSF.

    ``rho_src``, ``rho_tgt``: measured noise autocorrelations of the convolved and the
    unconvolved image (None: white), used by the afterburner and the variance.
    """
    shape = src.shape
    ny, nx = shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    conv = kmod.apply_kernel(sol, src)
    k_c = sol.kernel(xc, yc)
    ksum_c = float(k_c.sum())
    s_u = sky_median(vtgt, ~bad)  # unconvolved image's sky variance
    s_c = sky_median(vsrc, ~bad)  # convolved image's sky variance
    if cfg.decorrelate:
        # the filter whitens what the kernel correlated, the convolved image's own correlation included;
        # an unconvolved resampled template (science convolved) keeps its own, which the variance below
        # accounts for: whitening it with the resampling model amplifies the frequencies where the model's
        # spectrum is near zero (measured: matched-filter noise 0.83 of the prediction on a synthetic pair)
        phi = decorrelation_kernel(k_c, s_u, s_c, ksum_c, size=2 * sol.half + 1, pre=pre,
                                   max_gain=cfg.decorrelation_max_gain, rho_unconv=None, rho_conv=rho_src)
        u_kern = _conv_full(pre, phi) if pre is not None else phi  # what the unconvolved noise sees
        comps = np.array([_conv_full(c, phi) for c in sol.kernel_components])
        kc_eff = _conv_full(k_c, phi)  # what the convolved image's noise sees, at the centre
    else:
        phi = None
        u_kern = pre
        comps = sol.kernel_components
        kc_eff = k_c
    # var_src (*) (phi (*) K_c)^2 spreads each star's Poisson variance as the filters do ...
    k2 = (kc_eff**2).astype(np.float32)
    var_conv = kmod.FFTConvolver(vsrc, k2.shape[0] // 2).convolve(k2)
    np.maximum(var_conv, 0, out=var_conv)
    # ... and sum_ij (phi (*) K(x))_i (phi (*) K(x))_j rho_src(i - j) / sum_p (phi (*) K_c)^2 = t(x)^T C t(x),
    # exactly, scales it over the detector and for the convolved image's own noise correlation
    C = noise_gram(comps, rho_src) / float(k2.sum())
    poly = (sol.spatial_order, shape, sol.x0, sol.y0, sol.sx, sol.sy)
    bmap = kmod.quadratic_map(C, *poly)
    if u_kern is None:
        var_u = vtgt  # a pixel's own variance: its correlation with others does not enter
    elif pre is None:
        # phi is compact: no need to spread the variance; sum_ij phi_i phi_j rho_tgt(i - j) (sum phi^2 if white)
        var_u = vtgt * np.float32(noise_gram(u_kern[None], rho_tgt)[0, 0])
    else:
        # preconvolution spreads each star's Poisson variance over the PSF: convolve it
        var_u = kmod.FFTConvolver(vtgt, u_kern.shape[0] // 2).convolve((u_kern**2).astype(np.float32))
        var_u *= np.float32(noise_gram(u_kern[None], rho_tgt)[0, 0] / (u_kern**2).sum())
    if direction == "template":
        diff = tgt - conv
        var = var_u + var_conv * bmap
    else:
        ks = kmod.poly_map(sol.kernel_components.sum(axis=(1, 2)), *poly)
        diff = (conv - tgt) / ks
        var = (var_u + var_conv * bmap) / ks**2
    del conv, var_conv
    if phi is not None:
        # bad pixels (saturated cores, cosmic rays, no data) are zeroed first, not smeared
        ok = np.isfinite(diff) if bad_out is None else np.isfinite(diff) & ~bad_out
        d0 = np.where(ok, diff, 0).astype(np.float32)
        diff = kmod.FFTConvolver(d0, phi.shape[0] // 2).convolve(phi.astype(np.float32))
        yy, xx = np.nonzero(np.abs(phi) > 0.005 * np.abs(phi).max())
        header["DECRAD"] = (int(np.max(np.hypot(yy - phi.shape[0] // 2, xx - phi.shape[1] // 2))),
                            "decorrelation kernel radius; bad planes grown by it [px]")
    header["DECORR"] = (bool(cfg.decorrelate), "Reiss & Lupton decorrelation applied")
    header["DECVARU"] = (round(s_u, 4), "sky variance of the unconvolved image")
    header["DECVARC"] = (round(s_c, 4), "sky variance of the convolved image")
    # PSF of the difference: the unconvolved image's PSF (science), or science (*) K / ksum
    comps = psf_s.components.copy()
    if pre is not None:
        comps = np.array([_conv_small(c, pre) for c in comps])
    if direction == "science":
        kn = k_c / ksum_c
        comps = np.array([_conv_small(c, kn) for c in comps])
    if phi is not None:
        comps = np.array([_conv_small(c, phi) for c in comps])
    diff_psf = PixelPsf(comps, psf_s.order, psf_s.x0, psf_s.y0, psf_s.sx, psf_s.sy)
    return diff.astype(np.float32), var.astype(np.float32), diff_psf


def _diagnostic_hdus(sol, shape, direction) -> list:
    ny, nx = shape
    kh = fits.ImageHDU(sol.kernel_components.astype(np.float32), name="KERNEL")
    h = kh.header
    h["KORDER"] = (sol.spatial_order, "K(x,y)=sum_m t_m(x,y) KERNEL[m]")
    h["COMMENT"] = "t_m: diapipe.psf.poly_terms(KORDER) of (x-KX0)/KSX, (y-KY0)/KSY"
    h["KX0"], h["KY0"], h["KSX"], h["KSY"] = sol.x0, sol.y0, sol.sx, sol.sy
    h["CONVDIR"] = direction
    h["BGORDER"] = sol.bg_order
    for m, c in enumerate(sol.bg_coeffs):
        h[f"BG{m}"] = (float(c), "differential background coefficient")
    gx = np.linspace(0.1, 0.9, 3) * (nx - 1)
    gy = np.linspace(0.1, 0.9, 3) * (ny - 1)
    grid = np.array([sol.kernel(x, y) for y in gy for x in gx], np.float32)
    gh = fits.ImageHDU(grid, name="KGRID")
    for n, (y, x) in enumerate((y, x) for y in gy for x in gx):
        gh.header[f"KX{n}"], gh.header[f"KY{n}"] = round(float(x), 1), round(float(y), 1)
    n = 8
    mx = np.linspace(0, nx - 1, n)
    my = np.linspace(0, ny - 1, n)
    X, Y = np.meshgrid(mx, my)
    ks = sol.ksum(X.ravel(), Y.ravel()).reshape(n, n)
    fr = ks if direction == "template" else 1.0 / ks
    mh = fits.ImageHDU(fr.astype(np.float32), name="KSUMMAP")
    mh.header["COMMENT"] = "flux ratio science/template on an 8x8 grid spanning the detector"
    mh.header["GX0"], mh.header["GDX"] = 0.0, float(mx[1] - mx[0])
    mh.header["GY0"], mh.header["GDY"] = 0.0, float(my[1] - my[0])
    out = [kh, gh, mh]
    if sol.stamps is not None:
        st = sol.stamps
        t = Table({k: np.asarray(v) for k, v in st.items()})
        t["reason"] = np.asarray(st["reason"]).astype("U16")
        out.append(fits.BinTableHDU(t, name="STAMPS"))
    return out


# ---------------------------------------------------------------- plain FITS input
def read_image(path, gain: float | None = None, read_noise: float | None = None) -> Exposure:
    """An Exposure file, or a plain single-HDU FITS image (variance from gain and the sky noise).

    Plain images: NaN pixels -> NO_DATA, pixels >= SATURATE -> SAT; variance =
    sky variance (robust, measured) + max(image, 0) / gain, in the file's
    units (ADU^2 for ADU images).  ``gain`` (e-/ADU) defaults to the GAIN card.
    """
    try:
        with fits.open(path, memmap=False) as hdul:
            names = [h.name for h in hdul]
            if "IMAGE" in names:
                exp = None
            else:
                hdu = next((h for h in hdul if h.data is not None and h.data.ndim == 2), None)
                if hdu is None:
                    raise DiapipeError("no 2-D image in the file", path)
                data = np.asarray(hdu.data, float)
                header = hdu.header.copy()
                primary = hdul[0].header.copy()
    except DiapipeError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise DiapipeError(f"cannot read FITS image ({exc})", path) from exc
    if "IMAGE" in names:
        exp = Exposure.read(path)
        return exp
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(header) if "CTYPE1" in header else None
        except Exception:  # noqa: BLE001 - a broken WCS must not stop a subtraction on one grid
            wcs = None
    del FITSFixedWarning
    g = gain if gain is not None else header.get("GAIN", primary.get("GAIN"))
    mask = np.zeros(data.shape, masks.MASK_DTYPE)
    nan = ~np.isfinite(data)
    masks.set_plane(mask, nan, "NO_DATA")
    sat = header.get("SATURATE", primary.get("SATURATE"))
    if sat is not None:
        masks.set_plane(mask, np.isfinite(data) & (data >= float(sat)), "SAT")
    sky_var = _robust_sigma(data[~nan]) ** 2
    if read_noise is not None and g:
        sky_var = max(sky_var, (float(read_noise) / float(g)) ** 2)
    var = np.full(data.shape, sky_var)
    if g:
        var += np.clip(np.where(nan, 0, data), 0, None) / float(g)
    meta = {}
    for key in ("SATURATE", "MAGZERO", "EXPTIME", "MJD-OBS", "FILTER"):
        if key in header:
            meta[key] = header[key]
    meta["GAIN"] = float(g) if g else 0.0
    meta["BUNIT"] = header.get("BUNIT", "adu")
    return Exposure(MaskedImage(data, mask, var), wcs=wcs, psf=None, metadata=meta)


# ---------------------------------------------------------------- command line
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "subtract",
        help="difference of two images on one pixel grid (science - template)",
        description="Image subtraction (Alard-Lupton with a spatially varying kernel, or ZOGY) of two "
        "images already on one pixel grid, in the spirit of `hotpants -inim -tmplim -outim`. Reads "
        "diapipe Exposure files or plain single-HDU FITS; measures the PSFs when the files carry none. "
        "Writes an Exposure file: IMAGE (difference, science units), MASK, VARIANCE, PSF, and the "
        "diagnostics KERNEL, KGRID, KSUMMAP, STAMPS (and SCORR for ZOGY).",
    )
    p.add_argument("science")
    p.add_argument("template")
    p.add_argument("-o", "--output", required=True, help="difference exposure to write")
    p.add_argument("--method", choices=["al", "zogy"], default="al")
    p.add_argument("--convolve", choices=["template", "science", "auto"], default="template")
    p.add_argument("--spatial-order", type=int, default=2, help="kernel spatial polynomial order")
    p.add_argument("--background-order", type=int, default=1, help="differential background order")
    p.add_argument("--basis", choices=["alard-lupton", "delta"], default="alard-lupton")
    p.add_argument("--no-decorrelate", action="store_true", help="skip the Reiss & Lupton afterburner")
    p.add_argument("--stamp-snr", type=float, default=20.0, help="minimum peak S/N of kernel stars")
    p.add_argument("--clip-sigma", type=float, default=10.0,
                   help="stamp rejection threshold [robust sigma]; ~4 for small fields with few stars")
    p.add_argument("--gain", type=float, help="e-/ADU of both plain-FITS inputs (default: GAIN card)")
    p.add_argument("--template-gain", type=float, help="e-/ADU of the template if different")
    p.add_argument("--read-noise", type=float, help="read noise [e-] (floor on the sky noise of plain FITS)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from .logs import setup

    setup()
    sci = read_image(args.science, args.gain, args.read_noise)
    tpl = read_image(args.template, args.template_gain or args.gain, args.read_noise)
    cfg = SubtractConfig(method=args.method, convolve=args.convolve, spatial_order=args.spatial_order,
                         background_order=args.background_order, basis=args.basis,
                         decorrelate=not args.no_decorrelate, stamp_min_snr=args.stamp_snr,
                         clip_sigma=args.clip_sigma)
    diff = subtract(sci, tpl, cfg, data_id={"science": str(args.science)}, science_path=args.science,
                    template_path=args.template)
    diff.write(args.output)
    m = diff.metadata
    print(f"wrote {args.output}: {m['SUBMETH']} convolved {m['CONVDIR']} KSUM={m['KSUM']} "
          f"NSTAMP={m['NSTAMP']} NREJ={m['NREJ']} KCHI2={m['KCHI2']} KFALLBK={m['KFALLBK']} "
          f"DIFFRMS={m['DIFFRMS']} ({m['SUBTIME']} s)")
    return 0


def config_dict(cfg: SubtractConfig) -> dict:
    return asdict(cfg)


def subtract_files(calexp_path, template_path, diffexp_path, config=None, data_id=None) -> Exposure:
    """Read a calexp and its template (on the calexp's grid), subtract, write the diffexp atomically."""
    science = Exposure.read(calexp_path)
    template = Exposure.read(template_path)
    data_id = data_id if data_id is not None else science.data_id
    diff = subtract(science, template, config, data_id=data_id, science_path=calexp_path,
                    template_path=template_path)
    diff.write(diffexp_path)
    return diff
