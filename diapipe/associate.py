"""Association of diaSources into diaObjects, and forced photometry (light curves).

Association: the reliable diaSources (``isReliable`` from the real/bogus model,
or ``reliability >= reliability_min``) are taken visit by visit in time order.
Each one is matched to the nearest existing diaObject within ``match_radius``
arcsec; within one visit a diaObject takes at most one diaSource (pairs are
assigned nearest first, so two detections of one visit never merge into one
object).  Unmatched diaSources start new diaObjects.  A diaObject's position is
the inverse-variance weighted mean of its diaSources' centroids, updated as
detections accrue, so later matches use the better position; in the final
table a centroid > 5 sigma from the mean of the object's others (a blend, a
dipole) is left out of the position (``position_outliers``).

Forced photometry: on every difference image covering a diaObject (detected
there or not) a PSF of the diffexp's model is fitted at the fixed diaObject
position (linear flux only), in nJy via the exposure's MAGZERO and the
calexp's aperture correction APCORR (flux_nJy = APCORR * flux_e *
10**(-0.4 * (MAGZERO - 31.4)), a total flux as MAGZERO calibrates).  One row per diaObject and
difference image: the light curve.

Injected fakes (``pixelFlags_injectedCenter``) are left out of association:
they are a different source in every visit and would only add one-visit
diaObjects.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .exposure import Exposure
from .fileio import DiapipeError, write_parquet

log = logging.getLogger(__name__)

ARCSEC = np.pi / 180 / 3600  # radians

OBJECT_COLUMNS = ["diaObjectId", "ra", "dec", "raErr", "decErr", "nDiaSources", "firstMjd", "lastMjd",
                  "maxReliability", "maxSnr"]
LIGHTCURVE_COLUMNS = ["diaObjectId", "visit", "detector", "band", "midpointMjdTai", "x", "y", "psfFlux",
                      "psfFluxErr", "psfChi2Ndof", "detected", "diaSourceId", "forced_flag", "edge_flag"]


# ------------------------------------------------------------------ helpers
def unit_vectors(ra, dec) -> np.ndarray:
    """(n, 3) unit vectors of (ra, dec) in degrees."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def chord(radius_arcsec: float) -> float:
    """Chord length on the unit sphere of an angular separation (arcsec)."""
    return 2 * np.sin(0.5 * radius_arcsec * ARCSEC)


def select_sources(dia: pd.DataFrame, reliability_min: float | None = None,
                   exclude_injected: bool = True, fake_ids=None) -> pd.DataFrame:
    """The diaSources to associate: reliable, finite positions, no injected fakes.

    ``reliability_min`` None uses the model's own cut (``isReliable``); without a
    reliability column every diaSource is kept (unscored runs).  Fakes are the
    diaSources the completeness analysis matched to a fake (``fake_ids``) when
    given, else those with INJECTED pixels in their centre
    (``pixelFlags_injectedCenter``, which also hits real transients that
    happen to sit on a fake, e.g. at a shared host's centre).
    """
    keep = np.isfinite(dia["ra"].to_numpy(float)) & np.isfinite(dia["dec"].to_numpy(float))
    if reliability_min is not None and "reliability" in dia:
        keep &= dia["reliability"].to_numpy(float) >= reliability_min
    elif "isReliable" in dia:
        keep &= dia["isReliable"].to_numpy(bool)
    if exclude_injected and fake_ids is not None:
        keep &= ~dia["diaSourceId"].isin(set(np.asarray(fake_ids, np.int64))).to_numpy()
    elif exclude_injected and "pixelFlags_injectedCenter" in dia:
        keep &= ~dia["pixelFlags_injectedCenter"].to_numpy(bool)
    return dia.loc[keep].copy()


def _position_weights(dia: pd.DataFrame) -> np.ndarray:
    """Inverse-variance weights (1/pixel^2) of the centroids; median weight where the error is unknown."""
    if "xErr" not in dia or "yErr" not in dia:
        return np.ones(len(dia))
    var = dia["xErr"].to_numpy(float) ** 2 + dia["yErr"].to_numpy(float) ** 2
    w = np.where(np.isfinite(var) & (var > 0), 1.0 / np.maximum(var, 1e-6), np.nan)
    fill = np.nanmedian(w) if np.isfinite(w).any() else 1.0
    return np.where(np.isfinite(w), w, fill)


# ------------------------------------------------------------------ association
def associate(dia: pd.DataFrame, match_radius: float = 1.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Associate diaSources (already selected) into diaObjects.

    ``match_radius`` in arcsec.  Returns (diaSources with a diaObjectId column,
    diaObjects).  Deterministic: visits in (midpointMjdTai, visit) order, pairs
    by (distance, diaSourceId).
    """
    dia = dia.reset_index(drop=True).copy()
    n = len(dia)
    obj_of = np.full(n, -1, np.int64)
    if n == 0:
        dia["diaObjectId"] = obj_of
        return dia, empty_objects(dia)
    vec = unit_vectors(dia["ra"], dia["dec"])
    w = _position_weights(dia)
    mjd = dia["midpointMjdTai"].to_numpy(float) if "midpointMjdTai" in dia else np.zeros(n)
    # running weighted sums per object: sum w * vec, sum w
    sum_wv: list[np.ndarray] = []
    sum_w: list[float] = []
    r = chord(match_radius)
    order = pd.DataFrame({"mjd": np.nan_to_num(mjd, nan=np.inf), "visit": dia["visit"].to_numpy()})
    visits = order.drop_duplicates("visit").sort_values(["mjd", "visit"])["visit"].to_numpy()
    ids = dia["diaSourceId"].to_numpy(np.int64)
    for v in visits:
        rows = np.flatnonzero(dia["visit"].to_numpy() == v)
        taken_src, taken_obj = set(), set()
        if sum_w:
            centres = np.asarray(sum_wv) / np.asarray(sum_w)[:, None]
            centres /= np.linalg.norm(centres, axis=1)[:, None]
            tree = cKDTree(centres)
            pairs = []
            for i, cand in zip(rows, tree.query_ball_point(vec[rows], r)):
                for j in cand:
                    pairs.append((float(np.linalg.norm(vec[i] - centres[j])), int(ids[i]), int(i), int(j)))
            # nearest first: several diaSources of one visit near one object -> the nearest wins
            for _, _, i, j in sorted(pairs):
                if i in taken_src or j in taken_obj:
                    continue
                taken_src.add(i)
                taken_obj.add(j)
                obj_of[i] = j
        for i in rows:
            if i in taken_src:
                continue
            obj_of[i] = len(sum_w)
            sum_wv.append(np.zeros(3))
            sum_w.append(0.0)
        # update positions after the whole visit (order within a visit does not matter)
        for i in rows:
            sum_wv[obj_of[i]] = sum_wv[obj_of[i]] + w[i] * vec[i]
            sum_w[obj_of[i]] += w[i]
    # diaObjectId: the diaSourceId of the object's first diaSource (unique, deterministic)
    first = {}
    for i in np.argsort(ids, kind="stable"):
        for_obj = obj_of[i]
        if for_obj not in first or (mjd[i], ids[i]) < (mjd[first[for_obj]], ids[first[for_obj]]):
            first[for_obj] = i
    obj_ids = np.array([ids[first[j]] for j in range(len(sum_w))], np.int64)
    dia["diaObjectId"] = obj_ids[obj_of]
    return dia, object_table(dia)


def empty_objects(dia: pd.DataFrame | None = None) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("diaObjectId", "nDiaSources") else "float64")
                         for c in OBJECT_COLUMNS})


#: A diaSource whose centroid is this many sigma from the mean of the object's other diaSources
#: is left out of the object's position (it stays associated).
POSITION_CLIP = 5.0
#: Astrometric floor (arcsec) added in quadrature to the centroid errors in that test.
POSITION_FLOOR_ARCSEC = 0.03


def pixel_scale_of(dia: pd.DataFrame) -> float:
    """Pixel scale (arcsec/px) from the diaSources themselves: median sky / pixel separation of
    pairs on one exposure (the table carries centroid errors in pixels, positions on the sky)."""
    if not {"x", "y", "visit"} <= set(dia.columns) or len(dia) < 2:
        return np.nan
    det = dia["detector"].to_numpy() if "detector" in dia else np.zeros(len(dia))
    ratios = []
    for _, idx in pd.DataFrame({"v": dia["visit"].to_numpy(), "d": det}).groupby(["v", "d"]).indices.items():
        if len(idx) < 2:
            continue
        a, b = idx[:-1][:50], idx[1:][:50]
        vec = unit_vectors(dia["ra"].to_numpy(float)[np.r_[a, b]], dia["dec"].to_numpy(float)[np.r_[a, b]])
        sky = np.degrees(2 * np.arcsin(np.linalg.norm(vec[: len(a)] - vec[len(a):], axis=1) / 2)) * 3600
        pix = np.hypot(dia["x"].to_numpy(float)[a] - dia["x"].to_numpy(float)[b],
                       dia["y"].to_numpy(float)[a] - dia["y"].to_numpy(float)[b])
        ok = pix > 10
        ratios.extend((sky[ok] / pix[ok]).tolist())
    return float(np.median(ratios)) if ratios else np.nan


def position_outliers(dia: pd.DataFrame, clip: float = POSITION_CLIP,
                      floor_arcsec: float = POSITION_FLOOR_ARCSEC) -> np.ndarray:
    """Per associated diaSource (column diaObjectId): is it left out of its object's position?

    In an object of >= 3 diaSources, the one farthest from the weighted mean of the others, in units
    of sqrt(its centroid error^2 + that mean's error^2 + floor^2), is dropped while that exceeds
    ``clip`` and >= 2 remain.  Such a centroid is not the object's: a blend with a neighbour or an
    injected fake (a host fake 2 px from a supernova pulled its diaObject 1.5 px off and its forced
    fluxes 10-15% low), or a dipole's.  Without x/y errors or a pixel scale nothing is dropped.
    """
    out = np.zeros(len(dia), bool)
    scale = pixel_scale_of(dia)
    if "xErr" not in dia or "yErr" not in dia or not np.isfinite(scale):
        return out
    w = _position_weights(dia) / scale**2  # 1 / arcsec^2
    vec = unit_vectors(dia["ra"], dia["dec"])
    for _, idx in dia.groupby("diaObjectId").indices.items():
        keep = list(idx)
        while len(keep) >= 3:
            kv, kw = vec[keep], w[keep]
            tot, totw = (kv * kw[:, None]).sum(axis=0), kw.sum()
            z = np.empty(len(keep))
            for m in range(len(keep)):
                ow = totw - kw[m]
                centre = (tot - kv[m] * kw[m]) / ow
                centre /= np.linalg.norm(centre)
                sep = np.degrees(2 * np.arcsin(np.linalg.norm(kv[m] - centre) / 2)) * 3600
                z[m] = sep / np.sqrt(1 / kw[m] + 1 / ow + floor_arcsec**2)
            worst = int(np.argmax(z))
            if z[worst] <= clip:
                break
            out[keep[worst]] = True
            del keep[worst]
    return out


def object_table(dia: pd.DataFrame) -> pd.DataFrame:
    """diaObject table from associated diaSources (column diaObjectId).

    Columns: diaObjectId, ra, dec (deg, weighted mean without ``position_outliers``), raErr, decErr (arcsec,
    scatter / sqrt(n), NaN for one detection), nDiaSources, firstMjd, lastMjd
    (MJD TAI of the first / last diaSource), maxReliability, maxSnr, and per band
    ``<band>_psfFluxMean``, ``<band>_psfFluxSigma``, ``<band>_psfFluxMax``,
    ``<band>_psfFluxMin`` (nJy, difference-image PSF fluxes), ``<band>_nDiaSources``.
    """
    if len(dia) == 0:
        return empty_objects()
    # position outliers (blends, dipoles) keep their membership but not their say in the position
    w = np.where(position_outliers(dia), 0.0, _position_weights(dia))
    vec = unit_vectors(dia["ra"], dia["dec"]) * w[:, None]
    g = pd.DataFrame({"diaObjectId": dia["diaObjectId"].to_numpy(), "vx": vec[:, 0], "vy": vec[:, 1],
                      "vz": vec[:, 2]}).groupby("diaObjectId", sort=True).sum()
    ra = np.degrees(np.arctan2(g["vy"], g["vx"])) % 360
    dec = np.degrees(np.arctan2(g["vz"], np.hypot(g["vx"], g["vy"])))
    out = pd.DataFrame({"diaObjectId": g.index.to_numpy(np.int64), "ra": ra.to_numpy(), "dec": dec.to_numpy()})
    grp = dia.groupby("diaObjectId", sort=True)
    # positional scatter (arcsec) about the object's position
    ra_o = pd.Series(out["ra"].to_numpy(), index=out["diaObjectId"])
    dec_o = pd.Series(out["dec"].to_numpy(), index=out["diaObjectId"])
    d_ra = ((dia["ra"] - dia["diaObjectId"].map(ra_o) + 180) % 360 - 180) * np.cos(np.radians(dia["dec"])) * 3600
    d_dec = (dia["dec"] - dia["diaObjectId"].map(dec_o)) * 3600
    nsrc = grp.size()
    out["raErr"] = (d_ra.groupby(dia["diaObjectId"]).std() / np.sqrt(nsrc)).to_numpy()
    out["decErr"] = (d_dec.groupby(dia["diaObjectId"]).std() / np.sqrt(nsrc)).to_numpy()
    out["nDiaSources"] = nsrc.to_numpy(np.int64)
    out["firstMjd"] = grp["midpointMjdTai"].min().to_numpy(float) if "midpointMjdTai" in dia else np.nan
    out["lastMjd"] = grp["midpointMjdTai"].max().to_numpy(float) if "midpointMjdTai" in dia else np.nan
    out["maxReliability"] = grp["reliability"].max().to_numpy(float) if "reliability" in dia else np.nan
    out["maxSnr"] = grp["snr"].max().to_numpy(float) if "snr" in dia else np.nan
    if "band" in dia and "psfFlux" in dia:
        for band in sorted(dia["band"].astype(str).unique()):
            sub = dia[dia["band"].astype(str) == band].groupby("diaObjectId")["psfFlux"]
            stats = pd.DataFrame({"mean": sub.mean(), "std": sub.std(), "max": sub.max(), "min": sub.min(),
                                  "n": sub.size()})
            stats = stats.reindex(out["diaObjectId"])
            out[f"{band}_psfFluxMean"] = stats["mean"].to_numpy(float)
            out[f"{band}_psfFluxSigma"] = stats["std"].to_numpy(float)
            out[f"{band}_psfFluxMax"] = stats["max"].to_numpy(float)
            out[f"{band}_psfFluxMin"] = stats["min"].to_numpy(float)
            out[f"{band}_nDiaSources"] = stats["n"].fillna(0).to_numpy(np.int64)
    return out


def run_associate(dia_path, objects_out, sources_out=None, match_radius: float = 1.0,
                  reliability_min: float | None = None, exclude_injected: bool = True, fakes_path=None):
    """File-level: scored diaSources (Parquet) -> diaObjects (and associated diaSources) Parquet.

    ``fakes_path``: the completeness analysis' matched fakes (column diaSourceId, -1 if missed).
    """
    try:
        dia = pd.read_parquet(dia_path)
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a pyarrow traceback
        raise DiapipeError(f"cannot read diaSources: {exc}", dia_path) from None
    missing = [c for c in ("diaSourceId", "visit", "ra", "dec") if c not in dia]
    if missing:
        raise DiapipeError(f"diaSources lack columns {missing}", dia_path)
    fake_ids = None
    if fakes_path:
        f = pd.read_parquet(fakes_path)
        fake_ids = f.loc[f["diaSourceId"] >= 0, "diaSourceId"].to_numpy(np.int64) if len(f) else []
    sel = select_sources(dia, reliability_min, exclude_injected, fake_ids)
    log.info("associating %d of %d diaSources (match radius %.2f arcsec)", len(sel), len(dia), match_radius)
    srcs, objs = associate(sel, match_radius)
    log.info("%d diaObjects, %d with more than one diaSource", len(objs), int((objs["nDiaSources"] > 1).sum()))
    write_parquet(objs, objects_out)
    if sources_out is not None:
        write_parquet(srcs, sources_out)
    return srcs, objs


# ------------------------------------------------------------------ forced photometry
def remove_fakes(diffexp: Exposure, fakes: pd.DataFrame) -> Exposure:
    """A copy of the diffexp with the injected fakes' PSF models (flux in e-) subtracted.

    Fakes are injected into the science calexp before subtraction, so they sit
    in the diffexp as point sources of the diffexp's PSF; a fake near a real
    object (e.g. both at a host galaxy's centre) would otherwise add its flux
    to the object's forced photometry.
    """
    from .measure import _ShiftablePsf

    out = diffexp.copy()
    img = out.image
    ny, nx = img.shape
    for x, y, f in zip(fakes["x"].to_numpy(float), fakes["y"].to_numpy(float), fakes["flux"].to_numpy(float)):
        if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(f)):
            continue
        sp = _ShiftablePsf(diffexp.psf.image(x, y))
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        p = sp.shifted(x - ix, y - iy)
        h = sp.half
        y0, x0 = iy - h, ix - h
        ya, yb, xa, xb = max(0, y0), min(ny, y0 + p.shape[0]), max(0, x0), min(nx, x0 + p.shape[1])
        if ya < yb and xa < xb:
            img[ya:yb, xa:xb] -= f * p[ya - y0: yb - y0, xa - x0: xb - x0]
    return out


def forced_photometry(diffexp: Exposure, objects: pd.DataFrame, sources: pd.DataFrame | None = None,
                      margin: int = 0, fakes: pd.DataFrame | None = None) -> pd.DataFrame:
    """PSF fluxes (nJy) at every diaObject position on one difference image.

    Objects whose position falls outside the image (by more than ``margin``
    pixels inside) are skipped.  ``detected`` is True where a diaSource of
    that object is in this visit and detector.  ``fakes`` (the exposure's
    fakes table: x, y, flux in e-) are subtracted first (remove_fakes).
    """
    if fakes is not None and len(fakes) and diffexp.psf is not None:
        diffexp = remove_fakes(diffexp, fakes)
    from .measure import _Pixels, midpoint_mjd, nJy_per_electron, psf_fit

    meta = diffexp.metadata
    visit, detector = int(meta.get("visit", -1)), int(meta.get("detector", -1))
    if diffexp.wcs is None or diffexp.psf is None:
        raise DiapipeError("difference image has no WCS or PSF; cannot force photometry", None, diffexp.data_id)
    if len(objects) == 0:
        return pd.DataFrame({c: [] for c in LIGHTCURVE_COLUMNS})
    x, y = diffexp.wcs.all_world2pix(objects["ra"].to_numpy(float), objects["dec"].to_numpy(float), 0)
    ny, nx = diffexp.shape
    inside = np.isfinite(x) & np.isfinite(y) & (x >= margin - 0.5) & (x <= nx - 0.5 - margin) & \
        (y >= margin - 0.5) & (y <= ny - 0.5 - margin)
    # the PSF model has unit sum over its stamp, and MAGZERO calibrates total fluxes: the calexp's
    # aperture correction (large-aperture / PSF flux of its stars, 1.01-1.02 on the simulated survey)
    # takes PSF fluxes to total ones (without it SN fluxes came out 1-2% low: pulls of -1 to -2 at S/N 100)
    scale = nJy_per_electron(diffexp) * aperture_correction(diffexp)
    pix = _Pixels(diffexp)
    det_ids = {}
    if sources is not None and len(sources):
        s = sources[(sources["visit"] == visit) & (sources["detector"] == detector)]
        det_ids = dict(zip(s["diaObjectId"].to_numpy(np.int64), s["diaSourceId"].to_numpy(np.int64)))
    rows = []
    for k in np.flatnonzero(inside):
        r = psf_fit(pix, diffexp.psf, float(x[k]), float(y[k]), fit_position=False)
        # a fit whose PSF core lies on masked pixels (a saturated neighbour's bleed, a bad column) is
        # driven by the few pixels left in the wings: flagged, not a light-curve point
        usable = _psf_power_on_valid(pix, diffexp.psf, float(x[k]), float(y[k]))
        oid = int(objects["diaObjectId"].iat[k])
        rows.append({
            "diaObjectId": oid, "visit": visit, "detector": detector, "band": str(meta.get("band", "")),
            "midpointMjdTai": midpoint_mjd(meta), "x": float(x[k]), "y": float(y[k]),
            "psfFlux": r["flux"] * scale if r["ok"] else np.nan,
            "psfFluxErr": r["fluxErr"] * scale if r["ok"] else np.nan,
            "psfChi2Ndof": r["chi2ndof"], "detected": oid in det_ids, "diaSourceId": det_ids.get(oid, -1),
            "forced_flag": (not r["ok"]) or usable < MIN_PSF_POWER_UNMASKED, "edge_flag": bool(r["edge"]),
        })
    return pd.DataFrame(rows, columns=LIGHTCURVE_COLUMNS)


#: Least fraction of the PSF's power (sum of PSF^2, which sets the flux error) on unmasked pixels
#: for a forced measurement to count (forced_flag otherwise).
MIN_PSF_POWER_UNMASKED = 0.8


def _psf_power_on_valid(pix, psf, x: float, y: float) -> float:
    """sum(P^2 over valid pixels) / sum(P^2) of the PSF stamp at (x, y)."""
    from .measure import _stamp_data

    p = np.asarray(psf.image(x, y), float)
    half = p.shape[0] // 2
    ok, _, _ = _stamp_data(pix.valid, pix.valid, int(np.floor(x + 0.5)), int(np.floor(y + 0.5)), half)
    p2 = p**2
    return float((p2 * (ok > 0)).sum() / p2.sum()) if p2.sum() > 0 else 0.0


def aperture_correction(exposure: Exposure) -> float:
    """Total / PSF flux of a point source (header APCORR, measured by characterize on the calexp; 1 if absent)."""
    ap = exposure.metadata.get("APCORR")
    try:
        ap = float(ap)
    except (TypeError, ValueError):
        return 1.0
    return ap if np.isfinite(ap) and 0.5 < ap < 2.0 else 1.0


def run_forced(diffexp_paths, objects_path, output, sources_path=None, fakes_paths=None) -> pd.DataFrame:
    """File-level: forced photometry of every diaObject on every difference image -> light curves Parquet.

    ``fakes_paths``: the fakes table of each difference image (same order), subtracted before fitting.
    """
    objects = pd.read_parquet(objects_path)
    sources = pd.read_parquet(sources_path) if sources_path else None
    parts = []
    fakes_paths = list(fakes_paths) if fakes_paths else [None] * len(diffexp_paths)
    for p, fp in zip(diffexp_paths, fakes_paths):
        try:
            exp = Exposure.read(p)
        except DiapipeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DiapipeError(f"cannot read difference image: {exc}", p) from None
        try:
            fakes = pd.read_parquet(fp) if fp else None
            parts.append(forced_photometry(exp, objects, sources, fakes=fakes))
        except DiapipeError as exc:
            raise DiapipeError(str(exc), p) from None
    lc = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: [] for c in LIGHTCURVE_COLUMNS})
    lc = lc.sort_values(["diaObjectId", "midpointMjdTai", "visit", "detector"], kind="stable").reset_index(drop=True)
    log.info("%d forced measurements of %d diaObjects on %d difference images", len(lc), len(objects),
             len(diffexp_paths))
    write_parquet(lc, output)
    return lc


# ------------------------------------------------------------------ truth evaluation (simulated survey)
TRANSIENT_KINDS = ("sn", "variable", "flare")


def match_truth(dia: pd.DataFrame, truth_fluxes: pd.DataFrame, truth_sources: pd.DataFrame,
                radius_px: float = 2.0, kinds=TRANSIENT_KINDS) -> np.ndarray:
    """truth source_id (or -1) of each diaSource: nearest true transient of ``kinds`` in its exposure."""
    kind = truth_sources.set_index("source_id")["kind"]
    tf = truth_fluxes[truth_fluxes["source_id"].map(kind).isin(kinds)]
    out = np.full(len(dia), -1, np.int64)
    for (v, d), idx in dia.groupby(["visit", "detector"]).indices.items():
        t = tf[(tf["visit"] == v) & (tf["detector"] == d)]
        if len(t) == 0:
            continue
        tree = cKDTree(np.c_[t["x"].to_numpy(float), t["y"].to_numpy(float)])
        dist, j = tree.query(np.c_[dia["x"].to_numpy(float)[idx], dia["y"].to_numpy(float)[idx]])
        ok = dist < radius_px
        out[idx[ok]] = t["source_id"].to_numpy(np.int64)[j[ok]]
    return out


def association_metrics(sources: pd.DataFrame, truth_fluxes, truth_sources, radius_px: float = 2.0) -> dict:
    """Purity and completeness of the association against the simulation truth.

    ``fraction_in_main_object``: over all truth-matched diaSources, the fraction
    in the diaObject holding most of their true source's diaSources.
    ``merged_fraction``: diaObjects holding diaSources of two or more true
    sources, over all diaObjects with a truth match.
    """
    tid = match_truth(sources, truth_fluxes, truth_sources, radius_px)
    m = pd.DataFrame({"truth": tid, "obj": sources["diaObjectId"].to_numpy()})
    m = m[m["truth"] >= 0]
    if len(m) == 0:
        return {"n_matched_sources": 0}
    counts = m.groupby(["truth", "obj"]).size()
    main = counts.groupby(level=0).max()
    per_obj = m.groupby("obj")["truth"].nunique()
    return {
        "n_matched_sources": int(len(m)),
        "n_true_transients": int(m["truth"].nunique()),
        "fraction_in_main_object": float(main.sum() / len(m)),
        "n_split_transients": int((m.groupby("truth")["obj"].nunique() > 1).sum()),
        "n_objects_matched": int(len(per_obj)),
        "n_objects": int(sources["diaObjectId"].nunique()),
        "merged_fraction": float((per_obj > 1).mean()),
    }


def object_truth(sources: pd.DataFrame, truth_fluxes, truth_sources, radius_px: float = 2.0,
                 kinds=TRANSIENT_KINDS) -> pd.Series:
    """diaObjectId -> the true source most of its diaSources match (objects with no match left out)."""
    tid = match_truth(sources, truth_fluxes, truth_sources, radius_px, kinds=kinds)
    m = pd.DataFrame({"truth": tid, "obj": sources["diaObjectId"].to_numpy()})
    m = m[m["truth"] >= 0]
    return m.groupby("obj")["truth"].agg(lambda s: s.value_counts().index[0])


def template_truth_flux_of(lightcurves: pd.DataFrame, truth_fluxes, truth_sources) -> pd.Series:
    """Template truth flux (nJy) per source_id: the template visits are the truth visits with no forced point.

    (``completeness.template_truth_flux``; completeness takes the same visits: those not differenced.)
    """
    from .completeness import template_truth_flux

    visits = sorted(set(truth_fluxes["visit"].unique()) - set(lightcurves["visit"].unique()))
    return template_truth_flux(truth_fluxes, truth_sources, visits)


def truth_matched_points(lightcurves: pd.DataFrame, sources: pd.DataFrame, truth_fluxes, truth_sources,
                         radius_px: float, kinds=("sn",)) -> pd.DataFrame | None:
    """Unflagged forced points of diaObjects tied to a simulated source, with the true flux they should measure.

    ``flux_nJy`` is the true flux *change since the template* (what a difference
    image holds): the source's truth flux in the exposure (0 if no row, e.g.
    before explosion) minus its mean truth flux over the template visits (the
    truth visits with no forced point; ``completeness.template_truth_flux``).
    For a supernova absent from the template that is its flux; a variable or
    flare star is in the template at its mean brightness, and comparing its
    difference flux with its total flux is meaningless.  ``truth_total_nJy``
    keeps the total.  Each diaObject is tied to the true source most of its
    diaSources match; None when no diaSource matches.  ``attrs['n_flagged']``
    counts the forced_flag points (off the edge) that were left out.
    """
    obj_truth = object_truth(sources, truth_fluxes, truth_sources, radius_px, kinds)
    if len(obj_truth) == 0:
        return None
    lc = lightcurves[lightcurves["diaObjectId"].isin(obj_truth.index)].copy()
    edge = lc["edge_flag"].astype(bool)
    n_flagged = int((lc["forced_flag"].astype(bool) & ~edge).sum())
    lc = lc[np.isfinite(lc["psfFlux"]) & np.isfinite(lc["psfFluxErr"]) & ~edge & ~lc["forced_flag"].astype(bool)]
    lc["truth"] = lc["diaObjectId"].map(obj_truth)
    tf = truth_fluxes[["source_id", "visit", "detector", "flux_nJy"]].rename(columns={"source_id": "truth"})
    lc = lc.merge(tf, on=["truth", "visit", "detector"], how="left")
    lc["truth_total_nJy"] = lc["flux_nJy"].fillna(0.0)
    tmpl = template_truth_flux_of(lightcurves, truth_fluxes, truth_sources)
    lc["flux_nJy"] = lc["truth_total_nJy"] - lc["truth"].map(tmpl).fillna(0.0)
    lc.attrs["n_flagged"] = n_flagged
    return lc


def lightcurve_chi2(lightcurves: pd.DataFrame, sources: pd.DataFrame, truth_fluxes, truth_sources,
                    kinds=("sn",), radius_px: float = 2.0, min_snr_detected: float = 0.0) -> dict:
    """chi^2 per point of forced diffexp fluxes against the true fluxes of simulated transients.

    Each diaObject is tied to the true source most of its diaSources match; every
    forced point of it (detected or not) is compared with that source's true flux
    change since the template in the exposure (``truth_matched_points``).
    """
    lc = truth_matched_points(lightcurves, sources, truth_fluxes, truth_sources, radius_px, kinds)
    if lc is None:
        return {"n_objects": 0, "n_points": 0, "chi2_dof": float("nan")}
    z = (lc["psfFlux"] - lc["flux_nJy"]) / lc["psfFluxErr"]
    return {"n_objects": int(lc["diaObjectId"].nunique()), "n_points": int(len(lc)),
            "chi2_dof": float((z ** 2).mean()) if len(lc) else float("nan"),
            "z_median": float(z.median()) if len(lc) else float("nan"),
            # over points with a positive true flux (a NaN-free selection: the old index-aligned
            # division left NaN rows in and made this NaN)
            "frac_flux_bias_median": float(np.median(((lc["psfFlux"] - lc["flux_nJy"]) / lc["flux_nJy"])
                                                     [lc["flux_nJy"] > 0])) if (lc["flux_nJy"] > 0).any()
            else float("nan")}


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("associate", help="associate diaSources into diaObjects; forced light curves")
    p.add_argument("diaSources", help="scored diaSources Parquet")
    p.add_argument("--objects", required=True, help="output diaObjects Parquet")
    p.add_argument("--sources", help="output associated diaSources Parquet")
    p.add_argument("--match-radius", type=float, default=1.0, help="arcsec")
    p.add_argument("--reliability-min", type=float, default=None,
                   help="reliability cut (default: the model's isReliable)")
    p.add_argument("--diffexp", nargs="*", default=[], help="difference images for forced photometry")
    p.add_argument("--lightcurves", help="output light curves Parquet (needs --diffexp and --sources)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    srcs_out = args.sources
    run_associate(args.diaSources, args.objects, srcs_out, args.match_radius, args.reliability_min)
    if args.lightcurves:
        if not srcs_out:
            raise DiapipeError("--lightcurves needs --sources (which diaObject was detected where)")
        run_forced(args.diffexp, args.objects, args.lightcurves, srcs_out)
    return 0
