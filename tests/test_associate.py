"""Association (diapipe.associate) and forced photometry, measured against known truth.

Synthetic: transients observed over many visits with centroid noise, in pairs
closer than a few match radii, with an extra bogus detection near some of
them in the same visit; forced photometry on synthetic difference images of
known PSF and noise.  Workflow: the tiny survey's diaObjects and light curves
against the simulation truth.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diapipe import associate as asc

sys.path.insert(0, str(Path(__file__).parent))
from _detect_synth import add_point, make_diffexp  # noqa: E402

PIX = 0.2  # arcsec per pixel of the synthetic images


def synthetic_sources(n_obj=200, n_visits=12, sigma_arcsec=0.08, seed=3, pair_sep=2.5, extra=0.1):
    """diaSources of n_obj true sources (half of them in close pairs) over n_visits, plus the truth id."""
    rng = np.random.default_rng(seed)
    ra0, dec0 = 150.0, 2.0
    ra = ra0 + rng.uniform(-0.05, 0.05, n_obj)
    dec = dec0 + rng.uniform(-0.05, 0.05, n_obj)
    # every second object gets a neighbour pair_sep arcsec away
    ra[1::2] = ra[0::2] + pair_sep / 3600 / np.cos(np.radians(dec0))
    dec[1::2] = dec[0::2]
    rows = []
    for v in range(n_visits):
        seen = rng.random(n_obj) < 0.7
        for k in np.flatnonzero(seen):
            e = rng.normal(0, sigma_arcsec, 2)
            rows.append((k, v, ra[k] + e[0] / 3600 / np.cos(np.radians(dec0)), dec[k] + e[1] / 3600, 0.06))
            if rng.random() < extra:  # a bogus neighbour 1.5-3 match radii away in the same visit
                d = rng.uniform(1.5, 3.0)
                rows.append((-1, v, ra[k], dec[k] + d / 3600, 0.06))
    t = pd.DataFrame(rows, columns=["truth", "visit", "ra", "dec", "err"])
    t["diaSourceId"] = np.arange(len(t)) + 10**8 * t["visit"]
    t["detector"] = 0
    t["midpointMjdTai"] = 60000.0 + t["visit"]
    t["xErr"] = t["yErr"] = t["err"] / PIX / np.sqrt(2)
    t["band"] = "r"
    t["psfFlux"] = 1000.0
    t["reliability"] = 0.9
    t["isReliable"] = True
    return t


def test_association_purity_and_completeness():
    """>= 99% of each true source's diaSources in one diaObject; < 1% of diaObjects merge two."""
    t = synthetic_sources()
    srcs, objs = asc.associate(t, match_radius=0.5)
    m = srcs[srcs["truth"] >= 0]
    main = m.groupby(["truth", "diaObjectId"]).size().groupby(level=0).max()
    frac = main.sum() / len(m)
    merged = (srcs.groupby("diaObjectId")["truth"].apply(lambda s: s[s >= 0].nunique()) > 1).mean()
    assert frac >= 0.99, frac
    assert merged < 0.01, merged
    # one diaObject per true source (bogus neighbours make their own)
    assert m.groupby("truth")["diaObjectId"].nunique().max() == 1
    # positions: weighted mean within ~3 sigma/sqrt(n) of the truth (0.08" per detection)
    o = objs.set_index("diaObjectId")
    assert set(objs["diaObjectId"]) == set(srcs["diaObjectId"])
    assert (o["nDiaSources"].sum()) == len(srcs)
    assert (o["lastMjd"] >= o["firstMjd"]).all()


def test_nearest_wins_within_a_visit():
    """Two diaSources of one visit near one diaObject: the nearer joins it, the other starts a new one."""
    t = pd.DataFrame({"diaSourceId": [1, 2, 3], "visit": [0, 1, 1], "detector": 0,
                      "ra": [150.0, 150.0 + 0.6 / 3600, 150.0 + 0.2 / 3600], "dec": [2.0, 2.0, 2.0],
                      "midpointMjdTai": [1.0, 2.0, 2.0], "band": "r", "psfFlux": [1.0, 2.0, 3.0]})
    srcs, objs = asc.associate(t, match_radius=1.0)
    ids = srcs.set_index("diaSourceId")["diaObjectId"]
    assert ids[3] == ids[1] and ids[2] != ids[1]
    assert len(objs) == 2
    o = objs.set_index("diaObjectId").loc[ids[1]]
    assert o["nDiaSources"] == 2 and o["r_psfFluxMax"] == 3.0 and o["r_psfFluxMean"] == 2.0


def test_selection_by_reliability_and_fakes():
    t = pd.DataFrame({"diaSourceId": [1, 2, 3, 4], "visit": 0, "ra": 150.0, "dec": 2.0,
                      "reliability": [0.9, 0.2, 0.95, 0.6], "isReliable": [True, False, True, False],
                      "pixelFlags_injectedCenter": [False, False, True, False]})
    assert list(asc.select_sources(t)["diaSourceId"]) == [1]
    assert list(asc.select_sources(t, reliability_min=0.5)["diaSourceId"]) == [1, 4]
    assert list(asc.select_sources(t, reliability_min=0.5, exclude_injected=False)["diaSourceId"]) == [1, 3, 4]


def test_a_blended_centroid_does_not_move_the_diaobject():
    """Four detections of one supernova, one of them (the brightest, S/N 42) a blend with a host fake whose
    centroid sits 1.5 px off: it stays associated but is left out of the diaObject's position, which
    then lies on the supernova; with two detections nothing can be told apart and nothing is dropped."""
    scale = 0.2 / 3600  # deg per px
    ra0, dec0 = 150.0, 2.0
    x = np.array([100.0, 100.05, 101.5, 99.97])
    err = np.array([0.12, 0.09, 0.03, 0.05])  # px
    dia = pd.DataFrame({"diaSourceId": [1, 2, 3, 4], "diaObjectId": 1, "visit": [0, 1, 2, 3], "detector": 0,
                        "x": x, "y": 100.0, "ra": ra0 + (x - 100) * scale / np.cos(np.radians(dec0)),
                        "dec": dec0, "xErr": err, "yErr": err, "midpointMjdTai": [0.0, 1.0, 2.0, 3.0]})
    # a second object on the same exposures gives the table its pixel scale
    other = dia.assign(diaSourceId=dia["diaSourceId"] + 10, diaObjectId=2, x=dia["x"] + 300,
                       ra=dia["ra"] + 300 * scale / np.cos(np.radians(dec0)))
    both = pd.concat([dia, other], ignore_index=True)
    assert asc.pixel_scale_of(both) == pytest.approx(0.2, rel=1e-3)
    assert asc.position_outliers(both).tolist() == [False, False, True, False] * 2
    obj = asc.object_table(both).set_index("diaObjectId")
    off_px = (obj.loc[1, "ra"] - ra0) * np.cos(np.radians(dec0)) / scale
    assert abs(off_px - 0.0) < 0.05 and obj.loc[1, "nDiaSources"] == 4
    # the plain weighted mean would sit ~1 px off, toward the blend
    wmean = np.sum(x / err**2) / np.sum(1 / err**2) - 100
    assert wmean > 0.9
    assert not asc.position_outliers(both[both["visit"].isin([1, 2])]).any()


def test_forced_photometry_chi2_and_bias():
    """Forced PSF fluxes at known positions: pulls (f - f_true) / err have mean ~0 and chi2/dof ~1."""
    fwhm, sigma = 3.5, 10.0
    rng = np.random.default_rng(5)
    pulls, detected = [], []
    for v in range(6):
        exp = make_diffexp(fwhm=fwhm, sigma=sigma, seed=100 + v, visit=v, detector=0)
        xs = rng.uniform(30, 480, 40)
        ys = rng.uniform(30, 480, 40)
        fl = rng.uniform(0, 3000, 40)
        for x, y, f in zip(xs, ys, fl):
            add_point(exp.image, x, y, f, fwhm)
        ra, dec = exp.wcs.all_pix2world(xs, ys, 0)
        objs = pd.DataFrame({"diaObjectId": np.arange(40), "ra": ra, "dec": dec})
        srcs = pd.DataFrame({"diaObjectId": [3], "diaSourceId": [77], "visit": [v], "detector": [0]})
        lc = asc.forced_photometry(exp, objs, srcs)
        assert len(lc) == 40 and (lc["band"] == "r").all()
        pulls += list((lc["psfFlux"] - fl) / lc["psfFluxErr"])  # MAGZERO 31.4: 1 e- = 1 nJy
        detected += list(lc["detected"])
    pulls = np.asarray(pulls)
    chi2 = float(np.mean(pulls**2))
    assert 0.8 < chi2 < 1.25, chi2
    assert abs(np.mean(pulls)) < 4 / np.sqrt(len(pulls))
    assert sum(detected) == 6


def test_forced_photometry_total_flux_and_masked_cores():
    """PSF fluxes become total fluxes through the calexp's APCORR; a fit on a masked PSF core is flagged.

    The PSF model has unit sum over its stamp while MAGZERO calibrates total fluxes: on the
    simulated survey PSF fluxes of stars were 1.1-2.2% below the truth (APCORR 1.010-1.019) and
    forced SN fluxes alike.  A point whose core sits on masked pixels (a saturated star's bleed)
    came out at -1e6 nJy (truth 9400) with chi2/dof 42: it must not enter a light curve.
    """
    from diapipe import masks

    fwhm = 3.5
    exp = make_diffexp(fwhm=fwhm, sigma=5.0, seed=7, visit=1, detector=0)
    xs, ys = np.array([100.0, 300.0]), np.array([120.0, 320.0])
    for x, y in zip(xs, ys):
        add_point(exp.image, x, y, 20000.0, fwhm)
    exp.mask[316:325, 290:310] |= masks.MASK_DTYPE(masks.bit("SAT"))  # the second one's core
    ra, dec = exp.wcs.all_pix2world(xs, ys, 0)
    objs = pd.DataFrame({"diaObjectId": [1, 2], "ra": ra, "dec": dec})
    base = asc.forced_photometry(exp, objs)
    exp.metadata["APCORR"] = 1.02
    lc = asc.forced_photometry(exp, objs)
    assert lc["psfFlux"].iat[0] / base["psfFlux"].iat[0] == pytest.approx(1.02, rel=1e-9)
    assert lc["psfFluxErr"].iat[0] / base["psfFluxErr"].iat[0] == pytest.approx(1.02, rel=1e-9)
    assert not lc["forced_flag"].iat[0] and lc["forced_flag"].iat[1]
    assert lc["psfFlux"].iat[0] == pytest.approx(1.02 * 20000.0, rel=0.02)


def test_forced_photometry_skips_objects_off_the_image():
    exp = make_diffexp(shape=(128, 128), seed=2)
    ra, dec = exp.wcs.all_pix2world([64.0, 500.0, -40.0], [64.0, 64.0, 10.0], 0)
    lc = asc.forced_photometry(exp, pd.DataFrame({"diaObjectId": [1, 2, 3], "ra": ra, "dec": dec}))
    assert list(lc["diaObjectId"]) == [1]


def test_no_psf_is_a_clear_error():
    from diapipe.fileio import DiapipeError

    exp = make_diffexp(shape=(64, 64), psf=False)
    with pytest.raises(DiapipeError, match="no WCS or PSF"):
        asc.forced_photometry(exp, pd.DataFrame({"diaObjectId": [1], "ra": [150.0], "dec": [2.0]}))


@pytest.mark.workflow
def test_tiny_survey_association_and_lightcurves(tiny_run):
    """The tiny run's diaObjects and light curves against the simulation truth."""
    objs = pd.read_parquet(tiny_run.path("diaObjects"))
    srcs = pd.read_parquet(tiny_run.path("diaSources_associated"))
    lc = pd.read_parquet(tiny_run.path("lightcurves"))
    metrics = json.loads(tiny_run.path("association_metrics").read_text())
    assert len(objs) == srcs["diaObjectId"].nunique() == metrics["n_diaObjects"]
    # every diaObject is measured on every science diffexp that covers it, detected or not
    assert set(lc["diaObjectId"]) <= set(objs["diaObjectId"])
    assert lc.loc[lc["detected"], "diaSourceId"].isin(srcs["diaSourceId"]).all()
    if metrics.get("n_matched_sources", 0) >= 5:
        assert metrics["fraction_in_main_object"] >= 0.99, metrics
        assert metrics["merged_fraction"] < 0.05, metrics
