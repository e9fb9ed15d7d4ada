"""The simulated survey obeys its own model (issue "Foundation", item 3 acceptance).

Measured on the tiny overlay config (2 detectors of 512 x 512) or smaller;
each figure is compared with the truth the simulator wrote, with the issue's
tolerances: bias level and read noise 2%, sky variance 3%, star FWHM 3%,
astrometry 0.05 px rms, bleed trails on saturated stars, byte-identical reruns.
"""

from __future__ import annotations

import filecmp
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits

from diapipe import masks
from diapipe import simulate as sim
from diapipe import simulate_checks as chk
from diapipe.config import ConfigError
from diapipe.exposure import Exposure
from diapipe.fileio import DiapipeError, write_fits

from wfutil import REPO

TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())["simulate"]


@pytest.fixture(scope="module")
def cfg():
    return {"seed": 42, "simulate": dict(TINY)}


@pytest.fixture(scope="module")
def plan(cfg):
    return sim.plan_survey(cfg)


@pytest.fixture(scope="module")
def exposures(plan):
    """A few simulated exposures: (visit, detector) -> (raw HDUList, truth Exposure)."""
    out = {}
    for visit, detector in [(0, 0), (1, 1), (4, 0), (5, 1)]:
        out[(visit, detector)] = sim.simulate_raw(None, plan, visit, detector)
    return out


@pytest.fixture(scope="module")
def checks(plan, exposures):
    return {k: chk.check_exposure(plan, *k, raw_hdul=r, truth=t) for k, (r, t) in exposures.items()}


# ------------------------------------------------------------------ plan
def test_plan_has_every_kind_of_source_and_sane_visits(plan, cfg):
    s = cfg["simulate"]
    kinds = set(plan.sources["kind"])
    assert {"star", "galaxy", "sn", "variable", "mover", "flare"} <= kinds
    v = plan.visits
    assert len(v) == s["n_template_visits"] + s["n_science_visits"]
    assert v["is_template"].tolist() == [True] * s["n_template_visits"] + [False] * s["n_science_visits"]
    # Templates first, in good seeing; the survey spans about a month.
    assert v.loc[v["is_template"], "seeing"].max() <= 0.9
    assert v["seeing"].between(0.6, 1.5).all()
    assert 25 < v["mjd"].max() - v["mjd"].min() <= 31
    assert (np.diff(v["mjd"]) > 0).all()
    # Dithers and rotations differ between visits; the header pointing is off by < 30".
    assert v["ra"].nunique() == len(v) and v["rotation"].abs().max() > 0
    assert (v["pointing_err_arcsec"] <= 30).all() and v["pointing_err_arcsec"].max() > 3
    assert v["sat_trail"].any()


def test_supernovae_sit_off_their_host_centres(plan):
    src = plan.sources.set_index("source_id")
    sn = src[src["kind"] == "sn"]
    assert len(sn) > 0
    hosts = src.loc[sn["host_id"]]
    sep = np.hypot((sn["ra"].to_numpy() - hosts["ra"].to_numpy()) * math.cos(math.radians(2.0)),
                   sn["dec"].to_numpy() - hosts["dec"].to_numpy()) * 3600
    reff = hosts["reff"].to_numpy()
    assert (sep > 0.25 * reff).all() and (sep < 1.6 * reff).all()
    assert (hosts["kind"] == "galaxy").all()


def test_light_curves_and_movers(plan):
    src = plan.sources
    sn = src[src["kind"] == "sn"].iloc[:1]
    t0 = float(sn["t0"].iloc[0])
    mags = [sim.light_curve_mag(sn, t0 + dt)[0] for dt in (-30, -3, 5, 60)]
    # Rises to within a few tenths of the peak, then fades.
    assert mags[0] > mags[1] and mags[2] < mags[3]
    assert min(mags) >= float(sn["mag"].iloc[0]) - 1e-9
    mv = src[src["kind"] == "mover"].iloc[:1]
    r1 = sim.source_positions(mv, float(mv["t0"].iloc[0]))
    r2 = sim.source_positions(mv, float(mv["t0"].iloc[0]) + 1 / 24)
    moved = math.hypot((r1[0][0] - r2[0][0]) * math.cos(math.radians(r1[1][0])), r1[1][0] - r2[1][0]) * 3600
    assert 5 <= moved <= 60  # arcsec per hour


def test_truth_fluxes_and_refcat(plan):
    f = plan.fluxes
    assert {"source_id", "visit", "detector", "x", "y", "flux", "flux_nJy"} <= set(f.columns)
    zp = plan.visits.set_index("visit").loc[f["visit"], "zeropoint"].to_numpy()
    np.testing.assert_allclose(f["flux_nJy"], f["flux"] * 10 ** (-0.4 * (zp - 31.4)), rtol=1e-12)
    np.testing.assert_allclose(f["mag"], 31.4 - 2.5 * np.log10(f["flux_nJy"]), atol=1e-9)
    ref = plan.refcat
    assert {"id", "ra", "dec", "ra_err", "dec_err", "r_mag", "r_magErr"} <= set(ref.columns)
    assert ref["r_mag"].max() < 20.6 and len(ref) > 20
    truth = plan.sources.set_index("source_id").loc[ref["id"]]
    dpos = (ref["dec"].to_numpy() - truth["dec"].to_numpy()) * 3.6e6 / ref["dec_err"].to_numpy()
    assert 0.7 < np.std(dpos) < 1.3  # errors as quoted (Gaia-like, mas)


def test_plan_round_trips_through_the_truth_tables(plan, cfg, tmp_path):
    paths = {n: tmp_path / f"{n}.parquet" for n in sim.PLAN_TABLES}
    sim.write_plan(plan, paths)
    again = sim.load_plan(cfg, paths)
    pd.testing.assert_frame_equal(again.visits, plan.visits)
    pd.testing.assert_frame_equal(again.sources, plan.sources)
    w1, w2 = sim.true_wcs(plan, 3, 1), sim.true_wcs(again, 3, 1)
    np.testing.assert_allclose(w1.all_pix2world([[10.0, 500.0]], 0), w2.all_pix2world([[10.0, 500.0]], 0))
    assert sim.true_fwhm(again, 3, 1, 100, 200) == sim.true_fwhm(plan, 3, 1, 100, 200)
    with pytest.raises(DiapipeError, match="truth_sources"):
        sim.load_plan(cfg, {"truth_visits": paths["truth_visits"]})


def test_bad_simulate_config_names_the_key():
    with pytest.raises(ConfigError, match="simulate.nx"):
        sim.sim_config({"simulate": {"nx": "big"}})
    with pytest.raises(ConfigError, match="simulate.no_such_key"):
        sim.sim_config({"simulate": {"no_such_key": 1}})
    with pytest.raises(ConfigError, match="simulate.nx"):
        sim.sim_config({"simulate": {"nx": 513, "n_amps": 2}})


# ------------------------------------------------------------------ WCS and PSF
def test_true_wcs_is_tan_sip_and_describes_the_distortion_exactly(plan):
    w = sim.true_wcs(plan, 2, 1)
    assert w.wcs.ctype[0] == "RA---TAN-SIP" and w.sip.a_order == 3
    # The radial cubic about the optical axis, computed independently.
    s = plan.sim
    k = s["distortion_px"] / sim.focal_plane_radius(s) ** 3
    x, y = np.array([0.0, 511.0, 250.0]), np.array([0.0, 511.0, 40.0])
    u = x + 1 - w.wcs.crpix[0]
    v = y + 1 - w.wcs.crpix[1]
    r2 = u * u + v * v
    lin = sim.true_wcs(plan, 2, 1).deepcopy()
    lin.sip = None
    expect = lin.wcs_pix2world(u * (1 + k * r2) + w.wcs.crpix[0] - 1, v * (1 + k * r2) + w.wcs.crpix[1] - 1, 0)
    got = w.all_pix2world(x, y, 0)
    np.testing.assert_allclose(got, expect, atol=1e-10)
    # Inverse round trip; the fitted AP/BP alone are good to < 0.01 px.
    xx, yy = w.all_world2pix(*got, 0)
    np.testing.assert_allclose([xx, yy], [x, y], atol=1e-6)
    # Distortion matters at the level characterize must fit: > 1 px at the far corner.
    assert np.abs(k * np.sqrt(r2) ** 3).max() > 1.0


def test_header_wcs_is_rough(plan, exposures):
    raw, truth = exposures[(4, 0)]
    from astropy.wcs import WCS

    hw = WCS(raw[0].header)
    assert hw.sip is None
    c = np.array([[255.5, 255.5]])
    a, b = hw.all_pix2world(c, 0)[0], truth.wcs.all_pix2world(c, 0)[0]
    err = math.hypot((a[0] - b[0]) * math.cos(math.radians(a[1])), a[1] - b[1]) * 3600
    perr = float(plan.visit_row(4)["pointing_err_arcsec"])
    assert err < perr + 2.0 and err > perr - 2.0


def test_true_psf_is_normalised_centred_and_varies_over_the_focal_plane(plan):
    s = plan.sim
    img = sim.true_psf_image(plan, 5, 0, 256, 256, size=41)
    assert img.shape == (41, 41) and abs(img.sum() - 1) < 1e-12
    y, x = np.mgrid[:41, :41]
    assert abs((img * x).sum() - 20) < 1e-3 and abs((img * y).sum() - 20) < 1e-3
    # FWHM at the optical-axis end of the detector vs the far corner.
    fwhm_in = sim.true_fwhm(plan, 5, 0, 511, 255)
    fwhm_out = sim.true_fwhm(plan, 5, 0, 0, 0)
    assert fwhm_out > fwhm_in * 1.02
    seeing_px = float(plan.visit_row(5)["seeing"]) / s["pixel_scale"]
    assert abs(fwhm_in / seeing_px - 1) < 0.05
    # The FWHM the profile really has (measured on a finely sampled stamp, no pixels).
    p = sim._scalar_params(sim.psf_params(plan, 5, 0, 0, 0))
    r = np.linspace(0, 3 * p["fwhm"], 30001)
    prof = sim.psf_profile(r, 0 * r, dict(p, q=1.0))
    measured = 2 * r[np.argmin(np.abs(prof - prof[0] / 2))]
    assert abs(measured / p["fwhm"] - 1) < 1e-3
    # Wings: more flux beyond 3 FWHM than a Gaussian (which has ~0) has.
    big = sim.true_psf_image(plan, 5, 0, 0, 0, size=81)
    rr = np.hypot(np.arange(81)[None, :] - 40, np.arange(81)[:, None] - 40)
    assert big[rr > 3 * fwhm_out].sum() > 0.005


# ------------------------------------------------------------------ raw frames
def test_raw_frame_format(exposures, plan):
    raw, truth = exposures[(1, 1)]
    h = raw[0].header
    s = plan.sim
    data = raw[0].data
    assert data.dtype == np.uint16
    assert data.shape == (s["ny"], s["n_amps"] * (s["nx"] // s["n_amps"] + s["n_overscan"]))
    for key in ("OBSTYPE", "IMAGETYP", "DATE-OBS", "MJD-OBS", "EXPTIME", "DARKTIME", "FILTER", "AIRMASS",
                "DETECTOR", "CCDNAME", "EXPNUM", "RA", "DEC", "TELESCOP", "INSTRUME", "NAMPS", "GAIN",
                "RDNOISE", "SATURATE", "CTYPE1", "CRVAL1"):
        assert key in h, key
    assert h["OBSTYPE"] == "object" and h["EXPNUM"] == 1 and h["DETECTOR"] == 1
    secs = chk.amp_sections(h)
    covered = np.zeros((s["ny"], s["nx"]), int)
    for a in secs:
        covered[a["det"]] += 1
        assert data[a["bias"]].shape[1] == s["n_overscan"]
    assert (covered == 1).all()
    # Truth Exposure: image in e-, masks, variance, TAN-SIP WCS, PSF, zero point.
    assert truth.metadata["MAGZERO"] > 25 and truth.psf is not None and truth.wcs.sip is not None
    assert truth.image.shape == (s["ny"], s["nx"])


def test_amplifier_bias_and_read_noise_from_overscan_and_bias_frames(plan, cfg, checks):
    truth = plan.amps.set_index(["detector", "amp"])
    for (visit, det), c in checks.items():
        for _, row in c["overscan"].iterrows():
            t = truth.loc[(det, row["amp"])]
            assert abs(row["bias_overscan"] / t["bias_level"] - 1) < 0.02
            assert abs(row["read_noise_overscan"] / t["read_noise"] - 1) < 0.02, (visit, det, row)
    for det in (0, 1):
        b1 = sim.simulate_calib(cfg, "bias", det, 0)
        b2 = sim.simulate_calib(cfg, "bias", det, 1)
        rn = chk.bias_pair_read_noise(b1[0].data, b2[0].data, b1[0].header)
        for _, row in rn.iterrows():
            t = truth.loc[(det, row["amp"])]
            assert abs(row["read_noise_bias"] / t["read_noise"] - 1) < 0.02
            # The data region of a bias also sits at the bias level (plus the fixed structure).
            assert abs(row["bias_frames"] / t["bias_level"] - 1) < 0.02


def test_sky_variance_matches_sky_plus_read_noise(checks):
    sky = pd.concat([c["sky"] for c in checks.values()])
    assert (sky["n_pixels"] > 10000).all()
    assert (np.abs(sky["ratio"] - 1) < 0.03).all(), sky
    # And the mean over amps is much closer than the tolerance.
    assert abs(sky["ratio"].mean() - 1) < 0.01


def test_star_fwhm_matches_the_true_psf(checks):
    f = pd.concat([c["fwhm"] for c in checks.values()])
    assert len(f) >= 10, "too few bright isolated stars to measure"
    assert (np.abs(f["ratio"] - 1) < 0.03).mean() >= 0.95, f
    assert abs(f["ratio"].median() - 1) < 0.01


def test_star_positions_through_the_true_wcs_match_the_truth(checks):
    a = pd.concat([c["astrometry"] for c in checks.values()])
    assert len(a) >= 10
    rms = math.sqrt(np.mean(a["dx"] ** 2 + a["dy"] ** 2))
    assert rms < 0.05, rms
    assert abs(a["dx"].mean()) < 0.02 and abs(a["dy"].mean()) < 0.02


def test_saturated_stars_bleed_along_columns(checks, exposures):
    b = pd.concat([c["bleed"] for c in checks.values()])
    strong = b[b["peak_e"] > 2 * 90000]
    assert len(strong) >= 1
    assert strong["trail"].all(), strong
    # Every star above the full well has saturated pixels reaching farther along the column than across.
    assert (b["y_extent"] >= b["x_extent"]).all() and (b["y_extent"] > 0).all(), b
    # The truth SAT plane is exactly the raw pixels at or above SATURATE (so ISR can find them all).
    for (visit, det), (raw, truth) in exposures.items():
        for a in chk.amp_sections(raw[0].header):
            hi = raw[0].data[a["data"]] >= a["saturate"]
            np.testing.assert_array_equal(masks.is_set(truth.mask[a["det"]], "SAT"), hi)


def test_truth_mask_flags_every_deviant_pixel_and_cosmic_rays_are_tracks(checks, exposures):
    for c in checks.values():
        o = c["outliers"]
        assert o["n_outliers_unmasked"] == 0, o
        assert o["bad"] > 0
    # Cosmic rays: connected tracks, most longer than one pixel.
    from scipy import ndimage

    sizes = []
    for raw, truth in exposures.values():
        lab, n = ndimage.label(masks.is_set(truth.mask, "CR"), structure=np.ones((3, 3)))
        sizes += list(np.bincount(lab.ravel())[1:])
    assert len(sizes) >= 5 and np.median(sizes) >= 3


# ------------------------------------------------------------------ calibration frames
def test_calibration_frames(cfg, plan):
    s = plan.sim
    dark = sim.simulate_calib(cfg, "dark", 0, 0)[0]
    flat = sim.simulate_calib(cfg, "flat", 0, 0, "r")[0]
    assert dark.header["OBSTYPE"] == "dark" and dark.header["DARKTIME"] == s["dark_exptime"]
    assert flat.header["OBSTYPE"] == "flat" and flat.header["FILTER"] == "r"
    # Hot pixels show in the dark at their rates.
    defects = sim.detector_defects(s, plan.seed, 0)
    secs = chk.amp_sections(dark.header)
    img = np.zeros((s["ny"], s["nx"]))
    for a in secs:
        img[a["det"]] = (dark.data[a["data"]] - np.median(dark.data[a["bias"]])) * a["gain"]
    hot = defects.hot_rate > 5
    assert hot.sum() > 5
    ratio = np.median(img[hot] / (defects.hot_rate[hot] * s["dark_exptime"]))
    assert abs(ratio - 1) < 0.05
    # The flat carries the response pattern: dust donuts, vignetting, PRNU.
    resp, dead = sim.flat_response(s, plan.seed, 0, "r")
    fimg = np.zeros_like(img)
    for a in secs:
        fimg[a["det"]] = (flat.data[a["data"]] - np.median(flat.data[a["bias"]])) * a["gain"]
    good = (resp > 0.5) & ~defects.bad
    corr = np.corrcoef(fimg[good] / np.median(fimg[good]), resp[good])[0, 1]
    assert corr > 0.5
    assert dead.sum() >= 1 and np.all(fimg[dead] < 0.05 * np.median(fimg[good]))


# ------------------------------------------------------------------ reproducibility
def test_same_config_same_bytes_other_seed_other_bytes(cfg, tmp_path):
    small = {"seed": 7, "simulate": dict(TINY, nx=128, ny=128, n_template_visits=1, n_science_visits=1)}
    other = dict(small, seed=8)
    for tag, c in (("a", small), ("b", small), ("c", other)):
        p = sim.plan_survey(c)
        sim.write_plan(p, {n: tmp_path / tag / f"{n}.parquet" for n in sim.PLAN_TABLES})
        sim.write_raw(c, p, 1, 0, tmp_path / tag / "raw.fits", tmp_path / tag / "truth.fits")
        write_fits(sim.simulate_calib(c, "flat", 0, 0, "r"), tmp_path / tag / "flat.fits")
    names = [f"{n}.parquet" for n in sim.PLAN_TABLES] + ["raw.fits", "truth.fits", "flat.fits"]
    for n in names:
        assert filecmp.cmp(tmp_path / "a" / n, tmp_path / "b" / n, shallow=False), n
        assert not filecmp.cmp(tmp_path / "a" / n, tmp_path / "c" / n, shallow=False), n
    # Checksums are valid (and carry no wall-clock time).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(tmp_path / "a" / "raw.fits", checksum=True) as h:
            assert "T" not in str(h[0].header.comments["CHECKSUM"])
    e = Exposure.read(tmp_path / "a" / "truth.fits")
    assert e.wcs.sip is not None and e.psf is not None


def test_bad_dataids_raise_diapipe_errors(plan, cfg):
    with pytest.raises(DiapipeError, match="visit 99"):
        sim.simulate_raw(None, plan, 99, 0)
    with pytest.raises(DiapipeError, match="detector"):
        sim.simulate_raw(None, plan, 0, 7)
    with pytest.raises(DiapipeError, match="band"):
        sim.simulate_calib(cfg, "flat", 0, 0)


# ------------------------------------------------------------------ command line and workflow
def test_cli_writes_plan_raw_and_calib(tmp_path):
    from diapipe.cli import main

    overlay = {"simulate": dict(TINY, nx=128, ny=128, n_detectors=1, n_template_visits=1, n_science_visits=1,
                                n_bias=1, n_dark=1, n_flat=1)}
    cfgfile = tmp_path / "micro.yaml"
    cfgfile.write_text(yaml.safe_dump(overlay))
    base = str(REPO / "config" / "config.yaml")
    out = tmp_path / "out"
    assert main(["simulate", "plan", "--config", base, "--config", str(cfgfile), "--out-dir", str(out)]) == 0
    assert (out / "results/sim/truth/visits.parquet").exists() and (out / "results/sim/refcat.parquet").exists()
    assert main(["simulate", "raw", "--config", base, "--config", str(cfgfile), "--out-dir", str(out),
                 "--visit", "1", "--detector", "0"]) == 0
    assert (out / "results/sim/raw/1/0.fits").exists() and not (out / "results/sim/raw/0/0.fits").exists()
    assert main(["simulate", "calib", "--config", base, "--config", str(cfgfile), "--out-dir", str(out)]) == 0
    assert (out / "results/sim/calib/flat/r/0/0.fits").exists()


@pytest.mark.workflow
def test_workflow_outputs_equal_the_library_bytes(tiny_run, tmp_path):
    """The Snakemake jobs (separate processes, any order) write exactly what the library writes."""
    from diapipe import config as dpconfig

    cfg = dpconfig.load(tiny_run.workdir / "config" / "config.yaml", tiny_run.config)
    plan = sim.plan_survey(cfg)
    paths = {n: tmp_path / f"{n}.parquet" for n in sim.PLAN_TABLES}
    sim.write_plan(plan, paths)
    for n in sim.PLAN_TABLES:
        assert filecmp.cmp(paths[n], tiny_run.path(n), shallow=False), n
    visit = cfg["simulate"]["n_template_visits"]
    sim.write_raw(cfg, plan, visit, 1, tmp_path / "raw.fits", tmp_path / "truth.fits")
    assert filecmp.cmp(tmp_path / "raw.fits", tiny_run.path("raw", visit=visit, detector=1), shallow=False)
    assert filecmp.cmp(tmp_path / "truth.fits", tiny_run.path("truth_exposure", visit=visit, detector=1),
                       shallow=False)
    write_fits(sim.simulate_calib(cfg, "dark", 0, 1), tmp_path / "dark.fits")
    assert filecmp.cmp(tmp_path / "dark.fits", tiny_run.path("raw_dark", detector=0, seq=1), shallow=False)
