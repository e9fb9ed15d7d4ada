"""One self-contained HTML report per run (figures inlined as base64 PNGs).

Sections: run summary (exposures, counts per stage, time per rule from the
benchmark TSVs), per-visit table (seeing, zero point, 5-sigma point-source
depth, number of diaSources; the simulated truth beside them when given),
thumbnails of every difference image (zscale + asinh stretch, masked pixels
coloured, diaSources circled), PSF-matching kernel diagnostics (kernels on a
3x3 grid, flux-ratio map with the stamps, kernel sum / stamp chi2 / stamps /
difference-image noise across visits), astrometric diagnostics (WCS fit RMS
and matched stars per calexp; measured-minus-true positions of the matched
stars on simulated data), completeness curve, real/bogus ROC, gallery of the
best candidates (science / template / difference cutouts with their
reliability), light curves of the top diaObjects (with the true light curve
over them on simulated data).

With ``figures_dir`` every figure is also written as a PNG file,
``<figures_dir>/<section>/<name>.png`` (or ``figures_dir[section]/<name>.png``
when it is a dict), so that Snakemake's ``report()`` can register them.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import atomic_path, write_text

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ figures
def _png_tag(data: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fig_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


class _SectionDirs(dict):
    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, section):
        return self.root / section


class FigureSink:
    """The report's PNGs: each becomes an inline <img> tag, and <directory>/<section>/<name>.png when given.

    The files are what Snakemake's ``report()`` registers (``snakemake --report``).
    """

    def __init__(self, directory=None):
        # one directory (sections below it) or {section: directory}
        if isinstance(directory, dict):
            self.dirs = {k: Path(v) for k, v in directory.items()}
        else:
            self.dirs = None if not directory else _SectionDirs(Path(directory))
        self.written: list[Path] = []

    def add(self, png: bytes, section: str, name: str, alt: str, width: int | None = None) -> str:
        if self.dirs is not None:
            out = self.dirs[section] / f"{name}.png"
            with atomic_path(out) as tmp:
                Path(tmp).write_bytes(png)
            out.chmod(0o644)
            self.written.append(out)
        return _png_tag(png, alt, width)

    def add_file(self, path, section: str, name: str, width: int = 560) -> str:
        p = Path(path) if path else None
        if p is None or not p.exists():
            return "<p class='missing'>(not produced)</p>"
        return self.add(p.read_bytes(), section, name, p.name, width)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------ difference-image thumbnails
# Mask planes drawn in the thumbnails: defects blended in orange (visible even when
# much thinner than a thumbnail pixel), missing data / kernel edge opaque slate blue.
DEFECT_PLANES = ("BAD", "SAT", "CR", "SUSPECT", "INTRP")
NODATA_PLANES = ("NO_DATA", "EDGE")
DEFECT_RGB = np.array([1.0, 0.45, 0.0])
NODATA_RGB = np.array([0.30, 0.38, 0.62])


def _blocks(a: np.ndarray, factor: int) -> np.ndarray:
    """(ny//f, f, nx//f, f) view of ``a`` cropped to whole factor x factor blocks."""
    ny, nx = (n // factor * factor for n in a.shape)
    return a[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)


def bin_image(image: np.ndarray, good: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Block means of the good pixels over factor x factor blocks, and each block's good fraction.

    Blocks without a good pixel are NaN; the last partial row/column of blocks is cropped.
    """
    im = _blocks(np.where(good, image, 0.0).astype(np.float64), factor).sum(axis=(1, 3))
    n = _blocks(good, factor).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, im / np.maximum(n, 1), np.nan)
    return mean, n / factor**2


def asinh_zscale(values: np.ndarray, softening: float = 4.0, span: float = 25.0) -> np.ndarray:
    """Grey levels in [0, 1] for a difference image: symmetric asinh about the median, scaled by zscale.

    With h the zscale (IRAF) half-range about the median, u = (v - median) / h
    maps to 0.5 + 0.5 asinh(softening u) / asinh(softening span): the noise
    (|u| <~ 1) keeps its grain at mid-grey while residuals up to ``span`` x h
    (bright transients, bad subtractions) stay distinct instead of saturating.
    NaN stays NaN.
    """
    from astropy.visualization import ZScaleInterval

    ok = np.isfinite(values)
    if not ok.any():
        return np.full(values.shape, np.nan)
    v = values[ok]
    c = float(np.median(v))
    z1, z2 = ZScaleInterval().get_limits(v)
    h = max(z2 - c, c - z1, 1e-12 * max(abs(c), 1.0))
    u = (values - c) / h
    return np.clip(0.5 + 0.5 * np.arcsinh(softening * u) / np.arcsinh(softening * span), 0.0, 1.0)


def thumbnail_rgb(image: np.ndarray, mask: np.ndarray, planes: dict, max_size: int = 256) -> tuple[np.ndarray, int]:
    """Downsampled RGB (ny', nx', 3) of a difference image with masked pixels coloured; returns (rgb, factor).

    Blocks that hold any defect pixel (DEFECT_PLANES) are blended with orange (opaque
    orange when the block has no good pixel); blocks more than half NO_DATA/EDGE are slate blue.
    """
    factor = max(1, int(np.ceil(max(image.shape) / max_size)))
    defect_bits = sum(1 << planes[p] for p in DEFECT_PLANES if p in planes)
    nodata_bits = sum(1 << planes[p] for p in NODATA_PLANES if p in planes)
    defect = (mask & defect_bits) != 0
    nodata = ((mask & nodata_bits) != 0) | ~np.isfinite(image)
    good = ~defect & ~nodata
    mean, _ = bin_image(image, good, factor)
    grey = asinh_zscale(mean)
    rgb = np.repeat(np.nan_to_num(grey, nan=0.5)[..., None], 3, axis=2)
    blk_defect = _blocks(defect, factor).any(axis=(1, 3))
    blk_nodata = _blocks(nodata, factor).mean(axis=(1, 3)) > 0.5
    no_good = ~np.isfinite(mean)
    blk_defect |= no_good & ~blk_nodata
    rgb[blk_defect] = 0.35 * rgb[blk_defect] + 0.65 * DEFECT_RGB
    rgb[no_good & ~blk_nodata] = DEFECT_RGB
    rgb[blk_nodata] = NODATA_RGB
    return rgb, factor


def read_diffexp_diagnostics(path) -> dict:
    """What the report shows of one diffexp, from one open: PRIMARY header, IMAGE, MASK and its planes,
    and the subtract stage's KGRID (kernels at 3x3 positions), KSUMMAP (flux ratio map) and STAMPS HDUs.
    """
    from astropy.io import fits

    from . import masks
    from .fileio import DiapipeError

    try:
        with fits.open(path, memmap=False) as hdul:
            names = [h.name for h in hdul]
            out = {"header": dict(hdul[0].header), "image": np.asarray(hdul["IMAGE"].data, np.float32),
                   "mask": np.asarray(hdul["MASK"].data), "planes": masks.planes_from_header(hdul["MASK"].header)}
            if "KGRID" in names:
                h = hdul["KGRID"].header
                n = hdul["KGRID"].data.shape[0]
                out["kgrid"] = np.asarray(hdul["KGRID"].data, np.float64)
                out["kgrid_xy"] = np.array([(h.get(f"KX{i}", np.nan), h.get(f"KY{i}", np.nan)) for i in range(n)])
            if "KSUMMAP" in names:
                h = hdul["KSUMMAP"].header
                out["ksummap"] = np.asarray(hdul["KSUMMAP"].data, np.float64)
                out["ksummap_grid"] = (h.get("GX0", 0.0), h.get("GDX", 1.0), h.get("GY0", 0.0), h.get("GDY", 1.0))
            if "STAMPS" in names:
                d = hdul["STAMPS"].data
                out["stamps"] = pd.DataFrame({c: np.asarray(d[c]).astype(str) if c == "reason" else
                                              np.asarray(d[c]).astype(np.float64 if c != "used" else bool)
                                              for c in d.columns.names})
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DiapipeError(f"cannot read the difference image for the report ({exc})", path) from exc
    return out


def draw_rings(rgb: np.ndarray, x, y, radius: float, colour, width: float = 1.2) -> None:
    """Draw open circles of ``radius`` (pixels of ``rgb``) centred at (x, y) into ``rgb`` in place."""
    ny, nx = rgb.shape[:2]
    r = int(np.ceil(radius + width))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    for xc, yc in zip(np.asarray(x, float), np.asarray(y, float)):
        if not (np.isfinite(xc) and np.isfinite(yc)):
            continue
        yy, xx = int(round(yc)) + oy, int(round(xc)) + ox
        ring = (np.abs(np.hypot(xx - xc, yy - yc) - radius) <= width / 2) & (yy >= 0) & (yy < ny) & (xx >= 0) \
            & (xx < nx)
        rgb[yy[ring], xx[ring]] = colour


def diffexp_thumbnail(diag: dict, sources: pd.DataFrame | None = None, max_size: int = 256) -> bytes:
    """PNG (no axes: one thumbnail pixel per block) of a downsampled difference image; diaSources circled
    (green: reliable, cyan: the rest).  Drawn without a matplotlib figure, so it costs ~20 ms."""
    import matplotlib.image as mpimg

    rgb, f = thumbnail_rgb(diag["image"], diag["mask"], diag["planes"], max_size)
    if sources is not None and len(sources):
        rel = sources["isReliable"].to_numpy(bool) if "isReliable" in sources else np.zeros(len(sources), bool)
        # full-resolution pixel centres -> block coordinates
        x = (sources["x"].to_numpy(float) + 0.5) / f - 0.5
        y = (sources["y"].to_numpy(float) + 0.5) / f - 0.5
        draw_rings(rgb, x[~rel], y[~rel], 3.0, (0.0, 0.9, 0.9))
        draw_rings(rgb, x[rel], y[rel], 5.0, (0.1, 1.0, 0.1))
    buf = io.BytesIO()
    mpimg.imsave(buf, np.clip(rgb, 0, 1), format="png", origin="lower")
    return buf.getvalue()


# ------------------------------------------------------------------ kernel diagnostics
KERNEL_KEYS = {"SUBMETH": "method", "CONVDIR": "convolved", "KORDER": "kernelOrder", "KFALLBK": "fallback",
               "NSTAMP": "nStamps", "NREJ": "nRejected", "KSUM": "kernelSum", "FLUXRAT": "fluxRatio",
               "KCHI2": "stampChi2", "DIFFRMS": "diffRms"}


def kernel_row(diag: dict) -> dict:
    """Kernel-solution summary of one diffexp (PRIMARY keywords of the subtract stage, STAMPS, KSUMMAP).

    fluxRatioSpread_pct: (max - min) / median of the science/template flux ratio over the detector (%);
    stampChi2Median: median reduced chi2 of the stamps used, about the spatial kernel.
    """
    h = diag["header"]
    row = {v: h.get(k, np.nan) for k, v in KERNEL_KEYS.items()}
    if row["stampChi2"] == -1.0:  # subtract writes -1 when no stamp chi2 exists (PSF-model fallback)
        row["stampChi2"] = np.nan
    m = diag.get("ksummap")
    row["fluxRatioSpread_pct"] = (100 * float(np.ptp(m)) / float(np.median(m))
                                  if m is not None and np.isfinite(m).all() else np.nan)
    st = diag.get("stamps")
    ok = st is not None and len(st) and "chi2_spatial" in st
    row["stampChi2Median"] = float(np.median(st.loc[st["used"], "chi2_spatial"])) if ok and st["used"].any() \
        else np.nan
    return row


def kernel_figure(diag: dict, title: str = "") -> bytes | None:
    """PNG: the kernel at the 3x3 KGRID positions (one colour scale, sum under each) and the
    science/template flux-ratio map with the stamps used (o) and rejected (x)."""
    if "kgrid" not in diag:
        return None
    plt = _plt()
    kg = diag["kgrid"]
    k = kg.shape[-1]
    gap = max(1, k // 8)
    side = 3 * k + 2 * gap
    mosaic = np.full((side, side), np.nan)
    order = np.lexsort((diag["kgrid_xy"][:, 0], diag["kgrid_xy"][:, 1]))  # row-major from the bottom left
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(6.6, 3.1), gridspec_kw={"width_ratios": [1, 1.2]})
    for n, i in enumerate(order[:9]):
        iy, ix = divmod(n, 3)
        y0, x0 = iy * (k + gap), ix * (k + gap)
        mosaic[y0:y0 + k, x0:x0 + k] = kg[i]
        a1.text(x0 + k / 2, y0 + 1, f"{kg[i].sum():.3f}", ha="center", va="bottom", fontsize=5)
    lim = float(np.nanmax(np.abs(kg))) or 1.0
    a1.imshow(mosaic, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    a1.set_xticks([]), a1.set_yticks([])
    a1.set_title("kernel at 3x3 positions (sum)", fontsize=7)
    if "ksummap" in diag:
        m = diag["ksummap"]
        gx0, gdx, gy0, gdy = diag["ksummap_grid"]
        ext = (gx0 - gdx / 2, gx0 + (m.shape[1] - 0.5) * gdx, gy0 - gdy / 2, gy0 + (m.shape[0] - 0.5) * gdy)
        im = a2.imshow(m, origin="lower", extent=ext, cmap="viridis", interpolation="nearest")
        cb = fig.colorbar(im, ax=a2, fraction=0.046, pad=0.04)
        cb.ax.tick_params(labelsize=5)
        cb.set_label("flux ratio science/template", fontsize=6)
        st = diag.get("stamps")
        if st is not None and len(st):
            u = st["used"].to_numpy(bool)
            a2.plot(st["x"][u], st["y"][u], "o", mfc="none", mec="w", ms=3, mew=0.6, label=f"used ({u.sum()})")
            a2.plot(st["x"][~u], st["y"][~u], "x", color="r", ms=3, mew=0.7, label=f"rejected ({(~u).sum()})")
            a2.legend(fontsize=5, loc="upper right", framealpha=0.6)
        a2.set_xlim(ext[0], ext[1]), a2.set_ylim(ext[2], ext[3])
        a2.tick_params(labelsize=5)
        a2.set_title("flux ratio map and stamps", fontsize=7)
    else:
        a2.set_axis_off()
    fig.suptitle(title, fontsize=7)
    return _fig_png(fig)


def _by_detector(ax, df, col, **kw):
    for d, g in df.groupby("detector"):
        g = g.sort_values("visit")
        ax.plot(g["visit"], g[col], marker=kw.pop("marker", "o"), ls="-", lw=0.5, ms=3,
                label=f"det {d}", **kw)


def kernel_trends_figure(table: pd.DataFrame, stamps: pd.DataFrame | None = None) -> bytes:
    """PNG across visits: flux ratio (bars: range over the detector), stamp chi2 (dots: every used stamp),
    stamps used/rejected, difference-image noise (robust std of diff/sqrt(var); 1 = as predicted)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(7.2, 4.6), sharex=True)
    a = axes.ravel()
    from matplotlib.ticker import MaxNLocator

    for i, (d, g) in enumerate(table.groupby("detector")):
        g = g.sort_values("visit")
        c = f"C{i % 10}"  # one colour per detector in every panel
        half = g["fluxRatio"] * g["fluxRatioSpread_pct"].fillna(0) / 200
        a[0].errorbar(g["visit"], g["fluxRatio"], half, fmt="o-", ms=3, lw=0.5, capsize=2, color=c, label=f"det {d}")
        a[2].plot(g["visit"], g["nStamps"], "o-", ms=3, lw=0.5, color=c, label=f"used, det {d}")
        a[2].plot(g["visit"], g["nRejected"], "s--", ms=3, lw=0.5, mfc="none", color=c, label=f"rejected, det {d}")
        a[3].plot(g["visit"], g["diffRms"], "o-", ms=3, lw=0.5, color=c, label=f"det {d}")
        a[1].plot(g["visit"], g["stampChi2"], "o-", ms=4, lw=0.5, color=c, label=f"mean, det {d}")
    if stamps is not None and len(stamps):
        jit = np.random.default_rng(0).uniform(-0.15, 0.15, len(stamps))  # display only
        a[1].plot(stamps["visit"] + jit, stamps["chi2_spatial"], ".", color="0.6", ms=2, zorder=0,
                  label="used stamps")
    a[1].axhline(1, color="0.5", lw=0.5), a[3].axhline(1, color="0.5", lw=0.5)
    a[1].set_ylim(bottom=0)
    for ax, t in zip(a, ("flux ratio science/template", "stamp reduced chi2", "kernel stamps",
                         "diff noise / predicted")):
        ax.set_title(t, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    a[2].set_xlabel("visit", fontsize=7), a[3].set_xlabel("visit", fontsize=7)
    a[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _fig_png(fig)


# ------------------------------------------------------------------ astrometric diagnostics
ASTROMETRY_KEYS = {"WCSRMS": "wcsFitRms_mas", "NASTROM": "nMatched", "WCSORDER": "sipOrder",
                   "ASTSHIFT": "shift_arcsec"}


def truth_residuals(src: pd.DataFrame, truth_sources: pd.DataFrame) -> pd.DataFrame:
    """Measured-minus-true sky positions (mas) of the calexp sources matched to the refcat (refId >= 0).

    The simulated refcat's id is the truth source_id, so the match is exact; the
    measured position is the centroid through the fitted WCS (the src ra/dec).
    """
    s = src[src["refId"] >= 0]
    t = truth_sources.set_index("source_id").reindex(s["refId"].to_numpy())
    ok = np.isfinite(t["ra"].to_numpy(float))
    s, t = s[ok], t[ok]
    dec_t = np.deg2rad(t["dec"].to_numpy(float))
    dra = (s["ra"].to_numpy(float) - t["ra"].to_numpy(float) + 180.0) % 360.0 - 180.0
    return pd.DataFrame({"visit": s["visit"].to_numpy(), "detector": s["detector"].to_numpy(),
                         "x": s["x"].to_numpy(float), "y": s["y"].to_numpy(float),
                         "dra_mas": dra * np.cos(dec_t) * 3.6e6,
                         "ddec_mas": (s["dec"].to_numpy(float) - t["dec"].to_numpy(float)) * 3.6e6})


def astrometry_table(calexp_paths: dict, src_paths: dict | None = None,
                     truth_sources: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per calexp: the characterize stage's WCS fit RMS (mas, 2-D), matched stars, SIP order, shift
    from the raw WCS (arcsec); with truth: 2-D RMS and mean offset (mas) of measured-minus-true positions.

    Returns (table, residuals of every matched star).
    """
    from astropy.io import fits

    rows, res = [], []
    for (v, d), p in sorted(calexp_paths.items()):
        try:
            h = fits.getheader(p, 0)
        except OSError as exc:
            log.warning("cannot read %s: %s", p, exc)
            continue
        row = {"visit": v, "detector": d, **{c: h.get(k, np.nan) for k, c in ASTROMETRY_KEYS.items()}}
        sp = (src_paths or {}).get((v, d))
        if truth_sources is not None and sp and Path(sp).exists():
            src = pd.read_parquet(sp, columns=["x", "y", "ra", "dec", "refId"])
            src["visit"], src["detector"] = v, d
            r = truth_residuals(src, truth_sources)
            res.append(r)
            row["nTruth"] = len(r)
            row["trueRms_mas"] = float(np.sqrt(np.mean(r["dra_mas"] ** 2 + r["ddec_mas"] ** 2))) if len(r) else np.nan
            row["trueOffset_mas"] = float(np.hypot(r["dra_mas"].mean(), r["ddec_mas"].mean())) if len(r) else np.nan
        rows.append(row)
    resid = pd.concat(res, ignore_index=True) if res else pd.DataFrame(
        columns=["visit", "detector", "x", "y", "dra_mas", "ddec_mas"])
    return pd.DataFrame(rows), resid


def astrometry_trends_figure(table: pd.DataFrame) -> bytes:
    """PNG across visits: WCS fit RMS (filled) and RMS against truth (open) in mas; matched stars."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7.2, 2.6))
    for d, g in table.groupby("detector"):
        g = g.sort_values("visit")
        (ln,) = a1.plot(g["visit"], g["wcsFitRms_mas"], "o-", ms=3, lw=0.5, label=f"fit, det {d}")
        if "trueRms_mas" in g:
            a1.plot(g["visit"], g["trueRms_mas"], "o--", ms=4, lw=0.5, mfc="none", color=ln.get_color(),
                    label=f"vs truth, det {d}")
        a2.plot(g["visit"], g["nMatched"], "o-", ms=3, lw=0.5, label=f"det {d}")
    a1.set_ylabel("2-D RMS (mas)", fontsize=7), a2.set_ylabel("matched stars", fontsize=7)
    for ax in (a1, a2):
        ax.set_xlabel("visit", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    a1.set_ylim(bottom=0), a2.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _fig_png(fig)


def astrometry_residuals_figure(resid: pd.DataFrame, max_detectors: int = 4) -> bytes | None:
    """PNG: measured-minus-true residual arrows (ΔRA cos δ, ΔDec) at their pixel positions, one panel per
    detector (all visits), and all residuals as a scatter with their 2-D RMS circle."""
    if len(resid) == 0:
        return None
    plt = _plt()
    dets = sorted(resid["detector"].unique())[:max_detectors]
    fig, axes = plt.subplots(1, len(dets) + 1, figsize=(3.0 * (len(dets) + 1), 3.0))
    mag = np.hypot(resid["dra_mas"], resid["ddec_mas"])
    rms = float(np.sqrt(np.mean(mag**2)))
    decade = 10 ** np.floor(np.log10(max(rms, 1e-3)))
    key = float(min(decade * np.array([1, 2, 5, 10]), key=lambda k: abs(np.log(k / max(rms, 1e-3)))))  # 1-2-5 near RMS
    span = max(resid["x"].max() - resid["x"].min(), resid["y"].max() - resid["y"].min(), 1.0)
    scale = 3 * rms / (0.08 * span)  # mas per pixel of arrow: 3 x RMS spans 8% of the detector
    for ax, d in zip(axes, dets):
        g = resid[resid["detector"] == d]
        q = ax.quiver(g["x"], g["y"], g["dra_mas"], g["ddec_mas"], angles="xy", scale_units="xy", scale=scale,
                      width=0.004, color="C0")
        ax.quiverkey(q, 0.8, 1.04, key, f"{key:g} mas", labelpos="W", fontproperties={"size": 6})
        ax.set_aspect("equal")
        ax.set_title(f"detector {d} ({len(g)} stars)", fontsize=7, loc="left")
        ax.set_xlabel("x (px)", fontsize=6), ax.set_ylabel("y (px)", fontsize=6)
        ax.tick_params(labelsize=5)
    ax = axes[-1]
    ax.plot(resid["dra_mas"], resid["ddec_mas"], ".", ms=2, alpha=0.6)
    ax.add_patch(plt.Circle((0, 0), rms, fill=False, color="r", lw=0.8))
    lim = 1.1 * float(np.nanpercentile(mag, 99)) or 1.0
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
    ax.axhline(0, color="0.7", lw=0.5), ax.axvline(0, color="0.7", lw=0.5)
    ax.set_xlabel("ΔRA cos δ (mas)", fontsize=6), ax.set_ylabel("ΔDec (mas)", fontsize=6)
    ax.set_title(f"measured - true, RMS {rms:.1f} mas", fontsize=7)
    ax.tick_params(labelsize=5)
    fig.tight_layout()
    return _fig_png(fig)


# ------------------------------------------------------------------ sections
def rule_times(bench_dir="benchmarks") -> pd.DataFrame:
    """Jobs and wall time (s) per rule from Snakemake's benchmark TSVs (benchmarks/<rule>/*.tsv)."""
    rows = []
    for d in sorted(Path(bench_dir).glob("*")):
        if not d.is_dir():
            continue
        secs = []
        for f in d.glob("*.tsv"):
            try:
                secs.append(float(pd.read_csv(f, sep="\t")["s"].iloc[-1]))
            except Exception:  # noqa: BLE001 - a half-written benchmark is skipped, not fatal
                continue
        if secs:
            rows.append({"rule": d.name, "jobs": len(secs), "total_s": sum(secs), "max_s": max(secs)})
    return pd.DataFrame(rows, columns=["rule", "jobs", "total_s", "max_s"])


def depth_5sigma(exposure) -> float:
    """5-sigma point-source AB depth: MAGZERO - 2.5 log10(5 sqrt(median sky variance / sum(P^2)))."""
    return _depth(exposure.variance, exposure.psf, exposure.metadata.get("MAGZERO", np.nan))


def _depth(var: np.ndarray, psf, magzero: float) -> float:
    """depth_5sigma from a variance plane (e-^2), the PSF model (at the centre) and MAGZERO (AB mag of 1 e-)."""
    ok = np.isfinite(var) & (var > 0)
    if psf is None or not ok.any():
        return float("nan")
    v = float(np.median(var[ok]))
    ny, nx = var.shape
    p = psf.image(nx / 2, ny / 2)
    p = p / p.sum()
    return float(magzero) - 2.5 * np.log10(5 * np.sqrt(v / (p**2).sum()))


def read_calexp_summary(path) -> dict:
    """PRIMARY metadata and 5-sigma depth of a calexp, reading only PRIMARY, VARIANCE and PSF
    (the report needs no IMAGE/MASK; Exposure.read would load and checksum all of them)."""
    from astropy.io import fits

    from .exposure import _metadata_from_header
    from .fileio import DiapipeError
    from .psf import PixelPsf

    try:
        with fits.open(path, memmap=True) as hdul:
            names = [h.name for h in hdul]
            meta = _metadata_from_header(hdul[0].header)
            psf = PixelPsf.from_hdu(hdul["PSF"]) if "PSF" in names else None
            var = np.asarray(hdul["VARIANCE"].data, np.float32)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DiapipeError(f"cannot read the calexp for the report ({exc})", path) from exc
    meta["depth5sigma"] = _depth(var, psf, meta.get("MAGZERO", np.nan))
    return meta


def visit_table(calexp_paths: dict, dia: pd.DataFrame, truth_visits: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (visit, detector): band, MJD, seeing (arcsec FWHM), zero point (AB mag of 1 e-), 5-sigma depth
    (AB mag), diaSources (all and reliable); with the simulated truth, the true seeing and zero point."""
    ndia = dia.groupby(["visit", "detector"]).size() if len(dia) else pd.Series(dtype=int)
    nrel = (dia[dia["isReliable"].astype(bool)].groupby(["visit", "detector"]).size()
            if len(dia) and "isReliable" in dia else None)
    tv = truth_visits.set_index("visit") if truth_visits is not None and len(truth_visits) else None
    rows = []
    for (v, d), p in sorted(calexp_paths.items()):
        try:
            m = read_calexp_summary(p)
        except Exception as exc:  # noqa: BLE001 - one unreadable calexp must not lose the report
            log.warning("%s", exc)
            continue
        row = {"visit": v, "detector": d, "band": m.get("band", m.get("FILTER", "")),
               "mjd": m.get("MJD-OBS", np.nan), "seeing_arcsec": m.get("SEEING", np.nan),
               "zeropoint": m.get("MAGZERO", np.nan), "depth5sigma": m["depth5sigma"],
               "nDiaSources": int(ndia.get((v, d), 0)) if len(ndia) else 0}
        if nrel is not None:
            row["nReliable"] = int(nrel.get((v, d), 0))
        if tv is not None and v in tv.index:
            row["seeing_true"] = float(tv.at[v, "seeing"]) if "seeing" in tv else np.nan
            row["zeropoint_true"] = float(tv.at[v, "zeropoint"]) if "zeropoint" in tv else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def gallery(dia: pd.DataFrame, cutout_paths: dict, n: int = 12, sink: FigureSink | None = None) -> str:
    """Science / template / difference cutouts of the n most reliable diaSources (of distinct diaObjects)."""
    sink = sink or FigureSink()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .measure import read_cutouts

    if len(dia) == 0 or "reliability" not in dia:
        return "<p>No scored diaSources.</p>"
    d = dia.sort_values("reliability", ascending=False)
    if "diaObjectId" in d:
        d = d.drop_duplicates("diaObjectId")
    d = d.head(n)
    cache = {}
    cells = []
    for r in d.itertuples():
        key = (int(r.visit), int(r.detector))
        if key not in cutout_paths or not Path(cutout_paths[key]).exists():
            continue
        if key not in cache:
            ids, cubes = read_cutouts(cutout_paths[key])
            cache[key] = (dict(zip(ids["diaSourceId"].to_numpy(np.int64), range(len(ids)))), cubes)
        index, cubes = cache[key]
        i = index.get(int(r.diaSourceId))
        if i is None:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(4.5, 1.7))
        for ax, k in zip(axes, ("science", "template", "difference")):
            im = cubes[k][i]
            lo, hi = np.nanpercentile(im, [2, 99.5]) if np.isfinite(im).any() else (0, 1)
            ax.imshow(im, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(k, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        fig.suptitle(f"diaSource {r.diaSourceId}  R={r.reliability:.2f}  S/N={getattr(r, 'snr', np.nan):.1f}",
                     fontsize=7)
        caption = html.escape(
            f"diaSource {r.diaSourceId} · reliability {r.reliability:.2f} · S/N {getattr(r, 'snr', np.nan):.1f}"
        )
        img = sink.add(_fig_png(fig), "candidates", f"diaSource_{r.diaSourceId}", f"cutouts {r.diaSourceId}")
        cells.append(f"<div class='cell'>{img}<br><small>{caption}</small></div>")
    return "<div class='gallery'>" + "".join(cells) + "</div>" if cells else "<p>No cutouts.</p>"


def lightcurve_figures(objects: pd.DataFrame, lc: pd.DataFrame, truth: pd.Series | None = None,
                       truth_fluxes: pd.DataFrame | None = None, n: int = 8, sink: FigureSink | None = None,
                       template_flux: pd.Series | None = None) -> str:
    """Forced light curves (nJy) of the n diaObjects with most detections; truth drawn over them.

    The truth drawn is the flux change since the template (truth flux minus
    ``template_flux`` of the source, nJy, when given): what a difference image measures.
    """
    sink = sink or FigureSink()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(objects) == 0 or len(lc) == 0:
        return "<p>No diaObjects.</p>"
    top = objects.sort_values(["nDiaSources", "maxReliability"], ascending=False).head(n)
    cells = []
    for o in top.itertuples():
        pts = lc[lc["diaObjectId"] == o.diaObjectId].sort_values("midpointMjdTai")
        if len(pts) == 0:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 2.6))
        det = pts["detected"].astype(bool)
        ax.errorbar(pts["midpointMjdTai"][det], pts["psfFlux"][det], pts["psfFluxErr"][det], fmt="o", ms=4,
                    label="forced (detected)")
        ax.errorbar(pts["midpointMjdTai"][~det], pts["psfFlux"][~det], pts["psfFluxErr"][~det], fmt="o",
                    mfc="none", ms=4, label="forced (not detected)")
        if truth is not None and truth_fluxes is not None and o.diaObjectId in truth.index:
            t = truth_fluxes[truth_fluxes["source_id"] == truth[o.diaObjectId]]
            t = pts[["visit", "detector", "midpointMjdTai"]].merge(t, on=["visit", "detector"], how="left")
            t0_flux = float(template_flux.get(truth[o.diaObjectId], 0.0)) if template_flux is not None else 0.0
            ax.plot(t["midpointMjdTai"], t["flux_nJy"].fillna(0.0) - t0_flux, "k-", lw=1,
                    label="truth - template" if template_flux is not None else "truth")
        ax.axhline(0, color="0.7", lw=0.5)
        ax.set_xlabel("MJD (TAI)", fontsize=7), ax.set_ylabel("psfFlux (nJy)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title(f"diaObject {o.diaObjectId}  n={o.nDiaSources}", fontsize=7)
        ax.legend(fontsize=5)
        img = sink.add(_fig_png(fig), "lightcurves", f"diaObject_{o.diaObjectId}", f"light curve {o.diaObjectId}")
        cells.append(f"<div class='cell'>{img}</div>")
    return "<div class='gallery'>" + "".join(cells) + "</div>"


def _table_html(df: pd.DataFrame, floatfmt="{:.3f}") -> str:
    if df is None or len(df) == 0:
        return "<p>(empty)</p>"
    return df.to_html(index=False, float_format=lambda x: floatfmt.format(x), border=0, classes="tab")


def diffexp_sections(diffexps: dict, dia: pd.DataFrame, sink: FigureSink, thumbnail_size: int = 256
                     ) -> tuple[str, str, pd.DataFrame]:
    """HTML of the difference-image thumbnails and of the kernel diagnostics; the kernel table.

    Each diffexp is read once (read_diffexp_diagnostics) and dropped before the next.
    """
    thumbs, kernels, rows, stamps = [], [], [], []
    by_exp = dia.groupby(["visit", "detector"]) if len(dia) and {"x", "y"} <= set(dia.columns) else None
    groups = by_exp.groups if by_exp is not None else {}
    for (v, d), p in sorted(diffexps.items()):
        try:
            diag = read_diffexp_diagnostics(p)
        except Exception as exc:  # noqa: BLE001 - one unreadable diffexp must not lose the report
            log.warning("%s", exc)
            thumbs.append(f"<div class='cell missing'>visit {v} detector {d}: unreadable</div>")
            continue
        src = dia.loc[groups[(v, d)]] if (v, d) in groups else None
        n = 0 if src is None else len(src)
        nrel = int(src["isReliable"].astype(bool).sum()) if n and "isReliable" in src else 0
        png = diffexp_thumbnail(diag, src, thumbnail_size)
        ny, nx = diag["image"].shape
        caption = html.escape(f"visit {v} · detector {d} ({nx} x {ny} px) · {n} diaSources, {nrel} reliable · "
                              f"diff noise {diag['header'].get('DIFFRMS', float('nan')):.2f} x predicted")
        img = sink.add(png, "diffexps", f"diff_v{v}_d{d}", f"difference image {v} {d}")
        thumbs.append(f"<div class='cell thumb'>{img}<br><small>{caption}</small></div>")
        rows.append({"visit": v, "detector": d, **kernel_row(diag)})
        if "stamps" in diag and "chi2_spatial" in diag["stamps"]:
            st = diag["stamps"]
            stamps.append(pd.DataFrame({"visit": v, "detector": d, "chi2_spatial": st.loc[st["used"], "chi2_spatial"]}))
        kpng = kernel_figure(diag, f"visit {v} detector {d}: {diag['header'].get('SUBMETH', '')} "
                                   f"convolved {diag['header'].get('CONVDIR', '?')}, "
                                   f"order {diag['header'].get('KORDER', '?')}")
        if kpng is not None:
            kernels.append(f"<div class='cell'>{sink.add(kpng, 'kernel', f'kernel_v{v}_d{d}', f'kernel {v} {d}')}"
                           "</div>")
        del diag
    table = pd.DataFrame(rows)
    if not thumbs:
        return "<p>No difference images.</p>", "<p>No difference images.</p>", table
    legend = ("<p><small>Block means of the unmasked pixels, zscale + asinh stretch (grey = 0); "
              "<span style='color:#e67300'>orange</span>: BAD/SAT/CR/SUSPECT/INTRP pixels in the block, "
              "<span style='color:#4d619e'>slate blue</span>: NO_DATA/EDGE; circles: diaSources "
              "(green reliable, cyan the rest).</small></p>")
    thumbs_html = legend + "<div class='gallery'>" + "".join(thumbs) + "</div>"
    kern_html = _table_html(table)
    if len(table):
        st = pd.concat(stamps, ignore_index=True) if stamps else None
        kern_html += sink.add(kernel_trends_figure(table, st), "kernel", "kernel_trends",
                              "kernel diagnostics across visits")
    kern_html += "<div class='gallery'>" + "".join(kernels) + "</div>"
    return thumbs_html, kern_html, table


def astrometry_section(calexps: dict, srcs: dict | None, truth_sources: pd.DataFrame | None,
                       sink: FigureSink) -> str:
    """HTML: the per-calexp astrometry table, its trends across visits, the truth residual plot."""
    table, resid = astrometry_table(calexps, srcs, truth_sources)
    if len(table) == 0:
        return "<p>No calexps.</p>"
    out = _table_html(table, "{:.2f}")
    out += sink.add(astrometry_trends_figure(table), "astrometry", "astrometry_trends", "WCS fit RMS across visits")
    png = astrometry_residuals_figure(resid)
    if png is not None:
        out += "<br>" + sink.add(png, "astrometry", "astrometry_residuals", "measured minus true positions")
    return out


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1300px}h2{border-bottom:1px solid #ccc}
.tab{border-collapse:collapse;font-size:12px}.tab td,.tab th{padding:2px 8px;border-bottom:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:6px}.cell{border:1px solid #ddd}.missing{color:#a00}
nav a{margin-right:1em}.thumb{width:310px}"""

SECTIONS = {"summary": "Run summary", "visits": "Exposures", "diffexps": "Difference images",
            "kernel": "PSF-matching kernels", "astrometry": "Astrometry", "completeness": "Completeness",
            "roc": "Real/bogus ROC", "gallery": "Best candidates", "lightcurves": "Light curves"}


def build(out, *, calexps: dict, cutouts: dict, dia_scored=None, dia_associated=None, objects=None,
          lightcurves=None,
          association_metrics=None, completeness_plot=None, completeness_summary=None, eval_plots=None,
          realbogus_evaluation=None, truth_fluxes=None, truth_sources=None, truth_visits=None,
          diffexps: dict | None = None, srcs: dict | None = None, figures_dir=None, bench_dir="benchmarks",
          title="diapipe run", n_cutouts: int = 12, n_lightcurves: int = 8, thumbnail_size: int = 256) -> str:
    """Write the report HTML to ``out`` (and every figure to ``figures_dir`` when given); returns the HTML.

    calexps, cutouts, diffexps, srcs: {(visit, detector): path}.  The truth tables
    (simulated surveys only) add the true seeing/zero point, the measured-minus-true
    astrometry and the true light curves.
    """
    import time

    from . import associate as asc

    t0 = time.perf_counter()
    sink = FigureSink(figures_dir)
    dia = pd.read_parquet(dia_scored) if dia_scored else pd.DataFrame()
    objs = pd.read_parquet(objects) if objects else pd.DataFrame()
    lc = pd.read_parquet(lightcurves) if lightcurves else pd.DataFrame()
    assoc_src = pd.read_parquet(dia_associated) if dia_associated else None
    ts = pd.read_parquet(truth_sources) if truth_sources else None
    tv = pd.read_parquet(truth_visits) if truth_visits else None
    nav = "".join(f"<a href='#{k}'>{v}</a>" for k, v in SECTIONS.items())
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>"]
    # summary
    times = rule_times(bench_dir)
    summary = {"exposures (science+template)": len(calexps), "difference images": len(diffexps or {}),
               "diaSources": len(dia),
               "reliable diaSources": int(dia["isReliable"].sum()) if "isReliable" in dia else "n/a",
               "diaObjects": len(objs), "light-curve points": len(lc),
               "total job time (s)": round(float(times["total_s"].sum()), 1) if len(times) else "n/a"}
    for label, f in (("association", association_metrics), ("completeness", completeness_summary),
                     ("real/bogus", realbogus_evaluation)):
        if f and Path(f).exists():
            try:
                d = json.loads(Path(f).read_text())
                flat = {k: v for k, v in d.items() if isinstance(v, (int, float, str))}
                summary.update({f"{label}: {k}": (round(v, 4) if isinstance(v, float) else v)
                                for k, v in list(flat.items())[:8]})
            except Exception:  # noqa: BLE001
                pass
    parts.append("<h2 id='summary'>Run summary</h2>")
    parts.append(_table_html(pd.DataFrame({"quantity": list(summary), "value": [str(v) for v in summary.values()]})))
    parts.append("<h3>Time per rule (benchmarks)</h3>" + _table_html(times, "{:.1f}"))
    parts.append("<h2 id='visits'>Exposures</h2><p><small>seeing: PSF FWHM (arcsec); zeropoint: AB mag of 1 e-; "
                 "depth5sigma: 5-sigma point-source AB mag from the median sky variance and the PSF.</small></p>"
                 + _table_html(visit_table(calexps, dia, tv)))
    thumbs_html, kern_html, _ = diffexp_sections(diffexps or {}, dia, sink, thumbnail_size)
    parts.append("<h2 id='diffexps'>Difference images</h2>" + thumbs_html)
    parts.append("<h2 id='kernel'>PSF-matching kernels</h2><p><small>From the subtract stage's diagnostics "
                 "(PRIMARY keywords, KGRID, KSUMMAP, STAMPS HDUs). fluxRatio: science/template at the centre; "
                 "stampChi2: mean reduced chi2 of the stamps used; diffRms: robust std of diff/sqrt(var) "
                 "(1 = noise as predicted).</small></p>" + kern_html)
    parts.append("<h2 id='astrometry'>Astrometry</h2><p><small>wcsFitRms: 2-D RMS of the WCS fit residuals "
                 "against the reference catalog (mas); trueRms / trueOffset (simulated data): 2-D RMS and mean "
                 "of measured-minus-true positions of the matched stars (mas).</small></p>"
                 + astrometry_section(calexps, srcs, ts, sink))
    parts.append("<h2 id='completeness'>Completeness (fakes)</h2>"
                 + sink.add_file(completeness_plot, "quality", "completeness"))
    roc = Path(eval_plots) / "roc.png" if eval_plots else None
    parts.append("<h2 id='roc'>Real/bogus ROC</h2>" + sink.add_file(roc, "quality", "roc"))
    # gallery and light curves (associated diaSources carry diaObjectId)
    gal_src = dia
    if assoc_src is not None and len(assoc_src):
        gal_src = assoc_src
    parts.append("<h2 id='gallery'>Best candidates</h2>" + gallery(gal_src, cutouts, n_cutouts, sink))
    truth = tf = tmpl = None
    if truth_fluxes and ts is not None and assoc_src is not None and len(assoc_src):
        tf = pd.read_parquet(truth_fluxes)
        truth = asc.object_truth(assoc_src, tf, ts)
        truth = truth if len(truth) else None
        if len(lc):
            tmpl = asc.template_truth_flux_of(lc, tf, ts)
    parts.append("<h2 id='lightcurves'>Light curves of the top diaObjects</h2>"
                 + lightcurve_figures(objs, lc, truth, tf, n_lightcurves, sink, tmpl))
    parts.append(f"<p><small>Report built in {time.perf_counter() - t0:.1f} s.</small></p></body></html>")
    text = "\n".join(parts)
    write_text(text, out)
    Path(out).chmod(0o644)  # mkstemp files are 0600; the report is for reading
    log.info("report %s: %.1f s, %d figures, %.2f MB", out, time.perf_counter() - t0, len(sink.written),
             len(text) / 1e6)
    return text


# ------------------------------------------------------------------ command line
def find_datasets(butler, dataset_type: str, root=".") -> dict:
    """{(visit, detector): path} of the existing files of a per-exposure dataset type under ``root``."""
    import re
    import string

    tmpl = butler.template(dataset_type)
    regex, pattern = "", ""
    for literal, field, _, _ in string.Formatter().parse(tmpl):
        regex += re.escape(literal) + (rf"(?P<{field}>\d+)" if field else "")
        pattern += literal + ("*" if field else "")
    out = {}
    for p in sorted(Path(root).glob(pattern)):
        m = re.fullmatch(regex, p.relative_to(root).as_posix())
        if m:
            out[(int(m["visit"]), int(m["detector"]))] = p
    return out


def build_from_run(root, out, config: dict, figures_dir=None, title="diapipe run") -> str:
    """The report of a finished run in directory ``root`` (products found through the config's Butler table)."""
    from .butler import Butler

    root = Path(root)
    b = Butler(config["datasets"])

    def one(dataset_type):
        p = root / b.get(dataset_type)
        return p if p.exists() else None

    diffexps = find_datasets(b, "diffexp", root)
    rc = config.get("report", {})
    return build(out, calexps=find_datasets(b, "calexp", root), srcs=find_datasets(b, "src", root),
                 diffexps=diffexps, cutouts=find_datasets(b, "diaSrc_cutouts", root),
                 dia_scored=one("diaSources_scored"), dia_associated=one("diaSources_associated"),
                 objects=one("diaObjects"), lightcurves=one("lightcurves"),
                 association_metrics=one("association_metrics"), completeness_plot=one("completeness_plot"),
                 completeness_summary=one("completeness_summary"), eval_plots=one("realbogus_eval_plots"),
                 realbogus_evaluation=one("realbogus_evaluation"), truth_fluxes=one("truth_fluxes"),
                 truth_sources=one("truth_sources"), truth_visits=one("truth_visits"),
                 figures_dir=figures_dir, bench_dir=root / "benchmarks", title=title,
                 n_cutouts=rc.get("n_cutouts", 12), n_lightcurves=rc.get("n_lightcurves", 8),
                 thumbnail_size=rc.get("thumbnail_size", 256))


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("report", help="the HTML report of a finished run (outside Snakemake)")
    p.add_argument("--root", default=".", help="the run's working directory (default: .)")
    p.add_argument("--configfile", nargs="*", default=None,
                   help="config file(s), later ones overlaying earlier (default: <root>/config/config.yaml)")
    p.add_argument("-o", "--output", required=True, help="output HTML file")
    p.add_argument("--figures-dir", default=None, help="also write every figure here as PNG")
    p.add_argument("--title", default="diapipe run")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    import time

    from . import config as dpconfig

    files = args.configfile or [Path(args.root) / "config" / "config.yaml"]
    cfg = dpconfig.load(*files)
    t0 = time.perf_counter()
    text = build_from_run(args.root, args.output, cfg, args.figures_dir, args.title)
    print(f"wrote {args.output}: {len(text) / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
    return 0
