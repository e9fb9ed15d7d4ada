"""Characterization of one exposure of the default simulated survey, against its truth.

The postisr is the simulator's truth exposure plus noise of its variance, with the
true masks and the rough header WCS (up to 30" off), so only characterization is
measured (benchmarks/survey_characterize.py runs every exposure).  Acceptance
(issue 3): PSF FWHM within 3% of the truth over the detector (7x7 grid to the
corners), RMS(fitted - true WCS) <= 10 mas, zero point within 0.01 mag.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from diapipe import config as dpconfig
from diapipe import simulate as S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _survey_module():
    spec = importlib.util.spec_from_file_location("survey_characterize",
                                                  REPO / "benchmarks" / "survey_characterize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def first_science_visit():
    cfg = dpconfig.load(REPO / "config" / "config.yaml")
    plan = S.plan_survey(cfg)
    visit = cfg["simulate"]["n_template_visits"]  # the first science visit
    row = _survey_module().measure(plan, cfg, visit, 0)
    print(row)
    return row


def test_zero_point_within_0p01_mag(first_science_visit):
    row = first_science_visit
    assert row["n_phot"] >= 20
    assert abs(row["dMAGZERO"]) < 0.01


def test_wcs_within_10_mas_from_a_pointing_off_by_arcseconds(first_science_visit):
    row = first_science_visit
    assert row["header_wcs_error_arcsec"] > 5  # the header pointing really was off
    assert row["wcs_rms_mas"] <= 10.0


def test_psf_fwhm_within_3_percent_to_the_corners(first_science_visit):
    # a sparse field (~65 PSF stars): the size/shape model of psfex.fit_shape_psf
    # (measured 1.9%; the free pixel basis gave 4.5% here)
    assert first_science_visit["n_psf"] < 100  # really the sparse-field model
    assert first_science_visit["fwhm_err_max"] < 0.03


def test_psf_fwhm_sparse_field_weights_stars_by_snr():
    # visit 6, detector 0: 65 PSF stars, few at the x = 2047 corners.  With an intrinsic
    # scatter solved for chi^2/dof = 1 and a free quadratic size the model reached 4.95%
    # there; S/N weights and the radial size {1, u, v, u^2 + v^2} measured 2.0%.
    cfg = dpconfig.load(REPO / "config" / "config.yaml")
    plan = S.plan_survey(cfg)
    row = _survey_module().measure(plan, cfg, 6, 0)
    print(row)
    assert row["n_psf"] < 100
    assert row["fwhm_err_max"] < 0.03
    assert abs(row["dMAGZERO"]) < 0.01
