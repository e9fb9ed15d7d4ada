"""Acceptance of issue 5 on simulated pairs (measured against truth).

512 x 512 pairs of Moffat (or Gaussian) stars on a noisy sky, PSF FWHM
varying by 20% across the image, deeper template with another flux scale
and a differential background, 20 fakes of 3e4 e- in the science image.
For each case, with the default configuration (AL, decorrelated):

* std of difference / sqrt(variance) in blank sky within 1% of 1;
* the same pooled over 15 x 15 boxes around the 50 brightest stars within 2% of 1;
* mean forced PSF flux of the fakes in the difference within 1% of the truth.

The table in the report comes from the same cases
(``python benchmarks/bench_subtract.py --table``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from diapipe.subtract import subtract

sys.path.insert(0, str(Path(__file__).parent))
from subtract_synth import make_pair, psf_flux, residual_stats  # noqa: E402

CASES = {
    "ratio0.8": dict(seeing_ratio=0.8),
    "ratio1.0": dict(seeing_ratio=1.0),
    "ratio1.5": dict(seeing_ratio=1.5),
    "ratio2.0": dict(seeing_ratio=2.0),
    "ratio1.5-shift0.3": dict(seeing_ratio=1.5, shift=(0.3, 0.0)),
    "ratio0.8-shift0.3": dict(seeing_ratio=0.8, shift=(0.2, 0.2)),
    "ratio1.5-gaussian": dict(seeing_ratio=1.5, kind="gaussian"),
}


def measure(case: dict, config: dict | None = None):
    s, t, truth = make_pair(512, seed=3, **case)
    d = subtract(s, t, config or {})
    blank, stars, nbox = residual_stats(d, truth)
    fl = np.array([psf_flux(d, x, y)[0] for x, y in zip(truth["fake_x"], truth["fake_y"])])
    return d, blank, stars, nbox, fl.mean() / truth["fake_flux"][0] - 1.0


def test_equal_seeing_bright_stars():
    """Equal seeing as on the survey's visit 11 (FWHM 4.5 px, stars up to 2e6 e-, 1024^2): the kernel
    is nearly a delta, and the template's own noise in the normal equations (errors-in-variables)
    takes out its sharp part unless debiased; the science star cores are then left over.
    Measured on seeds 1-3: star boxes 0.984 / 0.999 / 0.982 debiased, 1.022 / 1.035 / 1.015 not."""
    s, t, truth = make_pair(1024, seeing_ratio=1.0, fwhm_t=4.5, seed=2, n_fakes=0, star_flux=(500.0, 2e6))
    d = subtract(s, t)
    blank, stars, nbox = residual_stats(d, truth)
    assert nbox == 50 and abs(blank - 1) < 0.01
    assert abs(stars - 1) < 0.02, f"bright-star boxes std {stars:.4f}"  # measured 0.9993
    off = residual_stats(subtract(s, t, {"debias_noise": "off"}), truth)[1]
    assert off > 1.02, f"without the debiasing {off:.4f}"  # measured 1.0345


@pytest.mark.parametrize("name", list(CASES))
def test_al_residuals_and_fakes(name):
    d, blank, stars, nbox, bias = measure(CASES[name])
    assert nbox == 50
    assert abs(blank - 1) < 0.01, f"blank-sky std {blank:.4f}"
    assert abs(stars - 1) < 0.02, f"bright-star boxes std {stars:.4f}"
    assert abs(bias) < 0.01, f"fake PSF-flux bias {bias:+.4f}"
    assert d.metadata["DECORR"] is True
    # the flux ratio science/template is recovered (simulated template scale 0.8; the
    # truncated Moffat wings cost the kernel sum up to ~1.5%)
    assert d.metadata["FLUXRAT"] == pytest.approx(1.25, rel=0.02)


@pytest.mark.parametrize("name", ["ratio1.0", "ratio1.5", "ratio1.5-shift0.3"])
def test_zogy_residuals_and_fakes(name):
    d, blank, stars, nbox, bias = measure(CASES[name], {"method": "zogy"})
    assert abs(blank - 1) < 0.01, f"blank-sky std {blank:.4f}"
    # ZOGY uses the PSFs at the image centre: the 20% PSF variation shows around bright stars
    # (a 0.3 px misregistration left uncorrected gives 1.10 here)
    assert abs(stars - 1) < 0.03, f"bright-star boxes std {stars:.4f}"
    assert abs(bias) < 0.01, f"fake PSF-flux bias {bias:+.4f}"
    # the misregistration ZOGY removes is the one simulated (from the AL kernel's centroid)
    true_dx, true_dy = CASES[name].get("shift", (0.0, 0.0))
    assert d.metadata["ZOGYDX"] == pytest.approx(true_dx, abs=0.05)
    assert d.metadata["ZOGYDY"] == pytest.approx(true_dy, abs=0.05)


def test_without_decorrelation_variance_still_right():
    d, blank, stars, _, bias = measure(CASES["ratio1.5"], {"decorrelate": False})
    assert d.metadata["DECORR"] is False
    assert abs(blank - 1) < 0.01 and abs(stars - 1) < 0.02 and abs(bias) < 0.01
