"""Does the simulator obey its own model?  Measurements of simulated frames against the truth.

These are the acceptance measurements of the simulated survey (issue
"Foundation", item 3), used by ``tests/test_simulate.py`` and by
``diapipe simulate check`` for the default survey:

* per-amplifier bias level and read noise from the overscan and from pairs of
  bias frames, against ``truth_amps``;
* the pixel variance of a bias-subtracted, flat-fielded sky region against
  (sky x R + dark + read noise^2) / R^2, per amplifier;
* the FWHM of bright isolated stars (elliptical Moffat fit) against ``true_fwhm``;
* windowed centroids (sep) of stars mapped through the true WCS against the
  truth catalogue;
* bleed trails on stars brighter than saturation;
* pixels deviating by more than 6 sigma from the truth lie in the truth mask.

The frames are read the way ISR must read them: amplifier geometry from the
DATASEC/BIASSEC/DETSEC headers.  The reference calibration used here knows the
truth (gain, flat response, bias structure), so it measures the simulator,
not an ISR.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from astropy.io import fits

from . import masks
from . import simulate as sim_mod


def parse_section(sec: str) -> tuple[slice, slice]:
    """IRAF '[x1:x2,y1:y2]' (1-based, inclusive) -> numpy (rows, cols) slices."""
    m = re.match(r"\[(\d+):(\d+),(\d+):(\d+)\]", sec.replace(" ", ""))
    if not m:
        raise ValueError(f"bad section {sec!r}")
    x1, x2, y1, y2 = map(int, m.groups())
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def amp_sections(header) -> list[dict]:
    """Per amplifier: name, data/overscan/detector slices, gain, read noise (from the header)."""
    out = []
    for i in range(int(header["NAMPS"])):
        L = sim_mod.AMP_NAMES[i]
        out.append(
            dict(
                amp=L,
                data=parse_section(header[f"DATASEC{L}"]),
                bias=parse_section(header[f"BIASSEC{L}"]),
                det=parse_section(header[f"DETSEC{L}"]),
                gain=float(header[f"GAIN{L}"]),
                rdnoise=float(header[f"RDNOISE{L}"]),
                saturate=float(header[f"SATURAT{L}"]),
            )
        )
    return out


def _row_poly(values: np.ndarray, order: int = 2) -> np.ndarray:
    """Fit a polynomial in row to per-row values (sigma-clipped once); return the fit per row."""
    t = np.linspace(-1, 1, len(values))
    c = np.polyfit(t, values, order)
    res = values - np.polyval(c, t)
    ok = np.abs(res) < 4 * np.std(res) + 1e-9
    c = np.polyfit(t[ok], values[ok], order)
    return np.polyval(c, t)


def overscan_stats(raw: np.ndarray, header) -> pd.DataFrame:
    """Per amplifier: bias level (ADU, mean of overscan) and read noise (e-, after removing the row drift)."""
    rows = []
    for a in amp_sections(header):
        os_ = raw[a["bias"]].astype(float)
        drift = _row_poly(os_.mean(axis=1))
        res = os_ - drift[:, None]
        rows.append(
            dict(
                amp=a["amp"],
                bias_overscan=float(os_.mean()),
                read_noise_overscan=float(res.std(ddof=3) * a["gain"]),
            )
        )
    return pd.DataFrame(rows)


def bias_pair_read_noise(raw1: np.ndarray, raw2: np.ndarray, header) -> pd.DataFrame:
    """Per amplifier: read noise (e-) from the data region of two bias frames (difference / sqrt 2)."""
    rows = []
    for a in amp_sections(header):
        d = raw1[a["data"]].astype(float) - raw2[a["data"]].astype(float)
        d -= d.mean(axis=1, keepdims=True)  # the two frames' row drifts differ
        n = d.shape[1]
        sigma = d.std() * math.sqrt(n / (n - 1)) / math.sqrt(2)
        rows.append(dict(amp=a["amp"], bias_frames=float(raw1[a["data"]].mean()), read_noise_bias=float(sigma * a["gain"])))
    return pd.DataFrame(rows)


def reference_calibrate(raw_hdu, plan, detector: int, band: str) -> np.ndarray:
    """Truth-informed calibration of a raw frame to e- in the flat-fielded frame.

    Per amp: subtract the overscan (a quadratic in row), trim and assemble by
    DETSEC, subtract the fixed bias structure, multiply by the gain, subtract
    the mean dark current, divide by the true flat response.  Dead pixels -> NaN.
    """
    header, raw = raw_hdu.header, raw_hdu.data.astype(float)
    sim = plan.sim
    ny, nx = sim["ny"], sim["nx"]
    img = np.zeros((ny, nx))
    defects = sim_mod.detector_defects(sim, plan.seed, detector)
    for a in amp_sections(header):
        drift = _row_poly(raw[a["bias"]].mean(axis=1))
        img[a["det"]] = (raw[a["data"]] - drift[:, None] - defects.bias_structure[a["det"]]) * a["gain"]
    img -= sim["dark_current"] * float(header["DARKTIME"])
    resp, _ = sim_mod.flat_response(sim, plan.seed, detector, band)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(resp > 0, img / resp, np.nan)


def sky_variance(calexp: np.ndarray, truth, plan, visit: int, detector: int, raw_header) -> pd.DataFrame:
    """Per amplifier: measured variance of sky pixels vs (S R + dark + rn^2) / R^2 (e-^2, flat-fielded)."""
    sim = plan.sim
    vrow = plan.visit_row(visit)
    resp, _ = sim_mod.flat_response(sim, plan.seed, detector, str(vrow["band"]))
    img = truth.image.astype(float)
    # Sky pixels: far (in flux) from every source: truth within 1% of its local low envelope.
    from scipy import ndimage

    base = ndimage.minimum_filter(img, size=31)
    sky_px = (img - base < 0.02 * np.sqrt(base)) & (truth.mask == 0) & (resp > 0) & np.isfinite(calexp)
    rows = []
    for a in amp_sections(raw_header):
        sel = np.zeros_like(sky_px)
        sel[a["det"]] = sky_px[a["det"]]
        s = img[sel]
        r = resp[sel]
        rn = a["rdnoise"]
        dark = (sim["dark_current"]) * float(vrow["darktime"])
        pred = (s * r + dark + rn**2) / r**2
        resid = calexp[sel] - s
        # Clip 5-sigma outliers (undetectable faint CR edges, etc.) symmetrically.
        z = resid / np.sqrt(pred)
        ok = np.abs(z) < 5
        rows.append(
            dict(
                amp=a["amp"],
                n_pixels=int(ok.sum()),
                sky_e=float(np.median(s)),
                var_measured=float(np.mean(resid[ok] ** 2)),
                var_predicted=float(np.mean(pred[ok])),
                # The same in raw ADU, before flat-fielding: sky/gain + (rn/gain)^2.
                var_pred_adu=float(np.median(s * r / a["gain"] + (rn / a["gain"]) ** 2)),
            )
        )
    out = pd.DataFrame(rows)
    # 5-sigma clipping of a Gaussian removes 5.7e-7 of the variance: negligible.
    out["ratio"] = out["var_measured"] / out["var_predicted"]
    return out


def _isolated_stars(plan, visit, detector, truth, fmin, fmax_peak, radius=15.0) -> pd.DataFrame:
    """Truth stars with peak flux in range, no brighter-than-1% neighbour within ``radius`` pixels, unmasked."""
    src = sim_mod.exposure_sources(plan, visit, detector, margin=60.0)
    stars = src[(src["kind"] == "star")].copy()
    sim = plan.sim
    fw = sim_mod.true_fwhm(plan, visit, detector, stars["x"].to_numpy(), stars["y"].to_numpy())
    peak = stars["flux"].to_numpy() / (1.133 * fw**2)  # Gaussian-equivalent peak (e-/px)
    stars["peak"] = peak
    keep = (stars["flux"] > fmin) & (peak < fmax_peak)
    m = 2 * radius
    keep &= (stars["x"] > m) & (stars["x"] < sim["nx"] - 1 - m) & (stars["y"] > m) & (stars["y"] < sim["ny"] - 1 - m)
    line = sim_mod.satellite_line(plan, visit, detector)
    if line is not None:  # a satellite trail is a neighbour too
        x0, y0, nxv, nyv, sig = line
        keep &= np.abs((stars["x"] - x0) * nxv + (stars["y"] - y0) * nyv) > radius + 6 * sig
    allx, ally, allf = src["x"].to_numpy(), src["y"].to_numpy(), src["flux"].to_numpy()
    # Extended galaxies count as neighbours out to radius + a few half-light radii.
    ext = np.nan_to_num(src["reff"].to_numpy()) / sim["pixel_scale"] * 4
    out = []
    for i, row in stars[keep].iterrows():
        d = np.hypot(allx - row["x"], ally - row["y"])
        near = (d < radius + ext) & (d > 0.01) & (allf > 0.01 * row["flux"])
        if near.any():
            continue
        ix, iy = int(round(row["x"])), int(round(row["y"]))
        h = int(radius)
        if truth.mask[iy - h : iy + h + 1, ix - h : ix + h + 1].any():
            continue
        out.append(row)
    return pd.DataFrame(out)


def _moffat_model(params, X, Y, os_=3):
    """Elliptical single Moffat (free beta) + constant, integrated over pixels on an os x os grid."""
    x0, y0, flux, fwhm, beta, e1, e2, bkg = params
    beta = max(beta, 1.05)
    sub = (np.arange(os_) + 0.5) / os_ - 0.5
    g = np.clip(np.hypot(e1, e2), 0, 0.9)
    q = (1 - g) / (1 + g)
    th = 0.5 * math.atan2(e2, e1)
    alpha = abs(fwhm) / (2 * math.sqrt(2 ** (1 / beta) - 1))
    tot = 0.0
    for sx in sub:
        for sy in sub:
            dx, dy = X + sx - x0, Y + sy - y0
            u = dx * math.cos(th) + dy * math.sin(th)
            v = -dx * math.sin(th) + dy * math.cos(th)
            r2 = u * u * q + v * v / q
            tot = tot + (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    return flux * tot / os_**2 + bkg


def fit_moffat(stamp: np.ndarray, var: np.ndarray, fwhm0: float) -> dict:
    """Least-squares elliptical Moffat fit to a star stamp centred near its middle; FWHM is the geometric mean."""
    from scipy.optimize import least_squares

    n = stamp.shape[0]
    c = n // 2
    Y, X = np.mgrid[0:n, 0:n].astype(float)
    ok = np.isfinite(stamp) & np.isfinite(var) & (var > 0)
    w = 1 / np.sqrt(var[ok])

    def resid(p):
        return ((_moffat_model(p, X, Y) - stamp)[ok]) * w

    p0 = [c, c, float(np.nansum(stamp - np.nanmedian(stamp))), fwhm0, 3.0, 0.0, 0.0, float(np.nanmedian(stamp))]
    r = least_squares(resid, p0, x_scale="jac", max_nfev=400)
    x0, y0, flux, fwhm, beta, e1, e2, bkg = r.x
    return dict(x=x0, y=y0, flux=flux, fwhm=abs(fwhm), beta=beta, e1=e1, e2=e2, ok=bool(r.success))


def star_fwhm(calexp, truth, plan, visit, detector, n_max=40, half=12) -> pd.DataFrame:
    """FWHM of bright isolated unsaturated stars (Moffat fit) vs the true PSF FWHM at their positions."""
    sim = plan.sim
    stars = _isolated_stars(plan, visit, detector, truth, fmin=0.0, fmax_peak=0.4 * sim["full_well"])
    if len(stars) == 0:
        return pd.DataFrame(columns=["source_id", "fwhm_measured", "fwhm_true", "ratio"])
    # Bright: peak S/N > 100 per pixel against the sky, so noise gives < 1% FWHM scatter.
    sky = float(plan.visit_row(visit)["sky"])
    stars = stars[stars["peak"] > 100 * math.sqrt(sky)].sort_values("flux", ascending=False).head(n_max)
    rows = []
    for _, s in stars.iterrows():
        ix, iy = int(round(s["x"])), int(round(s["y"]))
        sl = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        ft = sim_mod.true_fwhm(plan, visit, detector, s["x"], s["y"])
        fit = fit_moffat(calexp[sl], truth.variance[sl].astype(float), ft)
        rows.append(dict(source_id=int(s["source_id"]), x=s["x"], y=s["y"], flux=s["flux"],
                         fwhm_measured=fit["fwhm"], fwhm_true=ft, beta=fit["beta"], ok=fit["ok"]))
    out = pd.DataFrame(rows)
    out["ratio"] = out["fwhm_measured"] / out["fwhm_true"]
    return out


def star_astrometry(calexp, truth, plan, visit, detector, snr_min=100.0) -> pd.DataFrame:
    """sep windowed centroids of isolated unsaturated stars, through the true WCS, vs the truth (pixels)."""
    import sep

    sim = plan.sim
    stars = _isolated_stars(plan, visit, detector, truth, fmin=0.0, fmax_peak=0.5 * sim["full_well"], radius=12.0)
    if len(stars) == 0:
        return pd.DataFrame(columns=["source_id", "dx", "dy", "dist"])
    sky = float(plan.visit_row(visit)["sky"])
    fw = sim_mod.true_fwhm(plan, visit, detector, stars["x"].to_numpy(), stars["y"].to_numpy())
    snr = stars["flux"].to_numpy() / np.sqrt(stars["flux"].to_numpy() + 4 * math.pi * (fw / 2.3548) ** 2 * sky)
    stars = stars[snr > snr_min]
    if len(stars) == 0:
        return pd.DataFrame(columns=["source_id", "dx", "dy", "dist"])
    img = np.nan_to_num(calexp.astype(np.float64))
    bkg = sep.Background(np.ascontiguousarray(img), mask=truth.mask != 0, bw=128, bh=128)
    data = np.ascontiguousarray(img - bkg.back())
    # Start from the peak pixel near the truth (as a detection would), not from the truth.
    x0, y0 = [], []
    for _, s in stars.iterrows():
        ix, iy = int(round(s["x"])), int(round(s["y"]))
        st = data[iy - 2 : iy + 3, ix - 2 : ix + 3]
        j = np.unravel_index(np.argmax(st), st.shape)
        x0.append(ix - 2 + j[1])
        y0.append(iy - 2 + j[0])
    sig = 2.0 / 2.3548 * np.asarray(
        sim_mod.true_fwhm(plan, visit, detector, stars["x"].to_numpy(), stars["y"].to_numpy())) / 2
    xw, yw, flag = sep.winpos(data, np.asarray(x0, float), np.asarray(y0, float), sig)
    wcs = sim_mod.true_wcs(plan, visit, detector)
    ra, dec = wcs.all_pix2world(xw, yw, 0)
    dra = (ra - stars["ra"].to_numpy()) * np.cos(np.radians(dec)) * 3600 / sim["pixel_scale"]
    ddec = (dec - stars["dec"].to_numpy()) * 3600 / sim["pixel_scale"]
    return pd.DataFrame(dict(source_id=stars["source_id"].to_numpy(), snr=snr[snr > snr_min], dx=dra, dy=ddec,
                             dist=np.hypot(dra, ddec), flag=flag))


def bleed_trails(raw_hdu, plan, visit, detector) -> pd.DataFrame:
    """For every star whose peak exceeds the full well: is there a column-wise trail of saturated raw pixels?"""
    sim = plan.sim
    header, raw = raw_hdu.header, raw_hdu.data
    ny, nx = sim["ny"], sim["nx"]
    sat = np.zeros((ny, nx), bool)
    for a in amp_sections(header):
        sat[a["det"]] = raw[a["data"]] >= a["saturate"]
    src = sim_mod.exposure_sources(plan, visit, detector)
    stars = src[src["kind"].isin(["star", "variable", "flare"])]
    rows = []
    resp, _ = sim_mod.flat_response(sim, plan.seed, detector, str(plan.visit_row(visit)["band"]))
    for _, s in stars.iterrows():
        ix, iy = int(round(s["x"])), int(round(s["y"]))
        psf = sim_mod.true_psf_image(plan, visit, detector, s["x"], s["y"], size=61)
        # Predicted peak: the central pixel of the unit-sum stamp underestimates by the wing flux beyond it.
        peak = s["flux"] * psf.max() * resp[min(max(iy, 0), ny - 1), min(max(ix, 0), nx - 1)]
        if peak < 1.2 * sim["full_well"]:
            continue
        h = 150
        box = sat[max(0, iy - h) : iy + h + 1, max(0, ix - 8) : ix + 9]
        ys, xs = np.nonzero(box)
        if len(ys) == 0:
            rows.append(dict(source_id=int(s["source_id"]), peak_e=peak, x_extent=0, y_extent=0, trail=False))
            continue
        yext, xext = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        # A bleed trail: the saturated region reaches >= 2 px farther along the column than across.
        rows.append(dict(source_id=int(s["source_id"]), peak_e=peak, x_extent=xext, y_extent=yext,
                         trail=bool(yext >= xext + 2)))
    return pd.DataFrame(rows, columns=["source_id", "peak_e", "x_extent", "y_extent", "trail"])


def unmasked_outliers(calexp, truth, nsigma: float = 6.0) -> dict:
    """Pixels deviating from the truth by > nsigma that the truth mask does not flag (should be ~0)."""
    z = (calexp - truth.image) / np.sqrt(truth.variance)
    finite = np.isfinite(z)
    out = finite & (np.abs(z) > nsigma)
    flagged = truth.mask != 0
    return dict(
        n_pixels=int(finite.sum()),
        n_outliers=int(out.sum()),
        n_outliers_unmasked=int((out & ~flagged).sum()),
        n_masked=int(flagged.sum()),
        bad=int(masks.is_set(truth.mask, "BAD").sum()),
        sat=int(masks.is_set(truth.mask, "SAT").sum()),
        cr=int(masks.is_set(truth.mask, "CR").sum()),
    )


def check_exposure(plan, visit: int, detector: int, raw_hdul=None, truth=None) -> dict:
    """All per-exposure measurements for one (visit, detector); simulates it if not given."""
    if raw_hdul is None or truth is None:
        raw_hdul, truth = sim_mod.simulate_raw(None, plan, visit, detector)
    band = str(plan.visit_row(visit)["band"])
    hdu = raw_hdul[0]
    calexp = reference_calibrate(hdu, plan, detector, band)
    return dict(
        overscan=overscan_stats(hdu.data, hdu.header),
        sky=sky_variance(calexp, truth, plan, visit, detector, hdu.header),
        fwhm=star_fwhm(calexp, truth, plan, visit, detector),
        astrometry=star_astrometry(calexp, truth, plan, visit, detector),
        bleed=bleed_trails(hdu, plan, visit, detector),
        outliers=unmasked_outliers(calexp, truth),
    )


def read_fits(path) -> fits.HDUList:
    return fits.open(path, memmap=False)


def survey_report(cfg, butler, visits=None, detectors=None) -> dict:
    """Measure the acceptance figures on a written survey (files through ``butler``).

    Returns a dict of summary figures plus the per-item tables.
    """
    from .exposure import Exposure

    paths = {n: butler.get(n) for n in sim_mod.PLAN_TABLES}
    plan = sim_mod.load_plan(cfg, paths)
    s = plan.sim
    visits = list(plan.visits["visit"]) if visits is None else list(visits)
    detectors = list(range(s["n_detectors"])) if detectors is None else list(detectors)
    truth_amps = plan.amps.set_index(["detector", "amp"])
    acc = {k: [] for k in ("overscan", "sky", "fwhm", "astrometry", "bleed", "bias")}
    outliers = []
    for v in visits:
        for d in detectors:
            with read_fits(butler.get("raw", visit=int(v), detector=d)) as raw:
                truth = Exposure.read(butler.get("truth_exposure", visit=int(v), detector=d))
                r = check_exposure(plan, int(v), d, raw_hdul=raw, truth=truth)
            for k in ("overscan", "sky", "fwhm", "astrometry", "bleed"):
                acc[k].append(r[k].assign(visit=int(v), detector=d))
            outliers.append(dict(r["outliers"], visit=int(v), detector=d))
    for d in detectors:
        frames = []
        for seq in range(s["n_bias"]):
            with read_fits(butler.get("raw_bias", detector=d, seq=seq)) as h:
                frames.append((h[0].data.copy(), h[0].header.copy()))
        for i in range(0, len(frames) - 1, 2):
            t = bias_pair_read_noise(frames[i][0], frames[i + 1][0], frames[i][1])
            t2 = overscan_stats(frames[i][0], frames[i][1])
            acc["bias"].append(t.merge(t2, on="amp").assign(detector=d, pair=i // 2))
    tab = {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame() for k, v in acc.items()}
    tab["outliers"] = pd.DataFrame(outliers)

    def rel(t, col, truth_col):
        tv = truth_amps.loc[list(zip(t["detector"], t["amp"])), truth_col].to_numpy()
        return t[col].to_numpy() / tv - 1

    o, b = tab["overscan"], tab["bias"]
    f, a, bl = tab["fwhm"], tab["astrometry"], tab["bleed"]
    summary = {
        "n_exposures": len(visits) * len(detectors),
        "bias_level_overscan_max_rel_err": float(np.abs(rel(o, "bias_overscan", "bias_level")).max()),
        "read_noise_overscan_max_rel_err": float(np.abs(rel(o, "read_noise_overscan", "read_noise")).max()),
        "read_noise_overscan_mean_rel_err": float(np.mean(rel(o, "read_noise_overscan", "read_noise"))),
        "bias_level_biasframes_max_rel_err": float(np.abs(rel(b, "bias_frames", "bias_level")).max()) if len(b) else None,
        "read_noise_biasframes_max_rel_err": float(np.abs(rel(b, "read_noise_bias", "read_noise")).max()) if len(b) else None,
        "sky_var_ratio_mean": float(tab["sky"]["ratio"].mean()),
        "sky_var_ratio_max_abs_dev": float(np.abs(tab["sky"]["ratio"] - 1).max()),
        "fwhm_n_stars": len(f),
        "fwhm_ratio_median": float(f["ratio"].median()) if len(f) else None,
        "fwhm_ratio_rms_dev": float(np.sqrt(np.mean((f["ratio"] - 1) ** 2))) if len(f) else None,
        "fwhm_frac_within_3pct": float((np.abs(f["ratio"] - 1) < 0.03).mean()) if len(f) else None,
        "astrometry_n_stars": len(a),
        "astrometry_rms_px": float(np.sqrt(np.mean(a["dx"] ** 2 + a["dy"] ** 2))) if len(a) else None,
        "astrometry_mean_dx_dy_px": [float(a["dx"].mean()), float(a["dy"].mean())] if len(a) else None,
        "saturated_stars": len(bl),
        "saturated_stars_with_trail": int(bl["trail"].sum()) if len(bl) else 0,
        "saturated_stars_over_1.5x_full_well": int((bl["peak_e"] > 1.5 * s["full_well"]).sum()) if len(bl) else 0,
        "saturated_stars_over_1.5x_full_well_with_trail": int(bl.loc[bl["peak_e"] > 1.5 * s["full_well"], "trail"].sum())
        if len(bl) else 0,
        "saturated_stars_over_2x_full_well": int((bl["peak_e"] > 2 * s["full_well"]).sum()) if len(bl) else 0,
        "saturated_stars_over_2x_full_well_with_trail": int(bl.loc[bl["peak_e"] > 2 * s["full_well"], "trail"].sum())
        if len(bl) else 0,
        "outliers_6sigma": int(sum(x["n_outliers"] for x in outliers)),
        "outliers_6sigma_unmasked": int(sum(x["n_outliers_unmasked"] for x in outliers)),
        "mask_pixels_bad_sat_cr": [int(sum(x[k] for x in outliers)) for k in ("bad", "sat", "cr")],
    }
    return {"summary": summary, "tables": tab}
