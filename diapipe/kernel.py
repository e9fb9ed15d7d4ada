"""Alard-Lupton PSF-matching kernel: basis, stamp selection, spatial fit, full-image convolution.

The matching kernel K maps the image being convolved (``src``, usually the
template) onto the other one (``tgt``, usually the science image):

    tgt(x) ~ sum_m t_m(x) * (src (*) K_m)(x) + sum_l b_l t_l(x)

with K(x) = sum_j a_j(x) B_j a linear combination of basis images B_j whose
coefficients a_j(x) are low-order polynomials t_m in detector position (as in
Alard 2000, HOTPANTS and LSST ip_diffim).  The basis is a few Gaussians times
polynomials (Alard & Lupton 1998) or delta functions; basis 0 has unit sum and
all others zero sum, so the kernel sum (the flux ratio tgt/src) is a_0(x).

The fit works on stamps around isolated, unmasked, unsaturated stars: each
stamp contributes its normal equations once, the spatial system is assembled
from them (stamp-level least squares), and bad stamps are clipped iteratively
on their kernel sum and chi-square.  The full image is then convolved once
per spatial term (FFT), not once per pixel.

Units: positions in pixels (0-based, x = column); sigmas in pixels.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from .psf import poly_design, poly_terms

log = logging.getLogger("diapipe.kernel")

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


# ---------------------------------------------------------------- basis
def alard_lupton_basis(half: int, sigmas, degrees) -> np.ndarray:
    """Gaussian x polynomial basis images, shape (nbasis, 2 half + 1, 2 half + 1).

    Basis 0 (the narrowest Gaussian) has unit sum; every other image has zero
    sum (its sum times basis 0 is subtracted), so the kernel sum is the
    coefficient of basis 0.  Each image is then scaled to unit L2 norm, which
    keeps the normal equations well conditioned.
    """
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    basis = []
    for s, deg in zip(sigmas, degrees):
        g = np.exp(-(x**2 + y**2) / (2.0 * s**2))
        for i, j in poly_terms(int(deg)):
            basis.append(g * (x / s) ** i * (y / s) ** j)
    return _normalise_basis(np.array(basis))


def delta_basis(half: int) -> np.ndarray:
    """Delta-function basis: one image per kernel pixel, centre first (unit sum), others minus the centre."""
    k = 2 * half + 1
    basis = np.zeros((k * k, k, k))
    order = [half * k + half] + [p for p in range(k * k) if p != half * k + half]
    for n, p in enumerate(order):
        basis[n].flat[p] = 1.0
    return _normalise_basis(basis)


def _normalise_basis(basis: np.ndarray) -> np.ndarray:
    b0 = basis[0] / basis[0].sum()
    out = [b0]
    for b in basis[1:]:
        b = b - b.sum() * b0
        n = np.sqrt((b**2).sum())
        if n > 1e-12:
            out.append(b / n)
    return np.array(out)


def gaussian_sigma(image: np.ndarray) -> float:
    """Gaussian-equivalent sigma (pixels) of a centred PSF stamp from adaptive (Gaussian-weighted) moments.

    Unweighted moments are dominated by Moffat wings; the adaptive weight
    follows the core, as HSM does.
    """
    img = np.asarray(image, float)
    ny, nx = img.shape
    y, x = np.mgrid[:ny, :nx]
    x = x - (nx - 1) / 2.0
    y = y - (ny - 1) / 2.0
    r2 = x**2 + y**2
    sw = max(1.0, 0.25 * min(nx, ny) / 2.0)
    s = sw
    for _ in range(30):
        w = img * np.exp(-r2 / (2 * sw**2))
        tot = w.sum()
        if tot <= 0:
            break
        m2 = 0.5 * (w * r2).sum() / tot  # weighted sigma^2 per axis
        if m2 >= sw**2:  # the weight is narrower than the image: widen it
            sw *= 1.5
            continue
        s2 = m2 * sw**2 / (sw**2 - m2)  # deconvolve the Gaussian weight
        s_new = np.sqrt(s2)
        if abs(s_new - sw) < 1e-4 * sw:
            s = s_new
            break
        sw = s = s_new
    return float(s)


@dataclass
class BasisSpec:
    """What the basis was built from (for the header and for re-use)."""

    kind: str
    half: int
    sigmas: list = field(default_factory=list)
    degrees: list = field(default_factory=list)


def make_basis(sigma_src: float, sigma_tgt: float, cfg) -> tuple[np.ndarray, BasisSpec]:
    """Basis images for matching a PSF of sigma ``sigma_src`` to one of ``sigma_tgt`` (pixels).

    Gaussian widths follow the matching-kernel width sqrt(sigma_tgt^2 - sigma_src^2),
    spread by ``cfg.basis_beta`` (ip_diffim's recipe), never below
    ``cfg.basis_min_sigma``; the kernel half-size follows the PSF sizes.
    """
    sig_k = np.sqrt(max(sigma_tgt**2 - sigma_src**2, 0.0))
    n = len(cfg.basis_degrees)
    beta = cfg.basis_beta
    sigmas = [sig_k * beta ** (i - (n // 2)) for i in range(n)]
    if sigmas[0] < cfg.basis_min_sigma:
        sigmas = [cfg.basis_min_sigma * beta**i for i in range(n)]
    half = int(np.ceil(cfg.kernel_size_sigma * max(sigma_src, sigma_tgt)))
    half = int(np.clip(half, cfg.kernel_half_min, cfg.kernel_half_max))
    if cfg.basis == "delta":
        return delta_basis(half), BasisSpec("delta", half)
    return alard_lupton_basis(half, sigmas, cfg.basis_degrees), BasisSpec(
        "alard-lupton", half, [float(s) for s in sigmas], list(cfg.basis_degrees)
    )


# ---------------------------------------------------------------- stars
def find_peaks(image, sigma, bad, nsigma: float, border: int, return_smoothed: bool = False):
    """Local maxima (3x3 box-smoothed) above ``nsigma`` x local noise; returns x, y, peak.

    Cheaper than a full segmentation on a 4k x 4k image: only pixels above
    threshold are examined (one compiled pass for the smoothing, one for the peaks).
    """
    img = np.asarray(image, np.float32)
    bad = np.asarray(bad, bool)
    sm = np.empty(img.shape, np.float32)
    _box3_masked(img, bad, sm)
    thr = nsigma * sigma / 3.0  # noise of a 3x3 mean is sigma/3
    # float64 holds the threshold exactly as numpy computed it (float32 for a float32 map)
    thr_map = np.asarray(thr, np.float64) if np.ndim(thr) else np.full((1, 1), thr, np.float64)
    border = max(int(border), 2)  # the local-maximum test looks 2 px around
    xs, ys, pk = _local_maxima(sm, img, bad, np.broadcast_to(thr_map, img.shape) if np.ndim(thr) else thr_map,
                               np.ndim(thr) > 0, border)
    return (xs, ys, pk, sm) if return_smoothed else (xs, ys, pk)


@numba.njit(cache=True, nogil=True)
def _box3_masked(img, bad, out):  # pragma: no cover
    """out = 3 x 3 box mean of where(bad, 0, img) with mirrored edges (ndimage.uniform_filter(.., 3),
    mode 'reflect'), as float32 sums: one pass instead of full-image numpy temporaries."""
    ny, nx = img.shape
    rows = np.empty((ny, nx + 2), np.float32)
    zero = np.float32(0.0)
    for y in range(ny):
        ym = y - 1 if y > 0 else 0
        yp = y + 1 if y < ny - 1 else ny - 1
        for xp in range(nx + 2):
            x = min(max(xp - 1, 0), nx - 1)
            a = zero if bad[ym, x] else img[ym, x]
            b = zero if bad[y, x] else img[y, x]
            c = zero if bad[yp, x] else img[yp, x]
            rows[y, xp] = a + b + c
    k = np.float32(1.0 / 9.0)
    for y in range(ny):
        for x in range(nx):
            out[y, x] = (rows[y, x] + rows[y, x + 1] + rows[y, x + 2]) * k


@numba.njit(cache=True, nogil=True)
def _local_maxima(sm, img, bad, thr, per_pixel, border):  # pragma: no cover
    """Pixels of ``sm`` above threshold, at least ``border`` px inside, that beat their 5x5
    neighbours (ties: the first of equal neighbours), in row-major order; their image value."""
    ny, nx = sm.shape
    n = 0
    flags = np.zeros(sm.shape, np.bool_)
    for y in range(border, ny - border):
        for x in range(border, nx - border):
            v = sm[y, x]
            t = thr[y, x] if per_pixel else thr[0, 0]
            if not v > t:
                continue
            ok = True
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    if dx == 0 and dy == 0:
                        continue
                    nb = sm[y + dy, x + dx]
                    if not ((v > nb) or ((v == nb) and ((dy > 0) or ((dy == 0) and (dx > 0))))):
                        ok = False
                        break
                if not ok:
                    break
            if ok:
                flags[y, x] = True
                n += 1
    xs = np.empty(n, np.int64)
    ys = np.empty(n, np.int64)
    pk = np.empty(n, np.float32)
    k = 0
    for y in range(border, ny - border):
        for x in range(border, nx - border):
            if flags[y, x]:
                xs[k], ys[k] = x, y
                pk[k] = np.float32(0.0) if bad[y, x] else img[y, x]
                k += 1
    return xs, ys, pk


def _peaks_at(img, x, y):
    return img[np.asarray(y, int), np.asarray(x, int)] if len(x) else np.zeros(0)


def select_stamps(src, tgt, var_src, var_tgt, bad, half_stamp: int, half_kernel: int, cfg, saturation=None,
                  zero_weight=None):
    """Centres (x, y) of isolated, unmasked, unsaturated stars usable as kernel stamps.

    Stars are found on both images; a stamp is kept when its star is in both,
    no other peak lies within the stamp, no pixel of the (kernel-extended)
    stamp is masked, and it is not saturated.  With ``zero_weight`` (the pixels
    the fit will ignore: masked target pixels, and target pixels within the
    kernel's reach of a masked source pixel) a masked pixel no longer rejects
    the stamp: only one that leaves the star's core, or more than a tenth of
    the stamp, without weight does.  Stamps are spread over the detector (at
    most ``cfg.stamps_per_cell`` per cell of ``cfg.cell_size`` px).
    """
    ny, nx = src.shape
    border = half_stamp + half_kernel + 1
    sig_s = np.sqrt(np.nanmedian(var_tgt[::3, ::3][~bad[::3, ::3]])) if np.any(~bad) else 1.0
    sig_c = np.sqrt(np.nanmedian(var_src[::3, ::3][~bad[::3, ::3]])) if np.any(~bad) else 1.0
    # all peaks above 5 sigma (for isolation), the bright ones well inside the image as candidates
    xf, yf, pf_t, smt = find_peaks(tgt, sig_s, bad, 5.0, 2, return_smoothed=True)
    xg, yg, pf_c, smc = find_peaks(src, sig_c, bad, 5.0, 2, return_smoothed=True)

    def bright(x, y, sm, sig):
        keep = ((sm[y, x] > cfg.stamp_min_snr * sig / 3.0) & (x >= border) & (x < nx - border)
                & (y >= border) & (y < ny - border))
        return x[keep], y[keep], sm[y[keep], x[keep]]

    xt, yt, pt = bright(xf, yf, smt, sig_s)
    xc, yc, pc = bright(xg, yg, smc, sig_c)
    if len(xt) == 0 or len(xc) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    from scipy.spatial import cKDTree

    # in both images (within 2 px)
    tree_c = cKDTree(np.c_[xc, yc])
    d, _ = tree_c.query(np.c_[xt, yt], distance_upper_bound=2.0)
    both = np.isfinite(d)
    xs, ys, peak = xt[both], yt[both], pt[both]
    # isolated: no comparably bright peak (in either image) within the stamp.  Fainter
    # neighbours are harmless: they are in both images and the kernel matches them too.
    xf, yf, pf = np.r_[xf, xg], np.r_[yf, yg], np.r_[_peaks_at(smt, xf, yf), _peaks_at(smt, xg, yg)]
    tree = cKDTree(np.c_[xf, yf])
    r_iso = half_stamp * 1.2
    iso = np.ones(len(xs), bool)
    for n, idx in enumerate(tree.query_ball_point(np.c_[xs, ys], r_iso) if len(xs) else []):
        idx = np.asarray(idx, int)
        far = np.hypot(xf[idx] - xs[n], yf[idx] - ys[n]) > 2.5
        if np.any(pf[idx][far] > cfg.isolation_fraction * peak[n]):
            iso[n] = False
    xs, ys, peak = xs[iso], ys[iso], peak[iso]
    # unmasked, unsaturated, finite over the stamp extended by the kernel
    h = half_stamp + half_kernel
    core = max(2, half_stamp // 3)
    ok = np.ones(len(xs), bool)
    for n, (x, y) in enumerate(zip(xs, ys)):
        win = (slice(y - h, y + h + 1), slice(x - h, x + h + 1))
        if zero_weight is None:
            if bad[win].any():
                ok[n] = False
                continue
        else:
            # a hot pixel or a cosmic ray somewhere in a large stamp costs a few pixels, not the
            # star (at 0.2% hot pixels nearly every 65 x 65 window holds one: the bright stars were lost)
            zw = zero_weight[y - half_stamp : y + half_stamp + 1, x - half_stamp : x + half_stamp + 1]
            if zw[half_stamp - core : half_stamp + core + 1, half_stamp - core : half_stamp + core + 1].any() \
                    or zw.mean() > 0.1:
                ok[n] = False
                continue
        if saturation is not None:
            good = ~bad[win]
            if not good.any() or (np.nanmax(tgt[win][good]) >= cfg.saturation_fraction * saturation[0]
                                   or np.nanmax(src[win][good]) >= cfg.saturation_fraction * saturation[1]):
                ok[n] = False
    xs, ys, peak = xs[ok], ys[ok], peak[ok]
    # spread over the detector: brightest few per cell, then the overall limit
    # cell side: configured, or (0) such that the cells can hold max_stamps
    cell = cfg.cell_size or max(32, int(np.sqrt(nx * ny * cfg.stamps_per_cell / cfg.max_stamps)))
    cid = (ys // cell) * (nx // cell + 1) + xs // cell
    order = np.lexsort((-peak, cid))
    rank = np.zeros(len(xs), int)
    for n in range(1, len(order)):
        if cid[order[n]] == cid[order[n - 1]]:
            rank[order[n]] = rank[order[n - 1]] + 1
    keep = rank < cfg.stamps_per_cell
    xs, ys, peak = xs[keep], ys[keep], peak[keep]
    if len(xs) > cfg.max_stamps:
        # keep the brightest of each rank first, so every cell keeps one
        idx = np.lexsort((-peak, rank[keep]))[: cfg.max_stamps]
        xs, ys, peak = xs[idx], ys[idx], peak[idx]
    return xs.astype(int), ys.astype(int), peak


# ---------------------------------------------------------------- stamp normal equations
@dataclass
class StampSystem:
    """Per-stamp normal equations of the local (spatially constant) fit.

    M : (ns, nb+1, nb+1), b : (ns, nb+1), c : (ns,) y^T W y, npix : (ns,).
    The last column is the differential background (constant over the stamp).
    """

    x: np.ndarray
    y: np.ndarray
    M: np.ndarray
    b: np.ndarray
    c: np.ndarray
    npix: np.ndarray
    M_raw: np.ndarray | None = None  # before the noise debiasing: for chi2 and local fits
    local: tuple | None = None  # _local_fits' result, kept: it depends on the stamps only
    normal: dict | None = None  # _coefficient_maps' (G, t_k, t_b) by (orders, geometry), kept for the CV folds


def stamp_system(src, tgt, weight, xs, ys, basis, half_stamp, var_src=None) -> StampSystem:
    """Build each stamp's normal equations: columns (src (*) B_j) over the stamp, plus a constant.

    With ``var_src`` (the convolved image's variance) the expected noise term of the
    normal matrix, sum_p w_p var_src(p) <B_j, B_k>, is subtracted (``debiased``): noise
    in the convolved image otherwise shrinks the kernel, the errors-in-variables
    attenuation.  It biases the kernel sum (the flux ratio) low when the noisy science
    image is convolved, and, when the seeing is nearly equal, it takes the sharp part out
    of the near-delta kernel a template needs: the star cores of the science image are
    left over (+0.3 to +0.4 sigma mean in the central 2 px of the 50 brightest stars of the
    default survey's equal-seeing visit; std(D/sigma) in their boxes 1.034).
    """
    nb, k, _ = basis.shape
    h = k // 2
    S = 2 * half_stamp + 1
    L = S + 2 * h
    ns = len(xs)
    nb1 = nb + 1
    M = np.zeros((ns, nb1, nb1))
    bvec = np.zeros((ns, nb1))
    c = np.zeros(ns)
    npix = np.zeros(ns)
    M_raw = np.zeros((ns, nb1, nb1))
    if ns == 0:
        return StampSystem(np.asarray(xs, float), np.asarray(ys, float), M, bvec, c, npix, M_raw)
    # basis FFTs on the stamp grid (kernel centred at the origin, wrapped)
    Lf = sfft.next_fast_len(L, real=True)
    kp = np.zeros((nb, Lf, Lf), np.float32)
    kp[:, :k, :k] = basis
    kp = np.roll(kp, (-h, -h), axis=(1, 2))
    Bf = sfft.rfft2(kp, axes=(1, 2), workers=1)
    hs = half_stamp
    gram = basis.reshape(nb, -1) @ basis.reshape(nb, -1).T
    chunk = max(1, int(4e7 // (nb * Lf * Lf * 16)))
    for start in range(0, ns, chunk):
        sl = slice(start, min(ns, start + chunk))
        cut = np.zeros((sl.stop - sl.start, Lf, Lf), np.float32)
        ycut = np.zeros((sl.stop - sl.start, S, S))
        wcut = np.zeros((sl.stop - sl.start, S, S))
        for n, (x, y) in enumerate(zip(xs[sl], ys[sl])):
            cut[n, :L, :L] = src[y - hs - h : y + hs + h + 1, x - hs - h : x + hs + h + 1]
            ycut[n] = tgt[y - hs : y + hs + 1, x - hs : x + hs + 1]
            wcut[n] = weight[y - hs : y + hs + 1, x - hs : x + hs + 1]
        Tf = sfft.rfft2(cut, axes=(1, 2), workers=1)
        conv = sfft.irfft2(Tf[:, None] * Bf[None], s=(Lf, Lf), axes=(2, 3), workers=1)[:, :, h : h + S, h : h + S]
        conv = conv.astype(np.float64)
        X = np.concatenate([conv.reshape(len(ycut), nb, S * S), np.ones((len(ycut), 1, S * S))], axis=1)
        w = wcut.reshape(len(ycut), 1, S * S)
        yv = ycut.reshape(len(ycut), S * S)
        Xw = X * w
        M[sl] = Xw @ X.transpose(0, 2, 1)
        bvec[sl] = np.einsum("nip,np->ni", Xw, yv)
        c[sl] = np.einsum("np,np->n", w[:, 0] * yv, yv)
        npix[sl] = (w[:, 0] > 0).sum(axis=1)
        M_raw[sl] = M[sl]
        if var_src is not None:
            wv = np.array([float((wcut[n] * var_src[y - hs : y + hs + 1, x - hs : x + hs + 1]).sum())
                           for n, (x, y) in enumerate(zip(xs[sl], ys[sl]))])
            M[sl, :nb, :nb] = debiased(M[sl, :nb, :nb], wv[:, None, None] * gram)
    return StampSystem(np.asarray(xs, float), np.asarray(ys, float), M, bvec, c, npix, M_raw)


#: Along every eigen-direction a debiased stamp matrix keeps at least this fraction of the raw
#: matrix's curvature.  The expected noise term is exact on average, but for a faint stamp or a
#: high-frequency basis direction it is as large as the signal, and subtracting it in full
#: leaves near-zero or negative curvatures that the spatial fit amplifies (on 1024^2
#: equal-seeing synthetic pairs: star boxes 1.06-2.6 at spatial order 4).  At 0.5 the star
#: boxes of the default survey are 16/16 within 2%; at 0.2 the same; at 0.05, 13/16.
DEBIAS_FLOOR = 0.5


def debiased(A: np.ndarray, noise: np.ndarray, floor: float = DEBIAS_FLOOR) -> np.ndarray:
    """Normal matrices (..., n, n) minus their expected noise terms, kept positive definite.

    A - noise is diagonalised and each eigenvalue raised, where needed, to ``floor`` times the
    raw matrix's curvature u^T A u along that eigenvector u.
    """
    ev, U = np.linalg.eigh(A - noise)
    raw = np.einsum("...ji,...jk,...ki->...i", U, A, U)
    return (U * np.maximum(ev, floor * raw)[..., None, :]) @ np.swapaxes(U, -1, -2)


# ---------------------------------------------------------------- spatial solution
@dataclass
class KernelSolution:
    """Spatially varying kernel + differential background.

    kernel_components : (nterms, k, k); K(x, y) = sum_m t_m(x, y) kernel_components[m]
    bg_coeffs : (nbg,) coefficients of the background polynomial t_l(x, y)
    The polynomials use psf.poly_design with (x0, y0, sx, sy).
    """

    kernel_components: np.ndarray
    spatial_order: int
    bg_coeffs: np.ndarray
    bg_order: int
    x0: float
    y0: float
    sx: float
    sy: float
    basis_spec: BasisSpec | None = None
    stamps: dict | None = None
    chi2: float = float("nan")
    n_stamps: int = 0
    n_rejected: int = 0
    fallback: str = "none"
    theta: np.ndarray | None = None  # the fitted parameter vector (fit_spatial)
    layout: object = None  # its _Layout (fit_spatial)
    cv_chi2: dict | None = None  # spatial order -> held-out stamp chi2 (when the order was chosen by CV)

    @property
    def half(self) -> int:
        return self.kernel_components.shape[-1] // 2

    def kernel(self, x: float, y: float) -> np.ndarray:
        t = poly_design(x, y, self.spatial_order, self.x0, self.y0, self.sx, self.sy)[0]
        return np.tensordot(t, self.kernel_components, axes=1)

    def ksum(self, x, y) -> np.ndarray:
        t = poly_design(x, y, self.spatial_order, self.x0, self.y0, self.sx, self.sy)
        return t @ self.kernel_components.sum(axis=(1, 2))

    def background(self, x, y) -> np.ndarray:
        t = poly_design(x, y, self.bg_order, self.x0, self.y0, self.sx, self.sy)
        return t @ self.bg_coeffs


class _Layout:
    """Maps the global parameter vector onto each stamp's local coefficients."""

    def __init__(self, nb, korder, bgorder, const_ksum):
        self.nb = nb
        self.nk = len(poly_terms(korder))
        self.nbg = len(poly_terms(bgorder))
        self.korder, self.bgorder = korder, bgorder
        self.const_ksum = const_ksum
        n0 = 1 if const_ksum else self.nk
        self.n0 = n0
        self.nparam = n0 + (nb - 1) * self.nk + self.nbg

    def G(self, tk, tb) -> np.ndarray:
        """(ns, nb+1, nparam) matrices: local coefficients = G @ theta."""
        ns = tk.shape[0]
        G = np.zeros((ns, self.nb + 1, self.nparam))
        if self.const_ksum:
            G[:, 0, 0] = 1.0
        else:
            G[:, 0, : self.nk] = tk
        for j in range(1, self.nb):
            start = self.n0 + (j - 1) * self.nk
            G[:, j, start : start + self.nk] = tk
        G[:, self.nb, self.nparam - self.nbg :] = tb
        return G

    def unpack(self, theta, basis):
        """Spatial kernel components (nk, k, k) and background coefficients."""
        nk = self.nk
        coef = np.zeros((self.nb, nk))
        if self.const_ksum:
            coef[0, 0] = theta[0]
        else:
            coef[0] = theta[:nk]
        for j in range(1, self.nb):
            start = self.n0 + (j - 1) * nk
            coef[j] = theta[start : start + nk]
        comps = np.tensordot(coef.T, basis, axes=1)  # (nk, k, k)
        return comps, theta[self.nparam - self.nbg :]


def _local_fits(sys: StampSystem):
    """Each stamp alone: coefficients, kernel sum and reduced chi2 (computed once per system)."""
    if sys.local is not None:
        return sys.local
    # the raw normal equations: a stamp alone cannot afford the debiasing's noise (it is for the
    # spatial fit, which sums many stamps); these fits only judge the stamps for clipping
    M = sys.M_raw if sys.M_raw is not None else sys.M
    ns, nb1, _ = M.shape
    try:  # one batched LAPACK call; a singular stamp sends us to the loop
        a = np.linalg.solve(M, sys.b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        a = np.full((ns, nb1), np.nan)
        for n in range(ns):
            try:
                a[n] = np.linalg.solve(M[n], sys.b[n])
            except np.linalg.LinAlgError:
                continue
    chi2 = np.where(np.isfinite(a[:, 0]), _chi2_of(sys, np.nan_to_num(a)), np.inf)
    sys.local = (a, a[:, 0], chi2)
    return sys.local


def _chi2_of(sys, a):
    """Reduced chi2 of each stamp for local coefficients a (ns, nb+1)."""
    Mr = sys.M_raw if sys.M_raw is not None else sys.M
    q = sys.c - 2 * np.einsum("ni,ni->n", a, sys.b) + np.einsum("ni,nij,nj->n", a, Mr, a)
    return q / np.maximum(sys.npix - sys.M.shape[1], 1)


def _robust_upper(values, good, nsig):
    v = values[good & np.isfinite(values)]
    if len(v) < 3:
        return np.inf
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return med + nsig * max(mad, 0.05 * abs(med), 1e-12)


def _geometry(shape) -> tuple:
    """(x0, y0, sx, sy): centre and half-sizes [px] normalising x, y in the spatial polynomials."""
    ny, nx = shape
    return (nx - 1) / 2.0, (ny - 1) / 2.0, max(nx / 2.0, 1.0), max(ny / 2.0, 1.0)


def fit_spatial(sys: StampSystem, basis, cfg, shape, spatial_order, bg_order, include=None):
    """Stamp-level least squares for the spatial kernel, with iterative clipping of bad stamps.

    ``include`` (bool per stamp) restricts the fit to those stamps, as if the system held
    only them (the held-out folds use it rather than copying the per-stamp matrices).
    Returns (KernelSolution or None, reason).  ``None`` means too few stamps
    survived for this spatial order.
    """
    x0, y0, sx, sy = _geometry(shape)
    ns = len(sys.x)
    reason = np.array(["ok"] * ns, dtype=object)
    a_loc, ksum_loc, chi_loc = _local_fits(sys)
    good = np.isfinite(ksum_loc) & np.isfinite(chi_loc) & (ksum_loc > 0)
    reason[~good] = "singular"
    if include is not None:
        reason[~include] = "excluded"
        good &= include
    # kernel sums and local chi2: robust outliers are bad stamps (variables, blends, cosmics)
    if good.sum() >= 3:
        med = np.median(ksum_loc[good])
        mad = 1.4826 * np.median(np.abs(ksum_loc[good] - med))
        bad_ks = good & (np.abs(ksum_loc - med) > cfg.clip_sigma * max(mad, 1e-3 * abs(med)))
        reason[bad_ks] = "ksum"
        bad_chi = good & ~bad_ks & (chi_loc > _robust_upper(chi_loc, good & ~bad_ks, cfg.clip_sigma))
        reason[bad_chi] = "chi2_local"
        good &= ~(bad_ks | bad_chi)
    lay = _Layout(basis.shape[0], spatial_order, bg_order, cfg.constant_ksum)
    G, tk, tb = _coefficient_maps(sys, lay, (x0, y0, sx, sy))
    min_needed = max(cfg.min_stamps, int(np.ceil(cfg.stamps_per_term * lay.nk)))
    theta = None
    chi_sp = np.full(ns, np.nan)
    for _ in range(cfg.max_iter + 1):
        if good.sum() < min_needed:
            return None, f"{int(good.sum())} good stamps < {min_needed} needed for spatial order {spatial_order}"
        A, B = _assemble(sys, lay, tk, tb, good.astype(float))
        # tiny ridge: delta bases and high orders can be degenerate
        ridge = cfg.regularization * np.trace(A) / len(A) + 1e-12 * np.trace(A) / len(A)
        try:
            theta = np.linalg.solve(A + ridge * np.eye(len(A)), B)
        except np.linalg.LinAlgError:
            return None, "singular spatial system"
        a_sp = G @ theta
        chi_sp = _chi2_of(sys, a_sp)
        cut = _robust_upper(chi_sp, good, cfg.clip_sigma)
        newbad = good & (chi_sp > cut)
        if not newbad.any():
            break
        reason[newbad] = "chi2_spatial"
        good &= ~newbad
    comps, bg = lay.unpack(theta, basis)
    stamps = {
        "x": sys.x, "y": sys.y, "ksum_local": ksum_loc, "chi2_local": chi_loc,
        "chi2_spatial": chi_sp, "used": good.copy(), "reason": reason.astype(str),
        "snr2": sys.c.copy(), "dof": np.maximum(sys.npix - sys.M.shape[1], 1),
    }
    sol = KernelSolution(comps, spatial_order, bg, bg_order, x0, y0, sx, sy, stamps=stamps,
                         chi2=float(np.mean(chi_sp[good])), n_stamps=int(good.sum()),
                         n_rejected=int(ns - good.sum()))
    sol.theta, sol.layout = theta, lay
    return sol, "ok"


def _layout_key(lay: _Layout, geom) -> tuple:
    return (lay.nb, lay.korder, lay.bgorder, lay.const_ksum, tuple(geom))


def _coefficient_maps(sys: StampSystem, lay: _Layout, geom):
    """(G, t_k, t_b) for a layout, computed once per system and layout: the per-stamp maps G (local
    coefficients = G theta) and the kernel and background polynomial terms at the stamps they are made of."""
    key = _layout_key(lay, geom)
    if sys.normal is None:
        sys.normal = {}
    if key not in sys.normal:
        tk = poly_design(sys.x, sys.y, lay.korder, *geom)
        tb = poly_design(sys.x, sys.y, lay.bgorder, *geom)
        sys.normal[key] = (lay.G(tk, tb), tk, tb)
    return sys.normal[key]


def _assemble(sys: StampSystem, lay: _Layout, tk, tb, gw):
    """Global normal equations A = sum_s gw_s G_s^T M_s G_s, B = sum_s gw_s G_s^T b_s.

    G_s is a Kronecker pattern: local coefficient i (basis i, or the background) is a
    polynomial vector v_s (t_k or t_b; 1 for a constant kernel sum) times one block of
    theta.  So a block of A is sum_s gw_s M_s[i, j] v_s v_s'^T: one product over the
    stamps per pair of row groups, instead of a (nparam x nparam) matrix per stamp
    (at spatial order 4, 408^2 per stamp: 0.1 s and 150 MB for 120 stamps).
    """
    nb = lay.nb
    v0 = np.ones((len(sys.x), 1)) if lay.const_ksum else tk
    groups = [(slice(0, 1), v0, 0), (slice(1, nb), tk, lay.n0), (slice(nb, nb + 1), tb, lay.nparam - lay.nbg)]
    groups = [g for g in groups if g[0].stop > g[0].start]
    A = np.zeros((lay.nparam, lay.nparam))
    B = np.zeros(lay.nparam)
    for r1, v1, o1 in groups:
        n1 = (r1.stop - r1.start) * v1.shape[1]
        B[o1:o1 + n1] = np.einsum("si,sa->ia", gw[:, None] * sys.b[:, r1], v1).reshape(-1)
        for r2, v2, o2 in groups:
            n2 = (r2.stop - r2.start) * v2.shape[1]
            W = (gw[:, None, None] * sys.M[:, r1, r2]).reshape(len(gw), -1)  # (s, i j)
            P = (v1[:, :, None] * v2[:, None, :]).reshape(len(gw), -1)  # (s, a b)
            blk = (W.T @ P).reshape(r1.stop - r1.start, r2.stop - r2.start, v1.shape[1], v2.shape[1])
            A[o1:o1 + n1, o2:o2 + n2] = blk.transpose(0, 2, 1, 3).reshape(n1, n2)
    return A, B


def heldout_chi2(sys: StampSystem, basis, cfg, shape, spatial_order, bg_order, nfold: int = 4) -> float:
    """Median reduced chi2 of stamps left out of the fit, over ``nfold`` folds of the stamps.

    Every stamp is predicted by the spatial kernel fitted (with the usual
    clipping) to the other folds, so a spatial order with more freedom than the
    stamps constrain (which fits their noise and leaves ~1-2 % residuals on the
    stars between them) scores worse than a simpler one.  The median, because
    the left-out stamps are not clipped (variables, blends).  NaN when a fold
    cannot be fitted at this order.  Folds are stamp index modulo ``nfold``
    (deterministic).
    """
    ns = len(sys.x)
    _local_fits(sys)  # once for all folds
    lay = _Layout(basis.shape[0], spatial_order, bg_order, cfg.constant_ksum)  # and the normal equations
    G = _coefficient_maps(sys, lay, _geometry(shape))[0]
    fold = np.arange(ns) % nfold
    chi = np.full(ns, np.nan)
    for k in range(nfold):
        test = fold == k
        if not test.any():
            continue
        sol, _ = fit_spatial(sys, basis, cfg, shape, spatial_order, bg_order, include=~test)
        if sol is None:
            return float("nan")
        chi[test] = _chi2_of(sys, G @ sol.theta)[test]
    ok = np.isfinite(chi)
    return float(np.median(chi[ok])) if ok.any() else float("nan")


def fit_kernel_from_psfs(psf_src, psf_tgt, basis, cfg, shape, flux_ratio: float, spatial_order: int):
    """Fallback: the kernel that maps one PSF model onto the other (noise-free stamps on a grid).

    Used when too few stars are usable; the kernel sum is set to ``flux_ratio``.
    """
    ny, nx = shape
    k = basis.shape[-1]
    h = k // 2
    n = 5
    gx = np.linspace(0.1, 0.9, n) * (nx - 1)
    gy = np.linspace(0.1, 0.9, n) * (ny - 1)
    size = max(psf_src.size, psf_tgt.size) + 2 * h
    hs = size // 2 - h
    if hs < 2:
        hs = 2
    # lay both PSFs out in one synthetic image per grid point, then reuse stamp_system
    S = 2 * hs + 1
    L = S + 2 * h
    xs, ys = [], []
    src_img = np.zeros((n * n * (L + 2),) * 1 + (L + 2,))
    tgt_img = np.zeros_like(src_img)
    for i, yy in enumerate(gy):
        for j, xx in enumerate(gx):
            m = i * n + j
            cy = m * (L + 2) + L // 2 + 1
            cx = L // 2 + 1
            ps = _pad_to(psf_src.image(xx, yy), L)
            pt = _pad_to(psf_tgt.image(xx, yy), L) * flux_ratio
            src_img[cy - L // 2 : cy + L // 2 + 1, cx - L // 2 : cx + L // 2 + 1] = ps
            tgt_img[cy - L // 2 : cy + L // 2 + 1, cx - L // 2 : cx + L // 2 + 1] = pt
            xs.append(cx)
            ys.append(cy)
    w = np.ones_like(src_img)
    sys = stamp_system(src_img, tgt_img, w, np.array(xs), np.array(ys), basis, hs)
    # positions in detector coordinates for the spatial polynomial
    gxx, gyy = np.meshgrid(gx, gy)
    sys.x, sys.y = gxx.ravel(), gyy.ravel()
    # no background in a PSF-to-PSF fit: decouple the constant column (its coefficient solves to 0)
    for M in (sys.M, sys.M_raw):
        M[:, -1, :] = 0.0
        M[:, :, -1] = 0.0
        M[:, -1, -1] = 1.0
    sys.b[:, -1] = 0.0
    from copy import copy

    c = copy(cfg)
    c.clip_sigma = np.inf
    c.min_stamps = 1
    c.stamps_per_term = 1
    c.regularization = max(cfg.regularization, 1e-8)
    sol, why = fit_spatial(sys, basis, c, shape, spatial_order, 0)
    if sol is None:
        return None
    sol.stamps = None
    sol.n_stamps = 0
    sol.n_rejected = 0
    sol.chi2 = float("nan")
    return sol


def _pad_to(img, L):
    out = np.zeros((L, L))
    k = img.shape[0]
    if k > L:
        o = (k - L) // 2
        return img[o : o + L, o : o + L].copy()
    o = (L - k) // 2
    out[o : o + k, o : o + k] = img
    return out


# ---------------------------------------------------------------- full-image convolution
def small_kernel_rfft2(kernel: np.ndarray, L) -> np.ndarray:
    """rfft2 on an L = (ly, lx) grid of a small odd-sized kernel centred on pixel (0, 0).

    The kernel has only k << L non-zero rows: a real FFT of those rows, then an
    explicit DFT along y as one (ly x k) @ (k x lx/2+1) matrix product, costs a
    fraction of a full-size 2-D FFT (0.05 s instead of 0.35 s CPU on a 4k grid).
    Values below 1e-12 of the peak are set to zero: the far wings of a squared
    Gaussian (detection's and ZOGY's variance kernels) underflow to float32
    denormals, which make the matrix product 6x slower, and weigh nothing.
    """
    kernel = np.asarray(kernel)
    kernel = np.where(np.abs(kernel) < 1e-12 * np.abs(kernel).max(), 0, kernel).astype(np.float32)
    k = kernel.shape[0]
    h = k // 2
    ly, lx = L
    rows = np.zeros((k, lx), np.float32)
    rows[:, :k] = kernel
    rows = np.roll(rows, -h, axis=1)  # x offsets -h..h wrapped to the grid's origin
    R = sfft.rfft(rows, axis=1, workers=1)  # (k, lx//2+1); row j is y offset j - h
    return _dft_rows(ly, h) @ R.astype(np.complex64)


@functools.lru_cache(maxsize=16)
def _dft_rows(ly: int, h: int) -> np.ndarray:
    """(ly, 2h+1) complex64 DFT matrix along y for offsets -h..h (shared by every kernel of a convolver)."""
    return np.exp((-2j * np.pi / ly) * np.outer(np.arange(ly), np.arange(-h, h + 1))).astype(np.complex64)


class FFTConvolver:
    """Zero-padded linear convolution of one image with many small kernels via one forward FFT.

    float32 transforms (scipy.fft) are accurate to ~1e-7 of the image's peak,
    far below the noise, and twice as fast as float64.
    """

    def __init__(self, image: np.ndarray, half: int):
        self.shape = image.shape
        ny, nx = image.shape
        self.L = (sfft.next_fast_len(ny + 2 * half + 1, real=True), sfft.next_fast_len(nx + 2 * half + 1, real=True))
        self.F = sfft.rfft2(np.asarray(image, np.float32), s=self.L, workers=1)

    def kernel_fft(self, kernel: np.ndarray) -> np.ndarray:
        return small_kernel_rfft2(kernel, self.L)

    def convolve(self, kernel: np.ndarray | None = None, kernel_fft=None) -> np.ndarray:
        Kf = self.kernel_fft(kernel) if kernel_fft is None else kernel_fft
        out = sfft.irfft2(self.F * Kf, s=self.L, workers=1)
        return out[: self.shape[0], : self.shape[1]]


def poly_maps(order: int, shape, x0, y0, sx, sy):
    """Generator of (term index, full-image array t_m(x, y)) for the spatial polynomial."""
    ny, nx = shape
    u = ((np.arange(nx) - x0) / sx).astype(np.float32)
    v = ((np.arange(ny) - y0) / sy).astype(np.float32)
    for m, (i, j) in enumerate(poly_terms(order)):
        yield m, (v[:, None] ** j) * (u[None, :] ** i)


@numba.njit(cache=True, nogil=True)
def _add_rows(acc, g, w, first):  # pragma: no cover - compiled
    """acc[y] (=|+=) g[y] w[y] for the first acc.shape[0] rows (g may have more)."""
    for y in range(acc.shape[0]):
        wy = w[y]
        for x in range(acc.shape[1]):
            if first:
                acc[y, x] = g[y, x] * wy
            else:
                acc[y, x] += g[y, x] * wy


@numba.njit(cache=True, nogil=True)
def _add_cols(out, c, w):  # pragma: no cover - compiled
    """out[:, x] += c[:, x] w[x] over out's shape (c may be larger)."""
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            out[y, x] += c[y, x] * w[x]


def apply_kernel(sol: KernelSolution, src: np.ndarray) -> np.ndarray:
    """src (*) K(x, y) + background(x, y): sum over spatial terms u^i v^j of src (*) K_ij, from one forward FFT.

    The inverse 2-D transform is split by axis: each term's product is inverted along y,
    weighted by v^j and summed over the terms of one x power i, and only those sums are
    inverted along x and weighted by u^i (u^i commutes with the y transform, v^j with the x
    one).  At spatial order 4 that is 15 inverse transforms along y and 5 along x instead of
    15 of each; with the weighting and sums in compiled loops over one reused buffer, 3.3 s
    instead of 6.5 s CPU at 4096^2, with the same values to float32 rounding.
    """
    conv = FFTConvolver(src, sol.half)
    ny, nx = src.shape
    lx = conv.L[1]
    u = ((np.arange(nx) - sol.x0) / sol.sx).astype(np.float32)
    v = ((np.arange(ny) - sol.y0) / sol.sy).astype(np.float32)
    out = np.zeros(src.shape, np.float32)
    terms = list(enumerate(poly_terms(sol.spatial_order)))
    buf = np.empty_like(conv.F)
    acc = np.empty((ny, conv.F.shape[1]), conv.F.dtype)
    for i in sorted({i for _, (i, _) in terms}):
        first = True
        for m, (ii, j) in terms:
            if ii != i:
                continue
            np.multiply(conv.F, conv.kernel_fft(sol.kernel_components[m].astype(np.float32)), out=buf)
            g = sfft.ifft(buf, axis=0, workers=1, overwrite_x=True)
            _add_rows(acc, g, v**j, first)
            first = False
        _add_cols(out, sfft.irfft(acc, n=lx, axis=1, workers=1), u**i)
    for m, t in poly_maps(sol.bg_order, src.shape, sol.x0, sol.y0, sol.sx, sol.sy):
        out += np.float32(sol.bg_coeffs[m]) * t
    return out


def _power_map(coef: np.ndarray, shape, x0, y0, sx, sy) -> np.ndarray:
    """sum_{a,b} coef[b, a] u^a v^b on every pixel, as one matrix product (u, v: normalised x, y)."""
    ny, nx = shape
    nb, na = coef.shape
    u = (np.arange(nx) - x0) / sx
    v = (np.arange(ny) - y0) / sy
    U = u[:, None] ** np.arange(na)[None, :]  # (nx, na)
    V = v[:, None] ** np.arange(nb)[None, :]  # (ny, nb)
    return (V @ coef @ U.T).astype(np.float32)


def poly_map(coeffs, order: int, shape, x0, y0, sx, sy) -> np.ndarray:
    """Full-image map of sum_m coeffs[m] t_m(x, y) (psf.poly_terms order)."""
    coef = np.zeros((order + 1, order + 1))
    for c, (i, j) in zip(coeffs, poly_terms(order)):
        coef[j, i] += c
    return _power_map(coef, shape, x0, y0, sx, sy)


def quadratic_map(C: np.ndarray, order: int, shape, x0, y0, sx, sy) -> np.ndarray:
    """Full-image map of t(x, y)^T C t(x, y), e.g. sum of K(x, y)^2 with C_mn = <K_m, K_n>."""
    terms = poly_terms(order)
    coef = np.zeros((2 * order + 1, 2 * order + 1))
    for m, (i, j) in enumerate(terms):
        for n, (k, l) in enumerate(terms):
            coef[j + l, i + k] += C[m, n]
    return _power_map(coef, shape, x0, y0, sx, sy)
