"""Skymap: one tangent-plane tract over the survey footprint, cut into overlapping patches.

The tract is a gnomonic (TAN) projection centred on (ra0, dec0) with square
pixels of ``pixel_scale`` arcsec, north up and east left.  It is tiled by
``n_patches_x x n_patches_y`` patches whose *inner* boxes (``patch_size`` px
square) abut; each patch image is the inner box grown by ``overlap`` px on
every side, so neighbouring patch images share ``2 * overlap`` px.  A patch is
named by one integer, ``patch = iy * n_patches_x + ix`` (Snakemake wildcard
``{patch}``).

Every patch image has the same shape and a pure TAN WCS that is the tract WCS
shifted by the patch origin, so pixel (x, y) of patch p and of the tract are
related by an integer offset - coadds of neighbouring patches line up exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
from astropy.wcs import WCS

from .fileio import DiapipeError, write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkyMap:
    """Tract geometry.  Angles in degrees, ``pixel_scale`` in arcsec/px, sizes in px."""

    ra0: float
    dec0: float
    pixel_scale: float = 0.2
    patch_size: int = 2000
    overlap: int = 100
    n_patches_x: int = 2
    n_patches_y: int = 2

    # ------------------------------------------------------------ geometry
    @property
    def n_patches(self) -> int:
        return self.n_patches_x * self.n_patches_y

    @property
    def patch_shape(self) -> tuple[int, int]:
        """(ny, nx) of every patch image (inner box plus overlap on both sides)."""
        n = self.patch_size + 2 * self.overlap
        return (n, n)

    @property
    def tract_shape(self) -> tuple[int, int]:
        """(ny, nx) of the tract's inner area."""
        return (self.n_patches_y * self.patch_size, self.n_patches_x * self.patch_size)

    def tract_wcs(self) -> WCS:
        """TAN WCS of the tract pixel grid (0-based pixel (0, 0) = inner corner of patch 0)."""
        ny, nx = self.tract_shape
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [self.ra0, self.dec0]
        # FITS CRPIX is 1-based; the tract centre sits at 0-based ((nx-1)/2, (ny-1)/2).
        w.wcs.crpix = [(nx - 1) / 2 + 1, (ny - 1) / 2 + 1]
        s = self.pixel_scale / 3600.0
        w.wcs.cd = [[-s, 0.0], [0.0, s]]  # east left, north up
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.radesys = "ICRS"
        w.wcs.set()
        return w

    def patch_index(self, patch: int) -> tuple[int, int]:
        """(ix, iy) of a patch id; DiapipeError if it is not in the tract."""
        patch = int(patch)
        if not 0 <= patch < self.n_patches:
            raise DiapipeError(f"patch {patch} is not in the tract (0..{self.n_patches - 1})", data_id={"patch": patch})
        return patch % self.n_patches_x, patch // self.n_patches_x

    def patch_origin(self, patch: int) -> tuple[int, int]:
        """Tract pixel (x, y) of the patch image's pixel (0, 0)."""
        ix, iy = self.patch_index(patch)
        return ix * self.patch_size - self.overlap, iy * self.patch_size - self.overlap

    def patch_wcs(self, patch: int) -> WCS:
        """TAN WCS of one patch image (the tract WCS shifted by the patch origin)."""
        x0, y0 = self.patch_origin(patch)
        w = self.tract_wcs()
        w.wcs.crpix = [w.wcs.crpix[0] - x0, w.wcs.crpix[1] - y0]
        w.wcs.set()
        return w

    def patch_inner_box(self, patch: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the inner box in the patch image's pixels (half-open)."""
        o, n = self.overlap, self.patch_size
        return (o, o, o + n, o + n)

    def patch_center_sky(self, patch: int) -> tuple[float, float]:
        ny, nx = self.patch_shape
        ra, dec = self.patch_wcs(patch).wcs_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0]
        return float(ra), float(dec)

    # ---------------------------------------------------------- overlaps
    def sky_to_tract(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.tract_wcs().wcs_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return np.asarray(x), np.asarray(y)

    def patches_overlapping(self, wcs: WCS, shape, margin: float = 0.0) -> list[int]:
        """Patches whose images overlap a detector of ``shape`` (ny, nx) with ``wcs``.

        The detector outline (points every ~64 px along its edges, so SIP
        curvature is followed) is projected into the tract; a patch overlaps if
        its image box, grown by ``margin`` px, intersects the outline's bounding
        box and the outline polygon.  Returns sorted patch ids (may be empty).
        """
        ny, nx = shape
        xs, ys = _outline(nx, ny)
        ra, dec = wcs.all_pix2world(xs, ys, 0)
        return self.patches_overlapping_sky(ra, dec, margin=margin)

    def patches_overlapping_sky(self, ra, dec, margin: float = 0.0) -> list[int]:
        """Patches overlapping the polygon with vertices (ra, dec) in degrees."""
        tx, ty = self.sky_to_tract(ra, dec)
        if not (np.all(np.isfinite(tx)) and np.all(np.isfinite(ty))):
            return []
        poly = np.column_stack([tx, ty])
        out = []
        npy, npx = self.patch_shape
        for p in range(self.n_patches):
            x0, y0 = self.patch_origin(p)
            box = (x0 - margin - 0.5, y0 - margin - 0.5, x0 + npx - 0.5 + margin, y0 + npy - 0.5 + margin)
            if _polygon_intersects_box(poly, box):
                out.append(p)
        return out

    def require_overlap(self, wcs: WCS, shape, path=None, data_id=None, margin: float = 0.0) -> list[int]:
        """Like ``patches_overlapping`` but a detector outside the tract is a DiapipeError."""
        patches = self.patches_overlapping(wcs, shape, margin=margin)
        if not patches:
            ra, dec = wcs.all_pix2world([[(shape[1] - 1) / 2, (shape[0] - 1) / 2]], 0)[0]
            raise DiapipeError(
                f"exposure centred at RA={ra:.5f} Dec={dec:.5f} overlaps no patch of the tract "
                f"centred at RA={self.ra0:.5f} Dec={self.dec0:.5f} "
                f"({self.n_patches_x}x{self.n_patches_y} patches of {self.patch_size} px at {self.pixel_scale} arcsec/px)",
                path,
                data_id,
            )
        return patches

    # -------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path) -> None:
        """Write the skymap as JSON (geometry, plus each patch's centre for people)."""
        doc = {"skymap": self.to_dict(), "patches": []}
        for p in range(self.n_patches):
            ix, iy = self.patch_index(p)
            ra, dec = self.patch_center_sky(p)
            doc["patches"].append({"patch": p, "ix": ix, "iy": iy, "ra": ra, "dec": dec})
        write_text(json.dumps(doc, indent=1) + "\n", path)

    @classmethod
    def read(cls, path) -> "SkyMap":
        try:
            with open(path) as fh:
                doc = json.load(fh)
            return cls(**doc["skymap"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DiapipeError(f"cannot read skymap ({exc})", path) from exc

    @classmethod
    def from_config(cls, cfg: dict, sim_cfg: dict | None = None) -> "SkyMap":
        """Build from the ``skymap`` config block; a null centre comes from the simulate block."""
        ra, dec = cfg.get("ra"), cfg.get("dec")
        if ra is None or dec is None:
            sra, sdec = field_center_from_simulate(sim_cfg or {})
            ra = sra if ra is None else ra
            dec = sdec if dec is None else dec
        scale = float(cfg.get("pixel_scale", 0.2))
        size = int(cfg.get("patch_size", 2000))
        npx, npy = int(cfg.get("n_patches_x", 2)), int(cfg.get("n_patches_y", 2))
        if npx <= 0 or npy <= 0:
            hx, hy = simulated_field_halfwidths(sim_cfg or {})
            npx = npx if npx > 0 else max(1, int(np.ceil(2 * hx / scale / size)))
            npy = npy if npy > 0 else max(1, int(np.ceil(2 * hy / scale / size)))
        return cls(ra0=float(ra), dec0=float(dec), pixel_scale=scale, patch_size=size,
                   overlap=int(cfg.get("overlap", 100)), n_patches_x=npx, n_patches_y=npy)


def field_center_from_simulate(sim_cfg: dict) -> tuple[float, float]:
    """(ra, dec) in degrees of the simulated field centre, whatever the simulate block calls it."""
    for kr, kd in (("ra", "dec"), ("field_ra", "field_dec"), ("ra0", "dec0"), ("center_ra", "center_dec")):
        if kr in sim_cfg and kd in sim_cfg:
            return float(sim_cfg[kr]), float(sim_cfg[kd])
    for key in ("field_center", "center", "field_centre", "pointing"):
        v = sim_cfg.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return float(v[0]), float(v[1])
        if isinstance(v, dict) and "ra" in v and "dec" in v:
            return float(v["ra"]), float(v["dec"])
    raise DiapipeError("skymap ra/dec are null and the simulate config names no field centre; set skymap.ra and skymap.dec")


def simulated_field_halfwidths(sim_cfg: dict) -> tuple[float, float]:
    """Half-widths (arcsec, along RA and Dec) of the sky any simulated visit can touch.

    All detectors of the focal plane, rotated by up to ``rotation_deg`` and
    dithered by up to ``dither_arcsec`` in each axis, plus 10 arcsec.
    """
    try:
        from .simulate import detector_centre, sim_config

        sim = sim_config(sim_cfg)
    except Exception as exc:  # no simulate block: the user must give the tract size
        raise DiapipeError(f"skymap n_patches_x/y are 0 but the simulated field is unknown ({exc}); "
                           "set skymap.n_patches_x and n_patches_y") from None
    hx = max(abs(detector_centre(sim, d)[0]) for d in range(sim["n_detectors"])) + sim["nx"] / 2
    hy = max(abs(detector_centre(sim, d)[1]) for d in range(sim["n_detectors"])) + sim["ny"] / 2
    rot = np.deg2rad(sim.get("rotation_deg", 0.0))
    hx, hy = hx * np.cos(rot) + hy * np.sin(rot), hy * np.cos(rot) + hx * np.sin(rot)
    margin = sim.get("dither_arcsec", 0.0) + 10.0
    scale = sim.get("pixel_scale", 0.2)
    return float(hx * scale + margin), float(hy * scale + margin)


def _outline(nx: int, ny: int, step: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates around a detector's edge (0-based, counter-clockwise)."""
    ex = np.append(np.arange(0, nx - 1, step, dtype=float), nx - 1) + 0.0
    ey = np.append(np.arange(0, ny - 1, step, dtype=float), ny - 1) + 0.0
    lo, hix, hiy = -0.5, nx - 0.5, ny - 0.5
    ex = np.clip(np.concatenate([[lo], ex, [hix]]), lo, hix)
    ey = np.clip(np.concatenate([[lo], ey, [hiy]]), lo, hiy)
    xs = np.concatenate([ex, np.full(len(ey), hix), ex[::-1], np.full(len(ey), lo)])
    ys = np.concatenate([np.full(len(ex), lo), ey, np.full(len(ex), hiy), ey[::-1]])
    return xs, ys


def _polygon_intersects_box(poly: np.ndarray, box) -> bool:
    """True if a (convex-ish) polygon and an axis-aligned box (x0, y0, x1, y1) intersect."""
    x0, y0, x1, y1 = box
    px, py = poly[:, 0], poly[:, 1]
    if px.max() < x0 or px.min() > x1 or py.max() < y0 or py.min() > y1:
        return False
    # Any polygon vertex inside the box, or any box corner inside the polygon, or edges crossing.
    if np.any((px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)):
        return True
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if any(_point_in_polygon(c, poly) for c in corners):
        return True
    # Edge crossings: polygon edges against the box edges.
    box_edges = [(corners[i], corners[(i + 1) % 4]) for i in range(4)]
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        for c, d in box_edges:
            if _segments_cross(a, b, c, d):
                return True
    return False


def _point_in_polygon(pt, poly) -> bool:
    x, y = pt
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    cond = (py > y) != (qy > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = px + (y - py) * (qx - px) / (qy - py)
    return bool(np.count_nonzero(cond & (x < xint)) % 2)


def _segments_cross(a, b, c, d) -> bool:
    def orient(p, q, r):
        return np.sign((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))

    return orient(a, b, c) != orient(a, b, d) and orient(c, d, a) != orient(c, d, b)


# ------------------------------------------------------------- planning
@dataclass
class OverlapPlan:
    """Which patches each exposure feeds, known before any pixel exists (for the workflow DAG)."""

    skymap: SkyMap
    visit_band: dict  # visit -> band
    exposure_patches: dict  # (visit, detector) -> [patch]
    template_pool: list  # candidate template visits (all bands)
    visit_mjd: dict = field(default_factory=dict)

    def visits_on_patch(self, band: str, patch: int) -> list[int]:
        return sorted({v for (v, d), ps in self.exposure_patches.items() if patch in ps and self.visit_band[v] == band})

    def detectors_on_patch(self, visit: int, patch: int) -> list[int]:
        return sorted(d for (v, d), ps in self.exposure_patches.items() if v == visit and patch in ps)

    def patches_of(self, visit: int, detector: int | None = None) -> list[int]:
        if detector is not None:
            return list(self.exposure_patches.get((visit, detector), []))
        return sorted({p for (v, d), ps in self.exposure_patches.items() if v == visit for p in ps})

    def patches_in_band(self, band: str) -> list[int]:
        return sorted({p for (v, d), ps in self.exposure_patches.items() if self.visit_band[v] == band for p in ps})


def plan_overlaps(config: dict) -> OverlapPlan:
    """Patches per (visit, detector) from the planned pointings, with ``skymap.plan_margin`` px to spare.

    For the simulated survey the plan is ``diapipe.simulate.plan_survey``
    (deterministic from the config, no pixels); its true WCS differs from the
    fitted calexp WCS by well under an arcsec, far inside the margin.  For user
    exposures (inputs.source 'table') nothing is known before the calexps
    exist, so every visit feeds every patch; warps that turn out empty are
    written as empty (COVERAGE 0) and skipped by the coadd.
    """
    sm = SkyMap.from_config(config.get("skymap", {}), config.get("simulate", {}))
    margin = float(config.get("skymap", {}).get("plan_margin", 200))
    if config.get("inputs", {}).get("source", "simulate") == "simulate":
        from .simulate import plan_survey, true_wcs

        plan = plan_survey(config)
        sim = plan.sim
        vb, ep, mjd = {}, {}, {}
        for row in plan.visits.itertuples():
            v = int(row.visit)
            vb[v] = str(row.band)
            mjd[v] = float(row.mjd)
            for d in range(sim["n_detectors"]):
                w = true_wcs(plan, v, d)
                ep[(v, d)] = sm.patches_overlapping(w, (sim["ny"], sim["nx"]), margin=margin)
        pool = [int(v) for v in plan.visits.loc[plan.visits["is_template"], "visit"]]
        return OverlapPlan(sm, vb, ep, pool, mjd)
    if config.get("inputs", {}).get("source") == "table":
        # The user's exposures table (diapipe.inputs): its object frames, bands, MJDs and template flags.
        from . import inputs

        df = inputs.read_exposure_table(config["inputs"]["exposures"])
        ep = {vd: list(range(sm.n_patches)) for vd in inputs.data_ids(df)}
        return OverlapPlan(sm, inputs.visit_bands(df), ep, inputs.template_pool(df), inputs.visit_mjds(df))
    sim = config.get("simulate", {})
    bands = list(sim.get("bands", ["r"]))
    nv = int(sim.get("n_template_visits", 0)) + int(sim.get("n_science_visits", 0))
    vb = {v: bands[v % len(bands)] for v in range(nv)}
    ep = {(v, d): list(range(sm.n_patches)) for v in range(nv) for d in range(int(sim.get("n_detectors", 1)))}
    return OverlapPlan(sm, vb, ep, list(range(nv)))


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("skymap", help="write the tract/patch geometry (JSON) from a config")
    p.add_argument("--config", default="config/config.yaml", help="pipeline config YAML")
    p.add_argument("output", help="output JSON path")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from . import config as dpconfig

    cfg = dpconfig.load(args.config)
    sm = SkyMap.from_config(cfg.get("skymap", {}), cfg.get("simulate", {}))
    sm.write(args.output)
    log.info("skymap: %d x %d patches written to %s", sm.n_patches_x, sm.n_patches_y, args.output)
    return 0


def main(argv=None):  # pragma: no cover - convenience
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
