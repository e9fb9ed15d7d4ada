"""Injection of fake point sources into science calexps (before subtraction).

Each fake is the calexp's own PSF at the fake's position (sub-pixel shifted),
scaled to a flux chosen for a target optimal S/N in the calexp,

    S/N_opt = flux / sqrt(1 / sum(P^2 / V))   (P the local PSF, V the calexp variance),

drawn log-uniformly between ``snr_min`` and ``snr_max``.  Half are placed at
random isolated positions (away from catalogued sources, bad pixels and the
edge), half in galaxies (hosts) from the truth tables or the calexp's source
catalog, offset from the centre by up to ``host_offset`` effective radii.  The injected signal gets Poisson noise (the fake's
own photon noise, in electrons) and its expectation is added to the VARIANCE
plane; pixels above 2% of each fake's peak get the INJECTED mask plane.  The
fakes table records what was injected (truth for completeness and for
training real/bogus).  All draws come from ``rng_for(seed, "fakes", visit=,
detector=)``: same config, same fakes.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd

from . import masks
from .exposure import Exposure
from .fileio import DiapipeError, write_parquet
from .seeds import rng_for

log = logging.getLogger("diapipe.fakes")

DEFAULTS = {
    "n_isolated": 100,
    "n_hosts": 50,
    "snr_min": 2.0,
    "snr_max": 50.0,
    "margin": 20,
    "min_separation": 15.0,
    "host_mag_max": 23.0,
    "host_offset": 1.5,
    "injected_fraction": 0.02,
}

#: Fakes table columns: name -> (unit, description).
FAKES_COLUMNS = {
    "fakeId": ("", "Unique id: visit * 10^8 + detector * 10^5 + index (same scheme as diaSourceId)."),
    "visit": ("", "Visit number."),
    "detector": ("", "Detector number."),
    "band": ("", "Filter band."),
    "kind": ("", "'isolated' or 'host' (placed in a galaxy, within host_offset effective radii of its centre)."),
    "hostId": ("", "source_id of the host galaxy (-1 for isolated fakes)."),
    "x": ("pixel", "Column of the injected centre (0-based)."),
    "y": ("pixel", "Row of the injected centre (0-based)."),
    "ra": ("deg", "Right ascension from the calexp WCS."),
    "dec": ("deg", "Declination from the calexp WCS."),
    "flux": ("electron", "Injected flux in the calexp (expectation, before Poisson noise)."),
    "flux_nJy": ("nJy", "Injected flux calibrated with the calexp's MAGZERO."),
    "mag": ("mag(AB)", "Injected AB magnitude."),
    "snrTarget": ("", "Target optimal S/N in the calexp (log-uniform in [snr_min, snr_max])."),
    "snrCalexp": ("", "Optimal S/N in the calexp at the chosen flux, flux * sqrt(sum P^2 / V)."),
}


def _local_psf(exposure: Exposure, x, y):
    from .measure import _ShiftablePsf

    return _ShiftablePsf(exposure.psf.image(x, y))


def optimal_snr_unit(exposure: Exposure, x: float, y: float, pix=None) -> float:
    """sqrt(sum(P^2 / V)) at (x, y): the optimal S/N of a 1-electron point source.

    ``pix`` (measure._Pixels of the exposure) avoids recomputing the valid-pixel map per call.
    """
    from .measure import _Pixels

    sp = _local_psf(exposure, x, y)
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    _, w, _ = (pix or _Pixels(exposure)).stamp(ix, iy, sp.half)
    p = sp.shifted(x - ix, y - iy)
    return float(np.sqrt((w * p * p).sum()))


def choose_positions(exposure: Exposure, n_isolated: int, hosts: pd.DataFrame | None, n_hosts: int,
                     rng: np.random.Generator, margin: float = 20, min_separation: float = 15.0,
                     avoid_xy: np.ndarray | None = None, host_offset: float = 1.5) -> pd.DataFrame:
    """Fake positions: DataFrame(x, y, kind, hostId).

    Isolated fakes avoid ``avoid_xy`` (e.g. all catalogued sources), masked
    pixels and each other by ``min_separation`` pixels; host fakes sit in the
    galaxies of ``hosts`` (columns x, y and optional source_id, reff in arcsec),
    also kept apart from each other: offset from the centre in a random
    direction by reff x U(0, ``host_offset``), as supernovae are (at the
    centre when reff is unknown or ``host_offset`` is 0).  Fakes only at
    centres teach a classifier that a real transient sits exactly on its host's
    nucleus, and it then scores supernovae off their hosts' centres as bogus.
    """
    ny, nx = exposure.shape
    bad = masks.is_set(exposure.mask, *masks.BAD_PLANES)
    taken = np.empty((0, 2)) if avoid_xy is None else np.asarray(avoid_xy, float).reshape(-1, 2)
    placed = []

    def free(x, y, others):
        return not len(others) or np.min(np.hypot(others[:, 0] - x, others[:, 1] - y)) >= min_separation

    rows = []
    if hosts is not None and len(hosts) and n_hosts > 0:
        h = hosts[(hosts["x"] > margin) & (hosts["x"] < nx - 1 - margin)
                  & (hosts["y"] > margin) & (hosts["y"] < ny - 1 - margin)]
        order = rng.permutation(len(h))
        reff_px = None
        if "reff" in h and exposure.wcs is not None:
            from .warp import pixel_scale_arcsec

            reff_px = np.nan_to_num(h["reff"].to_numpy(float)) / pixel_scale_arcsec(exposure.wcs.celestial)
        for k in order:
            if len(rows) >= n_hosts:
                break
            x, y = float(h["x"].iloc[k]), float(h["y"].iloc[k])
            if host_offset > 0 and reff_px is not None:
                r = reff_px[k] * rng.uniform(0.0, host_offset)
                ang = rng.uniform(0.0, 2 * np.pi)
                x, y = x + r * np.cos(ang), y + r * np.sin(ang)
                if not (margin < x < nx - 1 - margin and margin < y < ny - 1 - margin):
                    continue
            if bad[int(round(y)), int(round(x))] or not free(x, y, np.asarray(placed).reshape(-1, 2)):
                continue
            placed.append((x, y))
            hid = int(h["source_id"].iloc[k]) if "source_id" in h else -1
            rows.append((x, y, "host", hid))
    n_iso = 0
    tries = 0
    while n_iso < n_isolated and tries < 50 * max(1, n_isolated):
        tries += 1
        x, y = rng.uniform(margin, nx - 1 - margin), rng.uniform(margin, ny - 1 - margin)
        if bad[int(round(y)), int(round(x))]:
            continue
        if not free(x, y, taken) or not free(x, y, np.asarray(placed).reshape(-1, 2)):
            continue
        placed.append((x, y))
        rows.append((x, y, "isolated", -1))
        n_iso += 1
    if n_iso < n_isolated:
        log.warning("placed only %d of %d isolated fakes (crowded or masked detector)", n_iso, n_isolated)
    return pd.DataFrame(rows, columns=["x", "y", "kind", "hostId"])


def inject(exposure: Exposure, fakes: pd.DataFrame, rng: np.random.Generator,
           injected_fraction: float = 0.02) -> Exposure:
    """A copy of ``exposure`` with point sources fakes.flux (e-) at fakes.x, fakes.y added.

    Signal with Poisson noise goes into the image, its expectation into the
    variance, and pixels above ``injected_fraction`` of a fake's peak into INJECTED.
    """
    if exposure.psf is None:
        raise DiapipeError("calexp has no PSF model; cannot inject fakes", None, exposure.data_id)
    out = exposure.copy()
    ny, nx = out.shape
    for x, y, flux in zip(fakes["x"], fakes["y"], fakes["flux"]):
        sp = _local_psf(out, x, y)
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        model = np.clip(flux * sp.shifted(x - ix, y - iy), 0, None)  # Fourier ringing is ~1e-6
        h = sp.half
        y0, x0 = iy - h, ix - h
        ya, yb, xa, xb = max(0, y0), min(ny, y0 + sp.size), max(0, x0), min(nx, x0 + sp.size)
        m = model[ya - y0 : yb - y0, xa - x0 : xb - x0]
        out.image[ya:yb, xa:xb] += rng.poisson(m).astype(np.float32)
        out.variance[ya:yb, xa:xb] += m.astype(np.float32)
        inj = m >= injected_fraction * model.max()
        out.mask[ya:yb, xa:xb][inj] |= masks.MASK_DTYPE(masks.bit("INJECTED"))
    out.metadata["NFAKES"] = int(len(fakes))
    return out


def make_fakes(calexp: Exposure, config: dict | None = None, seed: int = 0,
               hosts: pd.DataFrame | None = None, avoid_xy=None, path=None):
    """Choose, size and inject fakes into a calexp; return (calexp_with_fakes, fakes table)."""
    cfg = {**DEFAULTS, **(config or {})}
    if calexp.psf is None:
        raise DiapipeError("calexp has no PSF model; cannot inject fakes", path, calexp.data_id)
    if "MAGZERO" not in calexp.metadata:
        raise DiapipeError("calexp has no MAGZERO; cannot record fake fluxes in nJy", path, calexp.data_id)
    meta = calexp.metadata
    visit, detector = int(meta.get("visit", 0)), int(meta.get("detector", 0))
    rng = rng_for(seed, "fakes", visit=visit, detector=detector)
    pos = choose_positions(calexp, int(cfg["n_isolated"]), hosts, int(cfg["n_hosts"]), rng,
                           margin=float(cfg["margin"]), min_separation=float(cfg["min_separation"]),
                           avoid_xy=avoid_xy, host_offset=float(cfg["host_offset"]))
    n = len(pos)
    snr_target = np.exp(rng.uniform(np.log(cfg["snr_min"]), np.log(cfg["snr_max"]), n))
    from .measure import _Pixels

    pix = _Pixels(calexp)
    unit = np.array([optimal_snr_unit(calexp, x, y, pix) for x, y in zip(pos["x"], pos["y"])])
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(unit > 0, snr_target / unit, np.nan)
    ok = np.isfinite(flux)
    pos, snr_target, unit, flux = pos[ok].reset_index(drop=True), snr_target[ok], unit[ok], flux[ok]
    n = len(pos)
    magzero = float(meta["MAGZERO"])
    from .measure import make_dia_source_id

    table = pd.DataFrame({
        "fakeId": make_dia_source_id(visit, detector, np.arange(n)),
        "visit": np.full(n, visit, np.int64),
        "detector": np.full(n, detector, np.int64),
        "band": [str(meta.get("band", meta.get("FILTER", "")))] * n,
        "kind": pos["kind"].astype(str).to_numpy(),
        "hostId": pos["hostId"].to_numpy(np.int64),
        "x": pos["x"].to_numpy(float),
        "y": pos["y"].to_numpy(float),
    })
    if calexp.wcs is not None and n:
        ra, dec = calexp.wcs.pixel_to_world_values(table["x"].to_numpy(), table["y"].to_numpy())
    else:
        ra, dec = np.full(n, np.nan), np.full(n, np.nan)
    table["ra"], table["dec"] = np.asarray(ra, float), np.asarray(dec, float)
    table["flux"] = flux
    table["flux_nJy"] = flux * 10 ** (-0.4 * (magzero - 31.4))
    table["mag"] = magzero - 2.5 * np.log10(flux)
    table["snrTarget"] = snr_target
    table["snrCalexp"] = flux * unit
    injected = inject(calexp, table, rng, float(cfg["injected_fraction"]))
    log.info("injected %d fakes (%d on hosts) into visit %s detector %s", n,
             int((table["kind"] == "host").sum()), visit, detector)
    return injected, table


def hosts_from_truth(truth_fluxes: pd.DataFrame, truth_sources: pd.DataFrame, visit: int, detector: int,
                     mag_max: float = 23.0) -> pd.DataFrame:
    """Galaxy centres (x, y, source_id, and reff in arcsec when known) on one exposure from the simulation's truth."""
    tf = truth_fluxes[(truth_fluxes["visit"] == visit) & (truth_fluxes["detector"] == detector)]
    cols = ["source_id", "mag"] + (["reff"] if "reff" in truth_sources else [])
    gal = truth_sources.loc[truth_sources["kind"] == "galaxy", cols].rename(columns={"mag": "gmag"})
    out = tf.merge(gal, on="source_id")
    out = out[out["gmag"] < mag_max]
    return out[["x", "y", "source_id"] + (["reff"] if "reff" in out else [])].reset_index(drop=True)


def hosts_from_src(src: pd.DataFrame) -> pd.DataFrame:
    """Galaxy centres from a calexp source catalog (needs x, y and an extendedness-like column)."""
    for col in ("extendedness", "is_extended", "extended"):
        if col in src:
            g = src[src[col].astype(float) > 0.5]
            out = g[["x", "y"]].copy()
            out["source_id"] = g["id"].to_numpy() if "id" in g else -1
            return out.reset_index(drop=True)
    return pd.DataFrame({"x": [], "y": [], "source_id": []})


def run_files(calexp_path, out_calexp, out_table, seed=0, config=None, truth_fluxes=None,
              truth_sources=None, src=None) -> pd.DataFrame:
    """File-level entry point (Snakemake script and CLI)."""
    cfg = {**DEFAULTS, **(config or {})}
    calexp = Exposure.read(calexp_path)
    visit, detector = int(calexp.metadata.get("visit", 0)), int(calexp.metadata.get("detector", 0))
    hosts, avoid = None, None
    if truth_fluxes and truth_sources:
        tf, ts = pd.read_parquet(truth_fluxes), pd.read_parquet(truth_sources)
        hosts = hosts_from_truth(tf, ts, visit, detector, float(cfg["host_mag_max"]))
        here = tf[(tf["visit"] == visit) & (tf["detector"] == detector)]
        avoid = here[["x", "y"]].to_numpy(float)
    if src:
        s = pd.read_parquet(src)
        if hosts is None:
            hosts = hosts_from_src(s)
        if {"x", "y"} <= set(s.columns):
            xy = s[["x", "y"]].to_numpy(float)
            avoid = xy if avoid is None else np.vstack([avoid, xy])
    injected, table = make_fakes(calexp, cfg, seed, hosts=hosts, avoid_xy=avoid, path=calexp_path)
    injected.write(out_calexp)
    write_parquet(table, out_table)
    return table


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("fakes", help="inject fake point sources into a calexp",
                              description="Inject fakes (isolated and on galaxies) into a calexp.")
    p.add_argument("calexp")
    p.add_argument("-o", "--output", required=True, help="calexp with fakes (FITS)")
    p.add_argument("--table", required=True, help="fakes table (Parquet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="pipeline config YAML (its 'fakes' block is used)")
    p.add_argument("--src", help="calexp source catalog (isolation, hosts)")
    p.add_argument("--truth-fluxes")
    p.add_argument("--truth-sources")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from .logs import setup

    setup()
    cfg = {}
    seed = args.seed
    if args.config:
        from .config import load

        full = load(args.config)
        cfg, seed = full.get("fakes", {}), full["seed"]
    run_files(args.calexp, args.output, args.table, seed=seed, config=cfg, truth_fluxes=args.truth_fluxes,
              truth_sources=args.truth_sources, src=args.src)
    return 0
