"""The simulated survey: raw multi-amplifier CCD frames with known truth.

This is the project's ruler: every later stage is scored against what is
written here, so the model is explicit and every number comes from the config.

Camera
    ``n_detectors`` CCDs of ``nx x ny`` pixels on a grid in the focal plane,
    ``detector_gap_px`` apart.  Each is read through ``n_amps`` amplifiers that
    split it along x; each amplifier has its own gain (e-/ADU), read noise
    (e-), bias level (ADU) and ``n_overscan`` overscan columns.  The bias of a
    frame drifts slowly with row (a low-order polynomial of a few ADU) in both
    data and overscan columns, and a fixed 2-D bias structure (column pattern
    and a ramp at the start of readout) is the same in every frame.

Signal model (per pixel, electrons)
    e = Poisson(R * S + dark * DARKTIME + hot * DARKTIME) + CR
    then saturation at ``full_well`` with the excess bled up and down the
    column, then ADU = e / gain + bias(row) + structure + N(0, rn / gain),
    rounded and clipped to [0, 65535].  ``S`` is the true sky + sources in the
    flat-fielded frame (the truth image) and ``R`` the flat response
    (vignetting x PRNU x dust donuts x dead pixels/columns, median 1 over the
    detector's good pixels).

Sky
    Stars with power-law number counts, Sersic galaxies convolved with the
    PSF, supernovae offset from their hosts, variable stars, flares, moving
    objects and occasional satellite trails.  The PSF is a double Moffat
    (core + wide wing) whose FWHM and ellipticity grow towards the edge of the
    focal plane.  The true WCS of each exposure is TAN-SIP (order 3), exactly:
    the optical distortion is a radial cubic about the optical axis.

Pixel convention: (x, y) are 0-based pixel centres of the assembled, trimmed
``ny x nx`` detector image (numpy ``image[y, x]``, astropy ``origin=0``).

The plan (visits, sources, amplifiers, reference catalog) is drawn once by
``plan_survey`` and written as Parquet truth tables; ``load_plan`` reads it
back so any stage (or test) can ask for ``true_wcs``, ``true_psf_image`` and
``true_fwhm`` of any exposure.  Every random draw comes from
``diapipe.seeds.rng_for(seed, purpose, **dataId)``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, Sip

from . import masks
from .exposure import Exposure, MaskedImage
from .fileio import DiapipeError, write_fits, write_parquet
from .psf import PixelPsf, poly_design
from .seeds import rng_for

log = logging.getLogger("diapipe.simulate")

AMP_NAMES = "ABCDEFGHIJKLMNOP"
#: AB magnitude of 1 nJy.
NJY_ZP = 31.4

PLAN_TABLES = ("truth_visits", "truth_sources", "truth_amps", "truth_fluxes", "refcat")


# --------------------------------------------------------------------- config
def sim_config(cfg: dict | None) -> dict:
    """The ``simulate`` block with schema defaults filled in.

    ``cfg`` may be the whole pipeline config (with a ``simulate`` key) or the
    block itself; unknown or mistyped keys raise ConfigError naming the key.
    """
    from .config import ConfigError, validate

    block = dict(cfg["simulate"]) if cfg and "simulate" in cfg else dict(cfg or {})
    schema = _sim_schema()
    try:
        sim = validate(copy.deepcopy(block), schema)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config key '", "config key 'simulate.")) from None
    if sim["nx"] % sim["n_amps"]:
        raise ConfigError(f"config key 'simulate.nx': {sim['nx']} is not divisible by simulate.n_amps = {sim['n_amps']}")
    return sim


@functools.lru_cache(maxsize=1)
def _sim_schema() -> dict:
    from .config import load_schema

    return load_schema()["properties"]["simulate"]


def _seed_of(cfg, seed=None) -> int:
    if seed is not None:
        return int(seed)
    if cfg and "seed" in cfg:
        return int(cfg["seed"])
    return 0


# --------------------------------------------------------------------- plan
@dataclass
class SurveyPlan:
    """Everything drawn once for the survey: the truth tables.

    visits  : one row per visit (pointing, rotation, seeing, sky, zero point, ...)
    sources : one row per source (stars, galaxies and transients with their parameters)
    amps    : one row per (detector, amp): gain (e-/ADU), read_noise (e-), bias_level (ADU)
    refcat  : the Gaia-like reference catalog
    """

    sim: dict
    seed: int
    visits: pd.DataFrame
    sources: pd.DataFrame
    amps: pd.DataFrame
    refcat: pd.DataFrame
    fluxes: pd.DataFrame | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def visit_row(self, visit: int) -> pd.Series:
        rows = self.visits[self.visits["visit"] == int(visit)]
        if len(rows) != 1:
            raise DiapipeError(f"visit {visit} not in the survey plan", data_id={"visit": visit})
        return rows.iloc[0]

    def amp_rows(self, detector: int) -> pd.DataFrame:
        rows = self.amps[self.amps["detector"] == int(detector)].sort_values("amp")
        if len(rows) == 0:
            raise DiapipeError(f"detector {detector} not in the camera", data_id={"detector": detector})
        return rows


def detector_centre(sim: dict, detector: int) -> tuple[float, float]:
    """Focal-plane position (pixels from the optical axis) of a detector's centre."""
    n = sim["n_detectors"]
    ncol = int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    col, row = detector % ncol, detector // ncol
    pitch_x = sim["nx"] + sim["detector_gap_px"]
    pitch_y = sim["ny"] + sim["detector_gap_px"]
    return (col - (ncol - 1) / 2) * pitch_x, (row - (nrow - 1) / 2) * pitch_y


def focal_plane_radius(sim: dict) -> float:
    """Half-diagonal of the focal plane (pixels): the normalising radius of the PSF variation."""
    xs, ys = [], []
    for d in range(sim["n_detectors"]):
        cx, cy = detector_centre(sim, d)
        xs += [abs(cx) + sim["nx"] / 2]
        ys += [abs(cy) + sim["ny"] / 2]
    return float(math.hypot(max(xs), max(ys)))


def to_focal(sim: dict, detector: int, x, y):
    """Detector pixel (0-based) -> focal-plane pixel offsets from the optical axis."""
    cx, cy = detector_centre(sim, detector)
    return np.asarray(x, float) - (sim["nx"] - 1) / 2 + cx, np.asarray(y, float) - (sim["ny"] - 1) / 2 + cy


def _amp_table(sim: dict, seed: int) -> pd.DataFrame:
    rows = []
    for d in range(sim["n_detectors"]):
        rng = rng_for(seed, "amps", detector=d)
        for a in range(sim["n_amps"]):
            gain = sim["gain"] * (1 + sim["gain_scatter"] * rng.standard_normal())
            rn = sim["read_noise"] * (1 + sim["read_noise_scatter"] * rng.standard_normal())
            bias = sim["bias_level"] + sim["bias_level_scatter"] * rng.standard_normal()
            rows.append(
                dict(
                    detector=d,
                    amp=AMP_NAMES[a],
                    gain=round(float(gain), 4),
                    read_noise=round(float(max(rn, 0.5)), 3),
                    bias_level=round(float(bias), 2),
                    full_well=float(sim["full_well"]),
                )
            )
    return pd.DataFrame(rows)


def _mag_powerlaw(rng, n, mmin, mmax, slope):
    """n magnitudes with dN/dm ~ 10**(slope m) between mmin and mmax."""
    a, b = 10 ** (slope * mmin), 10 ** (slope * mmax)
    return np.log10(a + rng.uniform(size=n) * (b - a)) / slope


def _field_box(sim: dict) -> tuple[float, float]:
    """Half-widths (arcsec) in x and y of the sky area that any visit can see."""
    fr = [detector_centre(sim, d) for d in range(sim["n_detectors"])]
    hx = max(abs(c[0]) for c in fr) + sim["nx"] / 2
    hy = max(abs(c[1]) for c in fr) + sim["ny"] / 2
    # Rotations move the corners; dithers shift everything; keep a margin.
    rot = math.radians(sim["rotation_deg"])
    hx, hy = hx * math.cos(rot) + hy * math.sin(rot), hy * math.cos(rot) + hx * math.sin(rot)
    margin = sim["dither_arcsec"] + 20.0
    return hx * sim["pixel_scale"] + margin, hy * sim["pixel_scale"] + margin


def _offset_radec(ra0, dec0, dx_arcsec, dy_arcsec):
    """Gnomonic offsets (arcsec, x towards +RA, y towards +Dec) -> (ra, dec) in degrees."""
    xi = np.radians(np.asarray(dx_arcsec, float) / 3600.0)
    eta = np.radians(np.asarray(dy_arcsec, float) / 3600.0)
    ra0r, dec0r = math.radians(ra0), math.radians(dec0)
    denom = math.cos(dec0r) - eta * math.sin(dec0r)
    ra = ra0r + np.arctan2(xi, denom)
    dec = np.arctan2(math.sin(dec0r) + eta * math.cos(dec0r), np.hypot(xi, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _visit_table(sim: dict, seed: int) -> pd.DataFrame:
    nt, ns = sim["n_template_visits"], sim["n_science_visits"]
    bands = list(sim["bands"])
    rows = []
    for v in range(nt + ns):
        rng = rng_for(seed, "visit", visit=v)
        template = v < nt
        if template:
            # Two visits a night, half an hour apart, on the first nights.
            day = v // 2 + 0.02 * (v % 2)
            seeing = rng.uniform(*sim["seeing_template"])
        else:
            i = v - nt
            span = sim["survey_days"] - sim["science_start_day"]
            day = sim["science_start_day"] + span * (i // 2) / max(1, (ns - 1) // 2) + 0.02 * (i % 2)
            seeing = rng.uniform(*sim["seeing_science"])
        mjd = sim["start_mjd"] + day + rng.uniform(0.0, 0.004)
        airmass = rng.uniform(*sim["airmass_range"])
        transparency = abs(rng.normal(0.0, sim["transparency_scatter"]))
        zp = (
            sim["zeropoint"]
            + 2.5 * math.log10(sim["exptime"])
            - sim["extinction"] * (airmass - 1.0)
            - transparency
        )
        sky_mag = sim["sky_mag"] + rng.normal(0.0, sim["sky_mag_scatter"])
        sky = 10 ** (-0.4 * (sky_mag - zp)) * sim["pixel_scale"] ** 2
        gang = rng.uniform(0, 2 * math.pi)
        gamp = rng.uniform(0.3, 1.0) * sim["sky_gradient"]
        dx, dy = rng.uniform(-1, 1, size=2) * sim["dither_arcsec"]
        if v == 0:
            dx = dy = 0.0
        ra, dec = _offset_radec(sim["field_ra"], sim["field_dec"], dx, dy)
        rot = rng.uniform(-1, 1) * sim["rotation_deg"]
        perr = sim["pointing_error_arcsec"] * math.sqrt(rng.uniform())
        pang = rng.uniform(0, 2 * math.pi)
        hra, hdec = _offset_radec(float(ra), float(dec), perr * math.cos(pang), perr * math.sin(pang))
        e1, e2 = rng.normal(0.0, sim["psf_ellipticity_visit"], size=2)
        sat_u = float(rng.uniform())
        sat = sat_u < sim["satellite_probability"]
        sat_dx, sat_dy = rng.uniform(-1, 1, size=2) * np.array(_field_box(sim)) * 0.5
        sra, sdec = _offset_radec(float(ra), float(dec), sat_dx, sat_dy)
        sat_mag = rng.uniform(*sim["satellite_mag_range"])
        rows.append(
            dict(
                visit=v,
                band=bands[v % len(bands)],
                is_template=template,
                mjd=round(mjd, 6),
                exptime=float(sim["exptime"]),
                darktime=float(sim["exptime"] + sim["dark_overhead"]),
                airmass=round(airmass, 4),
                seeing=round(seeing, 4),
                psf_e1=float(e1),
                psf_e2=float(e2),
                zeropoint=float(zp),
                transparency=float(transparency),
                sky_mag=float(sky_mag),
                sky=float(sky),
                sky_grad_x=float(gamp * math.cos(gang)),
                sky_grad_y=float(gamp * math.sin(gang)),
                ra=float(ra),
                dec=float(dec),
                rotation=float(rot),
                pointing_err_arcsec=float(perr),
                header_ra=float(hra),
                header_dec=float(hdec),
                sat_trail=sat,
                sat_ra=float(sra),
                sat_dec=float(sdec),
                sat_pa=float(rng.uniform(0, 180)),
                sat_flux=float(10 ** (-0.4 * (sat_mag - zp)) * sim["pixel_scale"]),
                sat_u=sat_u,
            )
        )
    visits = pd.DataFrame(rows)
    # "Occasional" but never absent: if chance gave no trail, the science visit with the lowest draw gets one.
    sci = ~visits["is_template"]
    if sim["satellite_probability"] > 0 and not visits["sat_trail"].any() and sci.any():
        visits.loc[visits.loc[sci, "sat_u"].idxmin(), "sat_trail"] = True
    visits.loc[~visits["sat_trail"], "sat_flux"] = 0.0
    return visits.drop(columns="sat_u")


def _source_table(sim: dict, seed: int, visits: pd.DataFrame) -> pd.DataFrame:
    """Stars, galaxies and transients with their parameters (one row each)."""
    hx, hy = _field_box(sim)
    area_deg2 = 4 * hx * hy / 3600.0**2
    ra0, dec0 = sim["field_ra"], sim["field_dec"]
    blocks = []

    def add(kind, n, rng, mag, **extra):
        dx = rng.uniform(-hx, hx, size=n)
        dy = rng.uniform(-hy, hy, size=n)
        ra, dec = _offset_radec(ra0, dec0, dx, dy)
        block = dict(kind=np.full(n, kind, dtype=object), ra=ra, dec=dec, mag=np.asarray(mag, float))
        block.update(extra)
        blocks.append(pd.DataFrame(block))

    # Stars: power-law counts, plus a few bright ones that saturate.
    rng = rng_for(seed, "stars")
    n_star = rng.poisson(sim["star_density"] * area_deg2)
    add("star", n_star, rng, _mag_powerlaw(rng, n_star, *sim["star_mag_range"], sim["star_count_slope"]))
    rng = rng_for(seed, "bright_stars")
    nb = sim["n_bright_stars"]
    add("star", nb, rng, rng.uniform(*sim["bright_star_mag_range"], size=nb))

    # Galaxies: Sersic profiles, size shrinking with magnitude.
    rng = rng_for(seed, "galaxies")
    n_gal = rng.poisson(sim["galaxy_density"] * area_deg2)
    gmag = _mag_powerlaw(rng, n_gal, *sim["galaxy_mag_range"], sim["galaxy_count_slope"])
    reff = np.clip(
        sim["galaxy_reff_arcsec"] * 10 ** (-0.15 * (gmag - 20.0)) * 10 ** rng.normal(0, 0.2, n_gal), 0.1, 4.0
    )
    add(
        "galaxy",
        n_gal,
        rng,
        gmag,
        sersic_n=rng.uniform(0.6, 4.0, n_gal),
        reff=reff,
        q=rng.uniform(0.3, 1.0, n_gal),
        pa=rng.uniform(0, 180, n_gal),
    )
    table = pd.concat(blocks, ignore_index=True)
    table.insert(0, "source_id", np.arange(1, len(table) + 1, dtype=np.int64))

    mjd_last = visits["mjd"].max()
    transients = []
    # Supernovae in galaxies brighter than the host limit, offset from the centre.
    rng = rng_for(seed, "supernovae")
    hosts = table[(table["kind"] == "galaxy") & (table["mag"] < sim["sn_host_mag_max"])]
    mjd_last_template = visits.loc[visits["is_template"], "mjd"].max()
    tau_rise = rng.uniform(1.5, 4.0, min(sim["n_supernovae"], len(hosts)))
    nsn = min(sim["n_supernovae"], len(hosts))
    if nsn:
        pick = hosts.iloc[rng.choice(len(hosts), nsn, replace=False)]
        r = pick["reff"].to_numpy() * rng.uniform(0.3, 1.5, nsn)
        ang = rng.uniform(0, 2 * np.pi, nsn)
        dra = r * np.cos(ang) / 3600.0 / np.cos(np.radians(pick["dec"].to_numpy()))
        ddec = r * np.sin(ang) / 3600.0
        transients.append(
            pd.DataFrame(
                dict(
                    kind="sn",
                    ra=pick["ra"].to_numpy() + dra,
                    dec=pick["dec"].to_numpy() + ddec,
                    mag=rng.uniform(*sim["sn_peak_mag_range"], nsn),
                    host_id=pick["source_id"].to_numpy(),
                    # Explosion (t0 - 4 tau_rise) after the last template visit: templates hold no SN light.
                    t0=rng.uniform(mjd_last_template + 0.5, mjd_last - 1.0, nsn) + 4 * tau_rise,
                    tau_rise=tau_rise,
                    tau_fall=rng.uniform(15.0, 40.0, nsn),
                )
            )
        )
    # Variable stars: sinusoidal in magnitude.
    rng = rng_for(seed, "variables")
    n = sim["n_variables"]
    dx, dy = rng.uniform(-hx, hx, n), rng.uniform(-hy, hy, n)
    ra, dec = _offset_radec(ra0, dec0, dx, dy)
    transients.append(
        pd.DataFrame(
            dict(
                kind="variable",
                ra=ra,
                dec=dec,
                mag=rng.uniform(17.0, 21.0, n),
                amplitude=rng.uniform(0.1, 1.0, n),
                period=10 ** rng.uniform(-1, 1, n),
                t0=rng.uniform(0, 10, n) + sim["start_mjd"],
            )
        )
    )
    # Flares: a quiescent star that brightens fast just before one science visit.
    rng = rng_for(seed, "flares")
    n = sim["n_flares"]
    sci_mjd = visits.loc[~visits["is_template"], "mjd"].to_numpy()
    dx, dy = rng.uniform(-hx, hx, n), rng.uniform(-hy, hy, n)
    ra, dec = _offset_radec(ra0, dec0, dx, dy)
    tpeak = (rng.choice(sci_mjd, n) if len(sci_mjd) else np.full(n, mjd_last)) - rng.uniform(0, 0.02, n)
    transients.append(
        pd.DataFrame(
            dict(
                kind="flare",
                ra=ra,
                dec=dec,
                mag=rng.uniform(19.0, 22.5, n),
                amplitude=rng.uniform(1.0, 3.0, n),
                t0=tpeak,
                tau_fall=rng.uniform(0.005, 0.04, n),
            )
        )
    )
    # Moving objects: on the field at one visit, moving 5-60 arcsec/hour.
    rng = rng_for(seed, "movers")
    n = sim["n_movers"]
    dx, dy = rng.uniform(-hx, hx, n) * 0.8, rng.uniform(-hy, hy, n) * 0.8
    ra, dec = _offset_radec(ra0, dec0, dx, dy)
    speed = rng.uniform(5.0, 60.0, n) / 3600.0 * 24.0  # deg/day
    ang = rng.uniform(0, 2 * np.pi, n)
    transients.append(
        pd.DataFrame(
            dict(
                kind="mover",
                ra=ra,
                dec=dec,
                mag=rng.uniform(19.0, 22.5, n),
                t0=rng.choice(visits["mjd"].to_numpy(), n),
                rate_ra=speed * np.cos(ang),
                rate_dec=speed * np.sin(ang),
            )
        )
    )
    tr = pd.concat([t for t in transients if len(t)], ignore_index=True)
    tr.insert(0, "source_id", np.arange(len(table) + 1, len(table) + len(tr) + 1, dtype=np.int64))
    out = pd.concat([table, tr], ignore_index=True)
    for c in ("sersic_n", "reff", "q", "pa", "t0", "tau_rise", "tau_fall", "amplitude", "period", "rate_ra", "rate_dec"):
        if c not in out:
            out[c] = np.nan
        out[c] = out[c].astype(float)
    out["host_id"] = out["host_id"].fillna(-1).astype(np.int64) if "host_id" in out else -1
    out["kind"] = out["kind"].astype(str)
    cols_order = ["source_id", "kind", "ra", "dec", "mag", "host_id", "sersic_n", "reff", "q", "pa",
                  "t0", "tau_rise", "tau_fall", "amplitude", "period", "rate_ra", "rate_dec"]
    return out[cols_order]


def light_curve_mag(sources: pd.DataFrame, mjd: float) -> np.ndarray:
    """AB magnitude of every source at time ``mjd`` (inf where it emits nothing)."""
    mag = sources["mag"].to_numpy(float).copy()
    kind = sources["kind"].to_numpy()
    t0 = sources["t0"].to_numpy(float)
    sn = kind == "sn"
    if sn.any():
        # Bazin (2009) shape, scaled so its maximum is the peak magnitude; nothing before the
        # explosion at t0 - 4 tau_rise (where the Bazin curve is at ~2% of its peak).
        tr, tf = sources["tau_rise"].to_numpy(float)[sn], sources["tau_fall"].to_numpy(float)[sn]

        def bazin(t):
            return np.exp(-t / tf) / (1 + np.exp(-t / tr))

        tpk = tr * np.log(tf / tr - 1)
        rel = bazin(mjd - t0[sn]) / bazin(tpk)
        rel = np.where(mjd < t0[sn] - 4 * tr, 0.0, rel)
        with np.errstate(divide="ignore"):
            mag[sn] = np.where(rel > 1e-6, mag[sn] - 2.5 * np.log10(np.clip(rel, 1e-300, None)), np.inf)
    var = kind == "variable"
    if var.any():
        amp, per = sources["amplitude"].to_numpy(float)[var], sources["period"].to_numpy(float)[var]
        mag[var] += amp * np.sin(2 * np.pi * (mjd - t0[var]) / per)
    fl = kind == "flare"
    if fl.any():
        dt = mjd - t0[fl]
        boost = np.where(dt >= 0, (10 ** (0.4 * sources["amplitude"].to_numpy(float)[fl]) - 1)
                         * np.exp(-np.clip(dt, 0, None) / sources["tau_fall"].to_numpy(float)[fl]), 0.0)
        mag[fl] -= 2.5 * np.log10(1 + boost)
    return mag


def source_positions(sources: pd.DataFrame, mjd: float) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of every source at ``mjd`` (movers move)."""
    ra = sources["ra"].to_numpy(float).copy()
    dec = sources["dec"].to_numpy(float).copy()
    mv = sources["kind"].to_numpy() == "mover"
    if mv.any():
        dt = mjd - sources["t0"].to_numpy(float)[mv]
        dec[mv] += sources["rate_dec"].to_numpy(float)[mv] * dt
        ra[mv] += sources["rate_ra"].to_numpy(float)[mv] * dt / np.cos(np.radians(dec[mv]))
    return ra, dec


def _refcat(sim: dict, seed: int, sources: pd.DataFrame) -> pd.DataFrame:
    """Gaia-like reference catalog: stars brighter than refcat_mag_max, noisy positions and mags."""
    rng = rng_for(seed, "refcat")
    sel = sources[sources["kind"].isin(["star", "variable", "flare"]) & (sources["mag"] < sim["refcat_mag_max"])]
    mag = sel["mag"].to_numpy()
    # Gaia DR3-like: ~0.02 mas at G=15 growing to ~0.5 mas at G=20, plus a floor (epoch propagation).
    pos_err = np.hypot(0.02 * 10 ** (0.2 * np.clip(mag - 15, 0, None) * 1.4), sim["refcat_pos_floor_mas"])
    mag_err = 0.0003 + 0.003 * 10 ** (0.4 * (mag - 19.0))
    dec = sel["dec"].to_numpy() + rng.normal(0, 1, len(sel)) * pos_err / 3.6e6
    ra = sel["ra"].to_numpy() + rng.normal(0, 1, len(sel)) * pos_err / 3.6e6 / np.cos(np.radians(dec))
    out = pd.DataFrame(
        dict(
            id=sel["source_id"].to_numpy(np.int64),
            ra=ra,
            dec=dec,
            ra_err=pos_err,
            dec_err=pos_err,
        )
    )
    for band in sim["bands"]:
        out[f"{band}_mag"] = mag + rng.normal(0, 1, len(sel)) * mag_err
        out[f"{band}_magErr"] = mag_err
    return out.reset_index(drop=True)


def plan_survey(cfg: dict, seed=None) -> SurveyPlan:
    """Draw the survey: visits, sources (with transients), amplifiers, reference catalog.

    ``cfg`` is the pipeline config (or its ``simulate`` block); ``seed`` the
    master seed (default: ``cfg['seed']``).  Cheap: no pixels are made.
    """
    sim = sim_config(cfg)
    seed = _seed_of(cfg, seed)
    visits = _visit_table(sim, seed)
    sources = _source_table(sim, seed, visits)
    amps = _amp_table(sim, seed)
    refcat = _refcat(sim, seed, sources)
    plan = SurveyPlan(sim, seed, visits, sources, amps, refcat)
    plan.fluxes = truth_fluxes(plan)
    return plan


def truth_fluxes(plan: SurveyPlan) -> pd.DataFrame:
    """Every source on every exposure: position (pixels), flux (e-, nJy), magnitude."""
    parts = []
    for v in plan.visits["visit"]:
        for d in range(plan.sim["n_detectors"]):
            t = exposure_sources(plan, int(v), d, margin=0.0)
            parts.append(t[["source_id", "visit", "detector", "x", "y", "mag", "flux", "flux_nJy"]])
    return pd.concat(parts, ignore_index=True)


def mid_exposure_mjd(vrow) -> float:
    """MJD at the middle of a visit's exposure (the epoch of its truth positions and fluxes)."""
    return float(vrow["mjd"]) + float(vrow["exptime"]) / 2 / 86400.0


def exposure_sources(plan: SurveyPlan, visit: int, detector: int, margin: float = 0.0) -> pd.DataFrame:
    """Sources whose centre falls on (visit, detector) within ``margin`` pixels of its edge.

    Columns: source_id, kind, host_id, ra, dec (at the visit's MJD), mag, flux (e-,
    flat-fielded), flux_nJy, x, y (0-based pixels), and the galaxy shape.
    """
    key = ("expsrc", int(visit), int(detector), float(margin))
    if key in plan._cache:
        return plan._cache[key]
    sim = plan.sim
    vrow = plan.visit_row(visit)
    src = plan.sources
    # Positions and brightnesses at mid-exposure (movers trail, flares fade during it).
    mjd_mid = mid_exposure_mjd(vrow)
    ra, dec = source_positions(src, mjd_mid)
    mag = light_curve_mag(src, mjd_mid)
    # Cheap cut on the undistorted (TAN) position first, then the exact inverse for candidates.
    xl, yl = header_wcs(plan, visit, detector, true_pointing=True).wcs_world2pix(ra, dec, 0)
    lim = 50.0 + margin + abs(sim["distortion_px"]) * 3
    cand = (xl > -lim) & (xl < sim["nx"] + lim) & (yl > -lim) & (yl < sim["ny"] + lim) & np.isfinite(mag)
    idx = np.flatnonzero(cand)
    x, y = sky_to_pixel(plan, visit, detector, ra[idx], dec[idx])
    inside = (x >= -0.5 - margin) & (x < sim["nx"] - 0.5 + margin) & (y >= -0.5 - margin) & (y < sim["ny"] - 0.5 + margin)
    idx, x, y = idx[inside], x[inside], y[inside]
    zp = float(vrow["zeropoint"])
    flux = 10 ** (-0.4 * (mag[idx] - zp))
    out = pd.DataFrame(
        dict(
            source_id=src["source_id"].to_numpy()[idx],
            visit=np.full(len(idx), int(visit), np.int64),
            detector=np.full(len(idx), int(detector), np.int64),
            kind=src["kind"].to_numpy()[idx],
            host_id=src["host_id"].to_numpy()[idx],
            ra=ra[idx],
            dec=dec[idx],
            x=x,
            y=y,
            mag=mag[idx],
            flux=flux,
            flux_nJy=flux * 10 ** (-0.4 * (zp - NJY_ZP)),
            sersic_n=src["sersic_n"].to_numpy()[idx],
            reff=src["reff"].to_numpy()[idx],
            q=src["q"].to_numpy()[idx],
            pa=src["pa"].to_numpy()[idx],
        )
    )
    plan._cache[key] = out
    return out


def write_plan(plan: SurveyPlan, paths: dict) -> None:
    """Write the truth tables and refcat (Parquet) to ``paths[dataset_type]``."""
    tables = {
        "truth_visits": plan.visits,
        "truth_sources": plan.sources,
        "truth_amps": plan.amps,
        "truth_fluxes": plan.fluxes if plan.fluxes is not None else truth_fluxes(plan),
        "refcat": plan.refcat,
    }
    for name, table in tables.items():
        if name in paths and paths[name] is not None:
            write_parquet(table.reset_index(drop=True), paths[name])


def load_plan(cfg: dict, paths: dict, seed=None) -> SurveyPlan:
    """Reload a plan written by ``write_plan`` (``paths``: dataset type -> file).

    Needs truth_visits, truth_sources and truth_amps; truth_fluxes and refcat
    are read when given.
    """
    sim = sim_config(cfg)
    seed = _seed_of(cfg, seed)
    tables = {}
    for name in PLAN_TABLES:
        p = paths.get(name)
        if p is None:
            if name in ("truth_visits", "truth_sources", "truth_amps"):
                raise DiapipeError(f"load_plan needs the {name} table")
            continue
        try:
            tables[name] = pd.read_parquet(p)
        except (OSError, ValueError) as exc:
            raise DiapipeError(f"cannot read {name} ({exc})", p) from exc
    return SurveyPlan(
        sim,
        seed,
        tables["truth_visits"],
        tables["truth_sources"],
        tables["truth_amps"],
        tables.get("refcat", pd.DataFrame()),
        tables.get("truth_fluxes"),
    )


# --------------------------------------------------------------------- WCS
def _cd_matrix(scale_arcsec: float, rotation_deg: float) -> np.ndarray:
    """CD matrix (deg/pixel): north up, east left, rotated by ``rotation_deg``."""
    s = scale_arcsec / 3600.0
    c, n = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return s * np.array([[-c, n], [n, c]])


def _crpix(sim: dict, detector: int) -> tuple[float, float]:
    """FITS (1-based) pixel of the optical axis in a detector's frame."""
    cx, cy = detector_centre(sim, detector)
    return (sim["nx"] + 1) / 2 - cx, (sim["ny"] + 1) / 2 - cy


def distortion_k(sim: dict) -> float:
    """Radial cubic coefficient: displacement = k r^3 (pixels), distortion_px at the focal-plane corner."""
    return sim["distortion_px"] / focal_plane_radius(sim) ** 3


def true_wcs(plan: SurveyPlan, visit: int, detector: int) -> WCS:
    """The exact TAN-SIP WCS (order 3) of one exposure, on the assembled detector grid."""
    key = ("wcs", int(visit), int(detector))
    if key in plan._cache:
        return plan._cache[key]
    sim = plan.sim
    vrow = plan.visit_row(visit)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [float(vrow["ra"]), float(vrow["dec"])]
    crpix = _crpix(sim, detector)
    w.wcs.crpix = list(crpix)
    w.wcs.cd = _cd_matrix(sim["pixel_scale"], float(vrow["rotation"]))
    w.wcs.radesys = "ICRS"
    k = distortion_k(sim)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    # u' = u + k u (u^2 + v^2),  v' = v + k v (u^2 + v^2): radial cubic about the optical axis.
    a[3, 0] = a[1, 2] = k
    b[2, 1] = b[0, 3] = k
    ikey = ("inverse_sip", int(detector))
    if ikey not in plan._cache:
        plan._cache[ikey] = _inverse_sip(sim, detector, k)
    ap, bp = plan._cache[ikey]
    w.sip = Sip(a, b, ap, bp, crpix)
    w.pixel_shape = (sim["nx"], sim["ny"])
    w.wcs.set()
    plan._cache[key] = w
    return w


def sky_to_pixel(plan: SurveyPlan, visit: int, detector: int, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """Exact inverse of the true WCS: (ra, dec) in degrees -> 0-based pixel (x, y).

    The distortion is radial about the optical axis, r' = r (1 + k r^2), so the
    inverse is a 1-D cubic solved by Newton's method (to 1e-10 px), not the
    general SIP iteration (which can diverge far outside small detectors).
    """
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    if ra.size == 0:
        return np.empty(0), np.empty(0)
    lin = header_wcs(plan, visit, detector, true_pointing=True)
    xl, yl = lin.wcs_world2pix(ra, dec, 0)
    c1, c2 = _crpix(plan.sim, detector)
    up, vp = xl + 1 - c1, yl + 1 - c2
    rp = np.hypot(up, vp)
    k = distortion_k(plan.sim)
    r = rp.copy()
    for _ in range(50):
        f = r + k * r**3 - rp
        r_new = r - f / (1 + 3 * k * r**2)
        if np.max(np.abs(r_new - r)) < 1e-10:
            r = r_new
            break
        r = r_new
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(rp > 0, r / rp, 1.0)
    return up * scale + c1 - 1, vp * scale + c2 - 1


def _inverse_sip(sim, detector, k, order=5):
    """AP/BP polynomials (fitted) so that DS9 and wcs_world2pix-style tools invert well."""
    crpix = _crpix(sim, detector)
    xs = np.linspace(-0.5, sim["nx"] - 0.5, 24) + 1 - crpix[0]
    ys = np.linspace(-0.5, sim["ny"] - 0.5, 24) + 1 - crpix[1]
    u, v = [g.ravel() for g in np.meshgrid(xs, ys)]
    r2 = u * u + v * v
    U, V = u + k * u * r2, v + k * v * r2
    terms = [(p, q) for p in range(order + 1) for q in range(order + 1 - p)]
    A = np.stack([U**p * V**q for p, q in terms], axis=1)
    su = np.abs(A).max(axis=0)
    su[su == 0] = 1
    cu = np.linalg.lstsq(A / su, u - U, rcond=None)[0] / su
    cv = np.linalg.lstsq(A / su, v - V, rcond=None)[0] / su
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    for (p, q), cuu, cvv in zip(terms, cu, cv):
        ap[p, q], bp[p, q] = cuu, cvv
    return ap, bp


def header_wcs(plan: SurveyPlan, visit: int, detector: int, true_pointing: bool = False) -> WCS:
    """The rough TAN WCS a telescope writes: no distortion, CRVAL off by the pointing error.

    With ``true_pointing`` the CRVAL is the true one: the true WCS without its SIP terms.
    """
    sim = plan.sim
    vrow = plan.visit_row(visit)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    if true_pointing:
        w.wcs.crval = [float(vrow["ra"]), float(vrow["dec"])]
    else:
        w.wcs.crval = [float(vrow["header_ra"]), float(vrow["header_dec"])]
    w.wcs.crpix = list(_crpix(sim, detector))
    w.wcs.cd = _cd_matrix(sim["pixel_scale"], float(vrow["rotation"]))
    w.wcs.radesys = "ICRS"
    return w


# --------------------------------------------------------------------- PSF
@functools.lru_cache(maxsize=64)
def _fwhm_factor(beta: float, wing_fraction: float, wing_scale: float, wing_beta: float) -> float:
    """FWHM of the double Moffat whose core has FWHM 1."""
    ac = 1.0 / (2 * math.sqrt(2 ** (1 / beta) - 1))
    aw = wing_scale / (2 * math.sqrt(2 ** (1 / wing_beta) - 1))

    def prof(r):
        return (1 - wing_fraction) * (beta - 1) / ac**2 * (1 + (r / ac) ** 2) ** (-beta) + wing_fraction * (
            wing_beta - 1
        ) / aw**2 * (1 + (r / aw) ** 2) ** (-wing_beta)

    half = 0.5 * prof(0.0)
    lo, hi = 0.0, 10.0 * wing_scale  # bisection: the profile falls monotonically
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if prof(mid) > half else (lo, mid)
    return lo + hi


def psf_params(plan: SurveyPlan, visit: int, detector: int, x, y) -> dict:
    """PSF parameters at detector positions (x, y): FWHM (pixels), axis ratio, angle, Moffat alphas."""
    sim = plan.sim
    vrow = plan.visit_row(visit)
    fx, fy = to_focal(sim, detector, x, y)
    rr = (fx**2 + fy**2) / focal_plane_radius(sim) ** 2
    fwhm = float(vrow["seeing"]) / sim["pixel_scale"] * (1 + sim["psf_fwhm_variation"] * rr)
    phi = np.arctan2(fy, fx)
    er = sim["psf_ellipticity"] * rr
    e1 = float(vrow["psf_e1"]) + er * np.cos(2 * phi)
    e2 = float(vrow["psf_e2"]) + er * np.sin(2 * phi)
    g = np.clip(np.hypot(e1, e2), 0, 0.5)
    beta, wf, ws, wb = sim["psf_beta"], sim["psf_wing_fraction"], sim["psf_wing_scale"], sim["psf_wing_beta"]
    fcore = fwhm / _fwhm_factor(beta, wf, ws, wb)
    return dict(
        fwhm=fwhm,
        q=(1 - g) / (1 + g),
        theta=0.5 * np.arctan2(e2, e1),
        alpha_c=fcore / (2 * math.sqrt(2 ** (1 / beta) - 1)),
        alpha_w=ws * fcore / (2 * math.sqrt(2 ** (1 / wb) - 1)),
        beta=beta,
        wing_fraction=wf,
        wing_beta=wb,
    )


def _scalar_params(p: dict) -> dict:
    return {k: float(np.asarray(v).ravel()[0]) for k, v in p.items()}


def psf_profile(dx, dy, p: dict):
    """The continuous PSF (per unit pixel area, unit integral) at offsets (dx, dy) pixels."""
    c, s = math.cos(p["theta"]), math.sin(p["theta"])
    u = dx * c + dy * s
    v = -dx * s + dy * c
    # Area-preserving ellipse: major axis along u, geometric-mean FWHM = p['fwhm'].
    r2 = u * u * p["q"] + v * v / p["q"]
    b, bw = p["beta"], p["wing_beta"]
    core = (b - 1) / (math.pi * p["alpha_c"] ** 2) * (1 + r2 / p["alpha_c"] ** 2) ** (-b)
    wing = (bw - 1) / (math.pi * p["alpha_w"] ** 2) * (1 + r2 / p["alpha_w"] ** 2) ** (-bw)
    return (1 - p["wing_fraction"]) * core + p["wing_fraction"] * wing


def _sub_offsets(os_: int) -> np.ndarray:
    return (np.arange(os_) + 0.5) / os_ - 0.5


def psf_stamp(p: dict, half: int, dx: float = 0.0, dy: float = 0.0, os_core: int = 5) -> np.ndarray:
    """Pixel-integrated PSF on a (2 half + 1)^2 stamp, centred at (dx, dy) from the central pixel.

    Unit-integral normalisation (the stamp sums to < 1 by the flux beyond it).
    The core (within ~1.5 FWHM) is integrated on an os_core^2 sub-grid; the
    wings, where the profile is smooth, are sampled at pixel centres.
    """
    n = 2 * half + 1
    g = np.arange(-half, half + 1, dtype=float)
    img = psf_profile(g[None, :] - dx, g[:, None] - dy, p)
    hc = min(half, int(math.ceil(1.5 * p["fwhm"])) + 1)
    sub = _sub_offsets(os_core)
    gc = np.arange(-hc, hc + 1, dtype=float)
    xs = (gc[:, None] + sub[None, :]).ravel() - dx
    ys = (gc[:, None] + sub[None, :]).ravel() - dy
    core = psf_profile(xs[None, :], ys[:, None], p)
    m = 2 * hc + 1
    core = core.reshape(m, os_core, m, os_core).mean(axis=(1, 3))
    img[half - hc : half + hc + 1, half - hc : half + hc + 1] = core
    assert img.shape == (n, n)
    return img


def true_fwhm(plan: SurveyPlan, visit: int, detector: int, x, y) -> float:
    """FWHM (pixels) of the true PSF at (x, y): geometric mean of the major and minor axes."""
    p = psf_params(plan, visit, detector, x, y)
    f = p["fwhm"]
    return float(f) if np.ndim(f) == 0 else f


def true_psf_image(plan: SurveyPlan, visit: int, detector: int, x, y, size: int = 41) -> np.ndarray:
    """The true PSF at detector position (x, y), pixel-integrated, centred on the stamp's central pixel, unit sum."""
    if size % 2 == 0:
        raise ValueError("PSF stamp size must be odd")
    p = _scalar_params(psf_params(plan, visit, detector, x, y))
    img = psf_stamp(p, size // 2)
    return img / img.sum()


def pixel_psf(plan: SurveyPlan, visit: int, detector: int, size: int | None = None, order: int = 2) -> PixelPsf:
    """A PixelPsf (polynomial of order ``order`` in x, y) fitted to the true PSF on a 5x5 grid."""
    sim = plan.sim
    if size is None:
        size = int(2 * math.ceil(3 * sim["seeing_science"][1] / sim["pixel_scale"] * 1.3) + 1)
    gx = np.linspace(0, sim["nx"] - 1, 5)
    gy = np.linspace(0, sim["ny"] - 1, 5)
    xx, yy = [a.ravel() for a in np.meshgrid(gx, gy)]
    stamps = np.stack([true_psf_image(plan, visit, detector, x, y, size) for x, y in zip(xx, yy)])
    x0, y0, sx, sy = (sim["nx"] - 1) / 2, (sim["ny"] - 1) / 2, sim["nx"] / 2, sim["ny"] / 2
    design = poly_design(xx, yy, order, x0, y0, sx, sy)
    coef = np.linalg.lstsq(design, stamps.reshape(len(xx), -1), rcond=None)[0]
    return PixelPsf(coef.reshape(-1, size, size), order, x0, y0, sx, sy)


# --------------------------------------------------------------------- rendering
def _add_stamp(img: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    """Add ``stamp`` centred on pixel (ix, iy) into ``img``, clipped at the edges."""
    h = stamp.shape[0] // 2
    ny, nx = img.shape
    x0, x1 = ix - h, ix + h + 1
    y0, y1 = iy - h, iy + h + 1
    sx0, sy0 = max(0, -x0), max(0, -y0)
    sx1 = stamp.shape[1] - max(0, x1 - nx)
    sy1 = stamp.shape[0] - max(0, y1 - ny)
    if sx1 <= sx0 or sy1 <= sy0:
        return
    img[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)] += stamp[sy0:sy1, sx0:sx1]


def _star_half(p: dict, flux: float, cap: int) -> int:
    """Stamp half-size: 5 FWHM, or out to where the wing drops below 0.3 e-/pixel."""
    h = 5 * p["fwhm"]
    aw, bw = p["alpha_w"], p["wing_beta"]
    peak_w = flux * p["wing_fraction"] * (bw - 1) / (math.pi * aw**2)
    if peak_w > 0.3:
        h = max(h, aw * math.sqrt((peak_w / 0.3) ** (1 / bw) - 1))
    return int(min(cap, math.ceil(h)))


def _sersic_b(n):
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n * n)


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT-friendly size)."""
    best = 1 << (n - 1).bit_length()
    f5 = 1
    while f5 < best:
        f35 = f5
        while f35 < best:
            m = f35
            while m < n:
                m *= 2
            best = min(best, m)
            f35 *= 3
        f5 *= 5
    return best


def _render_galaxy(p_psf: dict, kernel_cache: dict, cell, row, dx, dy) -> np.ndarray:
    """Sersic galaxy (sum = 1) convolved with the PSF, pixel-integrated, centred at (dx, dy).

    The profile is sampled on an os x os sub-grid per pixel (finer for small
    galaxies, whose centres are steep), convolved with the PSF sampled on the
    same grid (FFT; the kernel's transform is cached per detector cell and
    size), then binned to pixels.
    """
    reff = row["reff_px"]
    n = row["sersic_n"]
    os_ = 3 if reff < 2.0 else (2 if reff < 5.0 else 1)
    h = int(np.clip(math.ceil(3 * reff * (1 + 0.5 * n) + 1.5 * p_psf["fwhm"]), 6, 64))
    h = next(b for b in (8, 12, 16, 24, 32, 48, 64) if b >= h)  # few sizes: cached kernels
    m = 2 * h + 1
    sub = _sub_offsets(os_)
    g = (np.arange(-h, h + 1)[:, None] + sub[None, :]).ravel()
    X, Y = g[None, :] - dx, g[:, None] - dy
    c, s = math.cos(row["theta"]), math.sin(row["theta"])
    u = X * c + Y * s
    v = -X * s + Y * c
    r = np.sqrt(u * u + (v / row["q"]) ** 2)
    gal = np.exp(-_sersic_b(n) * ((r / reff) ** (1 / n) - 1))
    hk = int(math.ceil(2.0 * p_psf["fwhm"] * os_))
    nfft = _fast_len(m * os_ + 2 * hk)
    key = (cell, os_, nfft)
    if key not in kernel_cache:
        gk = np.arange(-hk, hk + 1) / os_
        k = psf_profile(gk[None, :], gk[:, None], p_psf)
        kernel_cache[key] = (np.fft.rfft2(k / k.sum(), (nfft, nfft)), hk)
    kf, hk = kernel_cache[key]
    full = np.fft.irfft2(np.fft.rfft2(gal, (nfft, nfft)) * kf, (nfft, nfft))
    conv = full[hk : hk + m * os_, hk : hk + m * os_]
    out = conv.reshape(m, os_, m, os_).sum(axis=(1, 3))
    out = np.clip(out, 0, None)
    return out / out.sum()


def render_sky(plan: SurveyPlan, visit: int, detector: int) -> np.ndarray:
    """The noiseless true image (e-, flat-fielded frame): sky + sources + transients + satellite trail."""
    sim = plan.sim
    vrow = plan.visit_row(visit)
    nx, ny = sim["nx"], sim["ny"]
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    fx, fy = to_focal(sim, detector, xx, yy)
    R = focal_plane_radius(sim)
    img = (float(vrow["sky"]) * (1 + float(vrow["sky_grad_x"]) * fx / R + float(vrow["sky_grad_y"]) * fy / R)).astype(
        np.float64
    )
    del xx, yy, fx, fy
    cap = max(32, int(sim["max_stamp_half"]))
    src = exposure_sources(plan, visit, detector, margin=60.0)
    ix = np.floor(src["x"].to_numpy() + 0.5).astype(int)
    iy = np.floor(src["y"].to_numpy() + 0.5).astype(int)
    ddx = src["x"].to_numpy() - ix
    ddy = src["y"].to_numpy() - iy
    flux = src["flux"].to_numpy()
    kind = src["kind"].to_numpy()
    pp = psf_params(plan, visit, detector, src["x"].to_numpy(), src["y"].to_numpy())
    keys = ("fwhm", "q", "theta", "alpha_c", "alpha_w")
    # Galaxy shapes: sky position angle (east of north) -> angle in pixel axes via the CD matrix.
    w = true_wcs(plan, visit, detector)
    cd_inv = np.linalg.inv(w.wcs.cd)
    kernel_cache: dict = {}
    cell_size = max(128, nx // 4)
    for i in range(len(src)):
        if flux[i] <= 0:
            continue
        p = dict(pp)
        for k in keys:
            p[k] = float(pp[k][i])
        if kind[i] == "galaxy":
            pa = math.radians(src["pa"].iat[i])
            d = cd_inv @ np.array([-math.sin(pa), math.cos(pa)])  # east is -x at zero rotation
            row = dict(
                reff_px=max(src["reff"].iat[i] / sim["pixel_scale"], 0.3),
                sersic_n=src["sersic_n"].iat[i],
                q=src["q"].iat[i],
                theta=math.atan2(d[1], d[0]),
            )
            cell = (ix[i] // cell_size, iy[i] // cell_size)
            stamp = _render_galaxy(p, kernel_cache, cell, row, ddx[i], ddy[i])
            _add_stamp(img, flux[i] * stamp, ix[i], iy[i])
        elif kind[i] == "mover":
            # Trailed: the flux spread over PSFs every <= 0.5 px along the path during the exposure.
            h = _star_half(p, flux[i], cap)
            path_x, path_y = _mover_path(plan, visit, detector, int(src["source_id"].iat[i]))
            for xs, ys in zip(path_x, path_y):
                jx, jy = int(math.floor(xs + 0.5)), int(math.floor(ys + 0.5))
                stamp = psf_stamp(p, h, xs - jx, ys - jy)
                _add_stamp(img, flux[i] / len(path_x) * stamp, jx, jy)
        else:
            h = _star_half(p, flux[i], cap)
            stamp = psf_stamp(p, h, ddx[i], ddy[i])
            _add_stamp(img, flux[i] * stamp, ix[i], iy[i])
    if bool(vrow["sat_trail"]):
        _add_satellite(img, plan, visit, detector, vrow)
    return img


def _mover_path(plan, visit, detector, source_id) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions of a moving object sampled evenly (<= 0.5 px apart) over the exposure."""
    vrow = plan.visit_row(visit)
    row = plan.sources[plan.sources["source_id"] == source_id]
    t0 = float(vrow["mjd"])
    t1 = t0 + float(vrow["exptime"]) / 86400.0
    ends = [source_positions(row, t) for t in (t0, t1)]
    (xa,), (ya,) = sky_to_pixel(plan, visit, detector, *ends[0])
    (xb,), (yb,) = sky_to_pixel(plan, visit, detector, *ends[1])
    n = max(1, int(math.ceil(math.hypot(xb - xa, yb - ya) / 0.5)) + 1)
    # Midpoints of n equal time steps: their mean is the mid-exposure position (the truth).
    t = (np.arange(n) + 0.5) / n
    return xa + t * (xb - xa), ya + t * (yb - ya)


def satellite_line(plan, visit, detector) -> tuple[float, float, float, float, float] | None:
    """The visit's satellite trail on a detector: (x0, y0, nx, ny, sigma) or None.

    A pixel (x, y) is at signed distance (x - x0) nx + (y - y0) ny (pixels)
    from the trail's centre line; the cross-section is a Gaussian of ``sigma``
    (pixels, the seeing) carrying ``sat_flux`` e- per pixel of length.
    """
    vrow = plan.visit_row(visit)
    if not bool(vrow["sat_trail"]):
        return None
    w = true_wcs(plan, visit, detector)
    pa = math.radians(float(vrow["sat_pa"]))
    ra0, dec0 = float(vrow["sat_ra"]), float(vrow["sat_dec"])
    ra1, dec1 = _offset_radec(ra0, dec0, -600 * math.sin(pa), 600 * math.cos(pa))
    (x0, x1), (y0, y1) = w.wcs_world2pix([ra0, float(ra1)], [dec0, float(dec1)], 0)
    nrm = math.hypot(x1 - x0, y1 - y0)
    sigma = float(vrow["seeing"]) / plan.sim["pixel_scale"] / 2.3548
    return float(x0), float(y0), float(-(y1 - y0) / nrm), float((x1 - x0) / nrm), sigma


def _add_satellite(img, plan, visit, detector, vrow) -> None:
    """A satellite trail: a straight line with a Gaussian cross-section of the PSF's width."""
    x0, y0, nxv, nyv, sigma = satellite_line(plan, visit, detector)
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    dist = (xx - x0) * nxv + (yy - y0) * nyv
    near = np.abs(dist) < 6 * sigma
    img[near] += float(vrow["sat_flux"]) * np.exp(-0.5 * (dist[near] / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)


# --------------------------------------------------------------------- detector effects
@dataclass
class DetectorDefects:
    """Fixed per-detector artefacts (electrons / seconds / booleans on the assembled grid)."""

    hot_rate: np.ndarray  # extra dark current (e-/s) of hot pixels and hot columns
    bad: np.ndarray  # True where the pixel is defective (BAD plane)
    bias_structure: np.ndarray  # fixed bias pattern (ADU), same in every frame


@functools.lru_cache(maxsize=8)
def _defects_cached(sim_json: str, seed: int, detector: int) -> DetectorDefects:
    sim = json.loads(sim_json)
    nx, ny = sim["nx"], sim["ny"]
    rng = rng_for(seed, "defects", detector=detector)
    hot = np.zeros((ny, nx), np.float32)
    bad = np.zeros((ny, nx), bool)
    nhot = rng.poisson(sim["hot_pixel_fraction"] * nx * ny)
    hi = rng.integers(0, nx * ny, nhot)
    lo, hi_rate = sim["hot_pixel_rate_range"]
    hot.flat[hi] = np.exp(rng.uniform(math.log(lo), math.log(hi_rate), nhot))
    bad.flat[hi] = True
    # Bad columns: half hot (charge injection from a trap up the column), half dead (in the flat).
    for j in range(sim["n_bad_columns"]):
        col = int(rng.integers(2, nx - 2))
        y0 = int(rng.integers(0, ny // 2)) if rng.uniform() < 0.5 else 0
        if j % 2 == 0:
            hot[y0:, col] += rng.uniform(*sim["hot_pixel_rate_range"]) * 0.5
        bad[y0:, col] = True
    # Fixed bias structure: a column pattern and a decaying ramp at the start of the readout.
    struct = np.broadcast_to(rng.normal(0.0, sim["bias_structure"], nx)[None, :], (ny, nx)).astype(np.float32)
    ramp = (4.0 * sim["bias_structure"] * np.exp(-np.arange(ny) / 15.0)).astype(np.float32)
    struct = struct + ramp[:, None]
    return DetectorDefects(hot, bad, struct)


def detector_defects(plan_or_sim, seed: int, detector: int) -> DetectorDefects:
    sim = plan_or_sim.sim if isinstance(plan_or_sim, SurveyPlan) else plan_or_sim
    return _defects_cached(json.dumps(sim, sort_keys=True), int(seed), int(detector))


@functools.lru_cache(maxsize=8)
def _flat_cached(sim_json: str, seed: int, detector: int, band: str) -> tuple[np.ndarray, np.ndarray]:
    sim = json.loads(sim_json)
    nx, ny = sim["nx"], sim["ny"]
    rng = rng_for(seed, "flat", detector=detector, band=band)
    drng = rng_for(seed, "defects", detector=detector)
    # Vignetting: smooth radial fall-off across the whole focal plane.
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    fx, fy = to_focal(sim, detector, xx, yy)
    rr = (fx**2 + fy**2) / focal_plane_radius(sim) ** 2
    resp = (1.0 - sim["vignetting"] * rr).astype(np.float32)
    del xx, yy, fx, fy, rr
    # Pixel response non-uniformity (per pixel, Gaussian).
    resp *= (1.0 + sim["prnu"] * rng.standard_normal((ny, nx))).astype(np.float32)
    # Dust donuts: out-of-focus shadows, annuli a few per cent deep.
    for _ in range(sim["n_dust"]):
        cx, cy = rng.uniform(0, nx), rng.uniform(0, ny)
        rad = rng.uniform(15, 60)
        depth = rng.uniform(0.02, 0.08)
        h = int(rad * 1.3) + 2
        x0, x1 = max(0, int(cx) - h), min(nx, int(cx) + h + 1)
        y0, y1 = max(0, int(cy) - h), min(ny, int(cy) + h + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        sy, sx = np.mgrid[y0:y1, x0:x1]
        r = np.hypot(sx - cx, sy - cy)
        ring = np.exp(-0.5 * ((r - 0.7 * rad) / (0.25 * rad)) ** 2) * (r < rad * 1.2)
        resp[y0:y1, x0:x1] *= (1 - depth * ring).astype(np.float32)
    # Dead pixels and dead columns respond little or not at all.
    dead = np.zeros((ny, nx), bool)
    nd = drng.poisson(sim["dead_pixel_fraction"] * nx * ny)
    dead.flat[drng.integers(0, nx * ny, nd)] = True
    defects = detector_defects(sim, seed, detector)
    hot_col = defects.hot_rate > 0
    dead_cols = defects.bad & ~hot_col
    resp[dead] = 0.0
    resp[dead_cols] *= 0.3
    good = ~(dead | defects.bad)
    resp /= np.median(resp[good])
    return resp, dead


def flat_response(plan_or_sim, seed: int, detector: int, band: str) -> tuple[np.ndarray, np.ndarray]:
    """(R, dead): the flat response (median 1 over good pixels) and the dead-pixel map."""
    sim = plan_or_sim.sim if isinstance(plan_or_sim, SurveyPlan) else plan_or_sim
    return _flat_cached(json.dumps(sim, sort_keys=True), int(seed), int(detector), str(band))


def cosmic_rays(sim: dict, rng, shape, exptime: float) -> np.ndarray:
    """Charge (e-) deposited by cosmic rays: straight tracks of random length and angle, diffused a little."""
    ny, nx = shape
    n = rng.poisson(sim["cr_rate"] * nx * ny / 1e6 * max(exptime, 0.0))
    dep = np.zeros(shape, np.float64)
    if n == 0:
        return dep
    length = rng.exponential(sim["cr_mean_length"], n)
    ang = rng.uniform(0, np.pi, n)
    charge = np.exp(rng.normal(math.log(sim["cr_charge"]), 0.5, n)) * (1 + length / 4)
    x0, y0 = rng.uniform(0, nx, n), rng.uniform(0, ny, n)
    for i in range(n):
        ns = max(2, int(length[i] * 10))
        t = np.linspace(0, 1, ns)
        xs = x0[i] + t * length[i] * math.cos(ang[i])
        ys = y0[i] + t * length[i] * math.sin(ang[i])
        q = charge[i] / ns
        # Charge diffusion: 85% in the pixel, 15% shared by the 4 neighbours.
        for ddx, ddy, f in ((0, 0, 0.85), (1, 0, 0.0375), (-1, 0, 0.0375), (0, 1, 0.0375), (0, -1, 0.0375)):
            px = np.floor(xs + 0.5).astype(int) + ddx
            py = np.floor(ys + 0.5).astype(int) + ddy
            ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
            np.add.at(dep, (py[ok], px[ok]), q * f)
    return dep


def bleed(electrons: np.ndarray, full_well: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip at full well and spill the excess charge up and down the column (in place).

    Returns (sat, spill): ``sat`` the pixels that reached the full well (cores
    and trails), ``spill`` the partly filled pixel at each end of a trail (it
    holds spilled charge, so it is not to be trusted, but it is not saturated).
    """
    spill = np.zeros(electrons.shape, bool)
    for col in np.flatnonzero((electrons > full_well).any(axis=0)):
        c = electrons[:, col]
        for y0, y1 in _runs(c > full_well):  # [y0, y1)
            excess = float(np.sum(c[y0:y1] - full_well))
            c[y0:y1] = full_well
            for direction in (1, -1):
                remaining = excess / 2
                idx = np.arange(y1, len(c)) if direction == 1 else np.arange(y0 - 1, -1, -1)
                if len(idx) == 0 or remaining <= 0:
                    continue
                room = np.clip(full_well - c[idx], 0, None)
                cum = np.cumsum(room)
                nfull = int(np.searchsorted(cum, remaining))
                c[idx[:nfull]] = full_well
                if nfull < len(idx):
                    c[idx[nfull]] += remaining - (cum[nfull - 1] if nfull > 0 else 0.0)
                    spill[idx[nfull], col] = True
        electrons[:, col] = c
    sat = electrons >= full_well
    return sat, spill & ~sat


def _runs(b: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate([[0], b.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


# --------------------------------------------------------------------- raw frames
def amp_layout(sim: dict) -> list[dict]:
    """Per amplifier: raw data columns, overscan columns and assembled columns (0-based, half-open)."""
    w = sim["nx"] // sim["n_amps"]
    nos = sim["n_overscan"]
    out = []
    for a in range(sim["n_amps"]):
        r0 = a * (w + nos)
        out.append(dict(amp=AMP_NAMES[a], raw_data=(r0, r0 + w), raw_overscan=(r0 + w, r0 + w + nos), det=(a * w, (a + 1) * w)))
    return out


def _sec(x0, x1, ny) -> str:
    """IRAF section (1-based, inclusive) for columns [x0, x1) and all rows."""
    return f"[{x0 + 1}:{x1}, 1:{ny}]".replace(" ", "")


def _bias_drift(sim, rng, ny) -> np.ndarray:
    """A slow row-dependent bias drift (ADU): a random quadratic (Legendre) in row."""
    t = np.linspace(-1, 1, ny)
    c1, c2 = rng.normal(0, sim["bias_drift"], 2)
    return c1 * t + c2 * (1.5 * t * t - 0.5)


def assemble_raw(sim: dict, amps: pd.DataFrame, electrons: np.ndarray, defects: DetectorDefects, rng) -> np.ndarray:
    """Electrons on the assembled grid -> raw uint16 frame with overscan (bias, drift, read noise)."""
    ny, nx = electrons.shape
    layout = amp_layout(sim)
    nos = sim["n_overscan"]
    raw = np.empty((ny, sim["n_amps"] * (nx // sim["n_amps"] + nos)), np.float64)
    jitter = rng.normal(0.0, sim["bias_jitter"], len(layout))
    for lay, (_, amp), jit in zip(layout, amps.iterrows(), jitter):
        gain, rn = float(amp["gain"]), float(amp["read_noise"])
        row_bias = float(amp["bias_level"]) + jit + _bias_drift(sim, rng, ny)
        d0, d1 = lay["det"]
        r0, r1 = lay["raw_data"]
        o0, o1 = lay["raw_overscan"]
        raw[:, r0:r1] = (
            electrons[:, d0:d1] / gain
            + row_bias[:, None]
            + defects.bias_structure[:, d0:d1]
            + rng.normal(0.0, rn / gain, (ny, d1 - d0))
        )
        raw[:, o0:o1] = row_bias[:, None] + rng.normal(0.0, rn / gain, (ny, o1 - o0))
    return np.clip(np.floor(raw + 0.5), 0, 65535).astype(np.uint16)


def raw_header(plan_or_sim, amps: pd.DataFrame, detector: int, kind: str, mjd: float, exptime: float,
               darktime: float, band: str, airmass: float = 1.0, expnum: int = -1) -> fits.Header:
    """The headers a real camera writes (no truth values beyond what a camera knows)."""
    sim = plan_or_sim.sim if isinstance(plan_or_sim, SurveyPlan) else plan_or_sim
    h = fits.Header()
    h["TELESCOP"] = ("DIAPIPE-SIM", "simulated 1-m class telescope")
    h["INSTRUME"] = ("SIMCAM", "simulated multi-CCD camera")
    h["OBSTYPE"] = (kind, "object, bias, dark or flat")
    h["IMAGETYP"] = (kind, "same as OBSTYPE")
    h["OBJECT"] = ("SIMFIELD" if kind == "object" else kind.upper(), "target name")
    t = Time(mjd, format="mjd", scale="utc")
    h["DATE-OBS"] = (t.isot, "UTC start of exposure")
    h["MJD-OBS"] = (round(float(mjd), 8), "MJD (UTC) start of exposure")
    h["EXPTIME"] = (float(exptime), "[s] exposure time")
    h["DARKTIME"] = (float(darktime), "[s] dark current integration time")
    h["FILTER"] = (band, "filter")
    h["AIRMASS"] = (round(float(airmass), 4), "airmass at start")
    h["DETECTOR"] = (int(detector), "detector number")
    h["CCDNAME"] = (f"CCD{detector:02d}", "detector name")
    h["EXPNUM"] = (int(expnum), "exposure number (= visit)")
    layout = amp_layout(sim)
    ny = sim["ny"]
    h["NAMPS"] = (len(layout), "number of amplifiers")
    h["DETSIZE"] = (f"[1:{sim['nx']},1:{ny}]", "assembled, trimmed detector size")
    gains, rns, sats = [], [], []
    for lay, (_, amp) in zip(layout, amps.iterrows()):
        L = lay["amp"]
        h[f"DATASEC{L}"] = (_sec(*lay["raw_data"], ny), f"amp {L} data in this raw frame")
        h[f"BIASSEC{L}"] = (_sec(*lay["raw_overscan"], ny), f"amp {L} overscan columns")
        h[f"DETSEC{L}"] = (_sec(*lay["det"], ny), f"amp {L} place in the assembled image")
        gain = float(amp["gain"])
        h[f"GAIN{L}"] = (gain, f"[e-/ADU] amp {L} gain")
        h[f"RDNOISE{L}"] = (float(amp["read_noise"]), f"[e-] amp {L} read noise")
        # Raw ADU (bias included) above which the pixel is saturated: full well less a margin for
        # read noise and the bias drift, so every truly saturated pixel reads above it.
        sat = int(float(amp["bias_level"]) + float(amp["full_well"]) / gain
                  - 5 * float(amp["read_noise"]) / gain - 3 * sim["bias_drift"] - 3 * sim["bias_jitter"])
        h[f"SATURAT{L}"] = (min(sat, 65535), f"[ADU] amp {L} saturation (raw, with bias)")
        gains.append(gain)
        rns.append(float(amp["read_noise"]))
        sats.append(min(sat, 65535))
    h["GAIN"] = (round(float(np.mean(gains)), 4), "[e-/ADU] mean gain of the amps")
    h["RDNOISE"] = (round(float(np.mean(rns)), 3), "[e-] mean read noise of the amps")
    h["SATURATE"] = (int(min(sats)), "[ADU] lowest amp saturation level (raw)")
    return h


def _add_pointing(h: fits.Header, wcs: WCS, ra: float, dec: float) -> None:
    h["RA"] = (Angle(ra, "deg").to_string(unit="hourangle", sep=":", precision=2, pad=True), "telescope RA (J2000)")
    h["DEC"] = (Angle(dec, "deg").to_string(unit="deg", sep=":", precision=1, alwayssign=True, pad=True),
                "telescope Dec (J2000)")
    h["EQUINOX"] = 2000.0
    for card in wcs.to_header().cards:
        if card.keyword in ("MJDREF", "DATEREF", "MJD-OBS", "DATE-OBS", "WCSAXES"):
            continue
        h[card.keyword] = (card.value, card.comment)
    h.add_comment("The WCS is rough (telescope pointing, no distortion) and refers to the")
    h.add_comment("ASSEMBLED, TRIMMED ny x nx detector image (DETSEC), not to this raw frame.")


def simulate_raw(cfg, plan: SurveyPlan, visit: int, detector: int) -> tuple[fits.HDUList, Exposure]:
    """One raw science frame and its truth Exposure (``cfg`` may be None: the plan holds the config).

    Returns (raw HDUList: uint16 with overscan, real-camera headers;
    truth Exposure: noiseless image in e- in the flat-fielded frame, true
    BAD/SAT/CR mask, expected variance, true TAN-SIP WCS, PixelPsf, MAGZERO).
    """
    # The plan carries the config it was drawn with: its camera is the one the truth tables describe.
    sim = plan.sim
    visit, detector = int(visit), int(detector)
    if detector < 0 or detector >= sim["n_detectors"]:
        raise DiapipeError(f"no detector {detector} in a camera of {sim['n_detectors']}",
                           data_id={"visit": visit, "detector": detector})
    vrow = plan.visit_row(visit)
    amps = plan.amp_rows(detector)
    band = str(vrow["band"])
    truth = render_sky(plan, visit, detector)
    resp, dead = flat_response(sim, plan.seed, detector, band)
    defects = detector_defects(sim, plan.seed, detector)
    darktime = float(vrow["darktime"])
    dark_e = (sim["dark_current"] + defects.hot_rate) * darktime
    rng = rng_for(plan.seed, "raw", visit=visit, detector=detector)
    expected = resp * truth + dark_e
    electrons = rng.poisson(expected).astype(np.float64)
    cr = cosmic_rays(sim, rng, truth.shape, float(vrow["exptime"]))
    electrons += cr
    full_well = float(amps["full_well"].iloc[0])
    sat, spill = bleed(electrons, full_well)
    raw = assemble_raw(sim, amps, electrons, defects, rng)

    header = raw_header(sim, amps, detector, "object", vrow["mjd"], vrow["exptime"], darktime, band,
                        vrow["airmass"], visit)
    # A pixel reading at or above its amp's SATURATE is saturated as far as anyone can tell
    # (a few near-full-well pixels do, with read noise): SAT = full well reached OR raw >= SATURATE.
    for lay in amp_layout(sim):
        (d0, d1), (r0, r1) = lay["det"], lay["raw_data"]
        sat[:, d0:d1] |= raw[:, r0:r1] >= header[f"SATURAT{lay['amp']}"]
    spill &= ~sat
    _add_pointing(header, header_wcs(plan, visit, detector), float(vrow["header_ra"]), float(vrow["header_dec"]))
    hdul = fits.HDUList([fits.PrimaryHDU(raw, header=header)])

    # Truth: the calibrated (flat-fielded, e-) expectation, its variance and its masks.
    rn2 = np.empty(sim["nx"], np.float64)  # read noise^2 (e-^2) per column
    for lay, (_, amp) in zip(amp_layout(sim), amps.iterrows()):
        rn2[lay["det"][0] : lay["det"][1]] = float(amp["read_noise"]) ** 2
    raw_var = expected + rn2[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = np.where(resp > 0, raw_var / (resp * resp), 1e10).astype(np.float32)
    mask = np.zeros(truth.shape, masks.MASK_DTYPE)
    masks.set_plane(mask, defects.bad | dead, "BAD")
    masks.set_plane(mask, sat, "SAT")
    masks.set_plane(mask, spill, "SUSPECT")
    hit = np.nonzero(cr)
    crmask = np.zeros(truth.shape, bool)
    crmask[hit] = cr[hit] > sim["cr_mask_nsigma"] * np.sqrt(raw_var[hit])
    masks.set_plane(mask, crmask, "CR")
    del raw_var
    zp = float(vrow["zeropoint"])
    meta = {
        "visit": visit,
        "detector": detector,
        "band": band,
        "MJD-OBS": float(vrow["mjd"]),
        "EXPTIME": float(vrow["exptime"]),
        "MAGZERO": zp,
        "SEEING": float(vrow["seeing"]),
        "FWHMPIX": true_fwhm(plan, visit, detector, (sim["nx"] - 1) / 2, (sim["ny"] - 1) / 2),
        "SKYLEVEL": float(vrow["sky"]),
        "AIRMASS": float(vrow["airmass"]),
        "BUNIT": "electron",
        "TRUTH": True,
    }
    exp = Exposure(
        MaskedImage(truth.astype(np.float32), mask, variance),
        wcs=true_wcs(plan, visit, detector),
        psf=pixel_psf(plan, visit, detector),
        metadata=meta,
    )
    return hdul, exp


def calib_mjd(sim: dict, kind: str, detector: int, seq: int) -> float:
    """Calibrations are taken the afternoon (bias, dark) and evening twilight (flat) before the survey."""
    base = sim["start_mjd"] - 1.0
    off = {"bias": 0.70, "dark": 0.72, "flat": 0.95}[kind]
    return base + off + seq * 0.002 + detector * 1e-5


def simulate_calib(cfg, kind: str, detector: int, seq: int, band: str | None = None, seed=None) -> fits.HDUList:
    """One raw calibration frame: kind 'bias', 'dark' (DARKTIME = dark_exptime) or 'flat' (twilight, ``band``)."""
    sim = sim_config(cfg)
    seed = _seed_of(cfg, seed)
    detector, seq = int(detector), int(seq)
    if kind not in ("bias", "dark", "flat"):
        raise DiapipeError(f"unknown calibration kind {kind!r} (bias, dark, flat)")
    if kind == "flat" and band is None:
        raise DiapipeError("a flat needs a band", data_id={"detector": detector, "seq": seq})
    amps = _amp_table(sim, seed)
    amps = amps[amps["detector"] == detector].sort_values("amp")
    if len(amps) == 0:
        raise DiapipeError(f"no detector {detector}", data_id={"detector": detector})
    defects = detector_defects(sim, seed, detector)
    shape = (sim["ny"], sim["nx"])
    did = dict(kind=kind, detector=detector, seq=seq, band=band or "")
    rng = rng_for(seed, "calib", **did)
    if kind == "bias":
        exptime = darktime = 0.0
        expected = np.zeros(shape)
    elif kind == "dark":
        exptime = darktime = float(sim["dark_exptime"])
        expected = (sim["dark_current"] + defects.hot_rate) * darktime
    else:
        exptime = float(sim["flat_exptime"])
        darktime = exptime + sim["dark_overhead"]
        resp, _ = flat_response(sim, seed, detector, band)
        level = sim["flat_level"] * rng.uniform(0.8, 1.2)
        expected = resp * level + (sim["dark_current"] + defects.hot_rate) * darktime
    electrons = rng.poisson(expected).astype(np.float64)
    electrons += cosmic_rays(sim, rng, shape, exptime if kind != "bias" else 0.0)
    bleed(electrons, float(sim["full_well"]))
    raw = assemble_raw(sim, amps, electrons, defects, rng)
    mjd = calib_mjd(sim, kind, detector, seq)
    header = raw_header(sim, amps, detector, kind, mjd, exptime, darktime, band or "none")
    return fits.HDUList([fits.PrimaryHDU(raw, header=header)])


# --------------------------------------------------------------------- whole survey
def calib_frames(cfg) -> list[dict]:
    """Every calibration frame of the survey as dataIds {kind, detector, seq, band}."""
    sim = sim_config(cfg)
    out = []
    for d in range(sim["n_detectors"]):
        out += [dict(kind="bias", detector=d, seq=s, band=None) for s in range(sim["n_bias"])]
        out += [dict(kind="dark", detector=d, seq=s, band=None) for s in range(sim["n_dark"])]
        for b in sim["bands"]:
            out += [dict(kind="flat", detector=d, seq=s, band=b) for s in range(sim["n_flat"])]
    return out


def write_raw(cfg, plan, visit, detector, raw_path, truth_path) -> None:
    raw, truth = simulate_raw(cfg, plan, visit, detector)
    write_fits(raw, raw_path)
    truth.write(truth_path)


def simulate_survey(cfg: dict, butler, seed=None) -> dict:
    """Write the whole survey (truth tables, refcat, calibration raws, science raws) through ``butler``."""
    seed = _seed_of(cfg, seed)
    plan = plan_survey(cfg, seed)
    paths = {n: butler.get(n) for n in PLAN_TABLES}
    write_plan(plan, paths)
    counts = {"raw": 0, "calib": 0}
    for c in calib_frames(cfg):
        kind = c["kind"]
        ds = {"bias": "raw_bias", "dark": "raw_dark", "flat": "raw_flat"}[kind]
        write_fits(simulate_calib(cfg, kind, c["detector"], c["seq"], c["band"], seed=seed),
                   butler.get(ds, detector=c["detector"], seq=c["seq"], band=c["band"]))
        counts["calib"] += 1
    for v in plan.visits["visit"]:
        for d in range(plan.sim["n_detectors"]):
            write_raw(cfg, plan, int(v), d, butler.get("raw", visit=int(v), detector=d),
                      butler.get("truth_exposure", visit=int(v), detector=d))
            counts["raw"] += 1
    return counts


# --------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write the simulated survey (plan, raw frames, calibration frames, truth)",
        description="Write the simulated survey of a config. Without --visit/--detector/--kind, everything.",
    )
    p.add_argument("action", nargs="?", default="all", choices=["all", "plan", "raw", "calib", "check"],
                   help="what to write (default: all); 'check' measures a written survey against its truth")
    p.add_argument("--config", action="append", default=None,
                   help="config YAML (repeat to overlay; default config/config.yaml)")
    p.add_argument("--out-dir", default=".", help="root directory for the dataset paths (default: .)")
    p.add_argument("--seed", type=int, default=None, help="override the config seed")
    p.add_argument("--visit", type=int, help="raw: only this visit")
    p.add_argument("--detector", type=int, help="raw/calib/check: only this detector")
    p.add_argument("--report", help="check: write the summary (JSON) and tables (Parquet) beside this path")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from .butler import Butler
    from .config import load
    from .logs import setup

    setup()
    cfg = load(*(args.config or ["config/config.yaml"]))
    if args.seed is not None:
        cfg["seed"] = args.seed
    butler = Butler(cfg["datasets"], root=args.out_dir)
    seed = cfg["seed"]
    if args.action == "check":
        return _cli_check(args, cfg, butler)
    if args.action == "all" and args.visit is None and args.detector is None:
        counts = simulate_survey(cfg, butler, seed)
        log.info("wrote %d raw and %d calibration frames under %s", counts["raw"], counts["calib"], args.out_dir)
        return 0
    paths = {n: butler.get(n) for n in PLAN_TABLES}
    if args.action in ("plan", "all"):
        plan = plan_survey(cfg, seed)
        write_plan(plan, paths)
    if args.action in ("raw", "all"):
        plan = load_plan(cfg, paths, seed)
        visits = [args.visit] if args.visit is not None else list(plan.visits["visit"])
        dets = [args.detector] if args.detector is not None else range(plan.sim["n_detectors"])
        for v in visits:
            for d in dets:
                write_raw(cfg, plan, v, d, butler.get("raw", visit=v, detector=d),
                          butler.get("truth_exposure", visit=v, detector=d))
    if args.action in ("calib", "all"):
        for c in calib_frames(cfg):
            if args.detector is not None and c["detector"] != args.detector:
                continue
            ds = {"bias": "raw_bias", "dark": "raw_dark", "flat": "raw_flat"}[c["kind"]]
            write_fits(simulate_calib(cfg, c["kind"], c["detector"], c["seq"], c["band"], seed=seed),
                       butler.get(ds, detector=c["detector"], seq=c["seq"], band=c["band"]))
    return 0


def _cli_check(args, cfg, butler) -> int:
    import time

    from . import simulate_checks
    from .fileio import write_text

    t0 = time.monotonic()
    visits = [args.visit] if args.visit is not None else None
    dets = [args.detector] if args.detector is not None else None
    rep = simulate_checks.survey_report(cfg, butler, visits, dets)
    rep["summary"]["check_wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(rep["summary"], indent=2)
    print(text)
    if args.report:
        from pathlib import Path

        write_text(text + "\n", args.report)
        for name, table in rep["tables"].items():
            write_parquet(table, Path(args.report).with_suffix(f".{name}.parquet"))
    return 0
