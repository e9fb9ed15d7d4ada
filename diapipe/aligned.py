"""Difference imaging of a reduced time series WITHOUT sky WCS (``inputs.source: aligned_frames``).

For small-telescope series such as the SAAO 1.0m KB13475 microlensing field
(512x512 frames, bias/flat corrected, RA/DEC strings only) the main Snakemake
DAG (ISR -> characterize against a reference catalogue -> warp onto a sky
map) does not apply.  This module runs the same difference-imaging stages on
a frames table (``config/saao-frames.tsv``: path, visit, band, mjd):

1. ``diapipe.align.align_series``: star-pattern (triangle) matching to the
   best-seeing frame, polynomial transform, Lanczos-3 resampling, photometric
   scaling to that frame;
2. ``diapipe.align.build_template``: coadd of the ``n_best`` best-seeing frames;
3. ``diapipe.subtract.subtract`` of every aligned frame (template frames too:
   a light curve needs every epoch; their differences are slightly
   suppressed because the template contains them);
4. ``diapipe.measure.detect_and_measure`` -> diaSources (no real/bogus model
   for this camera: every diaSource above ``min_snr`` without bad-pixel
   flags counts);
5. ``diapipe.associate``: association (positions on the reference frame's
   pixel grid through a placeholder 0.31"/px TAN WCS, so arcsec radii work)
   and forced photometry on every difference image;
6. variables = diaObjects detected in >= ``min_detections`` frames whose forced
   light curve has chi2/dof >= ``min_chi2`` about its weighted mean; the report
   (``diapipe.report.build``) shows their light curves, and ``target.json`` names
   the most variable one within ``target_radius_px`` of the pointing centre.

Outputs under ``outdir``: diff/<visit>.fits (diffexp), diff/<visit>.diaSrc.parquet,
diff/<visit>.reg (DS9), template.fits, alignment.parquet, diaSources.parquet,
diaObjects.parquet, lightcurves.parquet, variables.parquet, target.json,
report/index.html.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import DiapipeError, write_parquet, write_text

log = logging.getLogger(__name__)

DEFAULTS = {
    "gain": 1.9,  # e-/ADU
    "read_noise": 5.0,  # e-
    "saturation": 60000.0,  # ADU
    "align_order": 2,  # polynomial order of the frame -> reference transform
    "match_radius": 3.0,  # px, star matching after the similarity solution
    "n_best": 10,  # frames in the template (best seeing)
    "band": "I",
    "min_snr": 6.0,  # diaSources kept for association (no real/bogus model for this camera)
    "associate_radius": 1.5,  # arcsec on the placeholder 0.31"/px grid (~5 px)
    "min_detections": 5,  # frames a variable must be detected in
    "min_chi2": 5.0,  # forced light-curve chi2/dof about the weighted mean
    "target_radius_px": 80.0,  # "near the pointing centre" (frames are offset by up to ~140 px)
    "max_frames": 0,  # 0: all frames of the table
    "max_frame_factor": 4.0,  # frames with more diaSources than this x the median are failed subtractions
    "forced_science": False,  # also measure science/template forced fluxes and cutouts (slower)
}

BAD_FLAGS = ("pixelFlags_edge", "pixelFlags_saturatedCenter", "pixelFlags_bad", "psfFlux_flag")


def frames_table(pattern: str, band: str = "I") -> pd.DataFrame:
    """Frames table from FITS headers: path, visit (1..N in time order), band, mjd (MJD-OBS, d), exptime (s)."""
    from astropy.io import fits

    rows = []
    for p in sorted(glob.glob(pattern)):
        h = fits.getheader(p)
        rows.append({"path": p, "band": band, "mjd": float(h.get("MJD-OBS", np.nan)),
                     "exptime": float(h.get("EXPTIME", 0.0))})
    if not rows:
        raise DiapipeError(f"no frame matches {pattern}")
    t = pd.DataFrame(rows).sort_values(["mjd", "path"], kind="stable").reset_index(drop=True)
    t.insert(1, "visit", np.arange(1, len(t) + 1))
    return t


def _variability(lc: pd.DataFrame) -> pd.DataFrame:
    """Per diaObject: forced-flux chi2/dof about the weighted mean, number of points, amplitude (nJy)."""
    ok = lc[np.isfinite(lc["psfFlux"]) & np.isfinite(lc["psfFluxErr"]) & (lc["psfFluxErr"] > 0)]
    out = []
    for oid, g in ok.groupby("diaObjectId"):
        f, e = g["psfFlux"].to_numpy(float), g["psfFluxErr"].to_numpy(float)
        w = 1 / e**2
        mean = np.sum(w * f) / np.sum(w)
        chi2 = float(np.sum(w * (f - mean) ** 2) / max(len(f) - 1, 1))
        out.append({"diaObjectId": oid, "nForced": len(f), "chi2dof": chi2,
                    "amplitude": float(np.percentile(f, 95) - np.percentile(f, 5))})
    return pd.DataFrame(out, columns=["diaObjectId", "nForced", "chi2dof", "amplitude"])


def pick_target(var: pd.DataFrame, lc: pd.DataFrame, shape, radius_px: float) -> dict:
    """The most variable diaObject within ``radius_px`` of the reference frame centre (the pointing).

    "Most variable" = detected in the most frames (ties: larger chi2/dof).  chi2/dof alone
    is ruled by residuals of bright, saturated stars whose PSF-fit errors are far too
    small; a real variable is instead found again and again at one place.
    """
    cy, cx = (np.array(shape) - 1) / 2.0
    d = np.hypot(var["x"] - cx, var["y"] - cy)
    near = var[var["isVariable"] & (d <= radius_px)]
    if not len(near):
        return {}
    t = near.sort_values(["nDiaSources", "chi2dof"], ascending=False).iloc[0]
    pts = lc[lc["diaObjectId"] == t["diaObjectId"]].sort_values("midpointMjdTai")
    f = pts["psfFlux"].to_numpy(float)
    ipk, imn = int(np.nanargmax(f)), int(np.nanargmin(f))
    return {"diaObjectId": int(t["diaObjectId"]), "x": float(t["x"]), "y": float(t["y"]),
            "distance_from_centre_px": float(np.hypot(t["x"] - cx, t["y"] - cy)),
            "nDiaSources": int(t["nDiaSources"]), "nForced": int(len(pts)), "chi2dof": float(t["chi2dof"]),
            "max_mjd": float(pts["midpointMjdTai"].iloc[ipk]), "max_flux_nJy": float(f[ipk]),
            "min_mjd": float(pts["midpointMjdTai"].iloc[imn]), "min_flux_nJy": float(f[imn]),
            "median_flux_nJy": float(np.nanmedian(f)),
            "first_mjd": float(pts["midpointMjdTai"].min()), "last_mjd": float(pts["midpointMjdTai"].max())}


def run_series(frames: pd.DataFrame, outdir, config: dict | None = None, title: str = "aligned series") -> dict:
    """The whole series run (see the module docstring); returns the summary dict (also outdir/summary.json)."""
    from . import associate as asc
    from . import ds9, report
    from .align import _pixel_wcs, align_series, build_template
    from .measure import detect_and_measure, write_cutouts
    from .subtract import subtract

    cfg = {**DEFAULTS, **(config or {})}
    out = Path(outdir)
    (out / "diff").mkdir(parents=True, exist_ok=True)
    if cfg["max_frames"]:
        frames = frames.head(int(cfg["max_frames"]))
    t0 = time.perf_counter()
    by_name = {Path(p).name: r for p, r in zip(frames["path"], frames.itertuples())}
    aligned, rows = align_series(list(frames["path"]), order=cfg["align_order"], gain=cfg["gain"],
                                 read_noise=cfg["read_noise"], saturation=cfg["saturation"],
                                 match_radius=cfg["match_radius"])
    al_tab = pd.DataFrame(rows)
    write_parquet(al_tab, out / "alignment.parquet")
    log.info("aligned %d of %d frames in %.1f s", len(aligned), len(frames), time.perf_counter() - t0)
    t_align = time.perf_counter() - t0
    # build_template rewrites the metadata of the frames it uses: give it copies.
    template = build_template([a.copy() for a in aligned], n_best=int(cfg["n_best"]))
    template.write(out / "template.fits")
    t_tmpl = time.perf_counter() - t0 - t_align
    wcs = _pixel_wcs(template.shape)
    template.wcs = wcs
    tables, diff_paths, cut_paths = [], [], {}
    for a in aligned:
        fr = by_name[a.metadata["FRAME"]]
        a.metadata.update({"visit": int(fr.visit), "detector": 0, "band": str(fr.band), "MJD-OBS": float(fr.mjd),
                           "EXPTIME": float(fr.exptime)})
        a.wcs = wcs
        did = {"visit": int(fr.visit), "detector": 0}
        try:
            diff = subtract(a, template, data_id=did, science_path=fr.path)
        except DiapipeError as exc:
            log.error("visit %d (%s): subtraction failed: %s", fr.visit, fr.path, exc)
            continue
        diff.wcs = wcs
        for k in ("visit", "detector", "band", "MJD-OBS", "EXPTIME"):
            diff.metadata[k] = a.metadata[k]
        dpath = out / "diff" / f"{fr.visit}.fits"
        diff.write(dpath)
        # detection threshold = the association cut: fainter candidates would be measured and dropped;
        # forced science/template fluxes (3 more PSF fits per source) only when asked.
        sci, tmpl = (a, template) if cfg["forced_science"] else (None, None)
        tab, cut, _ = detect_and_measure(diff, sci, tmpl, config={"threshold": float(cfg["min_snr"])}, path=dpath)
        log.info("visit %d: %d diaSources (%.1f s since start)", fr.visit, len(tab), time.perf_counter() - t0)
        write_parquet(tab, out / "diff" / f"{fr.visit}.diaSrc.parquet")
        cpath = out / "diff" / f"{fr.visit}.cutouts.fits"
        write_cutouts(tab, cut, cpath)
        ds9.write_regions(tab, out / "diff" / f"{fr.visit}.reg")
        tables.append(tab)
        diff_paths.append(dpath)
        cut_paths[(int(fr.visit), 0)] = cpath
    if not tables:
        raise DiapipeError("no frame of the series could be subtracted")
    t_sub = time.perf_counter() - t0 - t_align - t_tmpl
    dia = pd.concat(tables, ignore_index=True)
    write_parquet(dia, out / "diaSources.parquet")
    # A failed subtraction (cloud, focus, bad kernel) floods its frame with residuals of every star;
    # such frames would make every star look variable, so they leave association and light curves.
    n_per = dia.groupby("visit").size().reindex([int(p.stem) for p in diff_paths], fill_value=0)
    bad_visits = set(n_per.index[(n_per > cfg["max_frame_factor"] * max(n_per.median(), 1.0)) & (n_per > 30)])
    if bad_visits:
        log.warning("frames with %s x the median number of diaSources left out: %s", cfg["max_frame_factor"],
                    sorted(bad_visits))
    diff_paths = [p for p in diff_paths if int(p.stem) not in bad_visits]
    dia = dia[~dia["visit"].isin(bad_visits)]
    good = dia[(dia["snr"] >= cfg["min_snr"]) & ~dia[[c for c in BAD_FLAGS if c in dia]].any(axis=1)]
    sel = asc.select_sources(good)
    srcs, objs = asc.associate(sel, float(cfg["associate_radius"]))
    write_parquet(srcs, out / "diaSources_associated.parquet")
    write_parquet(objs, out / "diaObjects.parquet")
    lc = asc.run_forced(diff_paths, out / "diaObjects.parquet", out / "lightcurves.parquet",
                        out / "diaSources_associated.parquet")
    # A frame whose forced fluxes are off for most objects (transparency or kernel failure that the
    # diaSource count missed) is dropped from the light curves too: median |psfFlux / psfFluxErr| per frame.
    z = (lc["psfFlux"] / lc["psfFluxErr"]).abs().groupby(lc["visit"]).median()
    bad_lc = set(z.index[z > cfg["max_frame_factor"] * max(float(z.median()), 1.0)])
    if bad_lc:
        log.warning("frames with forced |S/N| > %s x the median left out of the light curves: %s",
                    cfg["max_frame_factor"], sorted(bad_lc))
        bad_visits |= bad_lc
        lc = lc[~lc["visit"].isin(bad_lc)].reset_index(drop=True)
        write_parquet(lc, out / "lightcurves.parquet")
    var = objs.merge(_variability(lc), on="diaObjectId", how="left")
    # object pixel positions on the reference grid (from the placeholder WCS)
    x, y = wcs.all_world2pix(var["ra"].to_numpy(float), var["dec"].to_numpy(float), 0)
    var["x"], var["y"] = x, y
    var["isVariable"] = (var["nDiaSources"] >= cfg["min_detections"]) & (var["chi2dof"] >= cfg["min_chi2"])
    write_parquet(var, out / "variables.parquet")
    target = pick_target(var, lc, template.shape, cfg["target_radius_px"])
    write_text(json.dumps(target, indent=1) + "\n", out / "target.json")
    # report: the variables' light curves, the target among them
    show = var[var["isVariable"]].sort_values("chi2dof", ascending=False)
    if target:
        show = pd.concat([show[show["diaObjectId"] == target["diaObjectId"]],
                          show[show["diaObjectId"] != target["diaObjectId"]]]).head(8)
    write_parquet(show.drop(columns=["x", "y"]), out / "report_objects.parquet")
    report.build(out / "report" / "index.html", calexps={}, cutouts=cut_paths, dia_scored=out / "diaSources.parquet",
                 dia_associated=out / "diaSources_associated.parquet", objects=out / "report_objects.parquet",
                 lightcurves=out / "lightcurves.parquet", bench_dir=out / "benchmarks", title=title,
                 n_lightcurves=8)
    ok = al_tab[al_tab.get("rms_px", pd.Series(dtype=float)).notna()] if "rms_px" in al_tab else al_tab.iloc[:0]
    ok = ok[ok["frame"] != ok["reference"]] if len(ok) else ok
    summary = {"frames": len(frames), "aligned": len(aligned), "subtracted": len(tables),
               "frames_rejected": sorted(int(v) for v in bad_visits),
               "align_rms_px_median": float(ok["rms_px"].median()) if len(ok) else None,
               "align_rms_px_p90": float(ok["rms_px"].quantile(0.9)) if len(ok) else None,
               "template_frames": template.metadata.get("FRAMES"),
               "template_seeing_px": float(template.metadata["SEEINGPX"]),
               "diaSources": len(dia), "diaSources_used": len(sel), "diaObjects": len(objs),
               "variables": int(var["isVariable"].sum()), "target": target,
               "wall_s": {"align": round(t_align, 1), "template": round(t_tmpl, 1),
                          "subtract_detect": round(t_sub, 1), "total": round(time.perf_counter() - t0, 1)}}
    write_text(json.dumps(summary, indent=1, default=str) + "\n", out / "summary.json")
    return summary


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("aligned", help="difference imaging of a frame series without sky WCS (e.g. SAAO)")
    sub = p.add_subparsers(dest="aligned_command", required=True)
    f = sub.add_parser("frames", help="write the frames table (path, visit, band, mjd, exptime) from FITS headers")
    f.add_argument("pattern", help="glob of the frames, e.g. '../shared/data/saao-kb13475/images/*.fits'")
    f.add_argument("-o", "--output", required=True, help="TSV table")
    f.add_argument("--band", default="I")
    f.set_defaults(func=lambda a: write_text(frames_table(a.pattern, a.band).to_csv(sep="\t", index=False),
                                             a.output) and 0)
    r = sub.add_parser("run", help="align, template, subtract, detect, associate, light curves, report")
    r.add_argument("--config", action="append", default=None,
                   help="config file(s) (default config/config.yaml + config/saao.yaml); uses inputs.exposures "
                        "and the 'aligned' block")
    r.add_argument("--frames", default=None, help="frames table (overrides inputs.exposures)")
    r.add_argument("--max-frames", type=int, default=None, help="only the first N frames (quick look)")
    r.add_argument("-o", "--outdir", default="results/aligned")
    r.set_defaults(func=_cli_run)


def _cli_run(args) -> int:
    from . import config as dpconfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    cfg = dpconfig.load(*(args.config or ["config/config.yaml", "config/saao.yaml"]))
    frames = pd.read_csv(args.frames or cfg["inputs"]["exposures"], sep="\t")
    settings = dict(cfg.get("aligned", {}))
    if args.max_frames:
        settings["max_frames"] = args.max_frames
    summary = run_series(frames, args.outdir, settings, title=settings.pop("title", "aligned series"))
    print(json.dumps(summary, indent=1, default=str))
    return 0
