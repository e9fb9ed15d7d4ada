"""DS9 views of difference images: region files of diaSources and ``diapipe show``.

``write_regions`` turns a (scored) diaSource table into a DS9 region file in
IMAGE coordinates (DS9 pixels are 1-based: x_ds9 = x + 1).  One marker per
diaSource:

* circle, green     -- reliability >= threshold (``isReliable``), real candidate
* circle, red       -- reliability below the threshold (bogus)
* circle, yellow    -- not scored (no ``reliability`` column)
* box, magenta      -- dipole (``isDipole``), whatever its reliability; the
  text colour still says green/red
* dashed markers    -- negative-only sources (flux fell since the template)

each with the text ``<diaSourceId> r=<reliability>``.  The radius is 2x the
PSF FWHM when the table carries it (else 6 px), so the marker frames the source
without hiding its core.

``show`` opens a diffexp in SAOImage DS9 (Debian package ``saods9``) by
command-line arguments: the IMAGE extension, one ``-mask`` layer per mask plane
that has pixels set (each plane a 0/1 image in its own colour, see
MASK_COLOURS), and the region file.  DS9 registers itself with XPA under the
title given (default ``ds9``), so ``xpaget ds9 file`` / ``xpaget ds9 regions``
/ ``xpaset -p ds9 saveimage png out.png`` talk to it afterwards.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import DiapipeError, write_text

log = logging.getLogger(__name__)

#: Colour of each mask plane's overlay (planes not listed are not drawn).
MASK_COLOURS = {
    "BAD": "red",
    "SAT": "green",
    "CR": "magenta",
    "EDGE": "yellow",
    "NO_DATA": "orange",
    "INTRP": "cyan",
    "SUSPECT": "pink",
    "DETECTED": "blue",
    "DETECTED_NEGATIVE": "purple",
    "INJECTED": "white",
    "STREAK": "gold",
}

GOOD, BAD, UNSCORED, DIPOLE = "green", "red", "yellow", "magenta"
NOT_INSTALLED = ("SAOImage DS9 is not installed (no 'ds9' on PATH): install it with "
                 "'apt-get install saods9' (Debian/Ubuntu) or from https://ds9.si.edu")


def region_lines(dia: pd.DataFrame, threshold: float | None = None, radius_px: float | None = None) -> list[str]:
    """DS9 region lines (image coordinates) for the diaSources of ONE exposure.

    ``threshold``: reliability cut (0-1); default the table's ``isReliable``
    flag, else 0.5.  ``radius_px``: marker radius in pixels (default 2 x the
    median ``fwhm`` column, else 6 px).
    """
    lines = ["# Region file format: DS9 version 4.1",
             "# diapipe diaSources: green = reliable, red = below threshold, yellow = unscored, "
             "magenta box = dipole, dashed = negative",
             'global color=green dashlist=8 3 width=1 font="helvetica 9 normal roman" select=1 '
             "highlite=1 dash=0 fixed=0 edit=0 move=0 delete=1 include=1 source=1",
             "image"]
    if radius_px is None:
        fwhm = pd.to_numeric(dia.get("fwhm", pd.Series(dtype=float)), errors="coerce")
        radius_px = float(2 * np.nanmedian(fwhm)) if fwhm.notna().any() else 6.0
    has_rel = "reliability" in dia
    for row in dia.itertuples(index=False):
        r = getattr(row, "reliability", np.nan) if has_rel else np.nan
        if not has_rel or not np.isfinite(r):
            colour, rtxt = UNSCORED, "r=?"
        else:
            ok = (r >= threshold) if threshold is not None else bool(getattr(row, "isReliable", r >= 0.5))
            colour, rtxt = (GOOD if ok else BAD), f"r={r:.2f}"
        x, y = float(row.x) + 1.0, float(row.y) + 1.0  # 0-based pixel centres -> DS9 1-based
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        dash = " dash=1" if bool(getattr(row, "isNegative", False)) else ""
        text = f"{int(row.diaSourceId)} {rtxt}"
        if bool(getattr(row, "isDipole", False)):
            lines.append(f"box({x:.2f},{y:.2f},{2 * radius_px:.1f},{2 * radius_px:.1f},0) # color={DIPOLE} "
                         f"width=2{dash} text={{{text} dipole}} tag={{dipole}} tag={{{colour}}}")
        else:
            lines.append(f"circle({x:.2f},{y:.2f},{radius_px:.1f}) # color={colour}{dash} text={{{text}}} "
                         f"tag={{{colour}}}")
    return lines


def write_regions(dia: pd.DataFrame, path, visit: int | None = None, detector: int | None = None,
                  threshold: float | None = None, radius_px: float | None = None) -> int:
    """Write the region file of one exposure (rows of ``dia`` with that visit/detector); returns the count.

    ``visit``/``detector`` None: every row of ``dia`` (already one exposure).
    """
    sel = dia
    if visit is not None and "visit" in dia:
        sel = sel[sel["visit"].astype(int) == int(visit)]
    if detector is not None and "detector" in dia:
        sel = sel[sel["detector"].astype(int) == int(detector)]
    write_text("\n".join(region_lines(sel, threshold, radius_px)) + "\n", path)
    return len(sel)


_SHAPE = re.compile(r"^(circle|box)\(([^)]*)\)\s*(?:#\s*(.*))?$")


def parse_regions(path) -> pd.DataFrame:
    """Read back a region file written by write_regions: shape, x, y (0-based), colour, diaSourceId, reliability."""
    rows = []
    for line in Path(path).read_text().splitlines():
        m = _SHAPE.match(line.strip())
        if not m:
            continue
        args = [float(a) for a in m.group(2).split(",")]
        props = m.group(3) or ""
        colour = re.search(r"color=(\w+)", props)
        text = re.search(r"text=\{([^}]*)\}", props)
        words = text.group(1).split() if text else []
        rel = float(words[1][2:]) if len(words) > 1 and words[1] != "r=?" else np.nan
        tags = re.findall(r"tag=\{(\w+)\}", props)
        rows.append({"shape": m.group(1), "x": args[0] - 1.0, "y": args[1] - 1.0,
                     "color": colour.group(1) if colour else "green",
                     "class": next((t for t in tags if t in (GOOD, BAD, UNSCORED)), None),
                     "diaSourceId": int(words[0]) if words else -1, "reliability": rel})
    return pd.DataFrame(rows)


def regions_from_files(scored_path, visit: int, detector: int, out, threshold: float | None = None) -> int:
    """File-level: region file of one exposure from the run's scored diaSource table."""
    if not Path(scored_path).exists():
        raise DiapipeError(f"{scored_path}: diaSource table not found (visit={visit}, detector={detector})")
    dia = pd.read_parquet(scored_path)
    return write_regions(dia, out, visit, detector, threshold)


# ------------------------------------------------------------------ DS9
def mask_layers(diffexp_path, out_dir) -> list[tuple[str, str, Path]]:
    """One 0/1 FITS image per mask plane with pixels set: [(plane, colour, path)]."""
    from astropy.io import fits

    from .masks import planes_from_header

    try:
        with fits.open(diffexp_path) as hdul:
            mask = np.asarray(hdul["MASK"].data)
            planes = planes_from_header(hdul["MASK"].header)
    except (OSError, KeyError) as exc:
        raise DiapipeError(f"{diffexp_path}: cannot read the MASK extension ({exc})") from None
    layers = []
    for name, b in planes.items():
        colour = MASK_COLOURS.get(name)
        on = (mask.astype(np.int64) >> b) & 1
        if colour is None or not on.any():
            continue
        p = Path(out_dir) / f"mask_{name}.fits"
        fits.PrimaryHDU(on.astype(np.uint8)).writeto(p, overwrite=True)
        layers.append((name, colour, p))
    return layers


def ds9_command(diffexp_path, region_path=None, layers=(), title: str = "ds9", ds9: str = "ds9",
                scale: str = "zscale", transparency: int = 60) -> list[str]:
    """Command-line arguments that open the diffexp's IMAGE with mask layers and regions in DS9."""
    cmd = [ds9, "-title", title, "-xpa", "yes", f"{diffexp_path}[IMAGE]", "-scale", scale]
    for _, colour, p in layers:
        cmd += ["-mask", "color", colour, "-mask", "mark", "nonzero", "-mask", "transparency",
                str(transparency), "-mask", str(p)]
    if region_path is not None:
        cmd += ["-regions", "load", str(region_path)]
    return cmd + ["-zoom", "to", "fit"]


def show(diffexp_path, region_path=None, title: str = "ds9", wait: bool = False, dry_run: bool = False):
    """Open the diffexp in DS9 (IMAGE + mask planes + regions); returns the Popen (or the command if dry_run)."""
    if not Path(diffexp_path).exists():
        raise DiapipeError(f"{diffexp_path}: difference image not found")
    if region_path is not None and not Path(region_path).exists():
        log.warning("%s: region file not found; showing without regions", region_path)
        region_path = None
    ds9 = shutil.which("ds9")
    if ds9 is None and not dry_run:
        raise DiapipeError(NOT_INSTALLED)
    # Mask layers live next to nothing the pipeline owns: a temp dir DS9 reads at start-up.
    tmp = Path(tempfile.mkdtemp(prefix="diapipe-ds9-"))
    layers = mask_layers(diffexp_path, tmp)
    cmd = ds9_command(diffexp_path, region_path, layers, title, ds9 or "ds9")
    if dry_run:
        return cmd
    log.info("%s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if wait:
        proc.wait()
    return proc


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("show", help="open a difference image in DS9 with mask planes and diaSource regions")
    p.add_argument("visit", type=int)
    p.add_argument("detector", type=int)
    p.add_argument("--config", action="append", default=None,
                   help="config file(s), later ones overlay (default config/config.yaml)")
    p.add_argument("--workdir", default=".", help="directory the dataset paths are relative to")
    p.add_argument("--title", default="ds9", help="DS9 window title = XPA access point name")
    p.add_argument("--wait", action="store_true", help="wait until DS9 exits")
    p.add_argument("--print", dest="dry_run", action="store_true", help="only print the DS9 command")
    p.set_defaults(func=_cli_show)
    r = subparsers.add_parser("regions", help="write the DS9 region file of one exposure from a diaSource table")
    r.add_argument("table", help="diaSource Parquet table (scored: reliability, isReliable)")
    r.add_argument("visit", type=int)
    r.add_argument("detector", type=int)
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--threshold", type=float, default=None, help="reliability cut (default: isReliable)")
    r.set_defaults(func=lambda a: regions_from_files(a.table, a.visit, a.detector, a.output, a.threshold) and 0)


def _cli_show(args) -> int:
    from . import config as dpconfig
    from .butler import Butler

    cfg = dpconfig.load(*(args.config or ["config/config.yaml"]))
    butler = Butler(cfg["datasets"])
    wd = Path(args.workdir)
    diff = wd / butler.get("diffexp", visit=args.visit, detector=args.detector)
    reg = None
    if "diaSrc_regions" in cfg["datasets"]:
        reg = wd / butler.get("diaSrc_regions", visit=args.visit, detector=args.detector)
    if shutil.which("ds9") is None and not args.dry_run:
        print(f"diapipe show: {NOT_INSTALLED}")
        return 2
    out = show(diff, reg, args.title, args.wait, args.dry_run)
    if args.dry_run:
        print(" ".join(out))
    else:
        print(f"diapipe show: DS9 '{args.title}' opened {diff}" + (f" with {reg}" if reg else ""))
    return 0
