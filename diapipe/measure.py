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
    "pixelFlags_badCenter": ("bool", "", "BAD pixels in the central 3x3 (the PSF fit lost part of its core)."),
    "pixelFlags_saturated": ("bool", "", "SAT pixels within 2 FWHM."),
    "pixelFlags_saturatedCenter": ("bool", "", "SAT pixels in the central 3x3."),
    "pixelFlags_cr": ("bool", "", "CR pixels within 2 FWHM."),
    "pixelFlags_crCenter": ("bool", "", "CR pixels in the central 3x3."),
    "pixelFlags_interpolated": ("bool", "", "INTRP pixels within 2 FWHM."),
    "pixelFlags_interpolatedCenter": ("bool", "", "INTRP pixels in the central 3x3."),
    "pixelFlags_suspect": ("bool", "", "SUSPECT pixels within 2 FWHM."),
    "pixelFlags_suspectCenter": ("bool", "", "SUSPECT pixels in the central 3x3."),
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

    def __init__(self, exposure: Exposure, valid=None):
        self.image = exposure.image
        self.variance = exposure.variance
        self.valid = det.valid_pixels(exposure) if valid is None else valid
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


# ------------------------------------------------ batched (vectorised) fits
# Every candidate of an exposure is fitted at once: PSF stamps, pixel stamps,
# Fourier shifts and the small normal equations are stacked along a first axis
# of length N (sources), so a detector's few hundred fits cost a few numpy calls
# per iteration instead of a few hundred Python-level fits each.


def _gather(arr, ix, iy, half, fill):
    """(N, 2 half + 1, 2 half + 1) stamps of ``arr`` centred on pixels (ix, iy); ``fill`` off the image.

    Also returns the (N, n, n) boolean 'on the image' map.
    """
    ny, nx = arr.shape
    off = np.arange(-half, half + 1)
    yy = np.asarray(iy, np.int64)[:, None] + off
    xx = np.asarray(ix, np.int64)[:, None] + off
    inside = ((yy >= 0) & (yy < ny))[:, :, None] & ((xx >= 0) & (xx < nx))[:, None, :]
    out = arr[np.clip(yy, 0, ny - 1)[:, :, None], np.clip(xx, 0, nx - 1)[:, None, :]]
    if not inside.all():
        out = np.where(inside, out, fill)
    return out, inside


def _pixel_stamps(pix: "_Pixels", ix, iy, half):
    """Image (0 where unusable) and weight (1 / variance, 0 where unusable) stamps, float64; touches-edge flags."""
    img, inside = _gather(pix.image, ix, iy, half, 0.0)
    var, _ = _gather(pix.variance, ix, iy, half, 1.0)
    ok, _ = _gather(pix.valid, ix, iy, half, False)
    ok = ok & inside
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ok, 1.0 / var.astype(np.float64), 0.0)
    img = np.where(ok, img.astype(np.float64), 0.0)  # NaN NO_DATA pixels would poison the sums
    return img, w, ~inside.all(axis=(1, 2))


def _psf_images(psf, xs, ys) -> np.ndarray:
    """Unit-sum PSF model stamps at (xs, ys): (N, S, S), or (1, S, S) for a constant PSF."""
    if getattr(psf, "order", None) == 0 and hasattr(psf, "components"):
        img = np.asarray(psf.components[0], float)
        return (img / img.sum())[None]
    if hasattr(psf, "components"):
        from .psf import poly_design

        t = poly_design(xs, ys, psf.order, psf.x0, psf.y0, psf.sx, psf.sy)
        img = np.tensordot(t, psf.components, axes=1)
    else:  # any object with .image(x, y)
        img = np.array([psf.image(x, y) for x, y in zip(xs, ys)], float)
    s = img.sum(axis=(1, 2))
    return img / np.where(s != 0, s, 1.0)[:, None, None]


class _BatchPsf:
    """PSF stamps of many sources (normalised to unit sum, then cropped to ~3 FWHM without
    renormalising, as ``_ShiftablePsf``), optionally padded by ``pad`` zeros, shiftable by
    sub-pixel amounts in Fourier space with exact derivatives."""

    def __init__(self, psf, xs, ys, pad=0):
        stamps = _psf_images(psf, np.atleast_1d(xs), np.atleast_1d(ys))
        n = stamps.shape[-1]
        if n % 2 == 0 or stamps.shape[-2] != n:
            raise ValueError("PSF stamps must be square with odd size")
        h = n // 2
        # half-maximum FWHM of each stamp (robust to Moffat wings), as psf.half_max_fwhm
        peak = stamps.max(axis=(1, 2))
        self.fwhm = np.sqrt(4.0 * np.count_nonzero(stamps >= 0.5 * peak[:, None, None], axis=(1, 2)) / np.pi)
        ri = np.minimum(h, np.maximum(6, np.ceil(3 * self.fwhm))).astype(int)  # each stamp's own crop
        r = int(ri.max())
        crop = stamps[:, h - r : h + r + 1, h - r : h + r + 1]
        if (ri < r).any():
            off = np.abs(np.arange(-r, r + 1))
            crop = crop * ((off[None, :, None] <= ri[:, None, None]) & (off[None, None, :] <= ri[:, None, None]))
        if pad:
            crop = np.pad(crop, ((0, 0), (pad, pad), (pad, pad)))
        self.half = r + pad
        self.size = 2 * self.half + 1
        # Transform on a fast FFT length (23, 29, 31 are primes: Bluestein is ~5x slower)
        # and crop back; the zero margin also keeps shifted wings from wrapping round.
        self.nfft = sfft.next_fast_len(self.size)
        if self.nfft > self.size:
            e = self.nfft - self.size
            crop = np.pad(crop, ((0, 0), (0, e), (0, e)))
        self.ft = sfft.fft2(crop, axes=(-2, -1), workers=1)
        self.k = 2 * np.pi * np.fft.fftfreq(self.nfft)

    def shifted(self, dx, dy, idx=None, derivs=False):
        """Stamps (N, n, n) of the PSF centred at (half + dx, half + dy) for sources ``idx``;
        with derivs also d/d(dx), d/d(dy)."""
        ft = self.ft if (self.ft.shape[0] == 1 or idx is None) else self.ft[idx]
        dx, dy = np.asarray(dx, float), np.asarray(dy, float)
        f = ft * np.exp(-1j * self.k[None, None, :] * dx[:, None, None]) \
            * np.exp(-1j * self.k[None, :, None] * dy[:, None, None])
        n = self.size
        if not derivs:
            return sfft.ifft2(f, axes=(-2, -1), workers=1).real[..., :n, :n]
        # d/d(dx) of P(x - dx) = -P'(x - dx): multiply by -i kx
        out = sfft.ifft2(np.stack([f, -1j * self.k[None, None, :] * f, -1j * self.k[None, :, None] * f], axis=1),
                         axes=(-2, -1), workers=1).real[..., :n, :n]
        return out[:, 0], out[:, 1], out[:, 2]


def _solve_batch(a, b):
    """Solve a[i] x[i] = b[i] for a stack of small systems; NaN rows where singular."""
    try:
        x = np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        x = np.full(b.shape, np.nan)
        for i in range(len(a)):
            try:
                x[i] = np.linalg.solve(a[i], b[i])
            except np.linalg.LinAlgError:
                pass
    return x


def _inv_batch(a):
    """Inverses of a stack of small matrices; NaN where singular."""
    try:
        return np.linalg.inv(a)
    except np.linalg.LinAlgError:
        out = np.full(a.shape, np.nan)
        for i in range(len(a)):
            try:
                out[i] = np.linalg.inv(a[i])
            except np.linalg.LinAlgError:
                pass
        return out


def psf_fit_batch(pix: "_Pixels", psf, xs, ys, fit_position=True, max_shift=2.0, niter=8):
    """``psf_fit`` for many sources at once; returns a dict of (N,) arrays (same keys).

    ``fit_position`` may be a scalar or an (N,) boolean array.  Flux (and position,
    Gauss-Newton with the exact Fourier-shift Jacobian) by weighted least squares,
    weights 1 / variance; electrons.
    """
    xs = np.atleast_1d(np.asarray(xs, float))
    ys = np.atleast_1d(np.asarray(ys, float))
    n = len(xs)
    fitpos = np.broadcast_to(np.asarray(fit_position, bool), (n,)).copy()
    res = {"flux": np.full(n, np.nan), "fluxErr": np.full(n, np.nan), "x": xs.copy(), "y": ys.copy(),
           "xErr": np.full(n, np.nan), "yErr": np.full(n, np.nan), "chi2ndof": np.full(n, np.nan),
           "ok": np.zeros(n, bool), "centroid_ok": fitpos.copy(), "edge": np.zeros(n, bool)}
    if n == 0:
        return res
    sp = _BatchPsf(psf, xs, ys)
    half = sp.half
    cx, cy = xs.copy(), ys.copy()
    cok = fitpos.copy()
    failed = np.zeros(n, bool)  # no usable pixel under the PSF
    active = fitpos.copy()
    for _ in range(niter):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        ix, iy = np.floor(cx[idx] + 0.5).astype(np.int64), np.floor(cy[idx] + 0.5).astype(np.int64)
        img, w, _ = _pixel_stamps(pix, ix, iy, half)
        p, px, py = sp.shifted(cx[idx] - ix, cy[idx] - iy, idx, derivs=True)
        spp = (w * p * p).sum(axis=(1, 2))
        dead = ~(spp > 0)
        failed[idx[dead]] = True
        active[idx[dead]] = False
        live = ~dead
        idx, img, w, p, px, py, spp = idx[live], img[live], w[live], p[live], px[live], py[live], spp[live]
        flux = (w * p * img).sum(axis=(1, 2)) / spp
        m = len(idx)
        # Gauss-Newton step in (flux, dx, dy); Jacobian columns p, F px, F py.
        J = np.stack([p, flux[:, None, None] * px, flux[:, None, None] * py], axis=1).reshape(m, 3, -1)
        wf = w.reshape(m, -1)
        A = np.einsum("mkp,mlp->mkl", J * wf[:, None, :], J)
        r = (img - flux[:, None, None] * p).reshape(m, -1)
        step = _solve_batch(A, np.einsum("mkp,mp->mk", J, wf * r))
        bad = ~np.isfinite(step).all(axis=1)
        cok[idx[bad]] = False
        active[idx[bad]] = False
        conv = ~bad & (np.abs(step[:, 1]) < 1e-3) & (np.abs(step[:, 2]) < 1e-3)
        active[idx[conv]] = False  # converged: keep the evaluated position
        mv = ~bad & ~conv
        cx[idx[mv]] += step[mv, 1]
        cy[idx[mv]] += step[mv, 2]
        far = idx[mv][np.hypot(cx[idx[mv]] - xs[idx[mv]], cy[idx[mv]] - ys[idx[mv]]) > max_shift]
        cok[far] = False
        active[far] = False
    cx = np.where(cok, cx, xs)
    cy = np.where(cok, cy, ys)
    # Final linear flux (and covariance) at the adopted position.
    idx = np.flatnonzero(~failed)
    if not idx.size:
        res["centroid_ok"] = cok & ~failed
        return res
    ix, iy = np.floor(cx[idx] + 0.5).astype(np.int64), np.floor(cy[idx] + 0.5).astype(np.int64)
    img, w, edge = _pixel_stamps(pix, ix, iy, half)
    p, px, py = sp.shifted(cx[idx] - ix, cy[idx] - iy, idx, derivs=True)
    spp = (w * p * p).sum(axis=(1, 2))
    good = spp > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = (w * p * img).sum(axis=(1, 2)) / spp
        resid = img - flux[:, None, None] * p
        ndof = np.maximum(1, (w > 0).sum(axis=(1, 2)) - np.where(cok[idx], 3, 1))
        chi2 = (w * resid**2).sum(axis=(1, 2)) / ndof
        err = 1 / np.sqrt(spp)
    g = idx[good]
    res["flux"][g], res["fluxErr"][g], res["chi2ndof"][g] = flux[good], err[good], chi2[good]
    res["x"][g], res["y"][g], res["ok"][g], res["edge"][g] = cx[g], cy[g], True, edge[good]
    failed[idx[~good]] = True
    cen = good & cok[idx]
    if cen.any():
        m = int(cen.sum())
        f = flux[cen][:, None, None]
        J = np.stack([p[cen], f * px[cen], f * py[cen]], axis=1).reshape(m, 3, -1)
        A = np.einsum("mkp,mlp->mkl", J * w[cen].reshape(m, 1, -1), J)
        cov = _inv_batch(A)
        ci = idx[cen]
        singular = ~np.isfinite(cov).all(axis=(1, 2))
        with np.errstate(invalid="ignore"):
            res["xErr"][ci] = np.where(singular, np.nan, np.sqrt(cov[:, 1, 1]))
            res["yErr"][ci] = np.where(singular, np.nan, np.sqrt(cov[:, 2, 2]))
        cok[ci[singular]] = False
    res["centroid_ok"] = cok & ~failed
    return res


def dipole_fit_batch(pix: "_Pixels", psf, pos_xy, neg_xy, max_iter=40):
    """``dipole_fit`` for many candidates: ``_dipole_fit_group`` per canvas size (lobe separation)."""
    pos_xy = np.asarray(pos_xy, float).reshape(-1, 2)
    neg_xy = np.asarray(neg_xy, float).reshape(-1, 2)
    pad = np.ceil(np.hypot(*(pos_xy - neg_xy).T) / 2).astype(int) + 2
    out = None
    for pd_ in np.unique(pad):
        sel = np.flatnonzero(pad == pd_)
        r = _dipole_fit_group(pix, psf, pos_xy[sel], neg_xy[sel], int(pd_), max_iter)
        if out is None:
            out = {k: np.full(len(pad), np.nan) for k in r}
            out["ok"] = np.zeros(len(pad), bool)
        for k, v in r.items():
            out[k][sel] = v
    if out is None:
        out = _dipole_fit_group(pix, psf, pos_xy, neg_xy, 2, max_iter)
    return out


def _dipole_fit_group(pix: "_Pixels", psf, pos_xy, neg_xy, pad, max_iter=40):
    """``dipole_fit`` for many candidates at once: a positive and a negative PSF at free
    positions, fluxes free (Levenberg-Marquardt with the exact Fourier Jacobian).

    ``pos_xy``, ``neg_xy``: (N, 2) starting lobe positions.  Returns a dict of (N,) arrays:
    fluxPos, fluxPosErr, fluxNeg, fluxNegErr (electrons; the lobe with the larger signed
    flux is the positive one), xPos, yPos, xNeg, yNeg, chi2ndof, ok.
    """
    pos_xy = np.asarray(pos_xy, float).reshape(-1, 2)
    neg_xy = np.asarray(neg_xy, float).reshape(-1, 2)
    n = len(pos_xy)
    keys = ("fluxPos", "fluxPosErr", "fluxNeg", "fluxNegErr", "xPos", "yPos", "xNeg", "yNeg", "chi2ndof")
    out = {k: np.full(n, np.nan) for k in keys}
    out["ok"] = np.zeros(n, bool)
    if n == 0:
        return out
    mid = 0.5 * (pos_xy + neg_xy)
    sep_pix = np.hypot(*(pos_xy - neg_xy).T)
    # one canvas per candidate: the PSF at the midpoint, with room for either lobe to move
    sp = _BatchPsf(psf, mid[:, 0], mid[:, 1], pad=pad)
    ix, iy = np.floor(mid[:, 0] + 0.5).astype(np.int64), np.floor(mid[:, 1] + 0.5).astype(np.int64)
    img, w, _ = _pixel_stamps(pix, ix, iy, sp.half)
    sw = np.sqrt(w).reshape(n, -1)
    imgw = img.reshape(n, -1) * sw
    enough = (w > 0).sum(axis=(1, 2)) >= 8

    def lobes(q, idx, derivs):
        a = sp.shifted(q[:, 0] - ix[idx], q[:, 1] - iy[idx], idx, derivs)
        b = sp.shifted(q[:, 2] - ix[idx], q[:, 3] - iy[idx], idx, derivs)
        return a, b

    def linear(q, idx):
        p1, p2 = lobes(q, idx, False)
        A = np.stack([p1.reshape(len(idx), -1), p2.reshape(len(idx), -1)], axis=1) * sw[idx][:, None, :]
        ata = np.einsum("mkp,mlp->mkl", A, A)
        return _solve_batch(ata, np.einsum("mkp,mp->mk", A, imgw[idx])), ata

    def chi2_of(par, idx):
        p1, p2 = lobes(par[:, [0, 1, 3, 4]], idx, False)
        model = par[:, 2, None] * p1.reshape(len(idx), -1) + par[:, 5, None] * p2.reshape(len(idx), -1)
        return ((imgw[idx] - model * sw[idx]) ** 2).sum(axis=1)

    idx0 = np.flatnonzero(enough)
    if not idx0.size:
        return out
    q0 = np.concatenate([pos_xy, neg_xy], axis=1)[idx0]
    f0, _ = linear(q0, idx0)
    par = np.stack([q0[:, 0], q0[:, 1], f0[:, 0], q0[:, 2], q0[:, 3], f0[:, 1]], axis=1)
    chi2 = chi2_of(par, idx0)
    lam = np.full(len(idx0), 1e-3)
    active = np.isfinite(par).all(axis=1) & np.isfinite(chi2)
    for _ in range(max_iter):
        a = np.flatnonzero(active)
        if not a.size:
            break
        idx = idx0[a]
        P = par[a]
        (p1, p1x, p1y), (p2, p2x, p2y) = lobes(P[:, [0, 1, 3, 4]], idx, True)
        m = len(a)
        F1, F2 = P[:, 2, None, None], P[:, 5, None, None]
        J = np.stack([F1 * p1x, F1 * p1y, p1, F2 * p2x, F2 * p2y, p2], axis=1).reshape(m, 6, -1) * sw[idx][:, None, :]
        r = imgw[idx] - (F1 * p1 + F2 * p2).reshape(m, -1) * sw[idx]
        A = np.einsum("mkp,mlp->mkl", J, J)
        g = np.einsum("mkp,mp->mk", J, r)
        d = np.einsum("mkk->mk", A)
        step = _solve_batch(A + lam[a, None, None] * d[:, :, None] * np.eye(6), g)
        trial = P + np.nan_to_num(step)
        c2 = chi2_of(trial, idx)
        better = np.isfinite(c2) & (c2 < chi2[a]) & np.isfinite(step).all(axis=1)
        dpos = np.abs(np.nan_to_num(step)[:, [0, 1, 3, 4]]).max(axis=1)
        rel = (chi2[a] - c2) / np.maximum(chi2[a], 1e-300)
        par[a[better]] = trial[better]
        chi2[a[better]] = c2[better]
        lam[a] = np.where(better, lam[a] / 10, lam[a] * 10)
        done = (better & ((dpos < 1e-3) | (rel < 1e-6))) | (lam[a] > 1e8)
        active[a[done]] = False
    q = par[:, [0, 1, 3, 4]]
    fine = np.isfinite(q).all(axis=1) & (np.abs(q - q0).max(axis=1) <= sep_pix[idx0] + 3)
    if not fine.any():
        return out  # wandered off: not a dipole of these lobes
    idx, q = idx0[fine], q[fine]
    f, ata = linear(q, idx)
    cov = _inv_batch(ata)
    swap = f[:, 1] > f[:, 0]  # call the lobe with the larger signed flux the positive one
    f = np.where(swap[:, None], f[:, ::-1], f)
    var = np.stack([cov[:, 0, 0], cov[:, 1, 1]], axis=1)
    var = np.where(swap[:, None], var[:, ::-1], var)
    q = np.where(swap[:, None], q[:, [2, 3, 0, 1]], q)
    p1, p2 = lobes(q, idx, False)
    model = f[:, 0, None] * p1.reshape(len(idx), -1) + f[:, 1, None] * p2.reshape(len(idx), -1)
    c2 = ((imgw[idx] - model * sw[idx]) ** 2).sum(axis=1)
    ndof = np.maximum(1, (w[idx] > 0).sum(axis=(1, 2)) - 6)
    with np.errstate(invalid="ignore"):
        out["fluxPosErr"][idx], out["fluxNegErr"][idx] = np.sqrt(var[:, 0]), np.sqrt(var[:, 1])
    out["fluxPos"][idx], out["fluxNeg"][idx] = f[:, 0], f[:, 1]
    out["xPos"][idx], out["yPos"][idx], out["xNeg"][idx], out["yNeg"][idx] = q.T
    out["chi2ndof"][idx] = c2 / ndof
    out["ok"][idx] = np.isfinite(f).all(axis=1)
    return out


def weighted_moments_batch(pix: "_Pixels", xs, ys, sigma_w, sign):
    """``weighted_moments`` for many sources: (ixx, iyy, ixy) arrays (pixel^2), NaN where undefined."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    sigma_w = np.broadcast_to(np.asarray(sigma_w, float), xs.shape)
    n = len(xs)
    nan = np.full(n, np.nan)
    if n == 0:
        return nan, nan.copy(), nan.copy()
    h = int(np.ceil(4 * np.nanmax(sigma_w)))
    ix, iy = np.floor(xs + 0.5).astype(np.int64), np.floor(ys + 0.5).astype(np.int64)
    img, w, _ = _pixel_stamps(pix, ix, iy, h)
    off = np.arange(-h, h + 1, dtype=float)
    dx = off[None, None, :] - (xs - ix)[:, None, None]
    dy = off[None, :, None] - (ys - iy)[:, None, None]
    s2 = sigma_w[:, None, None] ** 2
    g = np.exp(-0.5 * (dx**2 + dy**2) / s2) * (w > 0) * np.asarray(sign, float).reshape(-1, 1, 1) * img
    s = g.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mxx = (g * dx * dx).sum(axis=(1, 2)) / s
        myy = (g * dy * dy).sum(axis=(1, 2)) / s
        mxy = (g * dx * dy).sum(axis=(1, 2)) / s
        # For a Gaussian source of moments M: measured = (M^-1 + W^-1)^-1, W = sigma_w^2 I.
        det_m = mxx * myy - mxy**2
        ixx_, iyy_, ixy_ = myy / det_m - 1 / sigma_w**2, mxx / det_m - 1 / sigma_w**2, -mxy / det_m
        det_i = ixx_ * iyy_ - ixy_**2
        ok = (s > 0) & (det_m != 0) & (det_i > 0) & (ixx_ > 0) & np.isfinite(det_i)
        rxx, ryy, rxy = iyy_ / det_i, ixx_ / det_i, -ixy_ / det_i
    return np.where(ok, rxx, np.nan), np.where(ok, ryy, np.nan), np.where(ok, rxy, np.nan)


def _cutouts(arr, xs, ys, size):
    """(N, size, size) float32 cutouts centred on the pixels nearest (xs, ys); NaN off the image."""
    n = len(xs)
    if arr is None:
        return np.full((n, size, size), np.nan, np.float32)
    ix, iy = np.floor(np.asarray(xs) + 0.5).astype(np.int64), np.floor(np.asarray(ys) + 0.5).astype(np.int64)
    out, _ = _gather(arr, ix, iy, size // 2, np.nan)
    return out.astype(np.float32, copy=False)


def _forced_flux_batch(exposure: Exposure | None, pix, xs, ys, nJy_default):
    """Forced PSF fluxes (nJy), errors and failure flags on another exposure of the same pixel grid."""
    n = len(xs)
    if exposure is None or exposure.psf is None or n == 0:
        return np.full(n, np.nan), np.full(n, np.nan), np.ones(n, bool)
    r = psf_fit_batch(pix, exposure.psf, xs, ys, fit_position=False)
    scale = nJy_default
    if "MAGZERO" in exposure.metadata:
        scale = 10 ** (-0.4 * (float(exposure.metadata["MAGZERO"]) - 31.4))
    ok = r["ok"]
    return np.where(ok, r["flux"] * scale, np.nan), np.where(ok, r["fluxErr"] * scale, np.nan), ~ok


def _mask_flags(mask, xs, ys, r_flag):
    """OR of the mask bits within a box of half-width r_flag (per source) and in the central 3x3."""
    ix, iy = np.floor(np.asarray(xs) + 0.5).astype(np.int64), np.floor(np.asarray(ys) + 0.5).astype(np.int64)
    r_flag = np.asarray(r_flag, np.int64)
    R = int(r_flag.max()) if len(r_flag) else 1
    st, _ = _gather(mask, ix, iy, max(R, 1), 0)  # off the image: no bits
    off = np.abs(np.arange(-max(R, 1), max(R, 1) + 1))
    box = (off[None, :, None] <= r_flag[:, None, None]) & (off[None, None, :] <= r_flag[:, None, None])
    zero = st.dtype.type(0)
    region = np.bitwise_or.reduce(np.where(box, st, zero).reshape(len(ix), -1), axis=1)
    c = max(R, 1)
    centre = np.bitwise_or.reduce(st[:, c - 1 : c + 2, c - 1 : c + 2].reshape(len(ix), -1), axis=1)
    return region, centre


def _fwhm_batch(psf, xs, ys):
    """PSF FWHM (pixels) at many positions, from the area above half maximum (as ``_fwhm``)."""
    st = _psf_images(psf, np.asarray(xs, float), np.asarray(ys, float))
    peak = st.max(axis=(1, 2))
    f = np.sqrt(4.0 * np.count_nonzero(st >= 0.5 * peak[:, None, None], axis=(1, 2)) / np.pi)
    return np.broadcast_to(f, (len(xs),)).astype(float) if len(f) == 1 else f.astype(float)


# ------------------------------------------------------------- measurement
def measure(diffexp: Exposure, detections: det.Detections, science: Exposure | None = None,
            template: Exposure | None = None, refcat: pd.DataFrame | None = None,
            config: dict | None = None, path=None):
    """Measure every candidate; return (diaSource DataFrame, cutouts dict of (n, size, size) arrays).

    All candidates are measured together (``psf_fit_batch``, ``dipole_fit_batch``, ...).
    """
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
    v = detections.valid
    pix = _Pixels(diffexp, v if v is not None and v.shape == diffexp.shape else None)
    valid = pix.valid
    ny, nx = diffexp.shape
    psf = diffexp.psf
    ns = detections.noise_scale  # correlated-noise correction of PSF-weighted errors

    cands = detections.candidates
    strongest = np.array([max(c.pos_peaks + c.neg_peaks, key=lambda q: abs(q[2]))[:2] for c in cands], float)
    has_pos = np.array([c.has_pos for c in cands])
    has_neg = np.array([c.has_neg for c in cands])
    both = has_pos & has_neg
    x0, y0 = strongest[:, 0].copy(), strongest[:, 1].copy()
    fwhm = _fwhm_batch(psf, x0, y0)

    # Dipole fit of every candidate with both lobes (strongest positive and negative peak).
    dip = {k: np.full(n, np.nan) for k in ("fluxPos", "fluxPosErr", "fluxNeg", "fluxNegErr", "xPos", "yPos",
                                           "xNeg", "yNeg", "chi2ndof")}
    dip["ok"] = np.zeros(n, bool)
    bi = np.flatnonzero(both)
    if bi.size:
        pk = np.array([max(cands[i].pos_peaks, key=lambda q: q[2])[:2] for i in bi], float)
        nk = np.array([min(cands[i].neg_peaks, key=lambda q: q[2])[:2] for i in bi], float)
        d = dipole_fit_batch(pix, psf, pk, nk)
        for key, v in d.items():
            dip[key][bi] = v
        ok = d["ok"]
        x0[bi] = np.where(ok, 0.5 * (d["xPos"] + d["xNeg"]), 0.5 * (pk[:, 0] + nk[:, 0]))
        y0[bi] = np.where(ok, 0.5 * (d["yPos"] + d["yNeg"]), 0.5 * (pk[:, 1] + nk[:, 1]))

    fit = psf_fit_batch(pix, psf, x0, y0, fit_position=~both, max_shift=float(cfg["max_centroid_shift"]))
    x, y = fit["x"], fit["y"]
    sign = np.where((fit["ok"] & (fit["flux"] >= 0)) | (~fit["ok"] & has_pos), 1.0, -1.0)
    ixx, iyy, ixy = weighted_moments_batch(pix, x, y, fwhm / 2.3548, sign)

    # Pixel flags: within 2 FWHM, and the central 3x3.
    region, centre = _mask_flags(diffexp.mask, x, y, np.ceil(2 * fwhm).astype(np.int64))

    def anyp(bits, *planes):
        want = 0
        for p in planes:
            want |= masks.bit(p)
        return (bits & bits.dtype.type(want)) != 0

    sci_pix = _Pixels(science) if science is not None else None
    tmpl_pix = _Pixels(template) if template is not None else None
    sf, sfe, sflag = _forced_flux_batch(science, sci_pix, x, y, scale)
    tf, tfe, tflag = _forced_flux_batch(template, tmpl_pix, x, y, scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        isdip = (
            dip["ok"]
            & (dip["fluxPos"] > 0) & (dip["fluxNeg"] < 0)
            & (dip["fluxPos"] / (dip["fluxPosErr"] * ns) >= cfg["dipole_min_lobe_snr"])
            & (-dip["fluxNeg"] / (dip["fluxNegErr"] * ns) >= cfg["dipole_min_lobe_snr"])
            & (np.abs(dip["fluxPos"] + dip["fluxNeg"]) / (dip["fluxPos"] - dip["fluxNeg"]) <= cfg["dipole_max_asymmetry"])
        )
    dok = dip["ok"]
    rows = {
        "x": x, "y": y, "xErr": fit["xErr"] * ns, "yErr": fit["yErr"] * ns,
        "psfFlux": fit["flux"] * scale, "psfFluxErr": fit["fluxErr"] * scale * ns,
        "psfChi2Ndof": fit["chi2ndof"], "snr": np.array([c.peak_nu for c in cands], float),
        "isNegative": has_neg & ~has_pos, "isDipole": isdip,
        "dipoleFluxPos": dip["fluxPos"] * scale, "dipoleFluxPosErr": dip["fluxPosErr"] * scale * ns,
        "dipoleFluxNeg": dip["fluxNeg"] * scale, "dipoleFluxNegErr": dip["fluxNegErr"] * scale * ns,
        "dipoleSeparation": np.where(dok, np.hypot(dip["xPos"] - dip["xNeg"], dip["yPos"] - dip["yNeg"]), np.nan),
        "dipoleAngle": np.where(dok, np.degrees(np.arctan2(dip["yPos"] - dip["yNeg"], dip["xPos"] - dip["xNeg"])),
                                np.nan),
        "dipoleChi2Ndof": dip["chi2ndof"],
        "ixx": ixx, "iyy": iyy, "ixy": ixy,
        "scienceFlux": sf, "scienceFluxErr": sfe, "templateFlux": tf, "templateFluxErr": tfe,
        "nPix": np.array([c.npix for c in cands], np.int64), "noiseScale": np.full(n, ns),
        "psfFlux_flag": ~fit["ok"], "centroid_flag": ~both & ~fit["centroid_ok"],
        "shape_flag": ~np.isfinite(ixx), "dipole_flag": both & ~dok,
        "forced_flag": sflag | tflag,
        "pixelFlags_edge": fit["edge"] | anyp(region, "EDGE", "NO_DATA"),
        "pixelFlags_bad": anyp(region, "BAD"), "pixelFlags_badCenter": anyp(centre, "BAD"),
        "pixelFlags_saturated": anyp(region, "SAT"),
        "pixelFlags_saturatedCenter": anyp(centre, "SAT"), "pixelFlags_cr": anyp(region, "CR"),
        "pixelFlags_crCenter": anyp(centre, "CR"), "pixelFlags_interpolated": anyp(region, "INTRP"),
        "pixelFlags_interpolatedCenter": anyp(centre, "INTRP"), "pixelFlags_suspect": anyp(region, "SUSPECT"),
        "pixelFlags_suspectCenter": anyp(centre, "SUSPECT"),
        "pixelFlags_injected": anyp(region, "INJECTED"), "pixelFlags_injectedCenter": anyp(centre, "INJECTED"),
    }
    cutouts = {"difference": _cutouts(diffexp.image, x, y, size),
               "science": _cutouts(science.image if science is not None else None, x, y, size),
               "template": _cutouts(template.image if template is not None else None, x, y, size)}

    xs, ys = np.asarray(x, float), np.asarray(y, float)
    # Aperture photometry, all sources at once (sep wants native-endian C arrays).
    radii = [float(r) for r in cfg["aperture_radii"]]
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
