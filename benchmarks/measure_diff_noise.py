"""Noise calibration of the difference images of a finished simulated-survey run (issue 5 acceptance).

    python benchmarks/measure_diff_noise.py RUNDIR [--config config/tiny.yaml] [--visits 9 10]

For every diffexp of the run, against the simulation truth:

* ``blank``: std of diff / sqrt(variance) over blank sky: pixels without a
  BAD/SAT/CR/EDGE/NO_DATA/SUSPECT/INJECTED bit, off the visit's simulated
  satellite trail (``trail_px`` pixels within 6 sigma of it, which the
  difference rightly keeps: it is light in the science image), and farther than r from every
  true source of the exposure (r = 2 FWHM + 3 reff for galaxies, growing with
  log10 of the flux for bright sources), plus its robust (IQR) version;
* ``stars``: the same pooled over 15 x 15 boxes centred on the 50 brightest
  true stars whose box is entirely unmasked (so unsaturated);
* ``stars_stamp``, ``stars_other``: the same boxes split into the stars the kernel was
  fitted to (used rows of the diffexp's STAMPS HDU) and the others (out of sample;
  ``nbox_other`` of them, a few per image, so the summary also pools them over all images);
* ``stars_fullcov``: the same for the 50 brightest of the stars where every
  visit of the template coadd is used (its NIMAGE plane).  Mind the selection:
  these are fainter stars (a sixth of the stars have full coverage), and star
  boxes grow with the flux; at matched flux the two kinds agree (docs/subtract.md);
* ``mf_blank``: std of the PSF matched-filtered significance (diapipe.detect.
  matched_filter) over blank-sky pixels whose PSF footprint is all valid: the
  noise detection thresholds and forced photometry errors rely on;
* ``mf_robust``: detection's robust (IQR) estimate of the same over all valid
  pixels, sources clipped (what becomes noiseScale);
* the header figures behind them: convolution direction, DIFFRMS, the
  measured input-noise factors (SVARSCAL, TVARSCAL, TNOISCOR), and detection's
  noiseScale (matched-filter noise / predicted) when the diaSource table exists.

Targets (issue 5): |blank - 1| < 0.01 and |stars - 1| < 0.02.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diapipe import config as dpconfig  # noqa: E402
from diapipe import masks  # noqa: E402
from diapipe.butler import Butler  # noqa: E402
from diapipe.exposure import Exposure  # noqa: E402

EXCLUDE = masks.BAD_PLANES + ("INJECTED",)


def _iqr_std(v) -> float:
    q1, q3 = np.percentile(v, [25, 75])
    return float((q3 - q1) / 1.3489795)


def near_sources(shape, t: pd.DataFrame, fwhm: float) -> np.ndarray:
    """Pixels within r of a true source (r = 2 FWHM + 3 reff, + 1.5 FWHM per decade of flux above 10^4 e-)."""
    ny, nx = shape
    near = np.zeros(shape, bool)
    reff = np.nan_to_num(t["reff_px"].to_numpy(float)) if "reff_px" in t else np.zeros(len(t))
    flux = t["flux"].to_numpy(float)
    r = 2 * fwhm + 3 * reff + 1.5 * fwhm * np.log10(np.maximum(flux / 1e4, 1.0))
    for x, y, rr in zip(t["x"].to_numpy(float), t["y"].to_numpy(float), r):
        ri = int(np.ceil(rr))
        ix, iy = int(round(x)), int(round(y))
        y0, y1, x0, x1 = max(0, iy - ri), min(ny, iy + ri + 1), max(0, ix - ri), min(nx, ix + ri + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        near[y0:y1, x0:x1] |= (xx - x) ** 2 + (yy - y) ** 2 <= rr**2
    return near


def star_boxes(z, good, t: pd.DataFrame, n_bright=50, box=15, keep=None, return_boxes=False):
    """diff/sqrt(var) pooled over ``box`` x ``box`` boxes of the n brightest stars with an unmasked box.

    ``keep``: optional boolean per row of ``t``; stars where it is False are skipped.
    ``return_boxes``: return (list of the boxes' values, (n, 2) box centres x, y) instead.
    """
    h = box // 2
    ny, nx = z.shape
    stars = t[t["kind"] == "star"] if keep is None else t[(t["kind"] == "star").to_numpy() & keep]
    stars = stars.sort_values("flux", ascending=False)
    vals, where = [], []
    for x, y in zip(stars["x"].to_numpy(float), stars["y"].to_numpy(float)):
        ix, iy = int(round(x)), int(round(y))
        if iy - h < 0 or ix - h < 0 or iy + h >= ny or ix + h >= nx:
            continue
        win = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
        if not good[win].all():
            continue
        vals.append(z[win].ravel())
        where.append((x, y))
        if len(vals) == n_bright:
            break
    if return_boxes:
        return vals, np.array(where, float).reshape(-1, 2)
    return (np.concatenate(vals) if vals else np.array([np.nan])), len(vals)


def stamp_stars(d: Exposure, where: np.ndarray, radius: float = 2.0) -> np.ndarray:
    """Per box centre: is it one of the kernel fit's stamps (a used row of the diffexp's STAMPS HDU)?

    The 50 brightest stars are mostly the stamps the kernel was fitted to, so their boxes measure
    the fit on its own data; the other bright stars (rejected or unselected: neighbours, masked
    pixels, variables) are the out-of-sample check.
    """
    hdu = next((h for h in (d.extra_hdus or []) if h.name == "STAMPS"), None)
    if hdu is None or hdu.data is None or not len(where):
        return np.zeros(len(where), bool)
    st = hdu.data
    used = np.asarray(st["used"], bool)
    sx, sy = np.asarray(st["x"], float)[used], np.asarray(st["y"], float)[used]
    return np.array([bool((np.hypot(sx - x, sy - y) < radius).any()) for x, y in where])


def full_coverage(d, t: pd.DataFrame, coadds, half: int = 12) -> np.ndarray:
    """Per true source: is every visit of its template coadd used within ``half`` px of it?

    ``coadds``: list of (WCS of the NIMAGE plane, NIMAGE, NVISITS).  Where fewer visits
    enter, the template's PSF is another mean of the visits' PSFs than the smooth coadd
    PSF model and matching kernel describe.
    """
    ra, dec = d.wcs.all_pix2world(t["x"].to_numpy(float), t["y"].to_numpy(float), 0)
    out = np.zeros(len(t), bool)
    done = np.zeros(len(t), bool)
    for wcs, nim, nvis in coadds:
        cx, cy = wcs.all_world2pix(ra, dec, 0)
        cx, cy = np.round(cx).astype(int), np.round(cy).astype(int)
        inside = ~done & (cx >= half) & (cy >= half) & (cx < nim.shape[1] - half) & (cy < nim.shape[0] - half)
        for k in np.flatnonzero(inside):
            out[k] = nim[cy[k] - half:cy[k] + half + 1, cx[k] - half:cx[k] + half + 1].min() >= nvis
        done |= inside
    return out


def near_trail(shape, plan, visit, det) -> np.ndarray:
    """Pixels within 6 sigma of the visit's simulated satellite trail (none if it has no trail)."""
    from diapipe.simulate import satellite_line

    line = satellite_line(plan, visit, det) if plan is not None else None
    if line is None:
        return np.zeros(shape, bool)
    x0, y0, nxv, nyv, sigma = line
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.abs((xx - x0) * nxv + (yy - y0) * nyv) < 6 * sigma


def measure_one(diff_path, truth: pd.DataFrame, dia: pd.DataFrame | None, plan=None, coadds=None) -> dict:
    d = Exposure.read(diff_path)
    m = d.metadata
    visit, det = int(m.get("visit", -1)), int(m.get("detector", -1))
    z = (d.image / np.sqrt(d.variance)).astype(float)
    good = ~masks.is_set(d.mask, *EXCLUDE) & np.isfinite(z) & (d.variance > 0)
    # a satellite trail is light in the science image, which the difference must keep: not noise
    trail = near_trail(d.shape, plan, visit, det)
    good &= ~trail
    t = truth[(truth["visit"] == visit) & (truth["detector"] == det)]
    fwhm = 2.3548 * float(m.get("PSFSIGS", 1.5))
    blank = good & ~near_sources(d.shape, t, fwhm)
    boxes, where = star_boxes(z, good, t, return_boxes=True)
    zs, nbox = (np.concatenate(boxes) if boxes else np.array([np.nan])), len(boxes)
    is_stamp = stamp_stars(d, where)
    ss = np.array([float(np.sum(b.astype(float) ** 2)) for b in boxes])
    npx = np.array([b.size for b in boxes])
    zf, nbox_f = star_boxes(z, good, t, keep=full_coverage(d, t, coadds)) if coadds else (np.array([np.nan]), 0)
    # what detection and forced photometry see: the PSF matched filter's noise over the same blank sky
    from diapipe.detect import matched_filter

    psf = d.psf.image((d.shape[1] - 1) / 2, (d.shape[0] - 1) / 2)
    nu = matched_filter(d.image, d.variance, good, psf)
    h = psf.shape[0] // 2
    inner = np.zeros(d.shape, bool)
    inner[h:-h, h:-h] = True
    # the filter reaches h px: keep blank pixels whose whole stamp is valid
    from scipy import ndimage

    full = ndimage.minimum_filter(good.astype(np.uint8), size=2 * h + 1).astype(bool)
    mf = blank & inner & full
    from diapipe.detect import _filtered_noise

    mf_all = _filtered_noise(nu, good)[0]  # detection's own estimate (noiseScale), all valid pixels
    row = {"visit": visit, "detector": det, "convdir": m.get("CONVDIR"), "blank": float(np.std(z[blank])),
           "blank_iqr": _iqr_std(z[blank]), "blank_frac": float(blank.mean()), "mf_blank": float(np.std(nu[mf])),
           "mf_robust": float(mf_all),
           "stars": float(np.std(zs)),
           "nbox": nbox,
           "stars_stamp": float(np.sqrt(ss[is_stamp].sum() / max(npx[is_stamp].sum(), 1))) if is_stamp.any() else np.nan,
           "stars_other": float(np.sqrt(ss[~is_stamp].sum() / max(npx[~is_stamp].sum(), 1))) if (~is_stamp).any() else np.nan,
           "nbox_other": int((~is_stamp).sum()), "_ss_other": float(ss[~is_stamp].sum()), "_px_other": int(npx[~is_stamp].sum()),
           "_ss_stamp": float(ss[is_stamp].sum()), "_px_stamp": int(npx[is_stamp].sum()),
           "stars_fullcov": float(np.std(zf)), "nbox_fullcov": nbox_f, "trail_px": int(trail.sum()), "DIFFRMS": m.get("DIFFRMS"), "SVARSCAL": m.get("SVARSCAL", np.nan),
           "TVARSCAL": m.get("TVARSCAL", np.nan), "TNOISCOR": m.get("TNOISCOR", np.nan),
           "TNRESAMP": m.get("TNRESAMP", np.nan)}
    if dia is not None:
        s = dia[(dia["visit"] == visit) & (dia["detector"] == det)]
        row["noiseScale"] = float(s["noiseScale"].iloc[0]) if len(s) and "noiseScale" in s else np.nan
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rundir", nargs="?", default=".")
    ap.add_argument("--config", default=None, help="overlay config (relative to rundir)")
    ap.add_argument("--visits", type=int, nargs="*", help="only these visits")
    ap.add_argument("--diff-dir", default=None,
                    help="read {visit}/{detector}.fits diffexps from here instead (e.g. re-subtracted ones)")
    a = ap.parse_args(argv)
    wd = Path(a.rundir)
    cfg = dpconfig.load(wd / "config" / "config.yaml", *([wd / a.config] if a.config else []))
    b = Butler(cfg["datasets"], root=wd)
    tf = pd.read_parquet(b.get("truth_fluxes"))
    ts = pd.read_parquet(b.get("truth_sources"))
    info = ts.set_index("source_id")
    tf["kind"] = tf["source_id"].map(info["kind"])
    if "reff" in info:
        # reff is in arcsec in the truth table; pixel scale from the simulation config
        from diapipe.simulate import sim_config

        scale = float(sim_config(cfg)["pixel_scale"])
        tf["reff_px"] = tf["source_id"].map(info["reff"]).fillna(0.0) / scale
    dia = None
    if not a.diff_dir:  # the run's detection noiseScale belongs to its own diffexps, not to re-subtracted ones
        try:
            p = b.get("diaSources")
            dia = pd.read_parquet(p, columns=["visit", "detector", "noiseScale"]) if p.exists() else None
        except Exception:  # noqa: BLE001 - the noise table does not need it
            dia = None
    root = Path(a.diff_dir) if a.diff_dir else None
    paths = sorted((root or (wd / "results" / "diff")).glob("*/*.fits"))
    paths = [p for p in paths if p.stem.isdigit() and (not a.visits or int(p.parent.name) in a.visits)]
    from diapipe.simulate import plan_survey

    plan = plan_survey(cfg)
    coadds = []
    from astropy.io import fits
    from astropy.wcs import WCS

    for cp in sorted(wd.glob(cfg["datasets"]["template"].format(band="*", patch="*"))):
        with fits.open(cp) as h:
            if "NIMAGE" in h:
                coadds.append((WCS(h["NIMAGE"].header), h["NIMAGE"].data.copy(), int(h[0].header.get("NVISITS", 0))))
    rows = [measure_one(p, tf, dia, plan, coadds) for p in paths]
    if not rows:
        print("no diffexps found", file=sys.stderr)
        return 1
    out = pd.DataFrame(rows).sort_values(["visit", "detector"])
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.4f}".format):
        print(out[[c for c in out.columns if not c.startswith("_")]].to_string(index=False))
    ok_b = (out["blank"] - 1).abs() < 0.01
    ok_s = (out["stars"] - 1).abs() < 0.02
    print(f"\nblank-sky std: median {out['blank'].median():.4f}, range {out['blank'].min():.4f}-"
          f"{out['blank'].max():.4f}; within 1% of 1: {int(ok_b.sum())}/{len(out)}")
    print(f"bright-star boxes std: median {out['stars'].median():.4f}, range {out['stars'].min():.4f}-"
          f"{out['stars'].max():.4f}; within 2% of 1: {int(ok_s.sum())}/{len(out)}")
    if out["nbox_fullcov"].max() > 0:
        ok_f = (out["stars_fullcov"] - 1).abs() < 0.02
        print(f"bright-star boxes where every template visit is used (coadd NIMAGE = NVISITS within 12 px): "
              f"median {out['stars_fullcov'].median():.4f}, range {out['stars_fullcov'].min():.4f}-"
              f"{out['stars_fullcov'].max():.4f}; within 2% of 1: {int(ok_f.sum())}/{len(out)}")
    # pooled over all images: a few non-stamp stars per image are too few for a per-image figure
    print(f"bright-star boxes, pooled over all images: kernel stamps "
          f"{np.sqrt(out['_ss_stamp'].sum() / max(out['_px_stamp'].sum(), 1)):.4f} ({int(out['nbox'].sum() - out['nbox_other'].sum())} boxes), "
          f"other stars (out of sample) {np.sqrt(out['_ss_other'].sum() / max(out['_px_other'].sum(), 1)):.4f} "
          f"({int(out['nbox_other'].sum())} boxes)")
    print(f"matched-filter std on blank sky: median {out['mf_blank'].median():.4f}, range "
          f"{out['mf_blank'].min():.4f}-{out['mf_blank'].max():.4f}")
    print(f"matched-filter robust std (detection's noiseScale estimate): median {out['mf_robust'].median():.4f}, "
          f"range {out['mf_robust'].min():.4f}-{out['mf_robust'].max():.4f}")
    if "noiseScale" in out:
        print(f"detection noiseScale: median {out['noiseScale'].median():.4f}, range "
              f"{out['noiseScale'].min():.4f}-{out['noiseScale'].max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
