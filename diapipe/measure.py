"""Measurement of diaSources on a difference exposure, and the diaSource table.

For every detection candidate (``diapipe.detect``):

* centroid and PSF flux: weighted least-squares fit of the diffexp PSF at the
  source position (flux, x, y by Gauss-Newton, inverse-variance weights from
  the VARIANCE plane, masked pixels weight 0); the PSF is shifted sub-pixel in
  Fourier space, so its derivatives are exact for a well-sampled PSF.
  psfFluxErr = 1 / sqrt(sum(P^2 / V)) (electrons), converted to nJy with the
  diffexp's MAGZERO: flux_nJy = flux_e * 10**(-0.4 * (MAGZERO - 31.4)).
* aperture fluxes with sep.sum_circle (radii in pixels from the config).
* second moments ixx, iyy, ixy: Gaussian-weighted moments (weight = circular
  Gaussian of the PSF's sigma), de-weighted analytically, so a point source
  gives the PSF's moments.
* dipole fit when a candidate has both a positive and a negative lobe: two
  PSFs of free sign at free positions (positions by non-linear least squares,
  the two fluxes linear at each step).
* pixel flags from the mask planes, forced PSF fluxes on the science calexp
  and the template, the distance to the nearest reference star, and cutouts.

All columns are described once, in ``COLUMNS``; docs/diaSource-columns.md is
generated from it (``diapipe detect-columns``).  Pixel coordinates are 0-based
with pixel centres at integers (numpy / astropy / LSST convention).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
import scipy.fft as sfft
from scipy import optimize
from scipy.spatial import cKDTree

from . import detect as det
from . import masks
from .exposure import Exposure
from .fileio import DiapipeError, atomic_path, write_parquet

log = logging.getLogger("diapipe.measure")

#: Measurement settings (the rest of the ``detect`` config block).
DEFAULTS = {
    **det.DEFAULTS,
    "aperture_radii": [6.0, 12.0],
    "cutout_size": 31,
    "dipole_min_lobe_snr": 3.0,
    "dipole_max_asymmetry": 0.65,
    "bright_star_mag": 16.0,
    "bright_star_radius": 10.0,
    "max_centroid_shift": 2.0,
}

# --------------------------------------------------------------- the table
#: diaSource columns: name -> (dtype, unit, description).  The one place they are documented.
COLUMNS: dict[str, tuple[str, str, str]] = {
    "diaSourceId": ("int64", "", "Unique id: visit * 10^8 + detector * 10^5 + index within the exposure (deterministic)."),
    "visit": ("int64", "", "Visit (exposure) number."),
    "detector": ("int64", "", "Detector number."),
    "band": ("str", "", "Filter band."),
    "midpointMjdTai": ("float64", "d", "MJD (TAI) at the middle of the exposure: MJD-OBS + EXPTIME / 2."),
    "ra": ("float64", "deg", "Right ascension of the centroid (ICRS), from the diffexp WCS."),
    "dec": ("float64", "deg", "Declination of the centroid (ICRS), from the diffexp WCS."),
    "x": ("float64", "pixel", "Column of the centroid, 0-based, pixel centres at integers (PSF-fit centroid; lobe midpoint for dipoles)."),
    "y": ("float64", "pixel", "Row of the centroid, 0-based."),
    "xErr": ("float64", "pixel", "1-sigma error of x from the PSF-fit covariance."),
    "yErr": ("float64", "pixel", "1-sigma error of y from the PSF-fit covariance."),
    "psfFlux": ("float64", "nJy", "PSF flux in the difference image: weighted least-squares fit of the diffexp PSF at (x, y)."),
    "psfFluxErr": ("float64", "nJy", "1-sigma error of psfFlux, 1 / sqrt(sum P^2 / variance)."),
    "psfChi2Ndof": ("float64", "", "Reduced chi^2 of the PSF fit within the PSF stamp."),
    "snr": ("float64", "", "Detection significance: largest |matched-filter S/N| (or |S_corr|) in the source's footprints, in units of the measured noise (see noiseScale)."),
    "apFlux": ("float64", "nJy", "Flux in a circular aperture of the first configured radius (sep.sum_circle)."),
    "apFluxErr": ("float64", "nJy", "1-sigma error of apFlux from the variance plane."),
    "apRadius": ("float64", "pixel", "Radius of the apFlux aperture."),
    "isNegative": ("bool", "", "The source has only a negative footprint (flux decreased since the template)."),
    "isDipole": ("bool", "", "Both lobes fitted with S/N >= dipole_min_lobe_snr and flux asymmetry <= dipole_max_asymmetry."),
    "dipoleFluxPos": ("float64", "nJy", "Flux of the positive lobe of the dipole fit (NaN without both lobes)."),
    "dipoleFluxPosErr": ("float64", "nJy", "1-sigma error of dipoleFluxPos (positions fixed)."),
    "dipoleFluxNeg": ("float64", "nJy", "Flux of the negative lobe of the dipole fit (<= 0; NaN without both lobes)."),
    "dipoleFluxNegErr": ("float64", "nJy", "1-sigma error of dipoleFluxNeg (positions fixed)."),
    "dipoleSeparation": ("float64", "pixel", "Distance between the two fitted lobes."),
    "dipoleAngle": ("float64", "deg", "Direction from the negative to the positive lobe, counter-clockwise from +x."),
    "dipoleChi2Ndof": ("float64", "", "Reduced chi^2 of the dipole fit."),
    "ixx": ("float64", "pixel^2", "Second moment <(x - xc)^2> of |difference image|, Gaussian-weighted and de-weighted."),
    "iyy": ("float64", "pixel^2", "Second moment <(y - yc)^2>."),
    "ixy": ("float64", "pixel^2", "Second moment <(x - xc)(y - yc)>."),
    "scienceFlux": ("float64", "nJy", "Forced PSF flux at (x, y) on the science calexp (NaN if not given)."),
    "scienceFluxErr": ("float64", "nJy", "1-sigma error of scienceFlux."),
    "templateFlux": ("float64", "nJy", "Forced PSF flux at (x, y) on the template resampled to the calexp grid (NaN if not given)."),
    "templateFluxErr": ("float64", "nJy", "1-sigma error of templateFlux."),
    "refDistance": ("float64", "arcsec", "Distance to the nearest reference-catalog star (NaN without a refcat)."),
    "nPix": ("int64", "pixel", "Number of pixels in the source's footprints."),
    "noiseScale": ("float64", "", "Measured / expected noise of the matched-filtered diffexp (robust std of nu); when detect.rescale_noise, snr is divided and psfFluxErr, xErr, yErr, dipole flux errors multiplied by it."),
    "psfFlux_flag": ("bool", "", "PSF fit failed (no valid pixels or singular)."),
    "centroid_flag": ("bool", "", "Centroid fit failed or moved more than max_centroid_shift; the matched-filter peak is used."),
    "shape_flag": ("bool", "", "Second moments undefined (weighted moments not de-weightable)."),
    "apFlux_flag": ("bool", "", "Aperture touches masked pixels or the image edge."),
    "dipole_flag": ("bool", "", "Dipole fit attempted and failed."),
    "forced_flag": ("bool", "", "Forced science or template flux could not be measured (no image, PSF or valid pixels)."),
    "pixelFlags_edge": ("bool", "", "PSF stamp reaches the image edge, or EDGE / NO_DATA pixels within 2 FWHM."),
    "pixelFlags_bad": ("bool", "", "BAD pixels within 2 FWHM of the centroid."),
    "pixelFlags_saturated": ("bool", "", "SAT pixels within 2 FWHM."),
    "pixelFlags_saturatedCenter": ("bool", "", "SAT pixels in the central 3x3."),
    "pixelFlags_cr": ("bool", "", "CR pixels within 2 FWHM."),
    "pixelFlags_crCenter": ("bool", "", "CR pixels in the central 3x3."),
    "pixelFlags_interpolated": ("bool", "", "INTRP pixels within 2 FWHM."),
    "pixelFlags_interpolatedCenter": ("bool", "", "INTRP pixels in the central 3x3."),
    "pixelFlags_suspect": ("bool", "", "SUSPECT pixels within 2 FWHM."),
    "pixelFlags_injected": ("bool", "", "INJECTED (fake source) pixels within 2 FWHM."),
    "pixelFlags_injectedCenter": ("bool", "", "INJECTED pixels in the central 3x3."),
    "nearBrightStar": ("bool", "", "A reference star brighter than bright_star_mag lies within bright_star_radius."),
}

_NP_DTYPES = {"int64": np.int64, "float64": np.float64, "bool": np.bool_, "str": object}


def empty_table() -> pd.DataFrame:
    """A diaSource table with no rows, every column and its dtype."""
    return pd.DataFrame({c: pd.Series([], dtype=_pandas_dtype(d)) for c, (d, _, _) in COLUMNS.items()})


def _pandas_dtype(d):
    return "str" if d == "str" else _NP_DTYPES[d]


def _finish_table(rows: dict) -> pd.DataFrame:
    df = pd.DataFrame({c: np.asarray(rows[c], dtype=_NP_DTYPES[d]) if d != "str" else rows[c]
                       for c, (d, _, _) in COLUMNS.items()})
    if "band" in df:
        df["band"] = df["band"].astype("str")
    extra = [c for c in rows if c not in COLUMNS]  # e.g. apFlux_12_0
    for c in extra:
        df[c] = np.asarray(rows[c], float)
    return df


def columns_markdown() -> str:
    """docs/diaSource-columns.md, generated from ``COLUMNS``."""
    lines = [
        "# diaSource table columns",
        "",
        "Generated from `diapipe.measure.COLUMNS` by `diapipe detect-columns`; do not edit by hand.",
        "One row per diaSource; per exposure in `results/diff/{visit}/{detector}.diaSrc.parquet`,",
        "for the run in `results/diaSources.parquet`. Extra aperture radii appear as `apFlux_<r>` /",
        "`apFlux_<r>Err` (r in pixels, '.' written '_'). Fluxes are calibrated with the exposure's",
        "MAGZERO: flux_nJy = flux_e * 10**(-0.4 * (MAGZERO - 31.4)).",
        "",
        "| column | type | unit | description |",
        "|---|---|---|---|",
    ]
    for c, (d, unit, desc) in COLUMNS.items():
        lines.append(f"| `{c}` | {d} | {unit} | {desc} |")
    return "\n".join(lines) + "\n"


def nJy_per_electron(exposure: Exposure, path=None) -> float:
    """Calibration factor: flux_nJy = flux_e * 10**(-0.4 * (MAGZERO - 31.4))."""
    if "MAGZERO" not in exposure.metadata:
        raise DiapipeError("exposure has no MAGZERO (zero point); cannot calibrate fluxes to nJy",
                           path, exposure.data_id)
    return float(10 ** (-0.4 * (float(exposure.metadata["MAGZERO"]) - 31.4)))


def make_dia_source_id(visit: int, detector: int, index) -> np.ndarray:
    """visit * 10^8 + detector * 10^5 + index; a 63-bit hash when that would not fit."""
    index = np.asarray(index, np.int64)
    visit, detector = int(visit), int(detector)
    if 0 <= visit < 90_000_000_000 and 0 <= detector < 1000 and (index.size == 0 or index.max() < 100_000):
        return visit * 10**8 + detector * 10**5 + index
    out = []
    for i in index:
        h = hashlib.blake2b(f"{visit}|{detector}|{int(i)}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "little") >> 1)
    return np.asarray(out, np.int64)


def midpoint_mjd(meta: dict) -> float:
    for key in ("MJD-OBS", "MJD", "mjd"):
        if key in meta:
            return float(meta[key]) + 0.5 * float(meta.get("EXPTIME", 0.0)) / 86400.0
    return float("nan")


# ----------------------------------------------------------- PSF modelling
class _ShiftablePsf:
    """A PSF stamp that can be shifted by sub-pixel amounts, with exact derivatives (Fourier).

    The stamp is normalised to unit sum and then cropped to a radius of ~3 FWHM
    (half-maximum FWHM, robust to Moffat wings) without renormalising, so a
    fitted amplitude is still the total flux while the fits stay small.
    """

    def __init__(self, stamp, crop=True):
        from .psf import half_max_fwhm

        stamp = np.asarray(stamp, float)
        n = stamp.shape[0]
        if n % 2 == 0 or stamp.shape[1] != n:
            raise ValueError("PSF stamps must be square with odd size")
        stamp = stamp / stamp.sum()
        h = n // 2
        self.fwhm = half_max_fwhm(stamp)
        r = int(min(h, max(6, np.ceil(3 * self.fwhm)))) if crop else h
        stamp = stamp[h - r : h + r + 1, h - r : h + r + 1]
        self.size = 2 * r + 1
        self.half = r
        self.ft = sfft.fft2(stamp, workers=1)
        k = 2 * np.pi * np.fft.fftfreq(self.size)
        self.kx = k[None, :]
        self.ky = k[:, None]

    def shifted(self, dx, dy, derivs=False):
        """Stamp of the PSF centred at (half + dx, half + dy); with derivatives d/d(dx), d/d(dy)."""
        f = self.ft * (np.exp(-1j * self.kx * dx) * np.exp(-1j * self.ky * dy))
        if not derivs:
            return sfft.ifft2(f, workers=1).real
        # d/d(dx) of P(x - dx) = -P'(x - dx): multiply by -i kx
        out = sfft.ifft2(np.stack([f, -1j * self.kx * f, -1j * self.ky * f]), axes=(-2, -1), workers=1).real
        return out[0], out[1], out[2]


class _Pixels:
    """Image, variance and validity of one exposure, read per stamp (no full-image copies)."""

    def __init__(self, exposure: Exposure):
        self.image = exposure.image
        self.variance = exposure.variance
        self.valid = det.valid_pixels(exposure)
        self.shape = exposure.shape

    def stamp(self, ix, iy, half):
        """(image, weight = 1/variance or 0, touches_edge) stamps centred on (ix, iy)."""
        img, var, edge = _stamp_data(self.image, self.variance, ix, iy, half)
        ok, _, _ = _stamp_data(self.valid, self.valid, ix, iy, half)
        w = np.zeros_like(var)
        good = ok > 0
        w[good] = 1.0 / var[good]
        img[~good] = 0.0  # NO_DATA pixels are NaN in a diffexp; 0 * NaN would poison the sums
        return img, w, edge


def _stamp_data(image, weight, ix, iy, half):
    """Image and weight stamps (2 half + 1)^2 centred on (ix, iy), zeros off the image."""
    ny, nx = image.shape
    n = 2 * half + 1
    img = np.zeros((n, n))
    w = np.zeros((n, n))
    y0, x0 = iy - half, ix - half
    ya, yb = max(0, y0), min(ny, y0 + n)
    xa, xb = max(0, x0), min(nx, x0 + n)
    if ya < yb and xa < xb:
        img[ya - y0 : yb - y0, xa - x0 : xb - x0] = image[ya:yb, xa:xb]
        w[ya - y0 : yb - y0, xa - x0 : xb - x0] = weight[ya:yb, xa:xb]
    return img, w, (y0 < 0 or x0 < 0 or y0 + n > ny or x0 + n > nx)


def psf_fit(pix: _Pixels, psf, x, y, fit_position=True, max_shift=2.0):
    """Fit flux (and position) of a PSF at (x, y).

    ``pix`` gives image stamps (electrons) and weights 1 / variance (0 for masked pixels).  Returns
    dict(flux, fluxErr, x, y, xErr, yErr, chi2ndof, ok, centroid_ok, edge).
    """
    sp = _ShiftablePsf(psf.image(x, y))
    half = sp.half
    x_start, y_start = float(x), float(y)
    cx, cy = x_start, y_start
    res = {"flux": np.nan, "fluxErr": np.nan, "x": x_start, "y": y_start, "xErr": np.nan,
           "yErr": np.nan, "chi2ndof": np.nan, "ok": False, "centroid_ok": False, "edge": False}
    centroid_ok = fit_position
    niter = 8 if fit_position else 1
    last = None  # (ix, iy, dx, dy, stamps) of the latest evaluation, reused at the end
    for it in range(niter):
        ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
        img, w, edge = pix.stamp(ix, iy, half)
        if not (w > 0).any():
            return res
        dx, dy = cx - ix, cy - iy
        p, px, py = sp.shifted(dx, dy, derivs=True)
        last = (ix, iy, cx, cy, img, w, edge, p, px, py)
        spp = (w * p * p).sum()
        if spp <= 0:
            return res
        flux = (w * p * img).sum() / spp
        if not fit_position:
            break
        # Gauss-Newton step in (flux, dx, dy); Jacobian columns p, F px, F py.
        J = np.stack([p.ravel(), flux * px.ravel(), flux * py.ravel()], axis=1)
        wf = w.ravel()
        A = J.T @ (J * wf[:, None])
        r = (img - flux * p).ravel()
        try:
            step = np.linalg.solve(A, J.T @ (wf * r))
        except np.linalg.LinAlgError:
            centroid_ok = False
            break
        if not np.all(np.isfinite(step)):
            centroid_ok = False
            break
        if abs(step[1]) < 1e-3 and abs(step[2]) < 1e-3:  # converged: keep the evaluated position
            break
        cx, cy = cx + step[1], cy + step[2]
        if np.hypot(cx - x_start, cy - y_start) > max_shift:
            centroid_ok = False
            break
    if not centroid_ok:
        cx, cy = x_start, y_start
    # Final linear flux (and covariance) at the adopted position.
    if last is not None and (last[2], last[3]) == (cx, cy):
        ix, iy, _, _, img, w, edge, p, px, py = last
    else:
        ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
        img, w, edge = pix.stamp(ix, iy, half)
        p, px, py = sp.shifted(cx - ix, cy - iy, derivs=True)
    spp = (w * p * p).sum()
    if spp <= 0 or not (w > 0).any():
        return res
    flux = (w * p * img).sum() / spp
    resid = img - flux * p
    ndof = max(1, int((w > 0).sum()) - (3 if centroid_ok else 1))
    res.update(flux=flux, fluxErr=1 / np.sqrt(spp), x=cx, y=cy, ok=True, edge=edge,
               chi2ndof=float((w * resid**2).sum() / ndof))
    if centroid_ok:
        J = np.stack([p.ravel(), flux * px.ravel(), flux * py.ravel()], axis=1)
        A = J.T @ (J * w.ravel()[:, None])
        try:
            cov = np.linalg.inv(A)
            res.update(xErr=float(np.sqrt(cov[1, 1])), yErr=float(np.sqrt(cov[2, 2])))
        except np.linalg.LinAlgError:
            centroid_ok = False
    res["centroid_ok"] = centroid_ok
    return res


def dipole_fit(pix: _Pixels, psf, pos_xy, neg_xy):
    """Fit a positive and a negative PSF (free positions, linear fluxes).

    Returns dict(fluxPos, fluxPosErr, fluxNeg, fluxNegErr, xPos, yPos, xNeg, yNeg, chi2ndof, ok)
    with fluxes in electrons.
    """
    xm, ym = 0.5 * (pos_xy[0] + neg_xy[0]), 0.5 * (pos_xy[1] + neg_xy[1])
    core = _ShiftablePsf(psf.image(xm, ym))  # normalised and cropped to ~3 FWHM
    stamp = core.shifted(0.0, 0.0)
    sep_pix = np.hypot(pos_xy[0] - neg_xy[0], pos_xy[1] - neg_xy[1])
    half = core.half + int(np.ceil(sep_pix / 2)) + 2
    canvas = np.zeros((2 * half + 1, 2 * half + 1))
    h0 = core.half
    canvas[half - h0 : half + h0 + 1, half - h0 : half + h0 + 1] = stamp
    sp = _ShiftablePsf(canvas, crop=False)
    sp.ft *= stamp.sum()  # keep the crop's flux fraction (the constructor renormalised)
    ix, iy = int(np.floor(xm + 0.5)), int(np.floor(ym + 0.5))
    img, w, _ = pix.stamp(ix, iy, half)
    sw = np.sqrt(w).ravel()
    out = {"ok": False}
    if (w > 0).sum() < 8:
        return out

    imgf = img.ravel()
    cache = {}

    def basis(q):
        """PSF stamps and their position derivatives for lobe positions q = (x1, y1, x2, y2)."""
        key = tuple(q)
        if key not in cache:
            cache.clear()
            cache[key] = (sp.shifted(q[0] - ix, q[1] - iy, derivs=True),
                          sp.shifted(q[2] - ix, q[3] - iy, derivs=True))
        return cache[key]

    def linear_fluxes(q):
        (p1, _, _), (p2, _, _) = basis(q)
        A = np.stack([p1.ravel(), p2.ravel()], axis=1) * sw[:, None]
        ata = A.T @ A
        return np.linalg.solve(ata, A.T @ (imgf * sw)), ata

    # Six parameters (x1, y1, F1, x2, y2, F2) by Levenberg-Marquardt with the exact
    # (Fourier) Jacobian; the fluxes start from the linear solution at the peaks.
    def resid(p):
        (p1, _, _), (p2, _, _) = basis(p[[0, 1, 3, 4]])
        return sw * (imgf - p[2] * p1.ravel() - p[5] * p2.ravel())

    def jac(p):
        (p1, p1x, p1y), (p2, p2x, p2y) = basis(p[[0, 1, 3, 4]])
        cols = [p[2] * p1x, p[2] * p1y, p1, p[5] * p2x, p[5] * p2y, p2]
        return -np.stack([c.ravel() for c in cols], axis=1) * sw[:, None]

    q0 = np.array([pos_xy[0], pos_xy[1], neg_xy[0], neg_xy[1]], float)
    try:
        f0, _ = linear_fluxes(q0)
        x0 = np.array([q0[0], q0[1], f0[0], q0[2], q0[3], f0[1]])
        # tolerances: positions to ~1e-3 px; lobe flux and separation are degenerate for
        # small shifts, so chasing the last digits of either only burns time
        sol = optimize.least_squares(resid, x0, jac=jac, method="lm", x_scale="jac", max_nfev=40,
                                     ftol=1e-6, xtol=1e-6, gtol=1e-8)
        q = sol.x[[0, 1, 3, 4]]
        if np.max(np.abs(q - q0)) > sep_pix + 3:  # wandered off: not a dipole of these lobes
            return out
        f, ata = linear_fluxes(q)
        cov = np.linalg.inv(ata)
    except (np.linalg.LinAlgError, ValueError):
        return out
    params = q
    # Call the lobe with the larger signed flux the positive one.
    if f[1] > f[0]:
        f = f[::-1]
        cov = cov[::-1, ::-1]
        params = params[[2, 3, 0, 1]]
    ndof = max(1, int((w > 0).sum()) - 6)
    out.update(ok=bool(np.all(np.isfinite(f))), fluxPos=float(f[0]), fluxNeg=float(f[1]),
               fluxPosErr=float(np.sqrt(cov[0, 0])), fluxNegErr=float(np.sqrt(cov[1, 1])),
               xPos=params[0], yPos=params[1], xNeg=params[2], yNeg=params[3],
               chi2ndof=float((sol.fun**2).sum() / ndof))
    return out


def _fwhm(psf, x, y):
    """PSF FWHM (pixels) at (x, y) from the area above half maximum (robust to Moffat wings)."""
    from .psf import half_max_fwhm

    if psf.order == 0:
        cached = getattr(psf, "_diapipe_fwhm", None)
        if cached is None:
            cached = half_max_fwhm(psf.image(x, y))
            psf._diapipe_fwhm = cached
        return cached
    return half_max_fwhm(psf.image(x, y))


def weighted_moments(pix: _Pixels, x, y, sigma_w, sign=1.0):
    """De-weighted Gaussian-weighted second moments (ixx, iyy, ixy) of sign*image about (x, y)."""
    h = int(np.ceil(4 * sigma_w))
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    img, w, _ = pix.stamp(ix, iy, h)
    w = (w > 0).astype(float)
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    dx, dy = xx - (x - ix), yy - (y - iy)
    g = np.exp(-0.5 * (dx**2 + dy**2) / sigma_w**2) * w * sign * img
    s = g.sum()
    if not s > 0:
        return np.nan, np.nan, np.nan
    m = np.array([[(g * dx * dx).sum(), (g * dx * dy).sum()], [(g * dx * dy).sum(), (g * dy * dy).sum()]]) / s
    try:
        # For a Gaussian source of moments M: measured = (M^-1 + W^-1)^-1, W = sigma_w^2 I.
        minv = np.linalg.inv(m) - np.eye(2) / sigma_w**2
        if np.linalg.det(minv) <= 0 or minv[0, 0] <= 0:
            return np.nan, np.nan, np.nan
        mm = np.linalg.inv(minv)
    except np.linalg.LinAlgError:
        return np.nan, np.nan, np.nan
    return float(mm[0, 0]), float(mm[1, 1]), float(mm[0, 1])


def _cutout(arr, x, y, size, fill=np.nan, dtype=np.float32):
    """size x size cutout centred on the pixel nearest (x, y), ``fill`` (NaN) off the image."""
    out = np.full((size, size), fill, dtype)
    if arr is None:
        return out
    h = size // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    ny, nx = arr.shape
    y0, x0 = iy - h, ix - h
    ya, yb, xa, xb = max(0, y0), min(ny, y0 + size), max(0, x0), min(nx, x0 + size)
    if ya < yb and xa < xb:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = arr[ya:yb, xa:xb]
    return out


def _forced_flux(exposure: Exposure | None, pix, x, y, nJy_default):
    """Forced PSF flux (nJy) and error on another exposure of the same pixel grid."""
    if exposure is None or exposure.psf is None:
        return np.nan, np.nan, True
    r = psf_fit(pix, exposure.psf, x, y, fit_position=False)
    if not r["ok"]:
        return np.nan, np.nan, True
    scale = nJy_default
    if "MAGZERO" in exposure.metadata:
        scale = 10 ** (-0.4 * (float(exposure.metadata["MAGZERO"]) - 31.4))
    return r["flux"] * scale, r["fluxErr"] * scale, False


def _refcat_distances(refcat, ra, dec, band, bright_mag, bright_radius):
    """Distance (arcsec) to the nearest refcat star and nearBrightStar flags."""
    n = len(ra)
    if refcat is None or len(refcat) == 0 or n == 0:
        return np.full(n, np.nan), np.zeros(n, bool)

    def unit(r, d):
        r, d = np.radians(r), np.radians(d)
        return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=1)

    ref = unit(refcat["ra"].to_numpy(float), refcat["dec"].to_numpy(float))
    src = unit(np.asarray(ra), np.asarray(dec))
    tree = cKDTree(ref)
    chord, _ = tree.query(src)
    dist = np.degrees(2 * np.arcsin(np.clip(chord / 2, 0, 1))) * 3600
    near = np.zeros(n, bool)
    mag_col = f"{band}_mag" if f"{band}_mag" in refcat else ("mag" if "mag" in refcat else None)
    if mag_col is not None:
        bright = refcat[mag_col].to_numpy(float) < bright_mag
        if bright.any():
            btree = cKDTree(ref[bright])
            chord_r = 2 * np.sin(np.radians(bright_radius / 3600) / 2)
            near = np.array([len(h) > 0 for h in btree.query_ball_point(src, chord_r)], bool)
    return dist, near


# ------------------------------------------------------------- measurement
def measure(diffexp: Exposure, detections: det.Detections, science: Exposure | None = None,
            template: Exposure | None = None, refcat: pd.DataFrame | None = None,
            config: dict | None = None, path=None):
    """Measure every candidate; return (diaSource DataFrame, cutouts dict of (n, size, size) arrays)."""
    cfg = {**DEFAULTS, **(config or {})}
    size = int(cfg["cutout_size"])
    n = len(detections.candidates)
    empty_cut = {k: np.zeros((0, size, size), np.float32) for k in ("difference", "science", "template")}
    if n == 0:
        return empty_table(), empty_cut
    if diffexp.psf is None:
        raise DiapipeError("difference exposure has no PSF model", path, diffexp.data_id)
    scale = nJy_per_electron(diffexp, path)
    meta = diffexp.metadata
    visit, detector = int(meta.get("visit", 0)), int(meta.get("detector", 0))
    band = str(meta.get("band", meta.get("FILTER", "")))
    pix = _Pixels(diffexp)
    valid = pix.valid
    sci_pix = _Pixels(science) if science is not None else None
    tmpl_pix = _Pixels(template) if template is not None else None
    mask = diffexp.mask
    ny, nx = diffexp.shape

    rows = {c: [] for c in COLUMNS}
    radii = [float(r) for r in cfg["aperture_radii"]]
    cut = {k: [] for k in ("difference", "science", "template")}
    for k, c in enumerate(detections.candidates):
        strongest = max(c.pos_peaks + c.neg_peaks, key=lambda q: abs(q[2]))
        x0, y0 = float(strongest[0]), float(strongest[1])
        fwhm = _fwhm(diffexp.psf, x0, y0)
        both = c.has_pos and c.has_neg
        dip = {"ok": False}
        if both:
            pk = max(c.pos_peaks, key=lambda q: q[2])
            nk = min(c.neg_peaks, key=lambda q: q[2])
            dip = dipole_fit(pix, diffexp.psf, pk[:2], nk[:2])
            if dip["ok"]:
                x0 = 0.5 * (dip["xPos"] + dip["xNeg"])
                y0 = 0.5 * (dip["yPos"] + dip["yNeg"])
            else:
                x0, y0 = 0.5 * (pk[0] + nk[0]), 0.5 * (pk[1] + nk[1])
        fit = psf_fit(pix, diffexp.psf, x0, y0, fit_position=not both,
                      max_shift=float(cfg["max_centroid_shift"]))
        x, y = fit["x"], fit["y"]
        sign = 1.0 if (fit["ok"] and fit["flux"] >= 0) or (not fit["ok"] and c.has_pos) else -1.0
        ixx, iyy, ixy = weighted_moments(pix, x, y, fwhm / 2.3548, sign)

        # Pixel flags: within 2 FWHM, and the central 3x3.
        r_flag = int(np.ceil(2 * fwhm))
        ixc, iyc = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        reg = mask[max(0, iyc - r_flag) : iyc + r_flag + 1, max(0, ixc - r_flag) : ixc + r_flag + 1]
        cen = mask[max(0, iyc - 1) : iyc + 2, max(0, ixc - 1) : ixc + 2]

        def anyp(region, *planes):
            return bool(region.size and masks.is_set(region, *planes).any())

        sf, sfe, sflag = _forced_flux(science, sci_pix, x, y, scale)
        tf, tfe, tflag = _forced_flux(template, tmpl_pix, x, y, scale)
        ns = detections.noise_scale  # correlated-noise correction of PSF-weighted errors
        isdip = bool(
            dip["ok"]
            and dip["fluxPos"] > 0 > dip["fluxNeg"]
            and dip["fluxPos"] / (dip["fluxPosErr"] * ns) >= cfg["dipole_min_lobe_snr"]
            and -dip["fluxNeg"] / (dip["fluxNegErr"] * ns) >= cfg["dipole_min_lobe_snr"]
            and abs(dip["fluxPos"] + dip["fluxNeg"]) / (dip["fluxPos"] - dip["fluxNeg"]) <= cfg["dipole_max_asymmetry"]
        )
        vals = {
            "x": x, "y": y, "xErr": fit["xErr"] * ns, "yErr": fit["yErr"] * ns,
            "psfFlux": fit["flux"] * scale, "psfFluxErr": fit["fluxErr"] * scale * ns,
            "psfChi2Ndof": fit["chi2ndof"], "snr": c.peak_nu,
            "isNegative": bool(c.has_neg and not c.has_pos), "isDipole": isdip,
            "dipoleFluxPos": dip.get("fluxPos", np.nan) * scale, "dipoleFluxPosErr": dip.get("fluxPosErr", np.nan) * scale * ns,
            "dipoleFluxNeg": dip.get("fluxNeg", np.nan) * scale, "dipoleFluxNegErr": dip.get("fluxNegErr", np.nan) * scale * ns,
            "dipoleSeparation": np.hypot(dip["xPos"] - dip["xNeg"], dip["yPos"] - dip["yNeg"]) if dip["ok"] else np.nan,
            "dipoleAngle": np.degrees(np.arctan2(dip["yPos"] - dip["yNeg"], dip["xPos"] - dip["xNeg"])) if dip["ok"] else np.nan,
            "dipoleChi2Ndof": dip.get("chi2ndof", np.nan),
            "ixx": ixx, "iyy": iyy, "ixy": ixy,
            "scienceFlux": sf, "scienceFluxErr": sfe, "templateFlux": tf, "templateFluxErr": tfe,
            "nPix": c.npix, "noiseScale": ns,
            "psfFlux_flag": not fit["ok"], "centroid_flag": (not both) and not fit["centroid_ok"],
            "shape_flag": not np.isfinite(ixx), "dipole_flag": both and not dip["ok"],
            "forced_flag": sflag or tflag,
            "pixelFlags_edge": fit["edge"] or anyp(reg, "EDGE", "NO_DATA"),
            "pixelFlags_bad": anyp(reg, "BAD"), "pixelFlags_saturated": anyp(reg, "SAT"),
            "pixelFlags_saturatedCenter": anyp(cen, "SAT"), "pixelFlags_cr": anyp(reg, "CR"),
            "pixelFlags_crCenter": anyp(cen, "CR"), "pixelFlags_interpolated": anyp(reg, "INTRP"),
            "pixelFlags_interpolatedCenter": anyp(cen, "INTRP"), "pixelFlags_suspect": anyp(reg, "SUSPECT"),
            "pixelFlags_injected": anyp(reg, "INJECTED"), "pixelFlags_injectedCenter": anyp(cen, "INJECTED"),
        }
        for key, v in vals.items():
            rows[key].append(v)
        cut["difference"].append(_cutout(diffexp.image, x, y, size))
        cut["science"].append(_cutout(science.image if science is not None else None, x, y, size))
        cut["template"].append(_cutout(template.image if template is not None else None, x, y, size))

    xs, ys = np.asarray(rows["x"]), np.asarray(rows["y"])
    # Aperture photometry, all sources at once (sep wants native-endian C arrays).
    img32 = np.ascontiguousarray(np.where(valid, diffexp.image, 0), dtype=np.float32)
    var32 = np.ascontiguousarray(np.where(valid, diffexp.variance, 0), dtype=np.float32)
    bad = np.ascontiguousarray(~valid, dtype=np.uint8)
    import sep

    for i, r in enumerate(radii):
        s, e, flag = sep.sum_circle(img32, xs, ys, r, var=var32, mask=bad, subpix=5)
        if i == 0:
            rows["apFlux"], rows["apFluxErr"] = s * scale, e * scale
            rows["apRadius"] = np.full(n, r)
            outside = (xs - r < -0.5) | (ys - r < -0.5) | (xs + r > nx - 0.5) | (ys + r > ny - 0.5)
            rows["apFlux_flag"] = (flag != 0) | outside
        else:
            name = f"apFlux_{r:g}".replace(".", "_")
            rows[name], rows[name + "Err"] = s * scale, e * scale

    if diffexp.wcs is not None:
        ra, dec = diffexp.wcs.pixel_to_world_values(xs, ys)
    else:
        ra, dec = np.full(n, np.nan), np.full(n, np.nan)
    rows["ra"], rows["dec"] = np.asarray(ra, float), np.asarray(dec, float)
    dist, near = _refcat_distances(refcat, rows["ra"], rows["dec"], band,
                                   float(cfg["bright_star_mag"]), float(cfg["bright_star_radius"]))
    rows["refDistance"], rows["nearBrightStar"] = dist, near
    rows["diaSourceId"] = make_dia_source_id(visit, detector, np.arange(n))
    rows["visit"] = np.full(n, visit)
    rows["detector"] = np.full(n, detector)
    rows["band"] = [band] * n
    rows["midpointMjdTai"] = np.full(n, midpoint_mjd(meta))
    cutouts = {k: np.asarray(v, np.float32).reshape(n, size, size) for k, v in cut.items()}
    return _finish_table(rows), cutouts


def detect_and_measure(diffexp: Exposure, science=None, template=None, refcat=None, config=None,
                       scorr=None, path=None):
    """Detection then measurement; returns (table, cutouts, detections)."""
    detections = det.detect(diffexp, config, scorr=scorr, path=path)
    table, cutouts = measure(diffexp, detections, science, template, refcat, config, path=path)
    return table, cutouts, detections


def write_cutouts(table: pd.DataFrame, cutouts: dict, path) -> None:
    """Cutouts as one FITS file: DIFFERENCE, SCIENCE, TEMPLATE cubes (n, size, size) + IDS table.

    Plane i of each cube belongs to row i of the IDS table (diaSourceId, x, y),
    which is the row order of the diaSrc table.  Units: electrons; NaN off the image.
    """
    from astropy.io import fits
    from astropy.table import Table

    hdus = [fits.PrimaryHDU()]
    hdus[0].header["COMMENT"] = "diaSource cutouts; plane i <-> row i of IDS and of the diaSrc table"
    for key in ("difference", "science", "template"):
        hdus.append(fits.ImageHDU(cutouts[key], name=key.upper()))
    ids = Table({"diaSourceId": table["diaSourceId"].to_numpy(np.int64),
                 "x": table["x"].to_numpy(float), "y": table["y"].to_numpy(float)})
    hdus.append(fits.BinTableHDU(ids, name="IDS"))
    from .fileio import write_fits

    write_fits(fits.HDUList(hdus), path)


def read_cutouts(path) -> tuple[pd.DataFrame, dict]:
    """Read a cutouts file back: (ids DataFrame, {'difference','science','template': cube})."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        cubes = {k.lower(): np.asarray(hdul[k].data, np.float32) for k in ("DIFFERENCE", "SCIENCE", "TEMPLATE")}
        ids = pd.DataFrame({c: np.asarray(hdul["IDS"].data[c]) for c in ("diaSourceId", "x", "y")})
    return ids, cubes


def run_files(diffexp_path, output, science_path=None, template_path=None, refcat_path=None,
              cutouts_path=None, mask_path=None, config=None) -> pd.DataFrame:
    """File-level entry point used by the CLI and the Snakemake script."""
    diffexp = Exposure.read(diffexp_path)
    science = Exposure.read(science_path) if science_path else None
    template = Exposure.read(template_path) if template_path else None
    refcat = None
    if refcat_path:
        try:
            refcat = pd.read_parquet(refcat_path)
        except (OSError, ValueError) as exc:
            raise DiapipeError(f"cannot read reference catalog ({exc})", refcat_path) from exc
    table, cutouts, detections = detect_and_measure(diffexp, science, template, refcat, config,
                                                    path=diffexp_path)
    write_parquet(table, output)
    if cutouts_path:
        write_cutouts(table, cutouts, cutouts_path)
    if mask_path:
        det.write_detection_mask(diffexp, mask_path)
    log.info("%s: %d diaSources (%d dipoles, %d negative) -> %s", diffexp_path, len(table),
             int(table["isDipole"].sum()), int(table["isNegative"].sum()), output)
    return table


def merge_tables(paths, output) -> pd.DataFrame:
    """Concatenate per-exposure diaSrc tables into the run's diaSources table (ids must be unique)."""
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)] or [empty_table()]
    df = pd.concat(frames, ignore_index=True)
    if df["diaSourceId"].duplicated().any():
        raise DiapipeError("duplicate diaSourceId across exposures", output)
    df = df.sort_values(["visit", "detector", "diaSourceId"], kind="stable").reset_index(drop=True)
    write_parquet(df, output)
    return df


def write_columns_doc(path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(columns_markdown())


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("detect-columns", help="write docs/diaSource-columns.md from measure.COLUMNS")
    p.add_argument("-o", "--output", default="docs/diaSource-columns.md")
    p.set_defaults(func=lambda a: write_columns_doc(a.output))
