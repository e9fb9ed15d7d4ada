"""ZOGY image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27).

With N the new (science) image, R the reference (template), their PSFs P_n,
P_r, flux zero points F_n, F_r and background noise sigma_n, sigma_r, in
Fourier space (eqs. 13-17, 25-26 of the paper):

    D   = (F_r P_r N - F_n P_n R) / sqrt(sigma_n^2 F_r^2 |P_r|^2 + sigma_r^2 F_n^2 |P_n|^2)
    F_D = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)
    P_D = F_r F_n P_r P_n / (F_D sqrt(...))
    S   = F_D D conj(P_D),        S_corr = S / sqrt(V(S_N) + V(S_R))

D has white unit-variance noise; we return D / F_D, which is in science
flux units (F_n = 1) with PSF P_D, so PSF photometry on it gives the
transient's flux in the science image's units.  Its variance per pixel is
var_N + var_R / F_r^2.  S_corr is the detection significance per pixel.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from .kernel import small_kernel_rfft2


def _pad(psf: np.ndarray, k: int) -> np.ndarray:
    """Zero-pad a centred odd stamp to k x k."""
    n = psf.shape[0]
    out = np.zeros((k, k))
    o = (k - n) // 2
    out[o : o + n, o : o + n] = psf
    return out


def _centre(wrapped: np.ndarray, size: int) -> np.ndarray:
    """The size x size neighbourhood of pixel (0, 0) of a wrapped full-grid image, centred."""
    h = size // 2
    idx = np.r_[-h : h + 1]  # negative indices wrap: rows/columns -h..h around the origin
    return wrapped[idx][:, idx]


def zogy(new, ref, var_new, var_ref, psf_new, psf_ref, flux_ratio: float, sigma_new: float, sigma_ref: float,
         ref_shift=(0.0, 0.0)):
    """ZOGY difference of two images on one grid.

    new, ref : images (float, background-subtracted, bad pixels already set to 0)
    var_new, var_ref : per-pixel variance images (same units squared)
    psf_new, psf_ref : centred PSF stamps (odd size, any normalisation)
    flux_ratio : F_new / F_ref, the flux of one source in new divided by its flux in ref
    sigma_new, sigma_ref : background noise (same units as the images)
    ref_shift : (dx, dy) px, where the reference's sources sit relative to the new image's;
        the reference is moved back by it with a Fourier phase ramp (which keeps white noise
        white), so a residual misregistration leaves no dipoles.  ZOGY itself assumes none.

    Returns dict with D (science units), variance, psf (P_D stamp, unit sum),
    score (S_corr), flux_zero_point F_D.
    """
    ny, nx = new.shape
    k = max(psf_new.shape[0], psf_ref.shape[0])
    h = k // 2
    L = (sfft.next_fast_len(ny + 2 * h + 1, real=True), sfft.next_fast_len(nx + 2 * h + 1, real=True))
    Pn = small_kernel_rfft2(_pad(psf_new / psf_new.sum(), k), L)
    Pr = small_kernel_rfft2(_pad(psf_ref / psf_ref.sum(), k), L)
    Fn = 1.0
    Fr = 1.0 / flux_ratio
    sn2, sr2 = float(sigma_new) ** 2, float(sigma_ref) ** 2
    den = sn2 * Fr**2 * np.abs(Pr) ** 2 + sr2 * Fn**2 * np.abs(Pn) ** 2
    den = np.maximum(den, 1e-12 * den.max()).astype(np.float32)
    sq = np.sqrt(den)
    N = sfft.rfft2(np.asarray(new, np.float32), s=L, workers=1)
    R = sfft.rfft2(np.asarray(ref, np.float32), s=L, workers=1)
    dx, dy = float(ref_shift[0]), float(ref_shift[1])
    if dx or dy:
        fy = sfft.fftfreq(L[0])[:, None]
        fx = sfft.rfftfreq(L[1])[None, :]
        R *= np.exp(2j * np.pi * (fx * dx + fy * dy)).astype(np.complex64)
    Dhat = (Fr * Pr * N - Fn * Pn * R) / sq
    del N, R
    FD = Fr * Fn / np.sqrt(sn2 * Fr**2 + sr2 * Fn**2)
    PDhat = Fr * Fn * Pr * Pn / (FD * sq)
    D = sfft.irfft2(Dhat, s=L, workers=1)[:ny, :nx] / FD
    Shat = FD * Dhat * np.conj(PDhat)  # S = F_D D (*) P_D flipped, D of unit noise
    S = sfft.irfft2(Shat, s=L, workers=1)[:ny, :nx]
    del Shat, Dhat
    kn = sfft.irfft2(Fn * Fr**2 * np.conj(Pn) * np.abs(Pr) ** 2 / den, s=L, workers=1)
    kr = sfft.irfft2(Fr * Fn**2 * np.conj(Pr) * np.abs(Pn) ** 2 / den, s=L, workers=1)
    # k_n, k_r are compact (a few PSF widths): their squares' transforms from small stamps
    Vn = sfft.rfft2(np.asarray(var_new, np.float32), s=L, workers=1) * small_kernel_rfft2(_centre(kn, 2 * k + 1) ** 2, L)
    Vn += sfft.rfft2(np.asarray(var_ref, np.float32), s=L, workers=1) * small_kernel_rfft2(_centre(kr, 2 * k + 1) ** 2, L)
    VS = sfft.irfft2(Vn, s=L, workers=1)[:ny, :nx]
    del Vn
    score = S / np.sqrt(np.maximum(VS, 1e-30))
    # P_D as a small centred stamp
    pd = np.fft.fftshift(sfft.irfft2(PDhat, s=L, workers=1))
    cy, cx = L[0] // 2, L[1] // 2
    pd = pd[cy - h : cy + h + 1, cx - h : cx + h + 1].astype(float)
    pd /= pd.sum()
    variance = np.asarray(var_new, np.float32) + np.asarray(var_ref, np.float32) / np.float32(Fr**2)
    return {"D": D.astype(np.float32), "variance": variance, "psf": pd, "score": score.astype(np.float32),
            "flux_zero_point": float(FD)}


def zogy_tiled(new, ref, var_new, var_ref, psf_new_at, psf_ref_at, flux_ratio, sigma_new, sigma_ref,
               tile: int = 512, margin: int | None = None, ref_shift_at=None):
    """ZOGY on tiles of about ``tile`` px, each with the PSFs evaluated at its centre, stitched.

    ZOGY needs one PSF per image; a PSF that varies across the detector is
    followed tile by tile.  Tiles overlap by ``margin`` px (default: two PSF
    widths) so that every kept pixel is far from a tile edge.
    psf_new_at, psf_ref_at : callables (x, y) -> centred PSF stamp.
    ref_shift_at : optional callable (x, y) -> (dx, dy) px, the reference's misregistration
        at a tile centre (see ``zogy``).
    Returns the same dict as ``zogy`` with ``psf`` the P_D at the image centre
    and ``psfs`` a list of ((x0, x1, y0, y1), P_D) per tile.
    """
    ny, nx = new.shape
    nty = max(1, int(round(ny / tile))) if tile else 1
    ntx = max(1, int(round(nx / tile))) if tile else 1
    ys = np.linspace(0, ny, nty + 1).astype(int)
    xs = np.linspace(0, nx, ntx + 1).astype(int)
    out = {"D": np.empty((ny, nx), np.float32), "variance": np.empty((ny, nx), np.float32),
           "score": np.empty((ny, nx), np.float32), "psfs": []}
    for i in range(nty):
        for j in range(ntx):
            y0, y1, x0, x1 = ys[i], ys[i + 1], xs[j], xs[j + 1]
            xc, yc = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
            pn, pr = psf_new_at(xc, yc), psf_ref_at(xc, yc)
            m = margin if margin is not None else 2 * max(pn.shape[0], pr.shape[0])
            Y0, Y1, X0, X1 = max(0, y0 - m), min(ny, y1 + m), max(0, x0 - m), min(nx, x1 + m)
            sl = (slice(Y0, Y1), slice(X0, X1))
            shift = ref_shift_at(xc, yc) if ref_shift_at is not None else (0.0, 0.0)
            z = zogy(new[sl], ref[sl], var_new[sl], var_ref[sl], pn, pr, flux_ratio, sigma_new, sigma_ref, shift)
            inner = (slice(y0 - Y0, y1 - Y0), slice(x0 - X0, x1 - X0))
            for key in ("D", "variance", "score"):
                out[key][y0:y1, x0:x1] = z[key][inner]
            out["psfs"].append(((x0, x1, y0, y1), z["psf"]))
            out["flux_zero_point"] = z["flux_zero_point"]
    centre = min(out["psfs"], key=lambda t: abs((t[0][0] + t[0][1]) / 2 - nx / 2) + abs((t[0][2] + t[0][3]) / 2 - ny / 2))
    out["psf"] = centre[1]
    return out
