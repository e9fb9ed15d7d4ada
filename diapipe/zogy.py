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


def _wrapped(psf: np.ndarray, L) -> np.ndarray:
    k = psf.shape[0]
    h = k // 2
    p = np.zeros(L, np.float32)
    p[:k, :k] = psf
    return np.roll(p, (-h, -h), axis=(0, 1))


def zogy(new, ref, var_new, var_ref, psf_new, psf_ref, flux_ratio: float, sigma_new: float, sigma_ref: float):
    """ZOGY difference of two images on one grid.

    new, ref : images (float, background-subtracted, bad pixels already set to 0)
    var_new, var_ref : per-pixel variance images (same units squared)
    psf_new, psf_ref : centred PSF stamps (odd size, any normalisation)
    flux_ratio : F_new / F_ref, the flux of one source in new divided by its flux in ref
    sigma_new, sigma_ref : background noise (same units as the images)

    Returns dict with D (science units), variance, psf (P_D stamp, unit sum),
    score (S_corr), flux_zero_point F_D.
    """
    ny, nx = new.shape
    k = max(psf_new.shape[0], psf_ref.shape[0])
    h = k // 2
    L = (sfft.next_fast_len(ny + 2 * h + 1, real=True), sfft.next_fast_len(nx + 2 * h + 1, real=True))
    Pn = sfft.rfft2(_wrapped(psf_new / psf_new.sum(), L), workers=1)
    Pr = sfft.rfft2(_wrapped(psf_ref / psf_ref.sum(), L), workers=1)
    Fn = 1.0
    Fr = 1.0 / flux_ratio
    sn2, sr2 = float(sigma_new) ** 2, float(sigma_ref) ** 2
    den = sn2 * Fr**2 * np.abs(Pr) ** 2 + sr2 * Fn**2 * np.abs(Pn) ** 2
    den = np.maximum(den, 1e-12 * den.max()).astype(np.float32)
    sq = np.sqrt(den)
    N = sfft.rfft2(np.asarray(new, np.float32), s=L, workers=1)
    R = sfft.rfft2(np.asarray(ref, np.float32), s=L, workers=1)
    Dhat = (Fr * Pr * N - Fn * Pn * R) / sq
    del N, R
    FD = Fr * Fn / np.sqrt(sn2 * Fr**2 + sr2 * Fn**2)
    PDhat = Fr * Fn * Pr * Pn / (FD * sq)
    D = sfft.irfft2(Dhat, s=L, workers=1)[:ny, :nx] / FD
    Shat = FD * FD * Dhat * np.conj(PDhat)  # FD * (D_unit) ... with D_unit = Dhat
    Shat /= FD  # S = F_D * D_unit (*) P_D~
    S = sfft.irfft2(Shat, s=L, workers=1)[:ny, :nx]
    del Shat, Dhat
    kn = sfft.irfft2(Fn * Fr**2 * np.conj(Pn) * np.abs(Pr) ** 2 / den, s=L, workers=1)
    kr = sfft.irfft2(Fr * Fn**2 * np.conj(Pr) * np.abs(Pn) ** 2 / den, s=L, workers=1)
    Vn = sfft.rfft2(np.asarray(var_new, np.float32), s=L, workers=1) * sfft.rfft2(kn * kn, workers=1)
    Vn += sfft.rfft2(np.asarray(var_ref, np.float32), s=L, workers=1) * sfft.rfft2(kr * kr, workers=1)
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
