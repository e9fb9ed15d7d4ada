"""Characterization: postisr exposure -> calexp (calibrated exposure) + source catalog.

    calexp, src = characterize(postisr, refcat, config)

Steps (LSST calculateBackground / characterizeImage / calibrate, SExtractor,
PSFEx, SCAMP in spirit):

1. background: mesh of clipped modes over unmasked pixels (``diapipe.background``),
   re-estimated with the detected sources masked; subtracted.
2. detection of the bright sources (sep, ``detection.threshold`` sigma), windowed
   centroids, aperture fluxes, half-light radii; DETECTED mask plane.
3. PSF: stars on the stellar locus, isolated, unsaturated and unmasked, fitted by
   a PixelPsf varying as a polynomial across the detector (``diapipe.psfex``).
4. PSF fluxes and an aperture correction to total flux (``diapipe.photometry``).
5. astrometry: pattern match against the refcat from the rough WCS, then an
   iterative clipped TAN-SIP fit (``diapipe.astrometry``).
6. zero point against the refcat magnitudes in the exposure's band.

The calexp keeps electrons (background subtracted) and records in its metadata
MAGZERO (AB mag of 1 e-), MAGZERR, SEEING (arcsec, PSF model FWHM at the
centre), PSFFWHM (px), WCSRMS (mas), NASTROM, BKGLEVEL (e-) and more; it carries
the fitted WCS and the PSF model; the background mesh is an extra BKGMESH HDU.
The ``src`` table (Parquet) has one row per detection; pixel positions are
0-based (pixel centres at integers), fluxes in e- (``*InstFlux``) and nJy.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sep
import yaml
from scipy.spatial import cKDTree

from . import astrometry, background, masks, photometry, psfex
from .exposure import Exposure, MaskedImage
from .fileio import DiapipeError, write_fits, write_parquet

log = logging.getLogger(__name__)

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "stages" / "characterize.schema.yaml"

# Mask planes that make a pixel unusable for every measurement here.
BAD_PLANES = masks.BAD_PLANES


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The characterize block's JSON schema (parsed once: pure-Python YAML costs ~0.2 s)."""
    with open(SCHEMA) as fh:
        return yaml.safe_load(fh)


def default_config() -> dict:
    """The characterize config block with every default filled in."""
    return with_defaults({})


def with_defaults(cfg: dict | None) -> dict:
    """Validate a (partial) characterize block against its schema and fill defaults."""
    from .config import ConfigError, _Validator

    cfg = copy.deepcopy(cfg or {})
    errors = list(_Validator(_schema()).iter_errors(cfg))
    if errors:
        e = errors[0]
        raise ConfigError(f"config key 'characterize.{'.'.join(map(str, e.absolute_path))}': {e.message}")
    return cfg


# -------------------------------------------------------------- detection
def detect(image, noise, bad, threshold, min_area, deblend_cont):
    """sep detection on a background-subtracted image; returns (objects, segmentation map).

    noise : sky noise per pixel (scalar, image units); threshold in units of it.
    """
    data = background._c_contiguous(image)
    # Large images with many sources need more room than sep's defaults.
    sep.set_extract_pixstack(max(300000, data.size // 10))
    sep.set_sub_object_limit(4096)
    objs, seg = sep.extract(data, threshold, err=float(noise), mask=np.ascontiguousarray(bad, np.uint8),
                            minarea=min_area, deblend_cont=deblend_cont, segmentation_map=True)
    return objs, seg


def _box_or(mask: np.ndarray, ix, iy, r: int) -> np.ndarray:
    """Bitwise OR of ``mask`` over the (2r+1)^2 box around each (ix, iy), clipped at the edges."""
    ny, nx = mask.shape
    out = np.zeros(len(ix), dtype=mask.dtype)
    for dy in range(-r, r + 1):
        yy = np.clip(iy + dy, 0, ny - 1)
        for dx in range(-r, r + 1):
            out |= mask[yy, np.clip(ix + dx, 0, nx - 1)]
    return out


def _locus_mode(r: np.ndarray, width: float) -> float:
    """Densest value of r (the stellar locus): the r with most neighbours within +-width*r."""
    r = np.sort(r[np.isfinite(r) & (r > 0)])
    if len(r) == 0:
        return np.nan
    lo = np.searchsorted(r, r * (1 - width))
    hi = np.searchsorted(r, r * (1 + width))
    k = np.argmax(hi - lo)
    return float(np.median(r[lo[k]:hi[k]]))


def stellar_locus(x, y, r50, bright, width, shape, order=2):
    """Half-light radius of point sources as a function of position (the PSF varies).

    Starts from the densest r50 of the bright sources, then fits a polynomial in
    (x, y) to the sources within +-2*width of it, and again within +-width.
    Returns r50_star (per source) or None if there is no locus.
    """
    from .psf import poly_design

    mode = _locus_mode(r50[bright], width)
    if not np.isfinite(mode):
        return None
    ny, nx = shape
    geom = ((nx - 1) / 2, (ny - 1) / 2, nx / 2, ny / 2)
    pred = np.full(len(r50), mode)
    for w in (2.5 * width, 1.5 * width, width):
        sel = bright & (np.abs(r50 / pred - 1) < w)
        k = order if sel.sum() >= 10 * (order + 1) * (order + 2) // 2 else 0
        if sel.sum() < 3:
            break
        a = poly_design(x[sel], y[sel], k, *geom)
        coef, *_ = np.linalg.lstsq(a, r50[sel], rcond=None)
        pred = poly_design(x, y, k, *geom) @ coef
    return pred


# -------------------------------------------------------------- the stage
def characterize(postisr, refcat, config: dict | None = None, *, path=None, refcat_path=None):
    """Characterize one exposure.

    postisr : Exposure (electrons, sky not subtracted, BAD/SAT/CR masks, variance,
        rough WCS) or the path of one.
    refcat : DataFrame (id, ra, dec [deg], ra_err, dec_err [mas], <band>_mag,
        <band>_magErr) or the path of a Parquet file.
    config : the ``characterize`` config block (partial is fine; defaults filled).
    path, refcat_path : file names for error messages when objects are passed.

    Returns (calexp, src): the calibrated Exposure (with ``calexp.background``,
    the ``background.Background`` subtracted) and the source table (DataFrame).
    Raises DiapipeError naming the file and dataId when the exposure cannot be
    characterized (too few stars, failed astrometric match, missing band, ...).
    """
    t_start = time.perf_counter()
    cfg = with_defaults(config)
    if not isinstance(postisr, Exposure):
        path = postisr
        postisr = Exposure.read(postisr)
    if not isinstance(refcat, pd.DataFrame):
        refcat_path = refcat
        try:
            refcat = pd.read_parquet(refcat)
        except (OSError, ValueError) as exc:
            raise DiapipeError(f"cannot read reference catalog ({exc})", refcat) from exc
    data_id = postisr.data_id
    meta = postisr.metadata

    def fail(msg):
        return DiapipeError(f"characterize: {msg}", path, data_id)

    band = meta.get("band", meta.get("FILTER"))
    if band is None:
        raise fail("exposure has no band/FILTER in its metadata")
    mag_col, magerr_col = f"{band}_mag", f"{band}_magErr"
    missing = [c for c in ("ra", "dec", mag_col) if c not in refcat.columns]
    if missing:
        raise fail(f"reference catalog {refcat_path or ''} lacks column(s) {missing} "
                   f"(has {list(refcat.columns)})")
    if postisr.wcs is None:
        raise fail("exposure has no WCS to start the astrometric match from")

    img = background._c_contiguous(postisr.image)
    var = background._c_contiguous(postisr.variance)
    mask = postisr.mask.copy()
    bad = masks.is_set(mask, *BAD_PLANES)
    finite_img = np.isfinite(img)
    if not finite_img.all():
        bad |= ~finite_img
        img = np.where(finite_img, img, np.float32(0))
    good_var = np.isfinite(var) & (var > 0)
    if not good_var.all():
        bad |= ~good_var
        var = np.where(good_var, var, np.float32(1e30)).astype(np.float32)
    if bad.all():
        raise fail("every pixel is masked")
    ny, nx = img.shape
    t = {}

    # 1-2. background, detection, background again with sources masked
    c = cfg["background"]
    t0 = time.perf_counter()
    bkg = background.estimate(img, bad, c["mesh_size"], c["filter_size"])
    sub = img - bkg.image()
    d = cfg["detection"]
    try:
        # the global sky noise sets the threshold: twice as fast as sep's per-pixel
        # matched filter, and these are the bright calibration sources
        objs, seg = detect(sub, bkg.rms, bad, d["threshold"], d["min_area"], d["deblend_cont"])
    except Exception as exc:  # sep raises plain Exception on buffer overflows
        raise fail(f"source detection failed ({exc})") from exc
    detected = seg > 0
    if c["iterations"] > 1:
        fw = 2.355 * np.median(np.sqrt(np.maximum(objs["a"] * objs["b"], 0.09)))
        grown = background.source_mask(img.shape, objs["x"], objs["y"], objs["npix"], fw)
        bkg = background.estimate(img, bad | detected | grown, c["mesh_size"], c["filter_size"])
        sub = img - bkg.image()
    masks.set_plane(mask, detected, "DETECTED")
    t["background+detect"] = time.perf_counter() - t0
    n = len(objs)
    log.info("%d sources above %.1f sigma; background %.1f e- (rms %.1f)", n, d["threshold"], bkg.level, bkg.rms)
    if n < cfg["psf"]["min_stars"]:
        raise fail(f"only {n} sources detected above {d['threshold']} sigma")

    # 3. measurements: size, centroids, apertures, flags
    t0 = time.perf_counter()
    x0, y0 = objs["x"].astype(float), objs["y"].astype(float)
    sub_c = background._c_contiguous(sub)
    bad8 = np.ascontiguousarray(bad, np.uint8)
    sat_in = (objs["flag"] & (sep.OBJ_TRUNC | sep.OBJ_SINGU)) == 0
    ix, iy = np.round(x0).astype(int), np.round(y0).astype(int)
    a_ab = np.sqrt(np.maximum(objs["a"] * objs["b"], 0.09))
    rough_fwhm = 2.355 * np.median(a_ab[np.argsort(-objs["flux"])[:300]])
    near = _box_or(mask, ix, iy, max(2, int(np.ceil(0.75 * rough_fwhm))))
    is_sat = (near & masks.bit("SAT")) != 0
    r50, rflag = sep.flux_radius(sub_c, x0, y0, np.full(n, 2.0 * rough_fwhm), 0.5, mask=bad8,
                                 normflux=None, subpix=1)
    ap0, ap0err, _ = photometry.aperture_flux(sub_c, var, bad8, x0, y0, 1.5 * rough_fwhm)
    snr0 = ap0 / np.maximum(ap0err, 1e-30)
    clean = ((near & masks.bits(*BAD_PLANES)) == 0) & ((objs["flag"] & sep.OBJ_MERGED) == 0) & sat_in
    bright = clean & (snr0 > cfg["psf"]["min_snr"])
    r50_star = stellar_locus(x0, y0, r50, bright, cfg["psf"]["locus_width"], (ny, nx))
    if r50_star is None:
        raise fail(f"no clean bright (S/N > {cfg['psf']['min_snr']}) sources to find the stellar locus")
    size_ratio = r50 / r50_star
    point_like = np.abs(size_ratio - 1) < cfg["psf"]["locus_width"]
    # FWHM ~ 1.6 (Moffat beta=3) to 2.0 (Gaussian) x half-light radius; a first guess only
    fwhm0 = 1.7 * float(np.median(r50_star[point_like & bright]))
    # subpix=3: the Gaussian window makes boundary pixels matter little (3x faster than 11)
    x, y, wflag = sep.winpos(sub_c, x0, y0, np.full(n, fwhm0 / 2.355), mask=bad8, subpix=3)
    moved = (wflag != 0) | ~np.isfinite(x) | (np.hypot(x - x0, y - y0) > fwhm0)
    x, y = np.where(moved, x0, x), np.where(moved, y0, y)
    t["measure"] = time.perf_counter() - t0

    # 4. PSF model
    t0 = time.perf_counter()
    pc = cfg["psf"]
    size = pc["stamp_size"] or int(np.clip(2 * np.ceil(3.5 * fwhm0) + 1, 15, 51))
    size += 1 - size % 2
    half = size // 2
    edge = (x < half + 3) | (y < half + 3) | (x > nx - half - 4) | (y > ny - half - 4)
    # Masked pixels (a bad column, a neighbour's bleed trail) only drop out of the fit
    # pixel by pixel; a star is lost only if its core is hit (psfex.build_psf) -- in
    # sparse fields every star counts for the PSF's variation across the detector.
    cand = bright & point_like & ~edge
    n_unmasked = int(cand.sum())
    # isolation: no neighbour within 2 FWHM, none brighter than the star within its stamp;
    # fainter neighbours' footprints are left out of the fit pixel by pixel
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(half * 1.42 + 2, output_type="ndarray")
    k, j = np.concatenate([pairs, pairs[:, ::-1]]).T  # both directions: k the star, j its neighbour
    crowded = (np.hypot(x[j] - x[k], y[j] - y[k]) < 2 * fwhm0) | (objs["flux"][j] > objs["flux"][k])
    cand[k[crowded]] = False
    cidx = np.nonzero(cand)[0]
    log.info("PSF candidates: %d bright clean, %d on the stellar locus, %d unmasked, %d isolated",
             bright.sum(), (bright & point_like).sum(), n_unmasked, len(cidx))
    cidx = cidx[np.argsort(-snr0[cidx])][: pc["max_stars"]]
    if len(cidx) < pc["min_stars"]:
        raise fail(f"only {len(cidx)} usable PSF stars (isolated, unsaturated, S/N > {pc['min_snr']}); "
                   f"need {pc['min_stars']}")
    seg_st, *_ = psfex.cut_stamps(seg, x[cidx], y[cidx], half + psfex.LANCZOS_A)
    bad_st, *_ = psfex.cut_stamps(bad, x[cidx], y[cidx], half + psfex.LANCZOS_A)
    ignore = ((seg_st != 0) & (seg_st != (cidx + 1)[:, None, None])) | (bad_st != 0)
    sky_psf = photometry.local_sky(sub, seg, bad, x[cidx], y[cidx], half, half + 2 * fwhm0)
    psf, used = psfex.build_psf(sub, var, x[cidx], y[cidx], (ny, nx), size, pc["order"], clip=pc["clip"],
                                ignore=ignore, sky=sky_psf)
    if used.sum() < pc["min_stars"]:
        raise fail(f"only {used.sum()} PSF stars survived outlier rejection; need {pc['min_stars']}")
    psf_used = np.zeros(n, bool)
    psf_used[cidx[used]] = True
    psf_cand = np.zeros(n, bool)
    psf_cand[cidx] = True
    cxy = ((nx - 1) / 2, (ny - 1) / 2)
    fwhm_px = psfex.fwhm(psf.image(*cxy))
    t["psf"] = time.perf_counter() - t0

    # 5. photometry in electrons
    t0 = time.perf_counter()
    ph = cfg["photometry"]
    # PSF fit over the core (radius 2.5 FWHM, with a local sky): the optimal weights
    # are small beyond it, and the aperture correction below uses the same fluxes
    pflux, pferr = photometry.psf_flux(sub, var, bad, psf, x, y, seg=seg, half=int(np.ceil(2.5 * fwhm_px)))
    # Aperture correction to total flux: median ratio of a large aperture
    # (apcorr_radius_fwhm) to the PSF flux over the PSF stars; optionally the
    # local sky of an annulus far beyond the wings instead of the global one.
    r_ap = ph["apcorr_radius_fwhm"] * fwhm_px
    pu = np.nonzero(psf_used)[0]
    pu = pu[np.argsort(-snr0[pu])][:100]  # the 100 best measured are plenty
    _, apferr_pu, _ = photometry.aperture_flux(sub_c, var, bad8, x[pu], y[pu], r_ap)
    # neighbours inside the large aperture replaced by the PSF model of the star
    tapf = photometry.clean_aperture_flux(sub, seg, bad, psf, x[pu], y[pu], pu + 1, pflux[pu], r_ap)
    if ph["apcorr_local_sky"]:
        r_in, r_out = (f * fwhm_px for f in ph["sky_annulus_fwhm"])
        sky_ap = photometry.local_sky(sub, seg, bad, x[pu], y[pu], r_in, r_out)
        tapf = tapf - np.pi * r_ap**2 * np.where(np.isfinite(sky_ap), sky_ap, 0.0)
    apcorr, apcorr_err, _ = photometry.aperture_correction(pflux[pu], tapf, apferr_pu)
    # the catalogue's aperture flux: radius 2 FWHM (no aperture correction)
    apf, apferr, apflag = photometry.aperture_flux(sub_c, var, bad8, x, y, 2.0 * fwhm_px)
    flux_tot = pflux * apcorr
    snr = pflux / pferr
    t["photometry"] = time.perf_counter() - t0

    # 6. astrometry
    t0 = time.perf_counter()
    ac = cfg["astrometry"]
    # Astrometric stars: point-like, unsaturated, nothing masked nearby (a bad column
    # next to a star measurably biases its windowed centroid), not at the edge.
    usable = clean & ~is_sat & ~edge & np.isfinite(snr) & (snr > 5) & point_like
    cent_err = np.hypot(fwhm_px / 2.355 * np.sqrt(2) / np.maximum(snr, 1e-3), 0.005)
    ref_err = np.hypot(refcat["ra_err"].to_numpy(float), refcat["dec_err"].to_numpy(float)) / np.sqrt(2) \
        if "ra_err" in refcat.columns else np.full(len(refcat), 1.0)
    # Detections for the pattern: the brightest, saturated included (they are the brightest refs too)
    vote_flux = np.where(clean | is_sat, objs["flux"], 0.0)
    try:
        res = astrometry.solve(
            x, y, vote_flux, usable, refcat["ra"].to_numpy(float), refcat["dec"].to_numpy(float),
            refcat[mag_col].to_numpy(float), ref_err, postisr.wcs, (ny, nx), order=ac["sip_order"],
            max_offset_arcsec=ac["max_offset_arcsec"], max_rotation_deg=ac["max_rotation_deg"],
            n_bright=ac["n_bright"], match_radius_arcsec=ac["match_radius_arcsec"], clip=ac["clip"],
            centroid_err_px=cent_err, min_matches=ac["min_matches"])
    except astrometry.AstrometryError as exc:
        raise fail(f"astrometric calibration failed: {exc}") from exc
    wcs = res.wcs
    ra, dec = wcs.all_pix2world(x, y, 0)
    pix_scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600)
    astro_used = np.zeros(n, bool)
    astro_used[res.src_index] = True
    ref_id = np.full(n, -1, dtype=np.int64)
    ids = refcat["id"].to_numpy() if "id" in refcat.columns else np.arange(len(refcat))
    ref_id[res.src_index] = ids[res.ref_index]
    t["astrometry"] = time.perf_counter() - t0

    # 7. zero point from the astrometric matches
    t0 = time.perf_counter()
    si, ri = res.src_index, res.ref_index
    ok = ~is_sat[si] & clean[si] & (snr[si] > ph["min_snr"]) & np.isfinite(refcat[mag_col].to_numpy(float)[ri])
    si, ri = si[ok], ri[ok]
    if len(si) < ph["min_stars"]:
        raise fail(f"only {len(si)} matched unsaturated stars with S/N > {ph['min_snr']} for the zero point; "
                   f"need {ph['min_stars']}")
    ref_mag = refcat[mag_col].to_numpy(float)[ri]
    ref_magerr = refcat[magerr_col].to_numpy(float)[ri] if magerr_col in refcat.columns else np.full(len(ri), 0.02)
    colour = None
    if ph["colour_term"]:
        b1, b2 = ph["colour_bands"]
        if f"{b1}_mag" not in refcat.columns or f"{b2}_mag" not in refcat.columns:
            raise fail(f"colour term needs refcat columns {b1}_mag and {b2}_mag")
        colour = (refcat[f"{b1}_mag"] - refcat[f"{b2}_mag"]).to_numpy(float)[ri]
    try:
        zp = photometry.zero_point(flux_tot[si], pferr[si] * apcorr, ref_mag, ref_magerr, colour,
                                   fit_colour=ph["colour_term"], clip=ph["clip"], sys_floor=ph["sys_floor_mag"])
    except ValueError as exc:
        raise fail(f"zero point failed: {exc}") from exc
    if zp.n_used < ph["min_stars"]:
        raise fail(f"only {zp.n_used} stars left for the zero point after clipping")
    phot_used = np.zeros(n, bool)
    phot_used[si[zp.used]] = True
    t["zeropoint"] = time.perf_counter() - t0

    # 8. products
    nJy = photometry.nJy_per_electron(zp.magzero)
    src = pd.DataFrame({
        "sourceId": np.arange(n, dtype=np.int64),
        "visit": data_id.get("visit", -1),
        "detector": data_id.get("detector", -1),
        "band": band,
        "x": x, "y": y,
        "xErr": cent_err, "yErr": cent_err,
        "ra": ra, "dec": dec,
        "psfInstFlux": pflux * apcorr, "psfInstFluxErr": pferr * apcorr,
        "psfFlux": pflux * apcorr * nJy, "psfFluxErr": pferr * apcorr * nJy,
        "apInstFlux": apf, "apInstFluxErr": apferr,
        "apFlux": apf * nJy, "apFluxErr": apferr * nJy,
        "snr": snr,
        "peak": objs["peak"].astype(float),
        "halfLightRadius": r50, "sizeRatio": size_ratio,
        "extendedness": (size_ratio > 1 + pc["locus_width"]).astype(float),
        "a": objs["a"].astype(float), "b": objs["b"].astype(float), "theta": objs["theta"].astype(float),
        "sepFlags": objs["flag"].astype(np.int32),
        "flag_saturated": is_sat,
        "flag_bad": (near & masks.bit("BAD")) != 0,
        "flag_cr": (near & masks.bit("CR")) != 0,
        "flag_edge": edge,
        "flag_blended": (objs["flag"] & sep.OBJ_MERGED) != 0,
        "calib_psf_candidate": psf_cand,
        "calib_psf_used": psf_used,
        "calib_astrometry_used": astro_used,
        "calib_photometry_used": phot_used,
        "refId": ref_id,
    })

    out_meta = dict(meta)
    out_meta.update({
        "MAGZERO": round(zp.magzero, 5),
        "MAGZERR": round(zp.magzero_err, 5),
        "MAGZRMS": round(zp.scatter, 5),
        "MAGZCLR": round(zp.colour_coeff, 5),
        "NPHOTCAL": zp.n_used,
        "APCORR": round(apcorr, 5),
        "SEEING": round(fwhm_px * pix_scale, 4),
        "PSFFWHM": round(fwhm_px, 4),
        "PSFORDER": psf.order,
        "NPSFSTAR": int(psf_used.sum()),
        "WCSRMS": round(res.rms_mas, 2),
        "NASTROM": res.n_matched,
        "WCSORDER": ac["sip_order"],
        "ASTSHIFT": round(float(np.hypot(res.pattern.dx, res.pattern.dy) * pix_scale), 3),
        "BKGLEVEL": round(bkg.level, 3),
        "BKGRMS": round(bkg.rms, 3),
        "NSOURCES": n,
    })
    # The rough WCS cards of the input must not shadow the fitted one.
    for k in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        out_meta.pop(k, None)
    calexp = Exposure(MaskedImage(sub, mask, postisr.variance), wcs=wcs, psf=psf, metadata=out_meta,
                      extra_hdus=[bkg.to_hdu()])
    calexp.background = bkg
    t["total"] = time.perf_counter() - t_start
    log.info("calexp: MAGZERO %.4f +- %.4f (%d stars), seeing %.3f\" (%.2f px, %d PSF stars), "
             "WCS rms %.1f mas (%d stars), timing %s", zp.magzero, zp.magzero_err, zp.n_used,
             fwhm_px * pix_scale, fwhm_px, psf_used.sum(), res.rms_mas, res.n_matched,
             {k: round(v, 2) for k, v in t.items()})
    calexp.timing = t
    return calexp, src


def write_calexp(calexp: Exposure, path) -> None:
    """Write the calexp atomically (the background mesh rides along as its BKGMESH HDU)."""
    calexp.write(path)


def run(postisr_path, refcat_path, calexp_path, src_path=None, config=None):
    """Read, characterize, write: the calexp and (beside it) the src Parquet table."""
    calexp, src = characterize(postisr_path, refcat_path, config)
    if src_path is None:
        src_path = Path(calexp_path).with_suffix(".src.parquet")
    write_calexp(calexp, calexp_path)
    write_parquet(src, src_path)
    return calexp, src


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "characterize",
        help="postisr exposure -> calexp: background, PSF, astrometry, zero point",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("postisr", help="postisr Exposure FITS file")
    p.add_argument("--refcat", required=True, help="reference catalog (Parquet)")
    p.add_argument("-o", "--output", required=True, help="calexp FITS file to write")
    p.add_argument("--src", help="source table to write (default: beside the calexp, .src.parquet)")
    p.add_argument("--config", help="YAML file with a 'characterize' block (or the block itself)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from . import logs

    logs.setup()
    cfg = None
    if args.config:
        with open(args.config) as fh:
            cfg = yaml.safe_load(fh) or {}
        cfg = cfg.get("characterize", cfg) if isinstance(cfg, dict) else cfg
    run(args.postisr, args.refcat, args.output, args.src, cfg)
    return 0
