"""The run report in a real headless browser (Debian `chromium`): no console errors, key elements, a screenshot.

Skips with a reason when chromium is not installed (apt-get install chromium).  Set
DIAPIPE_KEEP_SCREENSHOT_DIR to keep the screenshots for a look.
"""

import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian 'chromium' (apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]
SECTIONS = ("summary", "visits", "diffexps", "kernel", "astrometry", "completeness", "roc", "gallery",
            "lightcurves")


def open_in_chromium(html_path, tmp_path, width=1280, height=2400):
    """Load a file in headless chromium twice: the DOM after load and a screenshot; returns (dom, console, png)."""
    url = f"file://{os.path.abspath(html_path)}"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    shot = tmp_path / "report.png"
    scr = subprocess.run([*common, f"--window-size={width},{height}", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    # Page console output (console.*, uncaught exceptions, refused resources) is logged as CONSOLE lines.
    console = [ln for ln in (dom.stderr + scr.stderr).splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert dom.returncode == 0 and dom.stdout.strip(), dom.stderr[-2000:]
    assert shot.exists(), scr.stderr[-2000:]
    keep = os.environ.get("DIAPIPE_KEEP_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, os.path.join(keep, f"{tmp_path.name}.png"))
    return dom.stdout, console, shot


def check_png(path, min_height=600):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    assert img.shape[0] >= min_height and img.shape[1] >= 800
    assert img.std() > 0.05, "the screenshot is (nearly) blank"
    return img


def check_report_dom(dom, n_lightcurves_min=1):
    assert re.search(r"<h1>[^<]+</h1>", dom)
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom or f"id='{sid}'" in dom, f"section #{sid} missing"
        assert f'href="#{sid}"' in dom or f"href='#{sid}'" in dom, f"no link to section #{sid}"
    assert "<table" in dom
    # self-contained: every image inline, and every inline PNG decodes
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', dom)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), [s[:60] for s in srcs if not s.startswith("data:")]
    import matplotlib.image as mpimg

    for s in srcs:
        mpimg.imread(io.BytesIO(base64.b64decode(s.split(",", 1)[1])), format="png")
    lc = dom.split('id="lightcurves"')[-1]
    assert len(re.findall(r"<img", lc)) >= n_lightcurves_min
    return srcs


def test_console_errors_are_seen(tmp_path):
    """The check can fail: a page that throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><h1>x</h1><script>throw new Error('boom')</script></body></html>")
    _, console, _ = open_in_chromium(bad, tmp_path, 900, 700)
    assert any("boom" in c for c in console)


def _synthetic_inputs(tmp_path):
    rng = np.random.default_rng(5)
    n_obj, visits = 4, np.arange(10, 22)
    mjd = 60000 + 2.0 * np.arange(len(visits))
    lc = []
    for o in range(n_obj):
        true = 5000 * np.exp(-0.5 * ((mjd - mjd[4 + o]) / 5) ** 2)
        for v, t, f in zip(visits, mjd, true):
            lc.append({"diaObjectId": o + 1, "visit": v, "detector": 0, "midpointMjdTai": t,
                       "psfFlux": f + rng.normal(0, 300), "psfFluxErr": 300.0, "detected": f > 1500})
    lc = pd.DataFrame(lc)
    det = lc[lc.detected].reset_index(drop=True)
    dia = pd.DataFrame({"diaSourceId": np.arange(len(det)) + 1000, "visit": det.visit, "detector": 0,
                        "diaObjectId": det.diaObjectId, "midpointMjdTai": det.midpointMjdTai,
                        "psfFlux": det.psfFlux, "snr": det.psfFlux / 300, "x": 50.0, "y": 60.0, "ra": 10.0,
                        "dec": -5.0, "reliability": 0.9, "isReliable": True})
    obj = dia.groupby("diaObjectId").agg(nDiaSources=("diaSourceId", "size"), ra=("ra", "mean"),
                                         dec=("dec", "mean")).reset_index()
    obj["maxReliability"] = 0.9
    paths = {}
    for name, df in (("dia", dia), ("obj", obj), ("lc", lc)):
        paths[name] = tmp_path / f"{name}.parquet"
        df.to_parquet(paths[name])
    return paths


def test_synthetic_report_in_chromium(tmp_path):
    """A report from small synthetic tables and one difference image (no pipeline run): opens cleanly,
    sections, the thumbnail and 4 light curves present, navigation links resolve to sections."""
    import sys
    from pathlib import Path

    from diapipe import report

    sys.path.insert(0, str(Path(__file__).parent))
    from _detect_synth import make_diffexp

    p = _synthetic_inputs(tmp_path)
    diff = tmp_path / "diff.fits"
    make_diffexp(shape=(128, 128), visit=10, detector=0).write(diff)
    out = tmp_path / "report" / "index.html"
    report.build(out, calexps={}, cutouts={}, diffexps={(10, 0): diff}, dia_scored=p["dia"],
                 dia_associated=p["dia"], objects=p["obj"], lightcurves=p["lc"],
                 bench_dir=tmp_path / "no-benchmarks", title="synthetic run")
    dom, console, shot = open_in_chromium(out, tmp_path)
    assert console == [], console
    assert len(check_report_dom(dom, n_lightcurves_min=4)) >= 5
    assert 'alt="difference image 10 0"' in dom
    check_png(shot)


@pytest.mark.workflow
def test_tiny_run_report_in_chromium(tiny_run, tmp_path):
    """Acceptance (issue 8): the tiny run's report opens in chromium without console errors; key elements there."""
    html = tiny_run.path("report")
    dom, console, shot = open_in_chromium(html, tmp_path)
    assert console == [], console
    srcs = check_report_dom(dom)
    assert len(srcs) >= 3  # completeness, ROC, light curves at least
    assert "diaObject" in dom and "reliability" in dom.lower()
    # the diagnostics added for issue 8: a thumbnail and a kernel figure per difference image, the kernel
    # trends, the astrometry table, trends and truth residuals
    n_thumbs = len(re.findall(r'alt="difference image \d+ \d+"', dom))
    assert n_thumbs >= 2 and len(re.findall(r'alt="kernel \d+ \d+"', dom)) == n_thumbs
    for alt in ("kernel diagnostics across visits", "WCS fit RMS across visits", "measured minus true positions"):
        assert f'alt="{alt}"' in dom, alt
    for col in ("wcsFitRms_mas", "nMatched", "fluxRatio", "depth5sigma", "seeing_arcsec"):
        assert f"<th>{col}</th>" in dom, col
    img = check_png(shot)
    # the page is laid out, not one long blank: content in the top and the lower half of the screenshot
    rows = np.where(img.std(axis=(1, 2)) > 0.01)[0]
    assert rows.min() < 200 and rows.max() > img.shape[0] // 3
