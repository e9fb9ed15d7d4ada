"""Align frames that have no sky WCS, and build a template from the best-seeing ones.

For archives of reduced frames with only a pointing (like the SAAO 1.0m
KB13475 series): every frame is registered to a reference frame by its stars.

1. **Detect** stars (``sep``: background, 5-sigma extraction, windowed
   centroids), keep the brightest unsaturated ones.
2. **Match by triangles** (Valdes et al. 1995; the astroalign idea): triangles
   of the ~30 brightest stars are described by their two side ratios, which do
   not change under translation, rotation and scale; near neighbours in that
   space propose similarity transforms, and the one that maps the most stars
   within ``match_radius`` px wins (RANSAC-like voting).
3. **Refine**: with the similarity transform as a guide, all stars are paired
   by nearest neighbour and a polynomial of ``order`` (default 2) in x, y is
   fitted from reference to frame coordinates, with 3-sigma clipping.  The
   residual RMS on matched stars is the alignment quality.
4. **Resample** the frame onto the reference grid with Lanczos-3
   (``diapipe.warp.lanczos_resample``), the Jacobian of the polynomial keeping
   fluxes, variance propagated, saturated pixels flagged (6 x 6 footprint).
5. **Template**: the N best-seeing aligned frames, photometrically scaled to
   the reference by matched-star flux ratios, stacked by
   ``diapipe.coadd.assemble_coadd`` (artefact rejection, weights, PSF).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sep
from astropy.io import fits
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from . import masks
from .exposure import Exposure, MaskedImage
from .fileio import DiapipeError, write_text
from .psf import PixelPsf, poly_design
from .warp import COADD_MAGZERO, lanczos_resample

log = logging.getLogger(__name__)


# --------------------------------------------------------------- reading
def read_frame(path, gain: float | None = None, read_noise: float | None = None, saturation: float = 60000.0,
               nominal_scale: float = 0.31) -> Exposure:
    """A reduced frame (ADU) as an Exposure in electrons, background subtracted.

    Variance = (signal + sky) e- + read_noise^2; SAT where raw >= ``saturation``
    ADU; a nominal TAN WCS from the RA/DEC pointing strings (``nominal_scale``
    arcsec/px, north up; only a label - alignment never uses it).
    """
    try:
        with fits.open(path, memmap=False) as hdul:
            h = hdul[0].header
            data = np.asarray(hdul[0].data, dtype=np.float64)
    except (OSError, ValueError, TypeError) as exc:
        raise DiapipeError(f"cannot read frame ({exc})", path) from exc
    if data.ndim != 2:
        raise DiapipeError(f"frame is not a 2-D image (shape {data.shape})", path)
    gain = float(gain if gain is not None else h.get("GAIN", 1.0))
    rn = float(read_noise if read_noise is not None else h.get("RDNOISE", 0.0))
    sat = data >= saturation
    e = data * gain
    bkg = sep.Background(np.ascontiguousarray(e), mask=sat, bw=64, bh=64, fw=3, fh=3)
    sky = bkg.back()
    var = np.clip(e, 0, None) + rn**2
    mask = np.zeros(e.shape, masks.MASK_DTYPE)
    masks.set_plane(mask, sat, "SAT")
    mask_bad = ~np.isfinite(e)
    masks.set_plane(mask, mask_bad, "BAD")
    img = np.where(mask_bad, 0.0, e - sky)
    meta = {"FRAME": Path(path).name, "MJD-OBS": float(h.get("MJD-OBS", np.nan)), "EXPTIME": float(h.get("EXPTIME", 0)),
            "GAIN": gain, "RDNOISE": rn, "SKYLEVEL": float(np.median(sky))}
    for k in ("PFWHM", "PHJDMID", "FILTERS", "OBJECT"):
        if k in h:
            meta[k] = h[k]
    return Exposure(MaskedImage(img, mask, var), wcs=_nominal_wcs(h, e.shape, nominal_scale), metadata=meta)


def _nominal_wcs(h, shape, scale) -> WCS:
    from astropy.coordinates import Angle

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    try:
        ra = Angle(str(h["RA"]).strip(), unit="hourangle").deg
        dec = Angle(str(h["DEC"]).strip(), unit="deg").deg
    except Exception:  # no pointing: a harmless placeholder; the pipeline never trusts this WCS
        ra, dec = 0.0, 0.0
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    s = scale / 3600
    w.wcs.cd = [[-s, 0], [0, s]]
    w.wcs.set()
    return w


# -------------------------------------------------------------- stars
@dataclass
class Stars:
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: float  # median FWHM (px) of the bright unsaturated stars
    clean: np.ndarray = None  # no neighbour within 2.5 FWHM brighter than 10% of the star
    snr: np.ndarray = None


@dataclass
class Found:
    """Stars found on a frame (``find_stars``), before their centroids are measured at some seeing."""

    img: np.ndarray  # float64 image
    err: np.ndarray  # per-pixel sigma
    bad: np.ndarray
    obj: np.ndarray  # sep objects kept as candidates, brightest first
    all_xy: np.ndarray  # every detection (for the isolation test)
    all_flux: np.ndarray
    sig: float  # rough Gaussian sigma of the brightest (px), bounds the centroid's move
    fwhm: float  # median FWHM (px) of the bright unsaturated stars


def find_stars(exp: Exposure, nmax: int = 400, thresh: float = 5.0) -> Found:
    """sep detection of the brightest ``nmax`` unsaturated stars and the frame's seeing."""
    img = np.ascontiguousarray(exp.image, dtype=np.float64)
    err = np.sqrt(np.ascontiguousarray(exp.variance, dtype=np.float64))
    bad = masks.is_set(exp.mask, *masks.BAD_PLANES)
    sep.set_extract_pixstack(1_000_000)
    obj = sep.extract(img, thresh, err=err, mask=bad, minarea=5)
    if len(obj) < 3:
        raise DiapipeError(f"only {len(obj)} stars detected; cannot align", exp.metadata.get("FRAME"))
    ny, nx = img.shape
    ix = np.clip(obj["x"].round().astype(int), 0, nx - 1)
    iy = np.clip(obj["y"].round().astype(int), 0, ny - 1)
    from scipy.ndimage import maximum_filter

    near_sat = maximum_filter(masks.is_set(exp.mask, "SAT"), size=9)[iy, ix]
    ok = ((obj["flag"] & ~1) == 0) & (obj["a"] > 0.5) & ~near_sat
    ok &= (ix > 8) & (iy > 8) & (ix < nx - 9) & (iy < ny - 9)
    all_xy = np.column_stack([obj["x"], obj["y"]])
    all_flux = obj["flux"]
    obj = obj[ok]
    obj = obj[np.argsort(-obj["flux"])][:nmax]
    fwhm0 = 2.0 * np.sqrt(np.log(2) * (obj["a"] ** 2 + obj["b"] ** 2))
    sig = float(np.clip(np.median(fwhm0[: min(30, len(fwhm0))]) / 2.355, 0.8, 10))
    fwhm = seeing_fwhm(img, obj["x"][:40], obj["y"][:40])
    return Found(img, err, bad, obj, all_xy, all_flux, sig, fwhm)


def measure_stars(f: Found, common_fwhm: float = 9.0) -> Stars:
    """Windowed centroids (px), aperture fluxes (e-) and ``clean`` flags of found stars, sorted by flux.

    Centroids are measured on the image degraded to a common seeing
    (``common_fwhm`` px, at least 1.05x the frame's): blends then bias a
    star's centroid the same way in two frames measured at the same seeing,
    so the bias cancels in their alignment.  ``clean`` marks stars without a
    significant neighbour, whose centroids do not move with the seeing.
    """
    obj, fwhm, bad = f.obj, f.fwhm, f.bad
    target = max(common_fwhm, fwhm * 1.05)
    sm = _smooth_to(f.img, fwhm, target)
    sig_t = target / 2.355
    x, y, fl = sep.winpos(sm, obj["x"], obj["y"], np.full(len(obj), sig_t), mask=bad)
    good = (fl == 0) & np.isfinite(x) & np.isfinite(y) & (np.hypot(x - obj["x"], y - obj["y"]) < 2 * f.sig)
    x, y = x[good], y[good]
    flux, ferr, _ = sep.sum_circle(f.img, x, y, 1.5 * fwhm, err=f.err, mask=bad)
    # clean: no detected neighbour within 2.5 FWHM carrying more than 10% of the star's flux
    d, nb = cKDTree(f.all_xy).query(np.column_stack([x, y]), k=12, distance_upper_bound=2.5 * fwhm)
    has = np.isfinite(d) & (d > 1.0)  # d <= 1 px is the star itself
    nflux = np.where(has, np.append(f.all_flux, 0.0)[np.minimum(nb, len(f.all_flux))], 0.0)
    clean = ~np.any(nflux > 0.1 * flux[:, None], axis=1)
    return Stars(x, y, flux, fwhm, clean, flux / np.maximum(ferr, 1e-9))


def detect_stars(exp: Exposure, nmax: int = 400, thresh: float = 5.0, common_fwhm: float = 9.0) -> Stars:
    """Brightest ``nmax`` unsaturated stars: windowed centroids (px), aperture fluxes (e-), seeing.

    ``find_stars`` then ``measure_stars`` at ``common_fwhm``.
    """
    return measure_stars(find_stars(exp, nmax, thresh), common_fwhm)


def pair_seeing(fwhm_ref: float, fwhm_frame: float) -> float:
    """Common seeing (px) for a pair's centroids: 1.05x the worse FWHM, rounded up to 0.1 px.

    Not the series' worst (~9 px): smoothing a good frame that far doubles the
    centroid noise of faint stars and loses crowded ones to winpos.
    """
    return float(np.ceil(10 * 1.05 * max(fwhm_ref, fwhm_frame)) / 10)


def seeing_fwhm(img, x, y, r: int = 10) -> float:
    """Median FWHM (px) of stars at (x, y) from their area above half maximum (robust in crowded fields)."""
    from .psf import half_max_fwhm

    vals = []
    ny, nx = img.shape
    for xi, yi in zip(x, y):
        ix, iy = int(round(xi)), int(round(yi))
        if r <= ix < nx - r and r <= iy < ny - r:
            st = img[iy - r:iy + r + 1, ix - r:ix + r + 1]
            if st.max() > 0:
                # only the connected core: neighbours above half max elsewhere must not count
                from scipy import ndimage

                lab, _ = ndimage.label(st >= 0.5 * st.max())
                core = lab == lab[r, r] if lab[r, r] else lab == lab.flat[np.argmax(st)]
                vals.append(np.sqrt(4.0 * core.sum() / np.pi))
    if not vals:
        return float("nan")
    return float(np.median(vals))


def _smooth_to(img, fwhm, target):
    from scipy import ndimage

    k = np.sqrt(max(target**2 - fwhm**2, 0.0)) / 2.355
    return ndimage.gaussian_filter(img, k) if k > 0.2 else img


# ------------------------------------------------------- triangle match
def _triangles(x, y, n: int = 30):
    """Invariants (b/a, c/a; a>=b>=c sides) and vertex indices (ordered by opposite side) of triangles."""
    idx = np.arange(min(n, len(x)))
    from itertools import combinations

    tri = np.array(list(combinations(idx, 3)))
    p = np.column_stack([x, y])[tri]  # (T, 3, 2)
    # side opposite vertex k
    s = np.stack([np.linalg.norm(p[:, 1] - p[:, 2], axis=1), np.linalg.norm(p[:, 0] - p[:, 2], axis=1),
                  np.linalg.norm(p[:, 0] - p[:, 1], axis=1)], axis=1)
    order = np.argsort(-s, axis=1)
    ss = np.take_along_axis(s, order, axis=1)
    keep = ss[:, 2] > 10  # tiny triangles are dominated by centroid noise
    inv = np.column_stack([ss[:, 1] / ss[:, 0], ss[:, 2] / ss[:, 0]])
    verts = np.take_along_axis(tri, order, axis=1)
    return inv[keep], verts[keep]


def similarity_from_pairs(src, dst):
    """Least-squares similarity (scale, rotation, shift): dst = s R src + t.  Returns 2x3 matrix."""
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    n = len(src)
    A = np.zeros((2 * n, 4))
    A[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    A[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    a, b, tx, ty = np.linalg.lstsq(A, dst.ravel(), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def _apply(M, x, y):
    return M[0, 0] * x + M[0, 1] * y + M[0, 2], M[1, 0] * x + M[1, 1] * y + M[1, 2]


def _count_matches(M, ref: Stars, ftree, match_radius: float) -> int:
    tx, ty = _apply(M, ref.x, ref.y)
    dd, _ = ftree.query(np.column_stack([tx, ty]), distance_upper_bound=match_radius)
    return int(np.isfinite(dd).sum())


def match_translation(ref: Stars, frm: Stars, match_radius: float = 3.0, nstars: int = 150):
    """Pure shift ref -> frame by voting: the 2-D histogram of all pairwise offsets peaks at the shift.

    Pointing offsets between frames of one field (no rotation, same camera) are the common case
    in such archives; this finds them even when the brightest stars of the two frames are mostly
    different ones (offsets of 1/4 frame, saturation, clouds), where triangles of the ~45 brightest
    can lock onto a chance pattern.  Returns (2x3 matrix, number of stars it maps within
    ``match_radius``).
    """
    n_r, n_f = min(nstars, len(ref.x)), min(nstars, len(frm.x))
    dx = (frm.x[:n_f, None] - ref.x[None, :n_r]).ravel()
    dy = (frm.y[:n_f, None] - ref.y[None, :n_r]).ravel()
    b = 2.0  # px bins; a 3x3 box sum below catches peaks split between bins
    ex = np.arange(np.floor(dx.min()) - b, dx.max() + 2 * b, b)
    ey = np.arange(np.floor(dy.min()) - b, dy.max() + 2 * b, b)
    h, _, _ = np.histogram2d(dy, dx, bins=(ey, ex))
    from scipy.ndimage import uniform_filter

    iy, ix = np.unravel_index(np.argmax(uniform_filter(h, 3, mode="constant")), h.shape)
    near = (np.abs(dx - (ex[ix] + b / 2)) < 1.5 * b + 1) & (np.abs(dy - (ey[iy] + b / 2)) < 1.5 * b + 1)
    M = np.array([[1.0, 0.0, np.median(dx[near])], [0.0, 1.0, np.median(dy[near])]])
    ftree = cKDTree(np.column_stack([frm.x, frm.y]))
    return M, _count_matches(M, ref, ftree, match_radius)


def match_similarity(ref: Stars, frm: Stars, match_radius: float = 3.0, ntri: int = 45):
    """Similarity transform ref -> frame from triangle invariants and voting; (M, n_matched).

    Two hypotheses compete on the same score (stars of the reference mapped within
    ``match_radius`` of a frame star): the best triangle-derived similarity, and the best
    pure shift (``match_translation``).  A match must map at least max(8, 8% of the stars) AND
    several times what chance alignment gives in a crowded field (``_chance_matches``).
    """
    inv_r, v_r = _triangles(ref.x, ref.y, ntri)
    inv_f, v_f = _triangles(frm.x, frm.y, ntri)
    if len(inv_r) == 0 or len(inv_f) == 0:
        raise DiapipeError("too few stars to form triangles")
    tree = cKDTree(inv_f)
    d, j = tree.query(inv_r, k=1, distance_upper_bound=0.01)
    cand = np.nonzero(np.isfinite(d))[0]
    ftree = cKDTree(np.column_stack([frm.x, frm.y]))
    best, best_n = match_translation(ref, frm, match_radius)
    rng = np.random.default_rng(0)
    if len(cand) > 600:
        cand = rng.choice(cand, 600, replace=False)
    for i in cand:
        src = np.column_stack([ref.x[v_r[i]], ref.y[v_r[i]]])
        dst = np.column_stack([frm.x[v_f[j[i]]], frm.y[v_f[j[i]]]])
        M = similarity_from_pairs(src, dst)
        sc = np.hypot(M[0, 0], M[1, 0])
        if not 0.8 < sc < 1.25:
            continue
        n = _count_matches(M, ref, ftree, match_radius)
        if n > best_n:
            best, best_n = M, n
    need = max(8, int(0.08 * min(len(ref.x), len(frm.x))), int(np.ceil(4 * _chance_matches(ref, frm, match_radius))))
    if best is None or best_n < need:
        raise DiapipeError(f"no consistent star pattern found (best {best_n} matched stars, need {need})")
    return best, best_n


def _chance_matches(ref: Stars, frm: Stars, match_radius: float) -> float:
    """Expected number of reference stars landing within ``match_radius`` of some frame star by chance."""
    area = max(np.ptp(frm.x) * np.ptp(frm.y), 1.0)
    return len(ref.x) * min(1.0, len(frm.x) * np.pi * match_radius**2 / area)


@dataclass
class Alignment:
    """Polynomial map reference pixel -> frame pixel, and how well it fits."""

    order: int
    cx: np.ndarray
    cy: np.ndarray
    x0: float
    y0: float
    scale: float
    rms: float = np.nan  # px, on matched stars (per axis, sqrt(mean(dx^2+dy^2)/2))
    n_matched: int = 0
    similarity: np.ndarray = field(default_factory=lambda: np.eye(2, 3))
    flux_ratio: float = 1.0  # frame flux / reference flux, from matched stars (median)
    rms_bright: float = np.nan  # px, as ``rms`` on the brighter half (by S/N) of the fitted stars

    def __call__(self, x, y):
        A = poly_design(x, y, self.order, self.x0, self.y0, self.scale, self.scale)
        return A @ self.cx, A @ self.cy

    def jacobian_det(self, x, y, h: float = 0.5):
        x, y = np.asarray(x, float), np.asarray(y, float)
        xp, yp = self(x + h, y)
        xm, ym = self(x - h, y)
        xq, yq = self(x, y + h)
        xn, yn = self(x, y - h)
        return ((xp - xm) * (yq - yn) - (xq - xn) * (yp - ym)) / (4 * h * h)


def fit_alignment(ref: Stars, frm: Stars, order: int = 2, match_radius: float = 3.0, shape=(512, 512),
                  min_stars: int = 10) -> Alignment:
    """Triangle-match then fit a polynomial of ``order`` ref -> frame with 3-sigma clipping.

    DiapipeError if fewer than ``min_stars`` paired stars survive the clipping: a fit through
    a handful of stars has a meaningless (near-zero) RMS and is most likely a false match.
    """
    M, _ = match_similarity(ref, frm, match_radius)
    ftree = cKDTree(np.column_stack([frm.x, frm.y]))
    x0, y0, sc = (shape[1] - 1) / 2, (shape[0] - 1) / 2, max(shape) / 2
    guide = lambda x, y: _apply(M, x, y)  # noqa: E731
    radius = match_radius
    for _pass in range(2):  # pair with the similarity, fit; re-pair with the polynomial at 1 px, refit
        tx, ty = guide(ref.x, ref.y)
        dd, jj = ftree.query(np.column_stack([tx, ty]), distance_upper_bound=radius)
        m = np.isfinite(dd)
        ri, fj = np.nonzero(m)[0], jj[m]
        # the fit (and its RMS) uses bright stars that are clean in both frames, if there are enough;
        # at worst 12 of them (2 per coefficient of an order-2 fit) beat every pair with its blends
        for snr_min, n_min in ((100, 15), (50, 15), (50, 12)):
            sel = ref.clean[ri] & frm.clean[fj] & (ref.snr[ri] > snr_min) & (frm.snr[fj] > snr_min)
            if sel.sum() >= n_min:
                ri, fj = ri[sel], fj[sel]
                break
        cx, cy, o, use, rx, ry = _fit_poly(ref, frm, ri, fj, order, x0, y0, sc)
        guide = lambda x, y, cx=cx, cy=cy, o=o: (poly_design(x, y, o, x0, y0, sc, sc) @ cx,  # noqa: E731
                                                 poly_design(x, y, o, x0, y0, sc, sc) @ cy)
        radius = 1.0
    if use.sum() < min_stars:
        raise DiapipeError(f"only {int(use.sum())} stars survive the polynomial fit (need {min_stars}): "
                           f"too few common stars to trust the alignment")
    rms = float(np.sqrt(np.mean(rx[use] ** 2 + ry[use] ** 2) / 2))
    # the brighter half of the fitted stars: if their RMS is much lower, the residual is centroid
    # noise of the fainter ones (not a transform the polynomial cannot follow)
    snr = np.minimum(ref.snr[ri], frm.snr[fj])
    bright = use & (snr >= np.median(snr[use]))
    rms_b = float(np.sqrt(np.mean(rx[bright] ** 2 + ry[bright] ** 2) / 2)) if bright.sum() >= 3 else rms
    fr = frm.flux[fj][use] / ref.flux[ri][use]
    fr = float(np.median(fr[np.isfinite(fr) & (fr > 0)])) if np.any(fr > 0) else 1.0
    return Alignment(o, cx, cy, x0, y0, sc, rms, int(use.sum()), M, fr, rms_b)


def _fit_poly(ref, frm, ri, fj, order, x0, y0, sc):
    """Polynomial ref -> frame through paired stars, iterated 3-sigma clipping."""
    use = np.ones(len(ri), bool)
    for _ in range(5):
        o = order if use.sum() >= 3 * len(poly_design([0], [0], order, 0, 0, 1, 1)[0]) else 1
        A = poly_design(ref.x[ri], ref.y[ri], o, x0, y0, sc, sc)
        cx = np.linalg.lstsq(A[use], frm.x[fj][use], rcond=None)[0]
        cy = np.linalg.lstsq(A[use], frm.y[fj][use], rcond=None)[0]
        rx, ry = frm.x[fj] - A @ cx, frm.y[fj] - A @ cy
        r = np.hypot(rx, ry)
        sig = np.sqrt(np.mean(r[use] ** 2) / 2)
        new = r < max(3 * sig * np.sqrt(2), 0.05)
        if np.array_equal(new, use):
            break
        use = new
    return cx, cy, o, use, rx, ry


# ---------------------------------------------------------- resampling
def resample_to_reference(frame: Exposure, al: Alignment, shape, flux_scale: float = 1.0) -> Exposure:
    """The frame on the reference pixel grid (Lanczos-3), times ``flux_scale``; NO_DATA outside."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    xr, yr = xx.ravel().astype(float), yy.ravel().astype(float)
    xi, yi = al(xr, yr)
    val, var, msk, ok = lanczos_resample(frame.image, xi, yi, frame.variance, frame.mask)
    det = np.abs(al.jacobian_det(xr, yr))
    img = np.where(ok, val * det * flux_scale, 0.0).reshape(shape)
    v = np.where(ok, var * (det * flux_scale) ** 2, 0.0).reshape(shape)
    m = np.where(ok, msk, masks.bit("NO_DATA")).reshape(shape).astype(masks.MASK_DTYPE)
    meta = dict(frame.metadata)
    meta.update({"ALIGNRMS": al.rms, "ALIGNN": al.n_matched, "ALIGNORD": al.order, "FLUXSCAL": flux_scale,
                 "MAGZERO": COADD_MAGZERO, "BUNIT": "ref-electron",
                 "COVERAGE": float(ok.mean())})
    return Exposure(MaskedImage(img, m, v), wcs=None, metadata=meta)


def empirical_psf(exp: Exposure, stars: Stars, size: int = 25, nmax: int = 40) -> PixelPsf:
    """Constant PixelPsf: median of bright isolated star stamps, each Lanczos-shifted to the stamp centre."""
    c = (size - 1) / 2
    tree = cKDTree(np.column_stack([stars.x, stars.y]))
    v, u = np.mgrid[:size, :size]
    ring = np.hypot(u - c, v - c) >= c - 2
    core = np.hypot(u - c, v - c) <= min(2.0 * (stars.fwhm if np.isfinite(stars.fwhm) else 4.0), c - 3)
    stamps = []
    # centre each stamp on the star's own windowed centroid at its seeing: ``stars`` positions
    # are measured at a common degraded seeing (blend-biased by design), and mis-centred
    # stamps would broaden the median PSF
    img = np.ascontiguousarray(exp.image, dtype=np.float64)
    bad = masks.is_set(exp.mask, *masks.BAD_PLANES)
    sig = max(stars.fwhm, 1.0) / 2.355 if np.isfinite(stars.fwhm) else 1.5
    xw, yw, fl = sep.winpos(img, stars.x, stars.y, np.full(len(stars.x), sig), mask=bad)
    shift_ok = (fl == 0) & np.isfinite(xw) & np.isfinite(yw) & (np.hypot(xw - stars.x, yw - stars.y) < 2.0)
    for x, y, f, ok_c in sorted(zip(xw, yw, stars.flux, shift_ok), key=lambda t: -t[2]):
        if len(stamps) >= nmax:
            break
        if not ok_c or len(tree.query_ball_point([x, y], size)) > 1:
            continue
        xs, ys = (u - c + x).ravel(), (v - c + y).ravel()
        val, _, msk, ok = lanczos_resample(exp.image, xs, ys, mask=exp.mask)
        if not ok.all() or (msk & masks.bits(*masks.BAD_PLANES)).any():
            continue
        st = val.reshape(size, size)
        # local background from the stamp's outer ring: in a crowded field the global sky fit leaves
        # a pedestal of unresolved stars that would otherwise broaden the PSF (and its peak/flux width)
        st = st - np.median(st[ring])
        # normalise by the flux within 2 FWHM, not the whole stamp: faint neighbours inside the
        # stamp would lower every star's normalised peak (a too-broad core); the median over
        # stars then removes the neighbours, and the final PSF is normalised once, wings included
        fc = st[core].sum()
        if fc <= 0:
            continue
        stamps.append(st / fc)
    if len(stamps) < 3:
        raise DiapipeError(f"only {len(stamps)} isolated stars for the PSF", exp.metadata.get("FRAME"))
    psf = np.clip(np.median(stamps, axis=0), 0, None)
    return PixelPsf.constant(psf / psf.sum())


# ---------------------------------------------------------------- series
def align_series(paths, reference=None, order: int = 2, gain=None, read_noise=None, saturation: float = 60000.0,
                 match_radius: float = 3.0):
    """Align every frame to the reference (default: the best-seeing frame).

    Returns (aligned exposures, table rows as dicts with frame, n_matched,
    rms_px, fwhm_px, flux_ratio), skipping frames that fail with their error
    logged (one DiapipeError per frame; the rest carry on).
    """
    frames, found = {}, {}
    rows = []
    for p in paths:
        try:
            e = read_frame(p, gain, read_noise, saturation)
            f = find_stars(e)
        except DiapipeError as exc:
            log.error("%s", exc)
            rows.append({"frame": Path(p).name, "error": str(exc)})
            continue
        frames[p], found[p] = e, f
    if not frames:
        raise DiapipeError("no frame could be read and measured")
    if reference is None:
        reference = min(found, key=lambda q: found[q].fwhm)
    ref_exp, ref_found = frames[reference], found[reference]
    ref_at = {}  # reference stars measured at each pair seeing (0.1 px steps)
    aligned = []
    for p, e in frames.items():
        try:
            # both frames' centroids at the pair's common seeing: blend biases cancel
            target = pair_seeing(ref_found.fwhm, found[p].fwhm)
            if target not in ref_at:
                ref_at[target] = measure_stars(ref_found, target)
            al = fit_alignment(ref_at[target], measure_stars(found[p], target), order=order,
                               match_radius=match_radius, shape=ref_exp.shape)
        except DiapipeError as exc:
            log.error("%s: %s", p, exc)
            rows.append({"frame": Path(p).name, "error": str(exc)})
            continue
        a = resample_to_reference(e, al, ref_exp.shape, flux_scale=1.0 / al.flux_ratio)
        a.metadata["REFFRAME"] = Path(reference).name
        a.metadata["SEEINGPX"] = found[p].fwhm
        aligned.append(a)
        rows.append({"frame": Path(p).name, "n_matched": al.n_matched, "rms_px": al.rms,
                     "rms_bright_px": al.rms_bright, "fwhm_px": found[p].fwhm,
                     "flux_ratio": al.flux_ratio, "order": al.order, "reference": Path(reference).name})
    return aligned, rows


def build_template(aligned: list[Exposure], n_best: int = 10, **coadd_kwargs) -> Exposure:
    """Coadd of the ``n_best`` best-seeing aligned frames, with an empirical PSF per frame."""
    from .coadd import assemble_coadd

    if not aligned:
        raise DiapipeError("no aligned frame to build a template from")
    best = sorted(aligned, key=lambda a: a.metadata["SEEINGPX"])[:n_best]
    ref_wcs = _pixel_wcs(best[0].shape)
    for k, a in enumerate(best):
        a.metadata["visit"] = k
        a.wcs = ref_wcs
        st = detect_stars(a, nmax=80)
        a.psf = empirical_psf(a, st)
    co = assemble_coadd(best, psf_order=0, **coadd_kwargs)
    co.metadata["FRAMES"] = ",".join(a.metadata["FRAME"] for a in best)
    co.metadata["BUNIT"] = "ref-electron"
    st = detect_stars(co, nmax=80)
    co.metadata["SEEINGPX"] = st.fwhm
    return co


def _pixel_wcs(shape) -> WCS:
    """A placeholder TAN WCS (0.31"/px at 0,0) so the coadd code has a grid; not a sky solution."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [0.0, 0.0]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    w.wcs.cd = [[-0.31 / 3600, 0], [0, 0.31 / 3600]]
    w.wcs.set()
    return w


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("align", help="align frames without WCS by star patterns and build a template")
    p.add_argument("frames", nargs="+", help="FITS frames (ADU, reduced)")
    p.add_argument("--reference", default=None, help="reference frame (default: best seeing)")
    p.add_argument("--order", type=int, default=2, help="polynomial order of the alignment")
    p.add_argument("--n-best", type=int, default=10, help="frames in the template")
    p.add_argument("--gain", type=float, default=None)
    p.add_argument("--read-noise", type=float, default=None)
    p.add_argument("--template", default=None, help="write the template Exposure here")
    p.add_argument("--report", default=None, help="write per-frame alignment numbers (JSON) here")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    aligned, rows = align_series(args.frames, args.reference, args.order, args.gain, args.read_noise)
    if args.report:
        write_text(json.dumps(rows, indent=1, default=float) + "\n", args.report)
    if args.template:
        build_template(aligned, args.n_best).write(args.template)
    return 0
