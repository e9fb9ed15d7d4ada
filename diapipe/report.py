"""One self-contained HTML report per run (figures inlined as base64 PNGs).

Sections: run summary (exposures, counts per stage, time per rule from the
benchmark TSVs), per-visit table (seeing, zero point, 5-sigma point-source
depth, number of diaSources), completeness curve, real/bogus ROC, gallery of
the best candidates (science / template / difference cutouts with their
reliability), light curves of the top diaObjects (with the true light curve
over them on simulated data).
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

from .fileio import write_text

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


def _file_png(path) -> str:
    p = Path(path) if path else None
    if p is None or not p.exists():
        return "<p class='missing'>(not produced)</p>"
    return _png_tag(p.read_bytes(), p.name, width=560)


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
    var = exposure.variance
    v = float(np.nanmedian(var[np.isfinite(var) & (var > 0)])) if np.isfinite(var).any() else np.nan
    ny, nx = exposure.shape
    p = exposure.psf.image(nx / 2, ny / 2) if exposure.psf is not None else None
    if p is None or not np.isfinite(v):
        return float("nan")
    p = p / p.sum()
    return float(exposure.metadata["MAGZERO"]) - 2.5 * np.log10(5 * np.sqrt(v / (p**2).sum()))


def visit_table(calexp_paths: dict, dia: pd.DataFrame) -> pd.DataFrame:
    """Per (visit, detector): band, MJD, seeing (arcsec), zero point, 5-sigma depth, diaSources."""
    from .exposure import Exposure

    ndia = dia.groupby(["visit", "detector"]).size() if len(dia) else pd.Series(dtype=int)
    rows = []
    for (v, d), p in sorted(calexp_paths.items()):
        try:
            e = Exposure.read(p)
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot read %s: %s", p, exc)
            continue
        m = e.metadata
        rows.append({"visit": v, "detector": d, "band": m.get("band", m.get("FILTER", "")),
                     "mjd": m.get("MJD-OBS", np.nan), "seeing_arcsec": m.get("SEEING", np.nan),
                     "zeropoint": m.get("MAGZERO", np.nan), "depth5sigma": depth_5sigma(e),
                     "nDiaSources": int(ndia.get((v, d), 0)) if len(ndia) else 0})
    return pd.DataFrame(rows)


def gallery(dia: pd.DataFrame, cutout_paths: dict, n: int = 12) -> str:
    """Science / template / difference cutouts of the n most reliable diaSources (of distinct diaObjects)."""
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
        cells.append(
            f"<div class='cell'>{_png_tag(_fig_png(fig), f'cutouts {r.diaSourceId}')}"
            f"<br><small>{caption}</small></div>"
        )
    return "<div class='gallery'>" + "".join(cells) + "</div>" if cells else "<p>No cutouts.</p>"


def lightcurve_figures(objects: pd.DataFrame, lc: pd.DataFrame, truth: pd.Series | None = None,
                       truth_fluxes: pd.DataFrame | None = None, n: int = 8) -> str:
    """Forced light curves (nJy) of the n diaObjects with most detections; truth drawn over them."""
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
            ax.plot(t["midpointMjdTai"], t["flux_nJy"].fillna(0.0), "k-", lw=1, label="truth")
        ax.axhline(0, color="0.7", lw=0.5)
        ax.set_xlabel("MJD (TAI)", fontsize=7), ax.set_ylabel("psfFlux (nJy)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title(f"diaObject {o.diaObjectId}  n={o.nDiaSources}", fontsize=7)
        ax.legend(fontsize=5)
        cells.append(f"<div class='cell'>{_png_tag(_fig_png(fig), f'light curve {o.diaObjectId}')}</div>")
    return "<div class='gallery'>" + "".join(cells) + "</div>"


def _table_html(df: pd.DataFrame, floatfmt="{:.3f}") -> str:
    if df is None or len(df) == 0:
        return "<p>(empty)</p>"
    return df.to_html(index=False, float_format=lambda x: floatfmt.format(x), border=0, classes="tab")


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1300px}h2{border-bottom:1px solid #ccc}
.tab{border-collapse:collapse;font-size:12px}.tab td,.tab th{padding:2px 8px;border-bottom:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:6px}.cell{border:1px solid #ddd}.missing{color:#a00}"""


def build(out, *, calexps: dict, cutouts: dict, dia_scored=None, dia_associated=None, objects=None,
          lightcurves=None,
          association_metrics=None, completeness_plot=None, completeness_summary=None, eval_plots=None,
          realbogus_evaluation=None, truth_fluxes=None, truth_sources=None, bench_dir="benchmarks",
          title="diapipe run", n_cutouts: int = 12, n_lightcurves: int = 8) -> str:
    """Write the report HTML to ``out``; returns the HTML."""
    from . import associate as asc

    dia = pd.read_parquet(dia_scored) if dia_scored else pd.DataFrame()
    objs = pd.read_parquet(objects) if objects else pd.DataFrame()
    lc = pd.read_parquet(lightcurves) if lightcurves else pd.DataFrame()
    assoc_src = pd.read_parquet(dia_associated) if dia_associated else None
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    # summary
    times = rule_times(bench_dir)
    summary = {"exposures (science+template)": len(calexps), "diaSources": len(dia),
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
    parts.append("<h2 id='visits'>Exposures</h2>" + _table_html(visit_table(calexps, dia)))
    parts.append("<h2 id='completeness'>Completeness (fakes)</h2>" + _file_png(completeness_plot))
    roc = Path(eval_plots) / "roc.png" if eval_plots else None
    parts.append("<h2 id='roc'>Real/bogus ROC</h2>" + _file_png(roc))
    # gallery and light curves (associated diaSources carry diaObjectId)
    gal_src = dia
    if assoc_src is not None and len(assoc_src):
        gal_src = assoc_src
    parts.append("<h2 id='gallery'>Best candidates</h2>" + gallery(gal_src, cutouts, n_cutouts))
    truth = tf = None
    if truth_fluxes and truth_sources and assoc_src is not None and len(assoc_src):
        tf = pd.read_parquet(truth_fluxes)
        ts = pd.read_parquet(truth_sources)
        tid = asc.match_truth(assoc_src, tf, ts)
        m = pd.DataFrame({"obj": assoc_src["diaObjectId"].to_numpy(), "truth": tid})
        m = m[m["truth"] >= 0]
        truth = m.groupby("obj")["truth"].agg(lambda s: s.value_counts().index[0]) if len(m) else None
    parts.append("<h2 id='lightcurves'>Light curves of the top diaObjects</h2>"
                 + lightcurve_figures(objs, lc, truth, tf, n_lightcurves))
    parts.append("</body></html>")
    text = "\n".join(parts)
    write_text(text, out)
    Path(out).chmod(0o644)  # mkstemp files are 0600; the report is for reading
    return text
