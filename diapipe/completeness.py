"""Completeness, accuracy and false detections of diaSources, from fakes and (simulated) truth.

* Each fake is matched to the nearest non-negative diaSource of its visit and
  detector within ``match_radius`` pixels.  Its S/N is the optimal S/N in the
  difference image, flux * sqrt(sum(P^2 / V)) with the diffexp's PSF and
  variance at the fake's position (``snrDiff``), or the calexp S/N when no
  diffexp is given.
* Completeness per S/N and per magnitude bin (with Wilson 68% intervals), and
  a fit of C(s) = c_max * Phi((s - s50) / width) by maximum likelihood
  (binomial), separately for isolated fakes and fakes on galaxies.
* Flux accuracy: median (psfFlux - flux) / flux and the std of
  (psfFlux - flux) / psfFluxErr per bin; position accuracy: std of the centroid
  offset per axis against the Cramer-Rao expectation sqrt(2) * sigma_PSF / S/N.
* Every diaSource is labelled fake, transient (sn, flare), variable, mover,
  artefact (at a static star or galaxy: subtraction residual) or false (no
  counterpart: noise, cosmic ray, defect) using the fakes and truth tables;
  false detections are counted per visit and detector.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pandas as pd
from scipy import optimize, special, stats
from scipy.spatial import cKDTree

from .fileio import atomic_path, write_parquet, write_text

log = logging.getLogger("diapipe.completeness")

DEFAULTS = {
    "match_radius": 2.0,
    "match_nsigma": 3.0,
    "match_radius_max": 4.0,
    "snr_bins": [2, 3, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8, 10, 15, 20, 30, 50],
    "mag_bin_width": 0.25,
    "truth_snr_min": 10.0,
}

TRANSIENT_KINDS = {"sn": "transient", "flare": "transient", "variable": "variable", "mover": "mover",
                   "star": "artefact", "galaxy": "artefact"}


def _nearest(src_xy, dst_xy, radius, src_r=None, dst_r=None):
    """For each dst point: index of the nearest src point within radius (-1 if none) and distance.

    ``src_r`` / ``dst_r``: a radius per src / dst point instead (a diaSource's own match
    radius, ``match_radii``); the nearest src point within the pair's radius wins.
    """
    if len(src_xy) == 0 or len(dst_xy) == 0:
        return np.full(len(dst_xy), -1), np.full(len(dst_xy), np.inf)
    if src_r is None and dst_r is None:
        d, i = cKDTree(src_xy).query(dst_xy, distance_upper_bound=radius)
        i = np.where(np.isfinite(d), np.asarray(i).astype(np.int64, copy=False), -1)
        return i, d
    rmax = float(np.nanmax(src_r if src_r is not None else dst_r))
    k = min(8, len(src_xy))
    d, i = cKDTree(src_xy).query(dst_xy, k=k, distance_upper_bound=rmax)
    d, i = d.reshape(len(dst_xy), k), i.reshape(len(dst_xy), k)
    found = np.isfinite(d)
    ic = np.where(found, i, 0)
    lim = np.asarray(src_r)[ic] if src_r is not None else np.asarray(dst_r)[:, None]
    ok = found & (d <= lim)
    first = np.argmax(ok, axis=1)
    hit = ok[np.arange(len(dst_xy)), first]
    idx = np.where(hit, ic[np.arange(len(dst_xy)), first], -1).astype(np.int64)
    return idx, np.where(hit, d[np.arange(len(dst_xy)), first], np.inf)


def match_radii(dia: pd.DataFrame, radius: float, nsigma: float = 0.0, radius_max: float | None = None) -> np.ndarray:
    """Per diaSource match radius (px): ``nsigma`` x its 2-D centroid error, within [radius, radius_max].

    A faint fake's centroid scatters by ~FWHM / S/N per axis (0.6 px at S/N 5 for a 4.5 px
    PSF), so a fixed 2 px radius labels some detected fakes as bogus; the radius then grows
    with the measured error, and stays ``radius`` for bright sources.  A diaSource without a
    centroid error (its centroid fit failed) gets ``radius_max``.
    """
    r = np.full(len(dia), float(radius))
    if nsigma > 0 and {"xErr", "yErr"} <= set(dia.columns):
        rmax = radius_max if radius_max else radius
        e = np.hypot(dia["xErr"].to_numpy(float), dia["yErr"].to_numpy(float))
        # no error: the centroid fit failed (an edge, a blend), and the position is the
        # footprint's peak, good to a FWHM at best: the largest radius
        r = np.where(np.isfinite(e), np.clip(nsigma * e, radius, rmax), rmax)
    return r


#: A detected fake's diaSource is a clean PSF measurement when none of these is set: the fit
#: worked, its centroid was fitted (no dipole lobe, no fixed position), and no defect, saturated
#: star, cosmic ray, interpolation or image edge touches its core.  Flux and centroid accuracy
#: are quoted for clean measurements (the flagged ones are flagged because they are not).
CLEAN_FLAGS = ("psfFlux_flag", "centroid_flag", "dipole_flag", "pixelFlags_edge", "pixelFlags_saturated",
               "pixelFlags_badCenter", "pixelFlags_crCenter", "pixelFlags_interpolatedCenter",
               "pixelFlags_suspectCenter")
#: ... and its PSF fit is that of a point source: reduced chi^2 <= this (a fake on a satellite
#: trail or a bright-star residual fits at chi^2/ndof ~ 10-200; isolated point sources at ~1).
CLEAN_MAX_PSF_CHI2 = 5.0


def match_fakes(dia: pd.DataFrame, fakes: pd.DataFrame, radius: float = 2.0, nsigma: float = 0.0,
                radius_max: float | None = None) -> pd.DataFrame:
    """Fakes with detected, diaSourceId, psfFlux(Err), measured x/y and offsets (per visit, detector).

    A fake matches the nearest non-negative diaSource within that diaSource's ``match_radii``.

    ``clean``: detected, and its diaSource has none of ``CLEAN_FLAGS``, no negative lobe and a
    PSF-fit reduced chi^2 <= ``CLEAN_MAX_PSF_CHI2``.
    """
    out = []
    for (v, d), f in fakes.groupby(["visit", "detector"], sort=True):
        s = dia[(dia["visit"] == v) & (dia["detector"] == d) & ~dia["isNegative"].astype(bool)]
        idx, dist = _nearest(s[["x", "y"]].to_numpy(float), f[["x", "y"]].to_numpy(float), radius,
                             src_r=match_radii(s, radius, nsigma, radius_max))
        f = f.copy()
        hit = idx >= 0
        f["detected"] = hit
        for col, src_col in (("diaSourceId", "diaSourceId"), ("psfFlux", "psfFlux"), ("psfFluxErr", "psfFluxErr"),
                             ("xMeas", "x"), ("yMeas", "y"), ("xErr", "xErr"), ("yErr", "yErr"),
                             ("isDipole", "isDipole")):
            vals = s[src_col].to_numpy()
            fill = -1 if col == "diaSourceId" else (False if col == "isDipole" else np.nan)
            f[col] = np.where(hit, vals[np.clip(idx, 0, max(len(vals) - 1, 0))] if len(vals) else fill, fill)
        f["dx"] = f["xMeas"] - f["x"]
        f["dy"] = f["yMeas"] - f["y"]
        flagged = np.zeros(len(s), bool)
        for col in CLEAN_FLAGS:
            if col in s:
                flagged |= s[col].to_numpy(bool)
        if "dipoleChi2Ndof" in s:  # a negative lobe was fitted: psfFlux at a fixed (midpoint) position
            flagged |= np.isfinite(s["dipoleChi2Ndof"].to_numpy(float))
        if "psfChi2Ndof" in s:
            flagged |= ~(s["psfChi2Ndof"].to_numpy(float) <= CLEAN_MAX_PSF_CHI2)
        f["clean"] = hit & ~(flagged[np.clip(idx, 0, max(len(s) - 1, 0))] if len(s) else True)
        out.append(f)
    return pd.concat(out, ignore_index=True) if out else fakes.assign(detected=False)


def add_diff_snr(fakes: pd.DataFrame, diffexps: dict, dia: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add snrDiff (optimal S/N in the difference image) and psfFwhm; diffexps maps (visit, detector) -> Exposure.

    With ``dia`` (the diaSources, column noiseScale) the S/N is divided by the
    exposure's measured matched-filter noise scale, i.e. counted in units of the
    noise actually present (correlated noise), as detection thresholds it.
    """
    from .fakes import optimal_snr_unit
    from .measure import _Pixels
    from .psf import half_max_fwhm

    pixels = {k: _Pixels(e) for k, e in diffexps.items()}
    snr = np.full(len(fakes), np.nan)
    fwhm = np.full(len(fakes), np.nan)
    for k, (v, d, x, y, flux) in enumerate(zip(fakes["visit"], fakes["detector"], fakes["x"], fakes["y"],
                                               fakes["flux"])):
        e = diffexps.get((int(v), int(d)))
        if e is None or e.psf is None:
            continue
        snr[k] = flux * optimal_snr_unit(e, x, y, pixels[(int(v), int(d))])
        fwhm[k] = half_max_fwhm(e.psf.image(x, y))  # robust to Moffat wings
    out = fakes.copy()
    scale = np.ones(len(fakes))
    if dia is not None and len(dia) and "noiseScale" in dia:
        per = dia.groupby(["visit", "detector"])["noiseScale"].first()
        key = pd.MultiIndex.from_arrays([fakes["visit"], fakes["detector"]])
        scale = per.reindex(key).fillna(1.0).to_numpy(float)
    out["noiseScale"] = scale
    out["snrDiff"] = snr / scale
    out["psfFwhm"] = fwhm
    return out


def _centroid_accuracy(d: pd.DataFrame, snr_col: str) -> dict:
    """std of the centroid offsets in units of FWHM / (2.35 S/N) (the photon-limited expectation;
    background-limited PSF fits reach sqrt(2) times that, the Cramer-Rao bound), per axis."""
    if len(d) < 3 or "psfFwhm" not in d or not np.isfinite(d["psfFwhm"]).any():
        return {}
    unit = d["psfFwhm"] / (2.3548 * d[snr_col])
    rx, ry = d["dx"] / unit, d["dy"] / unit
    return {"centroid_std_x_over_fwhm_2.35snr": float(np.std(rx)),
            "centroid_std_y_over_fwhm_2.35snr": float(np.std(ry)),
            "centroid_std_x_over_crb": float(np.std(rx) / np.sqrt(2)),
            "centroid_std_y_over_crb": float(np.std(ry) / np.sqrt(2))}


def mark_blends(matched: pd.DataFrame, truth_fluxes: pd.DataFrame, truth_sources: pd.DataFrame,
                fwhm_default: float = 5.0) -> pd.DataFrame:
    """Column ``blended``: a simulated transient, variable or mover lies within 2 PSF FWHM of the
    fake in that visit (its flux adds to the fake's: a host fake 2 px from a real supernova
    measured 2.4x its flux); blended fakes are not clean measurements."""
    out = matched.copy()
    out["blended"] = False
    if truth_fluxes is None or truth_sources is None or not len(out):
        return out
    kinds = truth_sources.set_index("source_id")["kind"]
    tf = truth_fluxes[kinds.reindex(truth_fluxes["source_id"]).isin(["sn", "flare", "variable", "mover"]).to_numpy()]
    fwhm = out["psfFwhm"].to_numpy(float) if "psfFwhm" in out else np.full(len(out), fwhm_default)
    fwhm = np.where(np.isfinite(fwhm), fwhm, fwhm_default)
    blended = np.zeros(len(out), bool)
    for (v, d), idx in out.groupby(["visit", "detector"]).indices.items():
        t = tf[(tf["visit"] == v) & (tf["detector"] == d)]
        if not len(t):
            continue
        dist, _ = cKDTree(t[["x", "y"]].to_numpy(float)).query(out.iloc[idx][["x", "y"]].to_numpy(float))
        blended[idx] = dist <= 2 * fwhm[idx]
    out["blended"] = blended
    if "clean" in out:
        out["clean"] = out["clean"] & ~out["blended"]
    return out


def wilson(k, n, z=1.0):
    """Wilson score interval (z-sigma) for k successes in n trials."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        den = 1 + z * z / n
        c = (p + z * z / (2 * n)) / den
        h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return c - h, c + h


def fit_completeness(snr, detected) -> dict:
    """Maximum-likelihood fit of C(s) = c_max * Phi((s - s50) / width) to detected (0/1) vs S/N."""
    snr = np.asarray(snr, float)
    det = np.asarray(detected, float)
    ok = np.isfinite(snr)
    snr, det = snr[ok], det[ok]
    if len(snr) < 10 or det.sum() == 0 or det.sum() == len(det):
        return {"s50": np.nan, "width": np.nan, "cmax": np.nan, "n": int(len(snr))}

    def nll(p):
        s50, lw, lc = p
        c = special.expit(lc) * stats.norm.cdf((snr - s50) / np.exp(lw))
        c = np.clip(c, 1e-12, 1 - 1e-12)
        return -(det * np.log(c) + (1 - det) * np.log(1 - c)).sum()

    r = optimize.minimize(nll, [5.0, 0.0, 4.0], method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6})
    s50, lw, lc = r.x
    # 1-sigma error of s50 from the numerical Hessian of the NLL.
    try:
        h = 1e-3
        f0 = nll(r.x)
        d2 = (nll(r.x + [h, 0, 0]) - 2 * f0 + nll(r.x - [h, 0, 0])) / h**2
        s50_err = float(1 / np.sqrt(d2)) if d2 > 0 else np.nan
    except FloatingPointError:
        s50_err = np.nan
    return {"s50": float(s50), "s50_err": s50_err, "width": float(np.exp(lw)), "cmax": float(special.expit(lc)),
            "n": int(len(snr))}


def _robust_std(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) < 3:
        return np.nan
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def curve(matched: pd.DataFrame, by: str, bins) -> pd.DataFrame:
    """Completeness and accuracy per bin of column ``by`` (and per kind)."""
    rows = []
    for kind, m in [("all", matched)] + [(k, g) for k, g in matched.groupby("kind")]:
        vals = m[by].to_numpy(float)
        for lo, hi in zip(bins[:-1], bins[1:]):
            sel = m[(vals >= lo) & (vals < hi)]
            n, k = len(sel), int(sel["detected"].sum())
            lo_ci, hi_ci = wilson(k, n)
            d = sel[sel["detected"]]
            rel = (d["psfFlux"] - d["flux_nJy"]) / d["flux_nJy"]
            pull = (d["psfFlux"] - d["flux_nJy"]) / d["psfFluxErr"]
            rows.append({
                "by": by, "kind": kind, "lo": lo, "hi": hi, "n": n, "nDetected": k,
                "completeness": k / n if n else np.nan, "completenessLo": lo_ci, "completenessHi": hi_ci,
                "fluxBiasMedian": float(np.median(rel)) if len(d) else np.nan,
                "fluxPullStd": float(np.std(pull)) if len(d) > 2 else np.nan,
                "fluxPullRobustStd": _robust_std(pull),
                "fluxPullStdClean": float(np.std(pull[d["clean"]])) if "clean" in d and d["clean"].sum() > 2 else np.nan,
                "posErrX": float(np.std(d["dx"])) if len(d) > 2 else np.nan,
                "posErrY": float(np.std(d["dy"])) if len(d) > 2 else np.nan,
            })
    return pd.DataFrame(rows)


def _relabel_host_blends(lab, mid, xy, radius_max, tf, kinds, host_of, f) -> None:
    """A diaSource matched to a static galaxy that hosts a fake or a transient within ``radius_max``
    px of it takes the nearest of those (in place).  ``host_of``: host_id by source_id.

    A galaxy does not vary, while its fake or supernova does: when the two blend (a host fake and
    a supernova 2 px on either side of the nucleus), the centroid lands on the nucleus, beyond the
    match radius of both, and the diaSource was labelled a static-source residual."""
    cand = [i for i in np.flatnonzero(lab == "artefact") if kinds.get(mid[i]) == "galaxy"]
    if not cand:
        return
    # every hosted transient and fake of this exposure: x, y, host, label, id
    parts = []
    if host_of is not None and len(tf):
        k = kinds.reindex(tf["source_id"]).to_numpy()
        h = host_of.reindex(tf["source_id"]).to_numpy(float)
        varying = [q for q, c in TRANSIENT_KINDS.items() if c != "artefact"]
        sel = np.isin(k, varying) & np.isfinite(h) & (h >= 0)
        parts.append((tf["x"].to_numpy(float)[sel], tf["y"].to_numpy(float)[sel], h[sel],
                      np.array([TRANSIENT_KINDS[q] for q in k[sel]], dtype=object), tf["source_id"].to_numpy()[sel]))
    if f is not None and len(f) and "hostId" in f:
        h = f["hostId"].to_numpy(float)
        sel = np.isfinite(h) & (h >= 0)
        parts.append((f["x"].to_numpy(float)[sel], f["y"].to_numpy(float)[sel], h[sel],
                      np.full(int(sel.sum()), "fake", dtype=object), f["fakeId"].to_numpy()[sel]))
    if not parts:
        return
    rx, ry, rh, rlab, rid = (np.concatenate(c) for c in zip(*parts))
    for i in cand:
        dist = np.hypot(rx - xy[i, 0], ry - xy[i, 1])
        ok = (rh == mid[i]) & (dist <= radius_max)
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmin(dist[ok])])
            lab[i], mid[i] = rlab[j], int(rid[j])


def classify(dia: pd.DataFrame, fakes: pd.DataFrame | None = None, truth_fluxes: pd.DataFrame | None = None,
             truth_sources: pd.DataFrame | None = None, radius: float = 2.0, nsigma: float = 0.0,
             radius_max: float | None = None) -> pd.DataFrame:
    """Label each diaSource: fake, transient, variable, mover, artefact or false (column ``truthClass``).

    A diaSource matches the nearest truth source or fake within its ``match_radii``."""
    radii = match_radii(dia, radius, nsigma, radius_max)
    out = dia[["diaSourceId", "visit", "detector", "x", "y", "snr", "isNegative", "isDipole"]].copy()
    label = np.full(len(out), "false", dtype=object)
    match_id = np.full(len(out), -1, np.int64)
    kinds = host_of = None
    if truth_sources is not None and truth_fluxes is not None:
        kinds = truth_sources.set_index("source_id")["kind"]
        if "host_id" in truth_sources:
            host_of = truth_sources.set_index("source_id")["host_id"]
    for (v, d), idx in out.groupby(["visit", "detector"]).groups.items():
        xy = out.loc[idx, ["x", "y"]].to_numpy(float)
        rr = radii[out.index.get_indexer(idx)]
        lab = label[out.index.get_indexer(idx)]
        mid = match_id[out.index.get_indexer(idx)]
        # Truth first (real sky changes), fakes last so a fake on a host is a fake.
        if kinds is not None:
            tf = truth_fluxes[(truth_fluxes["visit"] == v) & (truth_fluxes["detector"] == d)]
            tk = kinds.reindex(tf["source_id"]).to_numpy()
            # priority: static sources < variable/mover/transient
            for group in (("star", "galaxy"), ("variable",), ("mover",), ("sn", "flare")):
                sel = np.isin(tk, group)
                if not sel.any():
                    continue
                t = tf[sel]
                j, _ = _nearest(t[["x", "y"]].to_numpy(float), xy, radius, dst_r=rr)
                hit = j >= 0
                lab[hit] = TRANSIENT_KINDS[group[0]]
                mid[hit] = t["source_id"].to_numpy()[j[hit]]
        f = None
        if fakes is not None and len(fakes):
            f = fakes[(fakes["visit"] == v) & (fakes["detector"] == d)]
            if len(f):
                j, _ = _nearest(f[["x", "y"]].to_numpy(float), xy, radius, dst_r=rr)
                hit = j >= 0
                lab[hit] = "fake"
                mid[hit] = f["fakeId"].to_numpy()[j[hit]]
        if kinds is not None and radius_max is not None:
            _relabel_host_blends(lab, mid, xy, float(radius_max), tf, kinds, host_of, f)
        label[out.index.get_indexer(idx)] = lab
        match_id[out.index.get_indexer(idx)] = mid
    out["truthClass"] = label.astype(str)
    out["truthId"] = match_id
    return out


def template_truth_flux(truth_fluxes: pd.DataFrame, truth_sources: pd.DataFrame,
                        template_visits) -> pd.Series:
    """Truth flux (nJy) of each variable / transient source in the template, indexed by source_id.

    The template is a coadd of the ``template_visits``: a source's template flux is
    the mean of its truth ``flux_nJy`` over the template visits that cover it.  A
    supernova is absent from the truth tables before its explosion, so coverage is
    taken from its host galaxy (absent SN = 0 nJy); a mover is elsewhere in the
    template visits (template flux 0).  Why: a flare or variable is a star that is
    in the template at its quiescent brightness, so only the change reaches the
    difference image -- its total truth flux would overstate its difference S/N
    (by ~6x for a flare of +0.2 mag).
    """
    kinds = truth_sources.set_index("source_id")["kind"]
    hosts = truth_sources.set_index("source_id")["host_id"] if "host_id" in truth_sources else None
    tv = truth_fluxes[truth_fluxes["visit"].isin(list(template_visits))]
    ids = truth_sources.loc[truth_sources["kind"].isin(["sn", "flare", "variable"]), "source_id"]
    # per source: sum of nJy over template visits, and the visits where it was present
    per_visit = tv.groupby(["source_id", "visit"])["flux_nJy"].mean()  # (a source on two detectors: once)
    total = per_visit.groupby(level=0).sum()
    covered = per_visit.groupby(level=0).size()
    out = pd.Series(0.0, index=pd.Index(ids.to_numpy(), name="source_id"))
    for sid in out.index:
        n = covered.get(sid, 0)
        if kinds.get(sid) == "sn" and hosts is not None:
            n = covered.get(int(hosts.get(sid, -1)), 0) if int(hosts.get(sid, -1)) >= 0 else 0
            if n == 0:  # host not in the truth (or hostless): coverage from the SN itself
                n = covered.get(sid, 0)
        if n > 0:
            out[sid] = float(total.get(sid, 0.0)) / n
    return out


def truth_recovery(dia: pd.DataFrame, truth_fluxes: pd.DataFrame, truth_sources: pd.DataFrame, diffexps: dict,
                   snr_min: float = 10.0, radius: float = 2.0, template_visits=None, nsigma: float = 0.0,
                   radius_max: float | None = None) -> pd.DataFrame:
    """Simulated transients (sn, flare), variables and movers per visit: difference S/N and whether detected.

    The S/N is that of the flux *change* since the template (``fluxDiff`` = visit
    truth flux minus template truth flux, ``template_truth_flux``), the signal the
    difference image holds: snrDiff = |fluxDiff| sqrt(sum(P^2 / V)) / noiseScale.
    ``template_visits`` default: the truth visits that have no difference exposure.
    A truth source counts as detected when any diaSource (either sign) lies within ``radius``.
    """
    from .fakes import optimal_snr_unit
    from .measure import _Pixels

    kinds = truth_sources.set_index("source_id")["kind"]
    if template_visits is None:
        differenced = {v for v, _ in diffexps}
        template_visits = sorted(set(truth_fluxes["visit"].unique()) - differenced)
    tmpl = template_truth_flux(truth_fluxes, truth_sources, template_visits)
    tf = truth_fluxes.copy()
    tf["kind"] = kinds.reindex(tf["source_id"]).to_numpy()
    tf = tf[tf["kind"].isin(["sn", "flare", "variable", "mover"])]
    rows = []
    for (v, d), t in tf.groupby(["visit", "detector"]):
        e = diffexps.get((int(v), int(d)))
        if e is None:
            continue
        pix = _Pixels(e)
        s = dia[(dia["visit"] == v) & (dia["detector"] == d)]
        ns = float(s["noiseScale"].iloc[0]) if len(s) and "noiseScale" in s else 1.0
        j, _ = _nearest(s[["x", "y"]].to_numpy(float), t[["x", "y"]].to_numpy(float), radius,
                        src_r=match_radii(s, radius, nsigma, radius_max))
        for k, r in enumerate(t.itertuples()):
            if not (0 <= r.x < e.shape[1] and 0 <= r.y < e.shape[0]):
                continue
            t_nJy = 0.0 if r.kind == "mover" else float(tmpl.get(r.source_id, 0.0))
            # electrons of this visit per nJy: the truth flux (e-) over its flux_nJy
            diff_e = r.flux * (r.flux_nJy - t_nJy) / r.flux_nJy if r.flux_nJy > 0 else 0.0
            snr = abs(diff_e) * optimal_snr_unit(e, r.x, r.y, pix) / ns
            rows.append({"source_id": r.source_id, "kind": r.kind, "visit": v, "detector": d, "x": r.x, "y": r.y,
                         "flux": r.flux, "flux_nJy": r.flux_nJy, "templateFlux_nJy": t_nJy,
                         "fluxDiff_nJy": r.flux_nJy - t_nJy, "snrDiff": snr, "detected": bool(j[k] >= 0)})
    out = pd.DataFrame(rows)
    return out


def summary(matched: pd.DataFrame, classes: pd.DataFrame | None, snr_col: str, recovery=None, snr_min=10.0) -> dict:
    """The headline numbers (what the acceptance criteria ask for)."""
    res = {"snr_definition": f"{snr_col}: optimal PSF S/N = flux * sqrt(sum(P^2 / V))"}
    for kind in ("isolated", "host"):
        m = matched[matched["kind"] == kind]
        if not len(m):
            continue
        fit = fit_completeness(m[snr_col], m["detected"])
        s7 = m[(m[snr_col] >= 6.5) & (m[snr_col] < 7.5)]
        d_all = m[m["detected"] & (m[snr_col] >= 10)]
        d = d_all[d_all["clean"]] if "clean" in d_all else d_all
        pull = (d["psfFlux"] - d["flux_nJy"]) / d["psfFluxErr"]
        pull_all = (d_all["psfFlux"] - d_all["flux_nJy"]) / d_all["psfFluxErr"]
        res[kind] = {
            "n": int(len(m)),
            "fit": fit,
            "completeness_snr_6.5_7.5": float(s7["detected"].mean()) if len(s7) else None,
            # flux and centroid accuracy: clean measurements (CLEAN_FLAGS) of fakes with S/N >= 10
            "n_detected_snr_gt10": int(len(d_all)),
            "n_clean_snr_gt10": int(len(d)),
            "flux_bias_median_snr_gt10": float(np.median((d["psfFlux"] - d["flux_nJy"]) / d["flux_nJy"])) if len(d) else None,
            "flux_pull_std_snr_gt10": float(np.std(pull)) if len(d) > 2 else None,
            "flux_pull_robust_std_snr_gt10": _robust_std(pull) if len(d) > 2 else None,
            "flux_pull_std_snr_gt10_all": float(np.std(pull_all)) if len(d_all) > 2 else None,
            "flux_pull_robust_std_snr_gt10_all": _robust_std(pull_all) if len(d_all) > 2 else None,
            **_centroid_accuracy(d, snr_col),
        }
    if classes is not None and len(classes):
        per = classes.groupby(["visit", "detector"])["truthClass"].apply(lambda s: int((s == "false").sum()))
        res["false_per_exposure_mean"] = float(per.mean())
        res["class_counts"] = {k: int(v) for k, v in classes["truthClass"].value_counts().items()}
    if recovery is not None and len(recovery):
        bright = recovery[recovery["snrDiff"] > snr_min]
        res["truth_recovery_snr_gt_%g" % snr_min] = {
            k: {"n": int(len(g)), "detected": float(g["detected"].mean())} for k, g in bright.groupby("kind")
        }
    return res


def plot(curves: pd.DataFrame, matched: pd.DataFrame, snr_col: str, path) -> None:
    """Completeness vs S/N and magnitude, flux pull and position error: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    if not len(curves) or not len(matched):
        ax[0].text(0.5, 0.5, "no fakes", ha="center", transform=ax[0].transAxes)
        curves = pd.DataFrame(columns=["by", "kind", "lo", "hi", "n", "completeness", "completenessLo", "completenessHi"])
        matched = pd.DataFrame(columns=["detected", snr_col, "psfFlux", "flux_nJy", "psfFluxErr"], dtype=float)
    for kind, style in (("isolated", "o-"), ("host", "s--")):
        c = curves[(curves["by"] == snr_col) & (curves["kind"] == kind) & (curves["n"] > 0)]
        if len(c):
            mid = 0.5 * (c["lo"] + c["hi"])
            lo = np.clip(c["completeness"] - c["completenessLo"], 0, None)  # (round-off at 0 and 1)
            hi = np.clip(c["completenessHi"] - c["completeness"], 0, None)
            ax[0].errorbar(mid, c["completeness"], yerr=[lo, hi], fmt=style, label=kind)
        c = curves[(curves["by"] == "mag") & (curves["kind"] == kind)]
        if len(c):
            ax[1].plot(0.5 * (c["lo"] + c["hi"]), c["completeness"], style, label=kind)
    ax[0].axvline(5, color="grey", lw=0.5)
    ax[0].axhline(0.5, color="grey", lw=0.5)
    ax[0].set(xscale="log", xlabel="optimal S/N in difference image", ylabel="completeness", title="fakes")
    ax[0].legend()
    ax[1].set(xlabel="injected magnitude (AB)", ylabel="completeness")
    d = matched[matched["detected"].astype(bool)]
    ax[2].scatter(d[snr_col], (d["psfFlux"] - d["flux_nJy"]) / d["psfFluxErr"], s=4)
    ax[2].set(xscale="log", xlabel="S/N", ylabel="(psfFlux - true) / psfFluxErr", ylim=(-6, 6))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def run(dia_path, fakes_paths, outputs: dict, config=None, diffexp_paths=None, truth_fluxes=None,
        truth_sources=None, template_visits=None) -> dict:
    """File-level entry.  ``outputs`` maps matched, curves, classes, summary, plot to paths
    (matched fakes Parquet, completeness Parquet, diaSource classes Parquet, summary JSON, PNG).
    ``template_visits``: visits coadded into the templates (for the truth sources' template
    flux); default, the truth visits without a difference exposure."""
    from .exposure import Exposure

    cfg = {**DEFAULTS, **(config or {})}
    mkw = {"nsigma": float(cfg["match_nsigma"]), "radius_max": float(cfg["match_radius_max"])}
    dia = pd.read_parquet(dia_path)
    fakes = pd.concat([pd.read_parquet(p) for p in fakes_paths], ignore_index=True) if fakes_paths else None
    diffexps = {}
    for p in diffexp_paths or []:
        e = Exposure.read(p)
        diffexps[(int(e.metadata.get("visit", 0)), int(e.metadata.get("detector", 0)))] = e
    tf = pd.read_parquet(truth_fluxes) if truth_fluxes else None
    ts = pd.read_parquet(truth_sources) if truth_sources else None
    snr_col = "snrCalexp"
    matched = pd.DataFrame()
    curves = pd.DataFrame()
    if fakes is not None and len(fakes):
        if diffexps:
            fakes = add_diff_snr(fakes, diffexps, dia)
            snr_col = "snrDiff"
        matched = mark_blends(match_fakes(dia, fakes, float(cfg["match_radius"]), **mkw), tf, ts)
        mags = matched["mag"].to_numpy(float)
        w = float(cfg["mag_bin_width"])
        mag_bins = list(np.arange(np.floor(np.nanmin(mags) / w) * w, np.nanmax(mags) + w, w)) if len(mags) else [0, 1]
        curves = pd.concat([curve(matched, snr_col, list(cfg["snr_bins"])), curve(matched, "mag", mag_bins)],
                           ignore_index=True)
    classes = classify(dia, fakes, tf, ts, float(cfg["match_radius"]), **mkw)
    recovery = None
    if tf is not None and ts is not None and diffexps:
        recovery = truth_recovery(dia, tf, ts, diffexps, float(cfg["truth_snr_min"]), float(cfg["match_radius"]),
                                  template_visits=template_visits, **mkw)
    summ = summary(matched, classes, snr_col, recovery, float(cfg["truth_snr_min"])) if len(matched) else {}
    if len(dia) and "noiseScale" in dia:
        summ["noise_scale_per_exposure"] = {f"{v}/{d}": float(x) for (v, d), x in
                                            dia.groupby(["visit", "detector"])["noiseScale"].first().items()}
    write_parquet(matched, outputs["matched"])
    write_parquet(curves, outputs["curves"])
    write_parquet(classes, outputs["classes"])
    write_text(json.dumps(summ, indent=2, default=float), outputs["summary"])
    plot(curves, matched, snr_col, outputs["plot"])
    return summ


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("completeness", help="completeness and accuracy from fakes and truth")
    p.add_argument("diasources", help="diaSources Parquet (run table)")
    p.add_argument("--fakes", nargs="*", default=[], help="fakes tables")
    p.add_argument("--diffexp", nargs="*", default=[], help="difference exposures (for the S/N of each fake)")
    p.add_argument("--truth-fluxes")
    p.add_argument("--truth-sources")
    p.add_argument("-o", "--outdir", required=True)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from .logs import setup

    setup()
    out = {k: f"{args.outdir}/{name}" for k, name in (
        ("matched", "matched_fakes.parquet"), ("curves", "completeness.parquet"), ("classes", "classes.parquet"),
        ("summary", "summary.json"), ("plot", "completeness.png"))}
    s = run(args.diasources, args.fakes, out, diffexp_paths=args.diffexp,
            truth_fluxes=args.truth_fluxes, truth_sources=args.truth_sources)
    print(json.dumps(s, indent=2, default=float))
    return 0
