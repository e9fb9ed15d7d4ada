"""Fakes injection and the completeness analysis, on synthetic calexps with a known PSF."""

import json

import numpy as np
import pandas as pd
import pytest
from _detect_synth import MAGZERO, add_point, gaussian_stamp, make_diffexp, optimal_snr

from diapipe import completeness, fakes, masks, measure
from diapipe.exposure import Exposure, MaskedImage

FWHM, SIGMA = 3.5, 10.0


def _calexp(shape=(512, 512), seed=1, visit=3, detector=0):
    return make_diffexp(shape, FWHM, SIGMA, seed=seed, visit=visit, detector=detector)


def test_injected_fakes_have_the_recorded_flux_and_snr():
    cal = _calexp()
    cfg = {"n_isolated": 80, "n_hosts": 0, "snr_min": 5.0, "snr_max": 50.0}
    inj, tab = fakes.make_fakes(cal, cfg, seed=42)
    assert len(tab) == 80 and (tab["kind"] == "isolated").all()
    assert list(tab.columns) == list(fakes.FAKES_COLUMNS)
    # S/N as defined: flux * sqrt(sum P^2 / V), V the calexp variance
    assert np.allclose(tab["snrCalexp"], tab["snrTarget"], rtol=1e-6)
    assert np.allclose(tab["snrCalexp"], optimal_snr(tab["flux"], FWHM, SIGMA), rtol=2e-3)
    assert tab["snrTarget"].between(5, 50).all()
    assert np.allclose(tab["flux_nJy"], tab["flux"] * 10 ** (-0.4 * (MAGZERO - 31.4)))
    assert np.allclose(tab["mag"], MAGZERO - 2.5 * np.log10(tab["flux"]))
    # the added signal is the recorded flux (forced PSF fit on injected - original, Poisson noise only)
    delta = Exposure(MaskedImage(inj.image - cal.image, None, np.maximum(inj.variance - cal.variance, 1e-3)),
                     psf=cal.psf, metadata=dict(cal.metadata))
    pix = measure._Pixels(delta)
    fit = np.array([measure.psf_fit(pix, cal.psf, x, y, fit_position=False)["flux"] for x, y in zip(tab["x"], tab["y"])])
    ratio = fit / tab["flux"]
    assert abs(np.median(ratio) - 1) < 0.01
    # Poisson: relative scatter ~ 1/sqrt(flux) * (PSF-weighting factor ~ 1.4)
    assert np.std(ratio) < 3 / np.sqrt(tab["flux"].min())
    # variance gained the expectation of the added signal, INJECTED marks the fakes
    assert abs((inj.variance - cal.variance).sum() / tab["flux"].sum() - 1) < 0.01
    for x, y in zip(tab["x"], tab["y"]):
        assert masks.is_set(inj.mask[int(round(y)), int(round(x))], "INJECTED")
    assert masks.is_set(inj.mask, "INJECTED").sum() < 80 * 60
    assert not masks.is_set(cal.mask, "INJECTED").any()  # the input is untouched


def test_fakes_are_deterministic_per_data_id():
    cal = _calexp()
    cfg = {"n_isolated": 20, "n_hosts": 0}
    _, t1 = fakes.make_fakes(cal, cfg, seed=7)
    _, t2 = fakes.make_fakes(cal, cfg, seed=7)
    pd.testing.assert_frame_equal(t1, t2)
    _, t3 = fakes.make_fakes(_calexp(visit=4), cfg, seed=7)
    assert not np.allclose(t1["x"], t3["x"])
    assert t1["fakeId"].is_unique and t1["fakeId"].iloc[0] == 3 * 10**8


def test_isolated_fakes_avoid_sources_bad_pixels_and_edges():
    cal = _calexp()
    bad = np.zeros(cal.shape, bool)
    bad[:, 200:260] = True
    masks.set_plane(cal.mask, bad, "BAD")
    rng = np.random.default_rng(0)
    avoid = rng.uniform(0, 512, (200, 2))
    pos = fakes.choose_positions(cal, 60, None, 0, rng, margin=20, min_separation=12, avoid_xy=avoid)
    assert len(pos) == 60
    assert ((pos["x"] > 20) & (pos["x"] < 491) & (pos["y"] > 20) & (pos["y"] < 491)).all()
    assert not ((pos["x"] > 199.5) & (pos["x"] < 259.5)).any()
    d = np.hypot(pos["x"].to_numpy()[:, None] - avoid[:, 0], pos["y"].to_numpy()[:, None] - avoid[:, 1])
    assert d.min() >= 12


def test_host_fakes_sit_on_galaxy_centres():
    cal = _calexp()
    hosts = pd.DataFrame({"x": [100.3, 300.7, 400.0, 5.0], "y": [120.2, 310.9, 50.0, 5.0], "source_id": [11, 12, 13, 14]})
    inj, tab = fakes.make_fakes(cal, {"n_isolated": 5, "n_hosts": 10}, seed=1, hosts=hosts)
    h = tab[tab["kind"] == "host"]
    assert sorted(h["hostId"]) == [11, 12, 13]  # the one at the edge is skipped
    for _, r in h.iterrows():
        g = hosts[hosts["source_id"] == r["hostId"]].iloc[0]
        assert (r["x"], r["y"]) == (g["x"], g["y"])


def test_host_fakes_are_offset_within_their_host_like_supernovae():
    from astropy.wcs.utils import proj_plane_pixel_scales

    cal = _calexp()
    assert cal.wcs is not None
    scale = float(np.mean(proj_plane_pixel_scales(cal.wcs.celestial))) * 3600.0
    rng = np.random.default_rng(0)
    gx, gy = rng.uniform(40, 470, 40), rng.uniform(40, 470, 40)
    hosts = pd.DataFrame({"x": gx, "y": gy, "source_id": np.arange(40), "reff": 2.0})  # arcsec
    reff_px = 2.0 / scale
    inj, tab = fakes.make_fakes(cal, {"n_isolated": 0, "n_hosts": 40, "min_separation": 1.0}, seed=2, hosts=hosts)
    h = tab[tab["kind"] == "host"]
    assert len(h) >= 30
    d = np.hypot(h["x"].to_numpy() - gx[h["hostId"]], h["y"].to_numpy() - gy[h["hostId"]])
    assert d.max() <= 1.5 * reff_px + 1e-9
    assert 0.5 * reff_px < d.mean() < 1.0 * reff_px  # uniform in [0, 1.5] reff: mean 0.75
    # host_offset 0: on the centres, as before
    _, t0 = fakes.make_fakes(cal, {"n_isolated": 0, "n_hosts": 40, "min_separation": 1.0, "host_offset": 0.0},
                             seed=2, hosts=hosts)
    h0 = t0[t0["kind"] == "host"]
    assert np.allclose(h0["x"].to_numpy(), gx[h0["hostId"]]) and np.allclose(h0["y"].to_numpy(), gy[h0["hostId"]])


def test_hosts_from_truth_tables():
    tf = pd.DataFrame({"source_id": [1, 2, 3], "visit": [3, 3, 4], "detector": [0, 0, 0], "x": [10.0, 20.0, 30.0],
                       "y": [1.0, 2.0, 3.0]})
    ts = pd.DataFrame({"source_id": [1, 2, 3], "kind": ["galaxy", "star", "galaxy"], "mag": [21.0, 18.0, 20.0],
                       "reff": [0.8, np.nan, 1.2]})
    h = fakes.hosts_from_truth(tf, ts, 3, 0)
    assert list(h["source_id"]) == [1] and list(h["x"]) == [10.0] and list(h["reff"]) == [0.8]


def test_missing_psf_is_a_clear_error():
    from diapipe.fileio import DiapipeError

    cal = make_diffexp((64, 64), FWHM, SIGMA, psf=False)
    with pytest.raises(DiapipeError, match="no PSF"):
        fakes.make_fakes(cal, {"n_isolated": 2}, seed=1)


def _galaxy(image, x, y, flux, sigma=3.0):
    """A round Gaussian galaxy, rendered in a 41 x 41 stamp."""
    ix, iy = int(round(x)), int(round(y))
    yy, xx = np.mgrid[iy - 20 : iy + 21, ix - 20 : ix + 21]
    image[iy - 20 : iy + 21, ix - 20 : ix + 21] += (
        flux * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2) / (2 * np.pi * sigma**2))


@pytest.fixture(scope="module")
def fake_run():
    """Two calexps with galaxies, fakes injected, template subtracted (same PSF), detected and measured."""
    dia, fk, diffs = [], [], {}
    for visit in (10, 11):
        rng = np.random.default_rng(visit)
        shape = (768, 768)
        gxy = rng.uniform(40, 728, (120, 2))
        sky = np.zeros(shape)
        for x, y in gxy:
            _galaxy(sky, x, y, 20000.0)
        var_s = SIGMA**2 + sky  # sky-subtracted calexp: background + galaxy photon noise
        sci = Exposure(MaskedImage(sky + rng.normal(0, np.sqrt(var_s)), None, var_s),
                       wcs=_calexp().wcs, psf=_calexp().psf,
                       metadata={"visit": visit, "detector": 0, "band": "r", "MAGZERO": MAGZERO, "MJD-OBS": 60100.0})
        tmpl_img = sky + rng.normal(0, np.sqrt(var_s))
        hosts = pd.DataFrame({"x": gxy[:, 0], "y": gxy[:, 1], "source_id": np.arange(len(gxy))})
        inj, tab = fakes.make_fakes(sci, {"n_isolated": 350, "n_hosts": 120, "snr_min": 3.0, "snr_max": 15.0,
                                          "min_separation": 14.0}, seed=5, hosts=hosts, avoid_xy=gxy)
        diff = Exposure(MaskedImage(inj.image - tmpl_img, inj.mask, inj.variance + var_s), wcs=sci.wcs,
                        psf=sci.psf, metadata=dict(sci.metadata))
        t, _, _ = measure.detect_and_measure(diff.copy())
        dia.append(t)
        fk.append(tab)
        diffs[(visit, 0)] = diff
    return pd.concat(dia, ignore_index=True), pd.concat(fk, ignore_index=True), diffs


def test_completeness_of_fakes_isolated_and_on_galaxies(fake_run, tmp_path):
    dia, fk, diffs = fake_run
    withsnr = completeness.add_diff_snr(fk, diffs)
    # the difference image has template noise too: S/N_diff = S/N_calexp / sqrt(2) for faint isolated
    # fakes, less when the fake's own photon noise (in the diffexp variance, not in snrCalexp) counts
    iso = withsnr[withsnr["kind"] == "isolated"]
    r = iso["snrDiff"] / iso["snrCalexp"]
    assert (r < 1 / np.sqrt(2) + 1e-3).all() and r.max() > 0.69 and r.median() > 0.6
    m = completeness.match_fakes(dia, withsnr, 2.0)
    for kind in ("isolated", "host"):
        k = m[m["kind"] == kind]
        fit = completeness.fit_completeness(k["snrDiff"], k["detected"])
        c7 = k[(k["snrDiff"] >= 6.5)]["detected"].mean()
        print(f"{kind}: n={len(k)} s50={fit['s50']:.2f}+-{fit['s50_err']:.2f} width={fit['width']:.2f} "
              f"C(S/N>=6.5)={c7:.3f}")
        # ~700 isolated fakes (s50 error ~0.08), ~220 on hosts (~0.12)
        assert abs(fit["s50"] - 5.0) < (0.3 if kind == "isolated" else 0.5)
        assert c7 >= 0.95
    d = m[m["detected"] & (m["snrDiff"] > 6)]
    pull = (d["psfFlux"] - d["flux_nJy"]) / d["psfFluxErr"]
    # median pull ~ +1/SNR from fitting the position (S/N 6-10 here); scatter as the errors say
    assert abs(np.median(pull)) < 0.25 and abs(np.std(pull) - 1) < 0.15
    # the whole file-level analysis: tables, summary, plot
    paths = {}
    for (v, dd), e in diffs.items():
        paths[(v, dd)] = tmp_path / f"diff{v}.fits"
        e.write(paths[(v, dd)])
    dia.to_parquet(tmp_path / "dia.parquet")
    fk.to_parquet(tmp_path / "fakes.parquet")
    out = {k: tmp_path / n for k, n in (("matched", "m.parquet"), ("curves", "c.parquet"), ("classes", "k.parquet"),
                                        ("summary", "s.json"), ("plot", "p.png"))}
    summ = completeness.run(tmp_path / "dia.parquet", [tmp_path / "fakes.parquet"], out,
                            diffexp_paths=list(paths.values()))
    assert json.loads(out["summary"].read_text())["isolated"]["n"] == (fk["kind"] == "isolated").sum()
    assert abs(summ["isolated"]["fit"]["s50"] - 5.0) < 0.3
    curves = pd.read_parquet(out["curves"])
    assert {"snrDiff", "mag"} <= set(curves["by"]) and {"isolated", "host", "all"} <= set(curves["kind"])
    assert out["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    classes = pd.read_parquet(out["classes"])
    # every matched fake's diaSource is labelled fake (plus the odd second detection next to a fake)
    n_fake = (classes["truthClass"] == "fake").sum()
    assert m["detected"].sum() <= n_fake <= m["detected"].sum() + 3


def test_classify_against_truth():
    dia = pd.DataFrame({"diaSourceId": [1, 2, 3, 4, 5], "visit": [1] * 5, "detector": [0] * 5,
                        "x": [10.0, 50.0, 100.0, 150.0, 300.0], "y": [10.0] * 5, "snr": [10.0] * 5,
                        "isNegative": [False] * 5, "isDipole": [False, True, False, False, False]})
    ts = pd.DataFrame({"source_id": [7, 8, 9, 10], "kind": ["sn", "star", "mover", "variable"]})
    tf = pd.DataFrame({"source_id": [7, 8, 9, 10], "visit": [1] * 4, "detector": [0] * 4,
                       "x": [10.5, 50.0, 100.0, 150.0], "y": [10.0] * 4})
    fk = pd.DataFrame({"fakeId": [99], "visit": [1], "detector": [0], "x": [300.2], "y": [10.1]})
    c = completeness.classify(dia, fk, tf, ts, 2.0)
    assert list(c["truthClass"]) == ["transient", "artefact", "mover", "variable", "fake"]
    assert list(c["truthId"]) == [7, 8, 9, 10, 99]


@pytest.mark.workflow
def test_detect_and_fakes_rules_run(tmp_path):
    """inject_fakes, detect_measure and merge_diasources through Snakemake on synthetic inputs.

    The simulated-survey layout (visit 0 a template visit, visit 1 a science visit) with the
    calexps, templates, difference images and truth tables written by the test; only the
    three rules run.
    """
    import yaml
    from wfutil import copy_workflow, run

    wd = copy_workflow(tmp_path / "wf")
    overlay = {"simulate": {"n_detectors": 1, "n_template_visits": 1, "n_science_visits": 1},
               "fakes": {"enabled": True, "n_isolated": 10, "n_hosts": 0}}
    (wd / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    for v in (0, 1):
        cal = _calexp((256, 256), seed=v, visit=v)
        cal.write(wd / f"results/calexp/{v}/0.fits")
        pd.DataFrame({"x": [50.0], "y": [60.0]}).to_parquet(wd / f"results/calexp/{v}/0.src.parquet")
        _calexp((256, 256), seed=10 + v, visit=v).write(wd / f"results/diff/{v}/0.template.fits")
        make_diffexp((256, 256), FWHM, SIGMA, [(100.0, 100.0, 3000.0)], seed=20 + v, visit=v,
                     detector=0).write(wd / f"results/diff/{v}/0.fits")
    (wd / "results/sim/truth").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": [1], "ra": [150.0], "dec": [2.0], "r_mag": [15.0]}).to_parquet(wd / "results/sim/refcat.parquet")
    pd.DataFrame({"source_id": [1], "kind": ["galaxy"], "mag": [20.0]}).to_parquet(
        wd / "results/sim/truth/sources.parquet")
    pd.DataFrame({"source_id": [1, 1], "visit": [0, 1], "detector": [0, 0], "x": [50.0, 50.0], "y": [60.0, 60.0],
                  "mag": [20.0, 20.0], "flux": [1e4, 1e4], "flux_nJy": [1e4, 1e4]}).to_parquet(
        wd / "results/sim/truth/fluxes.parquet")
    rules = ["inject_fakes", "detect_measure", "merge_diasources"]
    proc = run(wd, "--cores", "1", "--configfile", "overlay.yaml", "--allowed-rules", *rules,
               "--", "results/diaSources.parquet", "results/fakes/0/0.fakes.parquet")
    # (judged by the jobs, not the exit code, which also reflects the workflow-wide onsuccess hook)
    # inject_fakes x2 (the template visit's fakes table was asked for), detect_measure of the
    # science visit, merge, and the target rule
    assert "(100%) done" in proc.stdout, proc.stdout[-4000:]
    tab = pd.read_parquet(wd / "results/diaSources.parquet")
    assert len(tab) >= 1 and tab["diaSourceId"].is_unique and set(tab["visit"]) == {1}
    assert (wd / "results/diff/1/0.cutouts.fits").exists() and (wd / "results/diff/1/0.detmask.fits").exists()
    assert len(pd.read_parquet(wd / "results/fakes/0/0.fakes.parquet")) == 10
    assert (wd / "logs/detect_measure/visit1_detector0.log").exists()
