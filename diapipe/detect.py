"""Detection of diaSources on a difference image (PSF matched filter, both polarities).

The detection statistic is the matched-filter significance

    nu = (I (*) P) / sqrt(V (*) P^2)

where ``(*)`` is correlation, I the difference image (electrons), V its variance
plane (e-^2) and P the difference-image PSF (unit sum).  Masked pixels enter
with I = V = 0, so they neither add signal nor noise.  For white noise of
constant variance nu has unit variance everywhere, and for a point source of
flux F on a pixel centre its peak is the optimal S/N

    S/N_opt = F / sqrt(1 / sum(P^2 / V))   (= F sqrt(sum P^2) / sigma for constant sigma).

With ZOGY the subtraction already provides S_corr, a unit-variance score image,
and detection thresholds that instead (``use_scorr``).

The robust (IQR) standard deviation of nu over the valid pixels measures how
well the variance plane describes the noise of the filtered image; correlated
noise (resampling, an undecorrelated kernel) makes it exceed 1.  With
``rescale_noise`` nu is divided by it, so the threshold is in units of the
noise actually present, and PSF-fit errors are scaled by the same factor
(column noiseScale) -- when the mismatch is significant (more than 3 times the
estimate's own statistical error, ~1.17 / sqrt(independent samples)).

Footprints are connected pixels (4-connectivity, scipy.ndimage.label) with
nu >= threshold (DETECTED) or nu <= -threshold (DETECTED_NEGATIVE).  A positive
and a negative footprint closer than ``merge_radius`` PSF FWHMs are merged into
one candidate (the two lobes of a dipole), as LSST's detectAndMeasure does.

The expected number of noise detections is ``expected_false_detections``:
the expected Euler characteristic of the pixelised excursion set of the
filtered Gaussian field (exact for a stationary field on the pixel grid, and
equal to the number of blobs at high thresholds, where blobs have no holes).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
from scipy import ndimage, stats

from . import masks
from .exposure import Exposure
from .fileio import DiapipeError
from .kernel import small_kernel_rfft2

log = logging.getLogger("diapipe.detect")

#: Detection settings (the ``detect`` config block without the measurement keys).
DEFAULTS = {
    "threshold": 5.0,
    "polarity": "both",
    "use_scorr": "auto",
    "min_pixels": 1,
    "merge_radius": 1.5,
    "grow": 1,
    "rescale_noise": True,
    "mask_streaks": True,
    "streak_min_length": 300,
}


@dataclass
class Candidate:
    """One detected candidate: its positive and/or negative footprint(s).

    Coordinates are 0-based pixel indices (x = column, y = row).
    """

    pos_peaks: list = field(default_factory=list)  # [(x, y, nu)] of positive footprints
    neg_peaks: list = field(default_factory=list)  # [(x, y, nu)] of negative footprints
    bbox: tuple = (0, 0, 0, 0)  # (y0, y1, x0, x1) half-open, union of the footprints
    npix: int = 0

    @property
    def has_pos(self) -> bool:
        return bool(self.pos_peaks)

    @property
    def has_neg(self) -> bool:
        return bool(self.neg_peaks)

    @property
    def peak_nu(self) -> float:
        """Largest |nu| of the candidate's footprints (detection S/N)."""
        return max(abs(p[2]) for p in self.pos_peaks + self.neg_peaks)


@dataclass
class Detections:
    candidates: list
    significance: np.ndarray  # nu map, float32
    threshold: float
    noise_std: float  # robust std of nu over valid pixels (1.0 for correct variances)
    n_valid: int
    noise_scale: float = 1.0  # factor nu was divided by (noise_std when rescale_noise, else 1)
    valid: np.ndarray | None = None  # the valid-pixel map used (measurement reuses it)


def valid_pixels(exposure: Exposure) -> np.ndarray:
    """Pixels usable for detection: no bad plane set, finite image, positive finite variance."""
    bad = masks.is_set(exposure.mask, *masks.BAD_PLANES)
    var = exposure.variance
    return ~bad & np.isfinite(exposure.image) & np.isfinite(var) & (var > 0)


def _invalid_border(valid, axis) -> int:
    """Width (pixels) of the fully invalid band on both ends of ``axis`` (the smaller of the two)."""
    line = valid.any(axis=1 - axis)
    if not line.any():
        return len(line)
    good = np.flatnonzero(line)
    return int(min(good[0], len(line) - 1 - good[-1]))


def _fft_correlate(arrays, kernels, valid=None):
    """Correlate each 2-D array with its kernel (odd size): same shape, zero outside the image.

    The FFT grid is padded only as much as wrap-around requires: a border of
    invalid (zero) pixels, like the EDGE band of a difference image, already
    separates the image from its periodic copies, so a 4096^2 diffexp with a
    >= half-kernel EDGE band is transformed at 4096^2 rather than 4320^2.
    """
    ny, nx = arrays[0].shape
    ky, kx = kernels[0].shape
    hy, hx = ky // 2, kx // 2
    ey = _invalid_border(valid, 0) if valid is not None else 0
    ex = _invalid_border(valid, 1) if valid is not None else 0
    shape = (sfft.next_fast_len(ny + max(0, hy - ey), real=True),
             sfft.next_fast_len(nx + max(0, hx - ex), real=True))
    out = []
    for a, kernel in zip(arrays, kernels):
        # correlation = convolution with the flipped kernel
        kf = small_kernel_rfft2(np.asarray(kernel[::-1, ::-1], np.float32), shape)
        if a.shape == shape:
            padded = a
        else:
            padded = np.zeros(shape, np.float32)
            padded[:ny, :nx] = a
        af = sfft.rfft2(padded, workers=1)
        af *= kf
        out.append(sfft.irfft2(af, shape, workers=1, overwrite_x=True)[:ny, :nx])
    return out


def matched_filter(image, variance, valid, psf_stamp) -> np.ndarray:
    """Significance map nu (float32); 0 where no valid pixel contributes."""
    psf_stamp = np.asarray(psf_stamp, np.float64)
    psf_stamp = psf_stamp / psf_stamp.sum()
    zero = np.float32(0)
    img = np.where(valid, image, zero).astype(np.float32, copy=False)
    var = np.where(valid, variance, zero).astype(np.float32, copy=False)
    num, den = _fft_correlate([img, var], [psf_stamp, psf_stamp**2], valid)
    # Below a tiny fraction of the full-stamp noise the FFT round-off dominates: nu = 0 there.
    sub = variance[::16, ::16][valid[::16, ::16]]
    typical = float(np.median(sub)) if sub.size else float(np.median(variance[valid]))
    floor = np.float32(1e-6 * typical * float((psf_stamp**2).sum()))
    none = den <= floor
    # in place: four passes over 4k x 4k float32 instead of four new arrays
    np.maximum(den, floor, out=den)
    np.sqrt(den, out=den)
    np.divide(num, den, out=num)
    np.copyto(num, zero, where=none)
    return num.astype(np.float32, copy=False)


def _filtered_noise(nu, valid, n_target=200_000, clip=4.0):
    """Robust std of nu from ~n_target pixels away from sources, and the number used.

    A first IQR estimate from a regular subgrid; then subgrid points whose
    step x step block, or a neighbouring block, holds |nu| > clip x that estimate
    (a source, a residual) are dropped and the IQR is taken again, so that a
    field dense in sources does not inflate the noise estimate.
    """
    ny, nx = nu.shape
    step = max(1, int(np.sqrt(valid.size / n_target)))
    hh, ww = ny // step * step, nx // step * step
    centre = nu[step // 2 : hh : step, step // 2 : ww : step]
    vc = valid[step // 2 : hh : step, step // 2 : ww : step]
    if hh == 0 or ww == 0 or not vc.any():
        return float("nan"), 0
    s0 = _robust_std(centre[vc])
    if not (np.isfinite(s0) and s0 > 0):
        return s0, int(vc.sum())
    blockmax = np.abs(nu[:hh, :ww]).reshape(hh // step, step, ww // step, step).max(axis=(1, 3))
    hot = ndimage.maximum_filter(blockmax, size=3) > clip * s0
    keep = vc & ~hot
    if keep.sum() < 0.2 * vc.sum():  # nearly everything "hot": the first estimate is all we have
        return s0, int(vc.sum())
    return _robust_std(centre[keep]), int(keep.sum())


def _robust_std(x) -> float:
    if x.size == 0:
        return float("nan")
    q25, q75 = np.percentile(x, [25, 75])
    return float((q75 - q25) / 1.3490)


def detect(diffexp: Exposure, config: dict | None = None, scorr: np.ndarray | None = None,
           path=None) -> Detections:
    """Find positive and negative footprints in a difference exposure.

    Sets the DETECTED / DETECTED_NEGATIVE mask planes of ``diffexp`` in place.
    ``scorr`` is ZOGY's S_corr (unit variance); used instead of the matched
    filter when present and ``use_scorr`` is 'auto' or 'always' ('never' ignores it).
    """
    cfg = {**DEFAULTS, **(config or {})}
    if scorr is None:
        scorr = scorr_of(diffexp)
    if diffexp.psf is None:
        raise DiapipeError("difference exposure has no PSF model; cannot build the matched filter",
                           path, diffexp.data_id)
    valid = valid_pixels(diffexp)
    masks.clear_plane(diffexp.mask, "DETECTED")
    masks.clear_plane(diffexp.mask, "DETECTED_NEGATIVE")
    ny, nx = diffexp.shape
    if not valid.any():
        log.warning("no valid pixels in the difference image: nothing to detect")
        return Detections([], np.zeros((ny, nx), np.float32), float(cfg["threshold"]), float("nan"), 0)

    use_scorr = cfg["use_scorr"]
    if scorr is not None and use_scorr in ("auto", "always"):
        nu = np.where(valid & np.isfinite(scorr), scorr, 0).astype(np.float32)
        log.info("detecting on ZOGY S_corr")
    else:
        if use_scorr == "always":
            raise DiapipeError("use_scorr is 'always' but the difference exposure has no SCORR HDU",
                               path, diffexp.data_id)
        # One PSF for the whole detector (its centre): detection loses < 1% S/N
        # for the few-% FWHM changes across a CCD; measurement uses the local PSF.
        psf_stamp = diffexp.psf.image(0.5 * (nx - 1), 0.5 * (ny - 1))
        nu = matched_filter(diffexp.image, diffexp.variance, valid, psf_stamp)

    # Noise diagnostic from a subsample: 1.0 means the variance plane is right.
    noise_std, n_sample = _filtered_noise(nu, valid)
    # Correlated noise (resampled template, undecorrelated kernel) or a mis-scaled
    # variance plane make the filtered noise differ from 1: measure it (IQR, robust
    # to sources) and threshold in units of the noise actually there.
    # Only when the mismatch is significant: the IQR estimate's error is ~1.17 / sqrt(N_eff),
    # N_eff = independent samples (nu is correlated over ~4 pi sigma_PSF^2 pixels).
    from .psf import half_max_fwhm

    fwhm = half_max_fwhm(diffexp.psf.image(0.5 * (nx - 1), 0.5 * (ny - 1)))  # robust to Moffat wings
    step = max(1, int(np.sqrt(valid.size / 200_000)))
    n_eff = min(n_sample, n_sample * step**2 / (4 * np.pi * (fwhm / 2.3548) ** 2))
    noise_err = 1.17 / np.sqrt(max(n_eff, 1.0))
    scale = 1.0
    if (cfg["rescale_noise"] and n_sample >= 1000 and np.isfinite(noise_std) and noise_std > 0
            and abs(noise_std - 1) > 3 * noise_err):
        scale = noise_std
        nu /= np.float32(scale)
    thr = float(cfg["threshold"])
    masks.clear_plane(diffexp.mask, "STREAK")
    if cfg["mask_streaks"]:
        # satellite and aircraft trails: light in one image only, long and straight; detecting
        # along them gives a chain of bright bogus diaSources (LSST masks them as STREAK too).
        # |nu|: a trail in the template, or a bad row, is a negative line
        streak = find_streaks(np.abs(nu), valid, fwhm, float(cfg["streak_min_length"]))
        if streak.any():
            masks.set_plane(diffexp.mask, streak, "STREAK")
            valid = valid & ~streak
            log.info("masked %d streak pixels (STREAK plane); no detection there", int(streak.sum()))
    cands = _footprints(nu, valid, thr, cfg, fwhm, diffexp.mask)
    log.info("%d candidates above %.1f sigma (matched-filter noise %.3f x the variance plane's%s)",
             len(cands), thr, noise_std, ", rescaled" if scale != 1.0 else "")
    return Detections(cands, nu, thr, noise_std, int(valid.sum()), scale, valid)


def find_streaks(nu, valid, fwhm: float, min_length: float = 300.0, level: float = 3.0,
                 max_streaks: int = 5) -> np.ndarray:
    """Boolean map of pixels on long straight trails in a significance image ``nu`` (pass |nu| for both signs).

    Pixels above ``level`` sigma are binned into blocks of ~1 FWHM; a Hough transform of
    the blocks proposes lines, and a line is a streak where it runs covered (gaps of at
    most 3 blocks) for at least ``min_length`` px: sources, even in a crowded field, line
    up only by chance and over short runs; masked stretches do not break a run.  The line is
    re-fitted to the trail's ridge, and the mask is the band within the trail's measured
    half-width plus 2 FWHM, along the covered run plus 2 FWHM at each end.
    Repeats for up to ``max_streaks`` trails.
    """
    ny, nx = nu.shape
    out = np.zeros((ny, nx), bool)
    b = max(2, int(round(fwhm)))
    blocks = _block_any(valid & (nu > level), b)
    nyb, nxb = blocks.shape
    seen = None
    min_blocks = min_length / b
    if blocks.sum() < min_blocks:
        return out
    # chance that a block next to a line is set with no trail there (three blocks across it)
    p_random = 1.0 - (1.0 - blocks.mean()) ** 3
    if p_random > 0.3:  # so crowded that chance alignments run on: no trail can be told apart
        log.warning("%.0f%% of the difference image is above %.0f sigma: no streak search", 100 * blocks.mean(), level)
        return out
    theta = np.deg2rad(np.arange(0.0, 180.0, 0.5))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    diag = int(np.ceil(np.hypot(nyb, nxb)))
    for _ in range(max_streaks):
        by, bx = np.nonzero(blocks)
        if len(by) < min_blocks:
            break
        # votes[theta, rho]: blocks on the line x cos + y sin = rho (1-block bins)
        rho = (np.outer(cos, bx.astype(np.float32)) + np.outer(sin, by.astype(np.float32))
               + np.float32(diag + 0.5)).astype(np.int32)  # rounded, offset to >= 0
        votes = np.zeros((len(theta), 2 * diag + 1), np.int64)
        for k in range(len(theta)):
            votes[k] = np.bincount(rho[k], minlength=2 * diag + 1)
        k, r = np.unravel_index(int(np.argmax(votes)), votes.shape)
        if votes[k, r] < min_blocks:
            break
        # the Hough line, refined on the blocks near it (its 0.5 deg steps drift by a block
        # over a detector), then the covered run along the refined line
        if seen is None:
            # blocks that are mostly masked say nothing: a trail crossing a masked region is not broken
            seen = _block_pad(valid, b).reshape(nyb, b, nxb, b).mean(axis=(1, 3)) >= 0.5
        c, sn, rb = _refine_line(by, bx, cos[k], sin[k], float(r - diag))
        seg = _covered_run(blocks, seen, c, sn, rb, nyb, nxb, p_random, min_blocks)
        if seg is None or seg[1] - seg[0] < min_blocks:
            break
        # block coordinates -> pixels: x_px = (x_block + 0.5) b - 0.5
        off = 0.5 * (b - 1)
        band, half = _streak_band(nu, valid, level, c, sn, rb * b + off * (c + sn),
                                  seg[0] * b + off * (c - sn), seg[1] * b + off * (c - sn), fwhm)
        log.info("streak: normal angle %.2f deg, offset %.1f px, run %.0f-%.0f px along it, half-width %.0f px",
                 np.degrees(np.arctan2(sn, c)), rb * b + off * (c + sn), seg[0] * b, seg[1] * b, half)
        out |= band
        # remove the trail's blocks and look for another
        blocks &= ~_block_any(band, b)
    return out


def _block_pad(a: np.ndarray, b: int) -> np.ndarray:
    """A boolean image padded with False to sides that are multiples of b."""
    ny, nx = a.shape
    out = np.zeros((-(-ny // b) * b, -(-nx // b) * b), bool)
    out[:ny, :nx] = a
    return out


def _block_any(a: np.ndarray, b: int) -> np.ndarray:
    """OR over b x b blocks of a boolean image (padded with False; rows first: 3x faster)."""
    a = _block_pad(a, b)
    nyb, nxb = a.shape[0] // b, a.shape[1] // b
    return np.logical_or.reduce(a.reshape(nyb, b, nxb * b), axis=1).reshape(nyb, nxb, b).any(axis=2)


def _refine_line(by, bx, c, s, rho, width: float = 2.0, iterations: int = 3):
    """Least-squares line through the points within ``width`` of x c + y s = rho: (c, s, rho).

    With n = (c, s) the normal and u = (-s, c) the direction, the offsets d = a + b t of the
    near points (t along u) put the line at (rho + a) n + t (u + b n): its normal is n - b u.
    """
    for _ in range(iterations):
        d = bx * c + by * s - rho
        near = np.abs(d) <= width
        if near.sum() < 10:
            break
        t = -bx[near] * s + by[near] * c
        slope, icpt = np.polyfit(t, d[near], 1)
        norm = np.hypot(1.0, slope)
        c, s, rho = (c + slope * s) / norm, (s - slope * c) / norm, (rho + icpt) / norm
    return c, s, rho


def _covered_run(blocks, seen, c, s, rho, nyb, nxb, p_random: float, min_blocks: float, gap: int = 3):
    """Longest run (t0, t1) along the line x c + y s = rho (t: position along it, blocks) where one
    of the three blocks across the line is set, bridging gaps of up to ``gap`` blocks and any
    stretch where those blocks are masked (not ``seen``).  The run must be covered densely
    (set at >= 70% of its seen positions, and >= 3x the chance rate ``p_random``) and set at
    >= min_blocks / 2 positions; None if no run is."""
    # points along the line: foot of the perpendicular from the origin, then the direction (-s, c)
    x0, y0 = rho * c, rho * s
    t = np.arange(-np.hypot(nyb, nxb), np.hypot(nyb, nxb) + 1)
    xs, ys = x0 - s * t, y0 + c * t
    inside = (xs >= -0.5) & (xs < nxb - 0.5) & (ys >= -0.5) & (ys < nyb - 0.5)
    t, xs, ys = t[inside], xs[inside], ys[inside]
    if not len(t):
        return None
    hit = np.zeros(len(t), bool)
    known = np.zeros(len(t), bool)
    for o in (-1, 0, 1):  # across the line
        ix = np.clip(np.rint(xs + o * c).astype(int), 0, nxb - 1)
        iy = np.clip(np.rint(ys + o * s).astype(int), 0, nyb - 1)
        hit |= blocks[iy, ix]
        known |= seen[iy, ix]
    idx = np.flatnonzero(hit | ~known)
    if not len(idx):
        return None
    # split where the gap exceeds ``gap`` blocks; keep the longest dense run
    breaks = np.flatnonzero(np.diff(idx) > gap + 1)
    starts = np.r_[idx[0], idx[breaks + 1]]
    ends = np.r_[idx[breaks], idx[-1]]
    best = None
    for a, e in zip(starts, ends):
        nhit = int(hit[a:e + 1].sum())
        frac = nhit / max(int((known | hit)[a:e + 1].sum()), 1)
        if (nhit >= 0.5 * min_blocks and frac >= max(0.7, 3 * p_random)
                and (best is None or e - a > best[1] - best[0])):
            best = (a, e)
    if best is None:
        return None
    return float(t[best[0]]), float(t[best[1]] + 1)


def _streak_band(nu, valid, level, c, s, rho_px, t0_px, t1_px, fwhm):
    """Pixels on the trail near the line x c + y s = rho_px (pixels), between t0_px - 2 FWHM and
    t1_px + 2 FWHM along it (t as in ``_covered_run``, in pixels), and the trail's half-width.

    The line is first re-fitted to the trail's ridge: in 64-px pieces along it, the peak of the
    median cross-profile (median along the piece: sources beside the trail do not move it).
    The half-width is where that median profile, over the whole run, falls below ``level``;
    the band is the half-width plus 2 FWHM (a bright trail's wings, where its brightness or a
    residual beside it lifts them, still reach the detection threshold 1 FWHM further out).
    """
    ny, nx = nu.shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    rmax = int(np.ceil(20 * fwhm))
    w = int(np.ceil(4 * fwhm))
    for _ in range(2):
        d = xx * c + yy * s - rho_px  # perpendicular distance (px)
        t = -xx * s + yy * c  # position along the line (px)
        near = np.flatnonzero(valid & (np.abs(d) < w))
        dn, tn, vn = d.ravel()[near], t.ravel()[near], nu.ravel()[near]
        ts, ds = [], []
        for a in np.arange(t0_px, t1_px, 64.0):
            sel = (tn >= a) & (tn < a + 64)
            if sel.sum() < 64:
                continue
            prof = _median_profile(np.rint(dn[sel]).astype(int) + w, vn[sel])
            if np.nanmax(prof) < level:
                continue
            ts.append(a + 32.0)
            ds.append(float(np.nanargmax(prof)) - w)
        if len(ts) < 3:
            break
        ts, ds = np.asarray(ts), np.asarray(ds)
        keep = np.ones(len(ts), bool)
        for _ in range(3):  # drop pieces whose ridge a source or a masked gap moved
            slope, icpt = np.polyfit(ts[keep], ds[keep], 1)
            res = np.abs(ds - (icpt + slope * ts))
            new = res <= max(2.0, 3 * 1.4826 * np.median(res[keep]))
            if new.sum() < 3 or np.array_equal(new, keep):
                break
            keep = new
        norm = np.hypot(1.0, slope)
        c, s, rho_px = (c + slope * s) / norm, (s - slope * c) / norm, (rho_px + icpt) / norm
    d = xx * c + yy * s - rho_px
    t = -xx * s + yy * c
    along = (t >= t0_px - 2 * fwhm) & (t <= t1_px + 2 * fwhm)
    sel = along & valid & (np.abs(d) < rmax)
    prof = _median_profile(np.rint(np.abs(d[sel])).astype(int), nu[sel])
    below = np.flatnonzero(~(prof >= level))  # NaN (no pixels) counts as below
    half = float(below[0]) if len(below) else float(rmax)
    return along & (np.abs(d) <= half + 2 * fwhm), half


def _median_profile(index, values) -> np.ndarray:
    """Median of ``values`` per non-negative integer ``index`` (NaN where an index has none)."""
    order = np.argsort(index, kind="stable")
    index, values = index[order], values[order]
    n = int(index.max()) + 1 if len(index) else 0
    edges = np.searchsorted(index, np.arange(n + 1))
    return np.array([np.median(values[edges[k]:edges[k + 1]]) if edges[k + 1] > edges[k] else np.nan
                     for k in range(n)])


def _peaks(nu, labels, n, sign, valid=None):
    """Per label: (x, y, nu) of the extreme valid pixel, bounding slices, valid pixel counts.

    Works inside each footprint's bounding box (ndimage.maximum_position on
    the full image argsorts every pixel: far too slow on 4k x 4k images).  A
    footprint without a valid pixel gets count 0 (and so fails min_pixels).
    """
    if n == 0:
        return [], [], np.zeros(0, int)
    slices = ndimage.find_objects(labels)
    peaks, npix = [], np.zeros(n, int)
    for i, sl in enumerate(slices):
        inside = labels[sl] == i + 1
        if valid is not None:
            inside &= valid[sl]
            if not inside.any():
                peaks.append((sl[1].start, sl[0].start, 0.0))
                continue
        vals = np.where(inside, nu[sl] * sign, -np.inf)
        k = int(np.argmax(vals))
        py, px = np.unravel_index(k, vals.shape)
        y, x = sl[0].start + py, sl[1].start + px
        peaks.append((int(x), int(y), float(nu[y, x])))
        npix[i] = int(inside.sum())
    return peaks, slices, npix


def _grow_into(mask, labels, slices, grow, plane):
    """Set ``plane`` on each footprint dilated by ``grow`` pixels (locally, per bounding box)."""
    ny, nx = labels.shape
    value = masks.MASK_DTYPE(masks.bit(plane))
    for i, sl in enumerate(slices):
        y0, y1 = max(0, sl[0].start - grow), min(ny, sl[0].stop + grow)
        x0, x1 = max(0, sl[1].start - grow), min(nx, sl[1].stop + grow)
        fp = labels[y0:y1, x0:x1] == i + 1
        if grow > 0:
            fp = ndimage.binary_dilation(fp, iterations=grow)
        mask[y0:y1, x0:x1][fp] |= value


#: Masked gaps up to 2 * this wide (px) do not split a footprint.
BRIDGE_PX = 2


def _footprints(nu, valid, thr, cfg, fwhm, mask):
    polarity = cfg["polarity"]
    # A footprint continues across a masked column (or any gap up to 2 BRIDGE_PX wide): a source
    # next to a bad column was split in two, and the half beside the column became a second,
    # spurious diaSource 3-5 px from the first, its centroid failing against the masked pixels.
    # Peaks and pixel counts stay on valid pixels.
    reach = valid if valid.all() else valid | (masks.grow_cross(valid, BRIDGE_PX) & (nu != 0))
    pos_map = (nu >= thr) & reach if polarity in ("both", "positive") else np.zeros(nu.shape, bool)
    neg_map = (nu <= -thr) & reach if polarity in ("both", "negative") else np.zeros(nu.shape, bool)
    lab_p, n_p = ndimage.label(pos_map)
    lab_n, n_n = ndimage.label(neg_map)
    pk_p, sl_p, np_p = _peaks(nu, lab_p, n_p, +1, valid)
    pk_n, sl_n, np_n = _peaks(nu, lab_n, n_n, -1, valid)
    keep_p = np_p >= cfg["min_pixels"]
    keep_n = np_n >= cfg["min_pixels"]

    # Mask planes, footprints grown by a few pixels as LSST does for display and masking.
    grow = int(cfg["grow"])
    _grow_into(mask, lab_p, sl_p, grow, "DETECTED")
    _grow_into(mask, lab_n, sl_n, grow, "DETECTED_NEGATIVE")

    # Pair each negative footprint with positive ones within merge_radius * FWHM (union-find).
    r = max(1, int(np.ceil(cfg["merge_radius"] * fwhm)))
    ny, nx = nu.shape
    parent = {("p", i): ("p", i) for i in range(n_p) if keep_p[i]}
    parent.update({("n", j): ("n", j) for j in range(n_n) if keep_n[j]})

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (xx**2 + yy**2) <= r * r
    for j in range(n_n):
        if not keep_n[j]:
            continue
        s = sl_n[j]
        y0, y1 = max(0, s[0].start - r), min(ny, s[0].stop + r)
        x0, x1 = max(0, s[1].start - r), min(nx, s[1].stop + r)
        near = ndimage.binary_dilation(lab_n[y0:y1, x0:x1] == j + 1, structure=disk)
        for i in np.unique(lab_p[y0:y1, x0:x1][near]):
            if i > 0 and keep_p[i - 1]:
                a, b = find(("n", j)), find(("p", int(i) - 1))
                if a != b:
                    parent[a] = b

    groups: dict = {}
    for key in parent:
        groups.setdefault(find(key), []).append(key)
    cands = []
    for members in groups.values():
        c = Candidate()
        ys0, ys1, xs0, xs1 = ny, 0, nx, 0
        for kind, i in sorted(members):
            pk, sl, npx = (pk_p, sl_p, np_p) if kind == "p" else (pk_n, sl_n, np_n)
            (c.pos_peaks if kind == "p" else c.neg_peaks).append(pk[i])
            s = sl[i]
            ys0, ys1 = min(ys0, s[0].start), max(ys1, s[0].stop)
            xs0, xs1 = min(xs0, s[1].start), max(xs1, s[1].stop)
            c.npix += int(npx[i])
        c.bbox = (ys0, ys1, xs0, xs1)
        cands.append(c)
    # Deterministic order: by row then column of the strongest peak.
    def strongest(c):
        p = max(c.pos_peaks + c.neg_peaks, key=lambda q: abs(q[2]))
        return (p[1], p[0])

    cands.sort(key=strongest)
    return cands


# ------------------------------------------------------------ noise expectation
def kernel_correlations(psf_stamp) -> dict:
    """Correlation coefficients of the matched-filtered white noise at pixel lags.

    For white noise W, nu = (W (*) P) / sqrt(sum P^2) has correlation
    rho(d) = sum_x P(x) P(x + d) / sum P^2.
    """
    p = np.asarray(psf_stamp, float)
    auto = ndimage.correlate(p, p, mode="constant")  # auto[c + d] = sum P(x) P(x+d)
    cy, cx = np.array(auto.shape) // 2
    a0 = auto[cy, cx]
    return {
        "h": auto[cy, cx + 1] / a0,
        "v": auto[cy + 1, cx] / a0,
        "d1": auto[cy + 1, cx + 1] / a0,
        "d2": auto[cy + 1, cx - 1] / a0,
        "h2": auto[cy, cx + 2] / a0 if cx + 2 < auto.shape[1] else 0.0,
    }


def _orthant(u, cov) -> float:
    """P(all X_i > u) for a zero-mean Gaussian vector with covariance ``cov``."""
    k = len(cov)
    # P(X > u) = P(-X < -u); -X has the same covariance.
    return float(stats.multivariate_normal.cdf(np.full(k, -u), mean=np.zeros(k), cov=cov,
                                               abseps=1e-15, releps=1e-5))


def expected_false_detections(psf_stamp, shape, threshold, polarity="both") -> float:
    """Expected number of noise footprints (4-connected) on a ``shape`` image.

    Uses the Euler characteristic of the excursion set on the pixel grid,
    EC = #pixels - #adjacent pairs + #2x2 blocks (all above threshold), whose
    expectation needs only 1-, 2- and 4-point Gaussian orthant probabilities
    with the matched filter's pixel correlations.  At thresholds >~ 3.5 sigma
    the excursion blobs are small and hole-free, so EC = number of footprints.
    """
    ny, nx = shape
    rho = kernel_correlations(psf_stamp)
    u = float(threshold)
    p1 = stats.norm.sf(u)
    ph = _orthant(u, [[1, rho["h"]], [rho["h"], 1]])
    pv = _orthant(u, [[1, rho["v"]], [rho["v"], 1]])
    # 2x2 block: pixels a=(0,0) b=(0,1) c=(1,0) d=(1,1)
    h, v, d1, d2 = rho["h"], rho["v"], rho["d1"], rho["d2"]
    cov4 = np.array([[1, h, v, d1], [h, 1, d2, v], [v, d2, 1, h], [d1, v, h, 1]])
    p4 = _orthant(u, cov4)
    ec = ny * nx * p1 - (ny * (nx - 1) * ph + (ny - 1) * nx * pv) + (ny - 1) * (nx - 1) * p4
    return float(ec * (2 if polarity == "both" else 1))


def expected_false_detections_continuous(fwhm_pix, shape, threshold, polarity="both") -> float:
    """Adler's expected Euler characteristic of a smooth 2-D Gaussian field (for comparison).

    For a Gaussian PSF of sigma s the matched-filtered field has Gaussian
    correlation with sigma sqrt(2) s, so lambda = Var(d nu / dx) = 1 / (2 s^2) and
    EC density = lambda / (2 pi)^(3/2) u exp(-u^2 / 2) per pixel^2 (plus boundary terms).
    """
    s = fwhm_pix / 2.3548
    lam = 1.0 / (2 * s * s)
    ny, nx = shape
    u = float(threshold)
    e = np.exp(-u * u / 2)
    ec = nx * ny * lam / (2 * np.pi) ** 1.5 * u * e + (nx + ny) * np.sqrt(lam) / (2 * np.pi) * e + stats.norm.sf(u)
    return float(ec * (2 if polarity == "both" else 1))


def scorr_of(diffexp: Exposure):
    """ZOGY's S_corr image from the diffexp's SCORR extra HDU, or None."""
    for hdu in getattr(diffexp, "extra_hdus", []) or []:
        if hdu.name == "SCORR" and hdu.data is not None and hdu.data.shape == diffexp.shape:
            return np.asarray(hdu.data, np.float32)
    return None


def write_detection_mask(diffexp: Exposure, path) -> None:
    """Write the diffexp's MASK (with DETECTED planes) as a small compressed FITS file."""
    from astropy.io import fits

    from .fileio import write_fits

    hdu = fits.CompImageHDU(diffexp.mask, name="MASK", compression_type="GZIP_2")
    for name, b, comment in masks.header_cards():
        hdu.header[name] = (b, comment)
    if diffexp.wcs is not None:
        hdu.header.update(diffexp.wcs.to_header(relax=True))
    write_fits(fits.HDUList([fits.PrimaryHDU(), hdu]), path)


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "detect",
        help="detect and measure diaSources on a difference exposure",
        description="Matched-filter detection and measurement of diaSources; writes a Parquet table.",
    )
    p.add_argument("diffexp", help="difference exposure FITS")
    p.add_argument("--science", help="science calexp (for scienceFlux and cutouts)")
    p.add_argument("--template", help="template resampled on the calexp grid (templateFlux, cutouts)")
    p.add_argument("--refcat", help="reference catalog Parquet (refDistance, nearBrightStar)")
    p.add_argument("--config", help="pipeline config YAML (its 'detect' block is used)")
    p.add_argument("--threshold", type=float, help="override the detection threshold (sigma)")
    p.add_argument("--cutouts", help="write science/template/difference cutouts to this FITS file")
    p.add_argument("--mask-out", help="write the MASK with DETECTED planes to this FITS file")
    p.add_argument("-o", "--output", required=True, help="output diaSource Parquet table")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from . import measure
    from .logs import setup

    setup()
    cfg = {}
    if args.config:
        from .config import load

        cfg = load(args.config).get("detect", {})
    if args.threshold is not None:
        cfg["threshold"] = args.threshold
    measure.run_files(
        args.diffexp, args.output, science_path=args.science, template_path=args.template,
        refcat_path=args.refcat, cutouts_path=args.cutouts, mask_path=args.mask_out, config=cfg,
    )
    return 0
