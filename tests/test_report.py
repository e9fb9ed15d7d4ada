"""The run report (diapipe.report): 5-sigma depth against a measured one, thumbnails, kernel and astrometric
diagnostics against known truth, and the tiny run's HTML, figures and `snakemake --report`."""

from __future__ import annotations

import io
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from diapipe import masks, report

sys.path.insert(0, str(Path(__file__).parent))
from _detect_synth import MAGZERO, make_diffexp, optimal_snr  # noqa: E402


def test_depth_5sigma_matches_measured_snr():
    """A star at the reported 5-sigma depth has optimal S/N 5 (and the measured PSF-flux scatter agrees)."""
    exp = make_diffexp(fwhm=3.5, sigma=10.0, seed=4)
    m5 = report.depth_5sigma(exp)
    flux = 10 ** (-0.4 * (m5 - MAGZERO))
    assert optimal_snr(flux, 3.5, 10.0) == pytest.approx(5.0, rel=0.01)
    # empirical: PSF fluxes at random blank positions scatter by flux / 5
    from diapipe.measure import _Pixels, psf_fit

    rng = np.random.default_rng(0)
    pix = _Pixels(exp)
    f = [psf_fit(pix, exp.psf, x, y, fit_position=False)["flux"] for x, y in rng.uniform(30, 480, (300, 2))]
    assert np.std(f) == pytest.approx(flux / 5, rel=0.15)


def test_rule_times_reads_benchmarks(tmp_path):
    d = tmp_path / "benchmarks" / "isr"
    d.mkdir(parents=True)
    for i, s in enumerate((1.5, 2.5)):
        (d / f"v{i}.tsv").write_text("s\th:m:s\tmax_rss\n" f"{s}\t0:00:01\t10\n")
    t = report.rule_times(tmp_path / "benchmarks")
    assert t.loc[0, "rule"] == "isr" and t.loc[0, "jobs"] == 2 and t.loc[0, "total_s"] == 4.0


# ------------------------------------------------------------------ thumbnails
def test_bin_image_block_means_of_good_pixels():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(37, 50))
    good = rng.random(img.shape) > 0.3
    good[:4, :4] = False  # one block with no good pixel
    mean, frac = report.bin_image(img, good, 4)
    assert mean.shape == (9, 12)  # partial blocks cropped
    assert np.isnan(mean[0, 0]) and frac[0, 0] == 0
    for by, bx in ((1, 2), (8, 11), (4, 7)):
        blk, g = img[4 * by:4 * by + 4, 4 * bx:4 * bx + 4], good[4 * by:4 * by + 4, 4 * bx:4 * bx + 4]
        assert mean[by, bx] == pytest.approx(blk[g].mean()) and frac[by, bx] == pytest.approx(g.mean())


def test_thumbnail_masks_noise_and_sources():
    """Masked pixels coloured (a 1-px bad column too), noise mid-grey with grain, +/- sources symmetric."""
    sigma, fwhm = 10.0, 3.5
    flux = 60 * sigma * np.sqrt(4 * np.pi * (fwhm / 2.3548) ** 2)  # PSF-weighted S/N ~ 60
    exp = make_diffexp(sigma=sigma, fwhm=fwhm, sources=[(301, 301, flux), (201, 401, -flux)], seed=3)
    mask = exp.mask
    masks.set_plane(mask, np.zeros(mask.shape, bool) | (np.arange(512)[None, :] < 40), "NO_DATA")
    col = np.zeros(mask.shape, bool)
    col[:, 101] = True
    masks.set_plane(mask, col, "BAD")
    blk = np.zeros(mask.shape, bool)
    blk[400:440, 400:440] = True  # a fully masked defect region: orange, not "no data"
    masks.set_plane(mask, blk, "BAD")
    rgb, f = report.thumbnail_rgb(exp.image, mask, dict(masks.MASK_PLANES), max_size=256)
    assert f == 2 and rgb.shape == (256, 256, 3)
    assert np.allclose(rgb[:, :20], report.NODATA_RGB)
    bad = rgb[:, 50]  # block column holding pixel column 101
    assert (bad[:, 0] - bad[:, 2] > 0.4).all(), "the 1-px bad column must show in a 2x binned thumbnail"
    assert np.allclose(rgb[202:218, 202:218], report.DEFECT_RGB)
    clean = rgb[20:120, 120:240]
    assert np.allclose(clean[..., 0], clean[..., 2])
    g = clean[..., 0]
    assert np.median(g) == pytest.approx(0.5, abs=0.03)  # zero residual = mid-grey
    lo, hi = np.percentile(g, [5, 95])
    assert 0.15 < hi - lo < 0.7  # noise grain visible but not saturated
    pos, neg = rgb[150, 150, 0], rgb[200, 100, 0]
    assert 0.8 < pos < 1.0 and pos + neg == pytest.approx(1.0, abs=0.03)  # asinh, symmetric about 0


def test_thumbnail_png_circles_sources(tmp_path):
    exp = make_diffexp(seed=5)
    p = tmp_path / "d.fits"
    exp.write(p)
    diag = report.read_diffexp_diagnostics(p)
    src = pd.DataFrame({"x": [100.0, 300.0], "y": [200.0, 50.0], "isReliable": [True, False]})
    png = report.diffexp_thumbnail(diag, src, 128)
    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(png), format="png")[::-1]  # PNG rows run top-down; y up here
    assert img.shape[:2] == (128, 128)  # 512 px binned 4x4
    green = (img[..., 1] > 0.8) & (img[..., 0] < 0.3) & (img[..., 2] < 0.3)
    yy, xx = np.nonzero(green)
    assert len(yy) > 20  # the reliable diaSource's circle is drawn, centred on it (100, 200) / 4
    assert np.mean(xx) == pytest.approx((100 + 0.5) / 4 - 0.5, abs=0.5)
    assert np.mean(yy) == pytest.approx((200 + 0.5) / 4 - 0.5, abs=0.5)
    cyan = (img[..., 1] > 0.8) & (img[..., 2] > 0.8) & (img[..., 0] < 0.3)
    assert cyan[6:20, 68:82].sum() > 8  # the other one, near (300, 50) / 4


# ------------------------------------------------------------------ kernel diagnostics
def test_kernel_diagnostics_of_a_real_subtraction(tmp_path):
    """On a simulated pair (template flux scale 0.8) the report reads flux ratio 1.25 from the diffexp,
    every kernel on the 3x3 grid sums to it, and the used stamps fit with reduced chi2 ~ 1."""
    from subtract_synth import make_pair

    from diapipe.subtract import subtract

    s, t, _ = make_pair(256, 1.5, seed=11, n_fakes=6)
    p = tmp_path / "diff.fits"
    subtract(s, t, {"spatial_order": 1}).write(p)
    diag = report.read_diffexp_diagnostics(p)
    row = report.kernel_row(diag)
    assert row["convolved"] == "template"
    assert row["fluxRatio"] == pytest.approx(1 / 0.8, rel=0.02)
    assert diag["kgrid"].shape[0] == 9
    np.testing.assert_allclose(diag["kgrid"].sum(axis=(1, 2)), 1 / 0.8, rtol=0.03)
    assert row["nStamps"] == diag["stamps"]["used"].sum() >= 5
    assert 0.5 < row["stampChi2Median"] < 2.0
    assert 0.8 < row["diffRms"] < 1.2
    assert row["fluxRatioSpread_pct"] < 3.0  # one flux scale over the detector
    png = report.kernel_figure(diag, "k")
    table = pd.DataFrame([{"visit": 1, "detector": 0, **row}, {"visit": 2, "detector": 0, **row}])
    trends = report.kernel_trends_figure(table, pd.DataFrame({"visit": 1, "chi2_spatial": [1.0, 0.9]}))
    import matplotlib.image as mpimg

    for b in (png, trends):
        assert mpimg.imread(io.BytesIO(b), format="png").shape[1] > 400


# ------------------------------------------------------------------ astrometry
def test_truth_residuals_recover_known_offsets(tmp_path):
    """Sources offset by (+30, -40) mas on the sky at Dec 60 (cos dec = 0.5): recovered, RMS 50 mas."""
    rng = np.random.default_rng(2)
    n = 200
    ra0, dec0 = rng.uniform(150, 150.1, n), rng.uniform(60, 60.1, n)
    truth = pd.DataFrame({"source_id": np.arange(1, n + 1), "ra": ra0, "dec": dec0})
    dra, ddec = 30 + rng.normal(0, 2, n), -40 + rng.normal(0, 2, n)
    src = pd.DataFrame({"x": rng.uniform(0, 500, n), "y": rng.uniform(0, 500, n),
                        "ra": ra0 + dra / 3.6e6 / np.cos(np.deg2rad(dec0)), "dec": dec0 + ddec / 3.6e6,
                        "refId": np.arange(1, n + 1)})
    src.loc[:9, "refId"] = -1  # not matched to the refcat
    src.loc[10, "refId"] = 99999  # not in the truth table
    calexp, sp = tmp_path / "0.fits", tmp_path / "0.src.parquet"
    fits.PrimaryHDU(header=fits.Header({"WCSRMS": 12.5, "NASTROM": 190, "WCSORDER": 3})).writeto(calexp)
    src.to_parquet(sp)
    table, resid = report.astrometry_table({(4, 1): calexp}, {(4, 1): sp}, truth)
    assert len(resid) == n - 11
    assert resid["dra_mas"].mean() == pytest.approx(30, abs=0.5)
    assert resid["ddec_mas"].mean() == pytest.approx(-40, abs=0.5)
    row = table.iloc[0]
    assert row["wcsFitRms_mas"] == 12.5 and row["nMatched"] == 190 and row["nTruth"] == n - 11
    assert row["trueRms_mas"] == pytest.approx(50, abs=1) and row["trueOffset_mas"] == pytest.approx(50, abs=1)
    png = report.astrometry_residuals_figure(resid)
    assert png is not None and report.astrometry_trends_figure(table)


def test_find_datasets(tmp_path):
    from diapipe.butler import Butler

    b = Butler({"diffexp": "results/diff/{visit}/{detector}.fits"})
    for rel in ("results/diff/3/0.fits", "results/diff/3/0.template.fits", "results/diff/12/1.fits"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert sorted(report.find_datasets(b, "diffexp", tmp_path)) == [(3, 0), (12, 1)]


# ------------------------------------------------------------------ the tiny run
SECTIONS = ("summary", "visits", "diffexps", "kernel", "astrometry", "completeness", "roc", "gallery",
            "lightcurves")


def _tiny_products(tiny_run):
    from diapipe import config as dpconfig
    from diapipe.butler import Butler

    cfg = dpconfig.load(tiny_run.workdir / "config" / "config.yaml", tiny_run.config)
    b = Butler(cfg["datasets"])
    return cfg, {t: report.find_datasets(b, t, tiny_run.workdir) for t in ("calexp", "src", "diffexp")}


@pytest.mark.workflow
def test_tiny_run_report(tiny_run):
    """Self-contained: no external src/href; every section present with figures; one thumbnail and one
    kernel figure per difference image; the figure files for snakemake --report written."""
    html = tiny_run.path("report").read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in html
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=\"http" not in html
    assert html.count("light curve ") >= 1 and html.count("cutouts ") >= 1
    _, prod = _tiny_products(tiny_run)
    n_diff = len(prod["diffexp"])
    assert n_diff >= 2
    assert len(re.findall(r'alt="difference image \d+ \d+"', html)) == n_diff
    assert len(re.findall(r'alt="kernel \d+ \d+"', html)) == n_diff
    for col in ("seeing_arcsec", "zeropoint", "depth5sigma", "nDiaSources", "wcsFitRms_mas", "trueRms_mas",
                "fluxRatio", "stampChi2"):
        assert f"<th>{col}</th>" in html
    def figs(section):
        return tiny_run.path("report_figures", section=section)

    assert len(list(figs("diffexps").glob("diff_v*_d*.png"))) == n_diff
    assert (figs("kernel") / "kernel_trends.png").exists()
    assert (figs("astrometry") / "astrometry_residuals.png").exists()
    assert (figs("quality") / "roc.png").exists()


@pytest.mark.workflow
def test_tiny_visit_table_and_astrometry_against_truth(tiny_run):
    """Per-visit table against the simulated truth: zero point within 0.05 mag, seeing within 10%
    (measured: +4-5%, pixel and PSF-model broadening), depth plausible; measured-minus-true astrometry
    of the matched stars consistent with the WCS fit RMS characterize reports (the simulated refcat is
    nearly exact for these bright stars; measured 2.8-65 mas per calexp, 41 mas pooled) and under 0.5 px
    pooled (a wrong match or a missing cos(dec) would give arcseconds)."""
    cfg, prod = _tiny_products(tiny_run)
    dia = pd.read_parquet(tiny_run.path("diaSources_scored"))
    tv = pd.read_parquet(tiny_run.path("truth_visits"))
    t = report.visit_table(prod["calexp"], dia, tv)
    assert len(t) == len(prod["calexp"]) and t["nDiaSources"].sum() == len(dia)
    assert (t["zeropoint"] - t["zeropoint_true"]).abs().max() < 0.05
    assert ((t["seeing_arcsec"] / t["seeing_true"] - 1).abs() < 0.10).all()
    assert t["depth5sigma"].between(22, 27).all()
    # the light calexp reader gives the same depth as the full Exposure
    from diapipe.exposure import Exposure

    (v, d), p = sorted(prod["calexp"].items())[-1]
    row = t[(t["visit"] == v) & (t["detector"] == d)].iloc[0]
    assert row["depth5sigma"] == pytest.approx(report.depth_5sigma(Exposure.read(p)), abs=1e-9)
    ts = pd.read_parquet(tiny_run.path("truth_sources"))
    a, resid = report.astrometry_table(prod["calexp"], prod["src"], ts)
    assert (a["nTruth"] >= 5).all()
    assert (a["trueRms_mas"] < 2 * a["wcsFitRms_mas"] + 5).all()
    assert np.sqrt(np.mean(resid["dra_mas"] ** 2 + resid["ddec_mas"] ** 2)) < 100


@pytest.mark.workflow
def test_snakemake_report_zip(tiny_run, tmp_path):
    """`snakemake --report x.zip` after the run: the figures registered with report() are in it."""
    from wfutil import run

    out = tmp_path / "report.zip"
    proc = run(tiny_run.workdir, "--configfile", tiny_run.config, "--report", out, timeout=170)
    assert proc.returncode == 0, proc.stdout[-4000:]
    names = zipfile.ZipFile(out).namelist()
    assert any(n.endswith("report.html") for n in names), names[:20]
    _, prod = _tiny_products(tiny_run)
    pngs = [Path(n).name for n in names if n.endswith(".png")]
    assert sum(re.fullmatch(r"diff_v\d+_d\d+\.png", n) is not None for n in pngs) == len(prod["diffexp"])
    for name in ("kernel_trends.png", "astrometry_trends.png", "astrometry_residuals.png", "roc.png",
                 "index.html"):
        assert any(Path(n).name == name for n in names), name


@pytest.mark.workflow
def test_cli_rebuilds_the_report_of_a_finished_run(tiny_run, tmp_path):
    """`diapipe report --root <run>` finds the products through the Butler table: same sections and figures."""
    from diapipe import cli

    wd = tiny_run.workdir
    out, figs = tmp_path / "r.html", tmp_path / "figs"
    rc = cli.main(["report", "--root", str(wd), "--configfile", str(wd / "config" / "config.yaml"),
                   str(tiny_run.config), "-o", str(out), "--figures-dir", str(figs)])
    assert rc == 0
    html = out.read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in html
    _, prod = _tiny_products(tiny_run)
    assert len(list((figs / "diffexps").glob("*.png"))) == len(prod["diffexp"])
    assert len(list((figs / "kernel").glob("kernel_v*.png"))) == len(prod["diffexp"])
    assert (figs / "astrometry" / "astrometry_residuals.png").exists()
