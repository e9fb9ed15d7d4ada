"""Measurement accuracy on synthetic difference images with a known PSF and known fluxes."""

import numpy as np
import pandas as pd
import pytest
from _detect_synth import MAGZERO, add_point, gaussian_stamp, make_diffexp, optimal_snr
from scipy.spatial import cKDTree

from diapipe import masks, measure
from diapipe.exposure import Exposure, MaskedImage
from diapipe.psf import PixelPsf

FWHM, SIGMA = 3.5, 10.0
S_PSF = FWHM / 2.3548


@pytest.fixture(scope="module")
def bright_sample():
    """~1400 isolated point sources with S/N_opt log-uniform in [10, 50] on white noise."""
    unit = optimal_snr(1.0, FWHM, SIGMA)
    rows = []
    for seed in (201, 202, 203):
        rng = np.random.default_rng(seed)
        g = np.arange(16, 768 - 16, 32)
        X, Y = np.meshgrid(g, g)
        X = X.ravel() + rng.uniform(-0.5, 0.5, X.size)
        Y = Y.ravel() + rng.uniform(-0.5, 0.5, X.size)
        snr = np.exp(rng.uniform(np.log(10), np.log(50), X.size))
        flux = snr / unit
        e = make_diffexp((768, 768), FWHM, SIGMA, list(zip(X, Y, flux)), seed=seed)
        # the fit itself, with the variance plane's errors (rescaling is tested in test_detect)
        tab, _, _ = measure.detect_and_measure(e, config={"rescale_noise": False})
        dist, idx = cKDTree(tab[["x", "y"]].to_numpy()).query(np.c_[X, Y])
        assert (dist < 1.0).all()
        m = tab.iloc[idx].reset_index(drop=True)
        m["true_flux"], m["true_x"], m["true_y"], m["true_snr"] = flux, X, Y, snr
        rows.append(m)
    return pd.concat(rows, ignore_index=True)


def test_psf_flux_unbiased_with_correct_errors(bright_sample):
    s = bright_sample
    rel = (s["psfFlux"] - s["true_flux"]) / s["true_flux"]  # MAGZERO 31.4: nJy == e-
    pull = (s["psfFlux"] - s["true_flux"]) / s["psfFluxErr"]
    print(f"n={len(s)} median bias {np.median(rel):+.4f}, pull std {np.std(pull):.3f}")
    assert abs(np.median(rel)) < 0.01
    assert abs(np.std(pull) - 1.0) < 0.05
    # the error is the optimal one: flux / error = S/N_opt
    assert np.allclose(s["true_flux"] / s["psfFluxErr"], s["true_snr"], rtol=1e-3)


def test_centroid_errors_match_expectation(bright_sample):
    """Background-limited: Cramer-Rao sigma_x = sqrt(2) sigma_PSF / S/N = sqrt(2) FWHM / (2.35 S/N)."""
    s = bright_sample
    expected = np.sqrt(2) * S_PSF / s["true_snr"]
    for axis in ("x", "y"):
        ratio = np.std((s[axis] - s["true_" + axis]) / expected)
        print(f"{axis}: std(offset) / (sqrt2 FWHM / 2.35 S/N) = {ratio:.3f}; "
              f"/ (FWHM / 2.35 S/N) = {ratio * np.sqrt(2):.3f}")
        assert abs(ratio - 1) < 0.2
        # the reported errors are right too
        assert abs(np.std((s[axis] - s["true_" + axis]) / s[axis + "Err"]) - 1) < 0.1


def test_centroid_photon_limited_regime_matches_fwhm_over_2p35_snr():
    """With the source's own photon noise dominating, sigma_x = FWHM / (2.35 S/N)."""
    rng = np.random.default_rng(5)
    flux, n = 4000.0, 300
    stamp_true = []
    offs = []
    for k in range(n):
        x0, y0 = 32 + rng.uniform(-0.5, 0.5), 32 + rng.uniform(-0.5, 0.5)
        model = np.zeros((64, 64))
        add_point(model, x0, y0, flux, FWHM)
        model = np.clip(model, 0, None) + 0.01  # tiny background: photon-limited
        img = rng.poisson(model) - 0.01
        e = Exposure(MaskedImage(img, None, model), psf=PixelPsf.constant(gaussian_stamp(FWHM)),
                     metadata={"MAGZERO": MAGZERO})
        r = measure.psf_fit(measure._Pixels(e), e.psf, 32.0, 32.0)
        offs.append(r["x"] - x0)
        stamp_true.append(r["flux"] / r["fluxErr"])
    snr = np.median(stamp_true)
    ratio = np.std(offs) / (FWHM / (2.35 * snr))
    print(f"photon-limited S/N {snr:.1f}: std(dx) / (FWHM / 2.35 S/N) = {ratio:.3f}")
    assert abs(ratio - 1) < 0.2


def test_moments_aperture_and_snr_of_a_point_source():
    flux = 20000.0
    e = make_diffexp((128, 128), FWHM, SIGMA, [(64.2, 63.7, flux)], seed=4)
    tab, _, _ = measure.detect_and_measure(e, config={"aperture_radii": [12.0, 6.0]})
    r = tab.iloc[0]
    assert abs(r["ixx"] / S_PSF**2 - 1) < 0.1 and abs(r["iyy"] / S_PSF**2 - 1) < 0.1
    assert abs(r["ixy"]) < 0.1 * S_PSF**2
    assert abs(r["apFlux"] / flux - 1) < 3 * r["apFluxErr"] / flux + 0.005
    assert abs(r["apFluxErr"] - SIGMA * np.sqrt(np.pi * 12.0**2)) < 0.02 * r["apFluxErr"]
    assert "apFlux_6" in tab and r["apFlux_6"] < r["apFlux"]
    assert abs(r["snr"] / optimal_snr(flux, FWHM, SIGMA) - 1) < 0.05  # peak pixel: sub-pixel sampling loss


def test_science_and_template_forced_fluxes():
    sci = make_diffexp((96, 96), FWHM, SIGMA, [(48.0, 40.0, 9000.0)], seed=31)
    tmpl = make_diffexp((96, 96), FWHM, SIGMA, [(48.0, 40.0, 5000.0)], seed=32)
    diff = make_diffexp((96, 96), FWHM, SIGMA, [(48.0, 40.0, 4000.0)], seed=33)
    tab, cut, _ = measure.detect_and_measure(diff, science=sci, template=tmpl)
    r = tab.iloc[0]
    assert abs(r["scienceFlux"] - 9000) < 4 * r["scienceFluxErr"]
    assert abs(r["templateFlux"] - 5000) < 4 * r["templateFluxErr"]
    assert not r["forced_flag"]
    assert np.isfinite(cut["template"]).all() and cut["science"].shape == (1, 31, 31)
    assert abs(cut["science"][0, 15, 15] - sci.image[40, 48]) < 1e-3


def test_calibration_to_nJy_uses_magzero():
    e = make_diffexp((96, 96), FWHM, SIGMA, [(48.0, 48.0, 5000.0)], seed=34)
    e.metadata["MAGZERO"] = 28.9  # 1 e- = 10**(-0.4 * (28.9 - 31.4)) = 10 nJy
    r = measure.detect_and_measure(e)[0].iloc[0]
    assert abs(r["psfFlux"] / 50000 - 1) < 0.05 and abs(r["psfFluxErr"] / (10 * SIGMA / np.sqrt(
        (gaussian_stamp(FWHM) ** 2).sum() / gaussian_stamp(FWHM).sum() ** 2)) - 1) < 0.01


def test_pixel_flags():
    e = make_diffexp((128, 128), FWHM, SIGMA, [(40.0, 40.0, 5000.0), (3.0, 90.0, 5000.0), (90.0, 90.0, 5000.0)],
                     seed=35)
    m = np.zeros(e.shape, bool)
    m[40, 41] = True
    masks.set_plane(e.mask, m, "CR")
    m[:] = False
    m[85, 90] = True
    masks.set_plane(e.mask, m, "SAT")
    tab, _, _ = measure.detect_and_measure(e)
    a = tab.iloc[np.argmin(np.hypot(tab["x"] - 40, tab["y"] - 40))]
    b = tab.iloc[np.argmin(np.hypot(tab["x"] - 3, tab["y"] - 90))]
    c = tab.iloc[np.argmin(np.hypot(tab["x"] - 90, tab["y"] - 90))]
    assert a["pixelFlags_cr"] and a["pixelFlags_crCenter"] and not a["pixelFlags_edge"]
    assert b["pixelFlags_edge"] and not b["pixelFlags_cr"]
    assert c["pixelFlags_saturated"] and not c["pixelFlags_saturatedCenter"]


def test_refcat_distance_and_bright_star_flag():
    e = make_diffexp((128, 128), FWHM, SIGMA, [(64.0, 64.0, 5000.0)], seed=36)
    ra0, dec0 = e.wcs.pixel_to_world_values(64.0, 64.0)
    ref = pd.DataFrame({"ra": [ra0 + 3 / 3600 / np.cos(np.radians(dec0)), ra0 + 0.01],
                        "dec": [dec0, dec0], "r_mag": [15.0, 20.0]})
    r = measure.detect_and_measure(e, refcat=ref)[0].iloc[0]
    assert abs(r["refDistance"] - 3.0) < 0.1 and r["nearBrightStar"]
    r = measure.detect_and_measure(e, refcat=ref, config={"bright_star_mag": 14.0})[0].iloc[0]
    assert not r["nearBrightStar"]


def test_ids_unique_deterministic_and_metadata():
    e = make_diffexp((128, 128), FWHM, SIGMA, [(30.0, 30.0, 5000.0), (90.0, 90.0, 5000.0)], seed=37,
                     visit=1234, detector=56)
    t1 = measure.detect_and_measure(e.copy())[0]
    t2 = measure.detect_and_measure(e.copy())[0]
    assert list(t1["diaSourceId"]) == [1234 * 10**8 + 56 * 10**5, 1234 * 10**8 + 56 * 10**5 + 1]
    pd.testing.assert_frame_equal(t1, t2)
    assert (t1["midpointMjdTai"] == 60000.0 + 15.0 / 86400).all()
    assert (t1["band"] == "r").all() and (t1["visit"] == 1234).all() and (t1["detector"] == 56).all()
    big = measure.make_dia_source_id(2024060100123, 3, [0, 1])  # a real camera's exposure number
    assert len(set(big)) == 2 and (big > 0).all()


def test_columns_doc_is_generated_from_the_one_column_list():
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "diaSource-columns.md"
    assert doc.read_text() == measure.columns_markdown(), "run: diapipe detect-columns"
    for c, (dtype, unit, desc) in measure.COLUMNS.items():
        assert desc and dtype in ("int64", "float64", "bool", "str")
