"""The run report (diapipe.report): 5-sigma depth against a measured one, and the tiny run's HTML."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from diapipe import report

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


@pytest.mark.workflow
def test_tiny_run_report(tiny_run):
    """Self-contained: no external src/href; every section present with figures."""
    html = tiny_run.path("report").read_text()
    for section in ("summary", "visits", "completeness", "roc", "gallery", "lightcurves"):
        assert f"id='{section}'" in html
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=\"http" not in html
    assert html.count("light curve ") >= 1 and html.count("cutouts ") >= 1
