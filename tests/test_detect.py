"""Detection on synthetic difference images: noise statistics, completeness, dipoles, planes, bad input."""

import numpy as np
import pandas as pd
import pytest
from _detect_synth import add_point, make_diffexp, optimal_snr
from astropy.io import fits
from scipy.spatial import cKDTree

from diapipe import detect, masks, measure
from diapipe.fileio import DiapipeError

FWHM, SIGMA = 3.5, 10.0


@pytest.mark.parametrize("border", [0, 12, 30])
def test_matched_filter_equals_direct_correlation(border):
    """FFT filter (with its wrap-around shortcut for invalid borders) = brute-force correlation."""
    from scipy import ndimage

    e = make_diffexp((96, 80), FWHM, SIGMA, [(40.0, 40.0, 2000.0)], seed=2)
    e.variance[:] *= np.linspace(0.5, 2.0, 80)[None, :]
    valid = np.ones(e.shape, bool)
    valid[50:53, 20] = False
    if border:
        valid[:border] = valid[-border:] = False
        valid[:, :border] = valid[:, -border:] = False
    p = e.psf.image(40, 48)
    nu = detect.matched_filter(e.image, e.variance, valid, p)
    img = np.where(valid, e.image, 0).astype(float)
    var = np.where(valid, e.variance, 0).astype(float)
    num = ndimage.correlate(img, p, mode="constant")
    den = ndimage.correlate(var, p**2, mode="constant")
    ref = np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1)), 0)
    inside = den > 0.05 * den.max()
    assert np.allclose(nu[inside], ref[inside], atol=2e-4)


def test_noise_significance_is_unit_variance():
    e = make_diffexp((512, 512), FWHM, SIGMA, seed=11)
    d = detect.detect(e, {"threshold": 5.0})
    assert abs(d.noise_std - 1.0) < 0.02


@pytest.mark.parametrize("threshold,rel_tol", [(3.5, 0.2), (4.0, 0.5)])
def test_pure_noise_count_matches_gaussian_field_expectation(threshold, rel_tol):
    """Number of noise footprints = expected Euler characteristic of the pixelised excursion set."""
    n, shape = 0, (768, 768)
    for seed in (21, 22):
        e = make_diffexp(shape, FWHM, SIGMA, seed=seed)
        n += len(detect.detect(e, {"threshold": threshold}).candidates)
    expected = 2 * detect.expected_false_detections(e.psf.image(0, 0), shape, threshold)
    # Poisson scatter alone is 1/sqrt(expected) (7% at 3.5 sigma, 20% at 4 sigma)
    assert abs(n / expected - 1) < rel_tol, (n, expected)
    # The smooth-field (Adler) formula over-predicts on the pixel grid, as it should.
    cont = 2 * detect.expected_false_detections_continuous(FWHM, shape, threshold)
    assert cont > expected


def test_point_source_peak_is_optimal_snr():
    snr = 20.0
    flux = snr / optimal_snr(1.0, FWHM, SIGMA)
    e = make_diffexp((128, 128), FWHM, SIGMA, [(64.0, 64.0, flux)], seed=3)
    d = detect.detect(e)
    assert len(d.candidates) == 1
    assert abs(d.candidates[0].peak_nu - snr) < 3.0  # one-sigma noise plus the max-over-pixels bias


def _completeness_sample(snr_lo, snr_hi, seeds, shape=(768, 768), spacing=32, config=None):
    unit = optimal_snr(1.0, FWHM, SIGMA)
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        g = np.arange(spacing // 2, shape[0] - spacing // 2, spacing)
        X, Y = np.meshgrid(g, g)
        X = X.ravel() + rng.uniform(-0.5, 0.5, X.size)
        Y = Y.ravel() + rng.uniform(-0.5, 0.5, X.size)
        snr = rng.uniform(snr_lo, snr_hi, X.size)
        e = make_diffexp(shape, FWHM, SIGMA, list(zip(X, Y, snr / unit)), seed=seed)
        tab, _, _ = measure.detect_and_measure(e, config=config)
        pos = tab[~tab["isNegative"]]
        dist, _ = cKDTree(pos[["x", "y"]].to_numpy()).query(np.c_[X, Y])
        rows.append(pd.DataFrame({"snr": snr, "detected": dist < 2.0}))
    return pd.concat(rows, ignore_index=True)


def test_completeness_of_isolated_point_sources_at_5_sigma():
    """50% at S/N_opt = 5.0 +- 0.3 and >= 97% at S/N_opt 7 (S/N_opt = flux / sqrt(1 / sum(P^2/V)))."""
    from diapipe.completeness import fit_completeness

    # The matched filter itself: this field is unrealistically dense in faint sources (one per
    # 32 x 32 px), which inflates the empirical noise estimate by ~2.5% (see the next test).
    s = _completeness_sample(3.0, 9.0, seeds=(101, 102, 103), config={"rescale_noise": False})
    fit = fit_completeness(s["snr"], s["detected"])
    c7 = s[(s["snr"] >= 6.5) & (s["snr"] < 7.5)]["detected"].mean()
    print(f"s50 = {fit['s50']:.2f} +- {fit['s50_err']:.2f}, width {fit['width']:.2f}, C(6.5-7.5) = {c7:.3f}, n = {len(s)}")
    assert abs(fit["s50"] - 5.0) < 0.3
    assert 0.7 < fit["width"] < 1.4  # the unit-variance noise of the matched filter
    assert c7 >= 0.97


def test_noise_rescaling_for_an_underestimated_variance_plane():
    """Noise 1.5x the variance plane's (e.g. correlated noise): threshold and errors follow the real noise."""
    unit = optimal_snr(1.0, FWHM, SIGMA)
    rng = np.random.default_rng(3)
    xy = rng.uniform(20, 748, (60, 2))
    snr_true = 20.0  # in units of the real noise
    e = make_diffexp((768, 768), FWHM, 1.5 * SIGMA, [(x, y, 1.5 * snr_true / unit) for x, y in xy], seed=14)
    e.variance[:] = SIGMA**2  # the variance plane claims 1.5x less noise
    naive = detect.detect(e.copy(), {"rescale_noise": False})
    d = detect.detect(e.copy())
    assert abs(d.noise_scale / 1.5 - 1) < 0.03 and naive.noise_scale == 1.0
    n_noise = len(d.candidates) - 60
    assert n_noise <= 3 < len(naive.candidates) - 60  # about 0.1 expected at a real 5 sigma
    tab = measure.measure(e, d)[0]
    pos = tab[tab["snr"] > 10]
    truth = 1.5 * snr_true / unit
    pull = (pos["psfFlux"] - truth) / pos["psfFluxErr"]
    robust_std = 1.4826 * np.median(np.abs(pull - np.median(pull)))  # (one blended pair)
    assert abs(robust_std - 1) < 0.25
    assert abs(np.median(pos["snr"]) / snr_true - 1) < 0.08
    assert (tab["noiseScale"] == d.noise_scale).all()


def test_shifted_stars_are_dipoles():
    e = make_diffexp((256, 256), FWHM, SIGMA, seed=5)
    truth = []
    for k, (x, y, shift, ang) in enumerate([(60, 60, 0.6, 0.0), (180, 70, 1.0, 90.0), (100, 190, 0.8, 45.0)]):
        f = 30000.0
        dx, dy = 0.5 * shift * np.cos(np.radians(ang)), 0.5 * shift * np.sin(np.radians(ang))
        add_point(e.image, x + dx, y + dy, f, FWHM)  # star in the science image
        add_point(e.image, x - dx, y - dy, -f, FWHM)  # the same star, misregistered, in the template
        truth.append((x, y, shift, ang))
    tab, _, _ = measure.detect_and_measure(e)
    tab = tab[tab["snr"] > 10]  # (one 5.1-sigma noise peak in this realisation)
    assert len(tab) == 3
    for x, y, shift, ang in truth:
        r = tab.iloc[np.argmin(np.hypot(tab["x"] - x, tab["y"] - y))]
        assert r["isDipole"], r
        assert np.hypot(r["x"] - x, r["y"] - y) < 0.3
        d_ang = (r["dipoleAngle"] - ang + 180) % 360 - 180
        assert abs(d_ang) < 15
        # Lobe fluxes and separation are degenerate for shifts << FWHM; their product is not.
        assert r["dipoleFluxPos"] > 0 > r["dipoleFluxNeg"]
        moment = r["dipoleFluxPos"] * r["dipoleSeparation"]
        assert abs(moment / (30000.0 * shift) - 1) < 0.15
        assert abs(r["psfFlux"]) < 5 * r["psfFluxErr"]


def test_transient_next_to_static_source_is_not_a_dipole():
    e = make_diffexp((128, 128), FWHM, SIGMA, [(64.3, 64.7, 3000.0)], seed=6)
    tab, _, _ = measure.detect_and_measure(e)
    assert len(tab) == 1 and not tab["isDipole"].iloc[0] and not tab["isNegative"].iloc[0]


def test_mask_planes_written():
    e = make_diffexp((128, 128), FWHM, SIGMA, [(40.0, 40.0, 3000.0), (90.0, 90.0, -3000.0)], seed=7)
    detect.detect(e)
    assert masks.is_set(e.mask[40, 40], "DETECTED") and not masks.is_set(e.mask[40, 40], "DETECTED_NEGATIVE")
    assert masks.is_set(e.mask[90, 90], "DETECTED_NEGATIVE") and not masks.is_set(e.mask[90, 90], "DETECTED")
    assert masks.is_set(e.mask, "DETECTED").sum() < 200  # footprints, not the whole image


def test_masked_pixels_do_not_make_detections():
    e = make_diffexp((128, 128), FWHM, SIGMA, seed=8)
    e.image[:, 50] = 1e5  # a hot column, masked BAD
    masks.set_plane(e.mask, np.isin(np.arange(128)[None, :], [50]) & np.ones((128, 1), bool), "BAD")
    assert len(detect.detect(e).candidates) == 0


@pytest.mark.parametrize("offset", [2.4, 3.6, 4.8])
def test_source_beside_a_masked_column_is_one_diasource_at_the_source(offset):
    """A bright source 2-5 px from a masked bad column: one diaSource with a good centroid at the source.
    Before, the column split its footprint and the half beside the column was a second diaSource 3-5 px
    away whose centroid failed (on the survey it was labelled bogus, its true source taken by the other)."""
    x0, y0 = 60.3, 64.6
    e = make_diffexp((128, 128), FWHM, SIGMA, [(x0, y0, 20000.0)], seed=21)
    col = int(round(x0 + offset))
    e.image[:, col] = 0.0  # as subtraction leaves a masked column
    bad = np.zeros(e.shape, bool)
    bad[:, col] = True
    masks.set_plane(e.mask, bad, "BAD")
    tab, _, _ = measure.detect_and_measure(e)
    assert len(tab) == 1
    r = tab.iloc[0]
    assert not r["centroid_flag"] and np.hypot(r["x"] - x0, r["y"] - y0) < 0.3
    assert abs(r["psfFlux"] / 20000 - 1) < 0.05


def test_scorr_is_used_when_present():
    e = make_diffexp((128, 128), FWHM, SIGMA, seed=9)
    score = np.zeros(e.shape, np.float32)
    score[30:33, 70:73] = 8.0
    e.extra_hdus = [fits.ImageHDU(score, name="SCORR")]
    d = detect.detect(e)
    assert len(d.candidates) == 1 and d.candidates[0].pos_peaks[0][:2] == (70, 30)
    assert len(detect.detect(e, {"use_scorr": "never"}).candidates) == 0
    e.extra_hdus = []
    with pytest.raises(DiapipeError, match="SCORR"):
        detect.detect(e, {"use_scorr": "always"})


def test_nan_no_data_pixels_next_to_a_source():
    e = make_diffexp((128, 128), FWHM, SIGMA, [(64.0, 64.0, 5000.0)], seed=13)
    e.image[60:70, 68:] = np.nan  # as subtraction writes NO_DATA
    e.variance[60:70, 68:] = np.nan
    e.mask[60:70, 68:] |= masks.bit("NO_DATA")
    tab, _, _ = measure.detect_and_measure(e)
    r = tab.iloc[0]
    assert len(tab) == 1 and np.isfinite([r["psfFlux"], r["x"], r["apFlux"]]).all()
    assert abs(r["psfFlux"] / 5000 - 1) < 0.1 and r["pixelFlags_edge"]


def test_no_valid_pixels_gives_empty_well_formed_table():
    e = make_diffexp((64, 64), FWHM, SIGMA, seed=10)
    e.mask[:] = masks.bit("NO_DATA")
    e.image[:] = np.nan
    tab, cut, _ = measure.detect_and_measure(e)
    ref = measure.empty_table()
    assert len(tab) == 0 and list(tab.columns) == list(measure.COLUMNS)
    assert (tab.dtypes == ref.dtypes).all()
    assert cut["difference"].shape == (0, 31, 31)


def test_missing_psf_is_a_clear_error(tmp_path):
    e = make_diffexp((64, 64), FWHM, SIGMA, seed=10, psf=False)
    p = tmp_path / "diff.fits"
    e.write(p)
    with pytest.raises(DiapipeError, match="no PSF") as err:
        measure.run_files(p, tmp_path / "out.parquet")
    assert "visit=7" in str(err.value) and str(p) in str(err.value)
    assert not (tmp_path / "out.parquet").exists()


def test_cli_writes_table_cutouts_and_mask(tmp_path):
    from diapipe.cli import main

    unit = optimal_snr(1.0, FWHM, SIGMA)
    e = make_diffexp((128, 128), FWHM, SIGMA, [(30.2, 40.6, 15 / unit), (90.0, 100.0, -20 / unit)], seed=12)
    e.write(tmp_path / "diff.fits")
    e.write(tmp_path / "sci.fits")
    out = tmp_path / "d.parquet"
    rc = main(["detect", str(tmp_path / "diff.fits"), "--science", str(tmp_path / "sci.fits"), "-o", str(out),
               "--cutouts", str(tmp_path / "c.fits"), "--mask-out", str(tmp_path / "m.fits")])
    assert rc == 0
    tab = pd.read_parquet(out)
    assert len(tab) == 2 and tab["isNegative"].sum() == 1
    ids, cubes = measure.read_cutouts(tmp_path / "c.fits")
    assert (ids["diaSourceId"].to_numpy() == tab["diaSourceId"].to_numpy()).all()
    assert cubes["science"].shape == (2, 31, 31) and np.isnan(cubes["template"]).all()
    with fits.open(tmp_path / "m.fits") as h:
        m = h["MASK"].data
    assert masks.is_set(m, "DETECTED").any() and masks.is_set(m, "DETECTED_NEGATIVE").any()


def _add_trail(image, x0, y0, angle_deg, flux_per_px, fwhm, length=None):
    """A straight trail (Gaussian cross-profile of ``fwhm``) through (x0, y0); flux per px of length."""
    ny, nx = image.shape
    yy, xx = np.mgrid[:ny, :nx]
    a = np.deg2rad(angle_deg)
    d = -(xx - x0) * np.sin(a) + (yy - y0) * np.cos(a)  # distance across
    t = (xx - x0) * np.cos(a) + (yy - y0) * np.sin(a)  # along
    sig = fwhm / 2.3548
    prof = flux_per_px * np.exp(-0.5 * (d / sig) ** 2) / (np.sqrt(2 * np.pi) * sig)
    if length is not None:
        prof = np.where(np.abs(t) <= length / 2, prof, 0)
    image += prof.astype(image.dtype)
    return d, t


@pytest.mark.parametrize("angle, flux", [(7.0, 400.0), (63.0, 120.0), (-20.0, -300.0)])
def test_streak_is_masked_and_not_detected_across_a_masked_gap(angle, flux):
    """A satellite trail (bright, or faint: ~7 sigma per FWHM of length; or negative: a trail in the
    template, a bad row) crossing the frame and a masked region: its pixels get STREAK and no
    diaSource sits on it; the point sources beside it stay."""
    srcs = [(100.0, 400.0, 6000.0), (450.0, 90.0, 6000.0), (300.0, 300.0 + 30.0, 3000.0)]
    e = make_diffexp((640, 640), FWHM, SIGMA, srcs, seed=31)
    d, t = _add_trail(e.image, 320.0, 300.0, angle, flux, FWHM)
    e.mask[:, 250:262] |= masks.bit("BAD")  # a masked stretch the trail crosses
    det = detect.detect(e, {"threshold": 5.0})
    streak = masks.is_set(e.mask, "STREAK")
    on = (np.abs(d) < FWHM) & ~masks.is_set(e.mask, "BAD")
    assert streak[on].mean() > 0.99
    assert streak.mean() < 0.25  # a band, not the frame
    peaks = [max(c.pos_peaks + c.neg_peaks, key=lambda q: abs(q[2])) for c in det.candidates]
    on_trail = [p for p in peaks if abs(d[int(p[1]), int(p[0])]) < 3 * FWHM]
    assert not on_trail
    found = cKDTree([(p[0], p[1]) for p in peaks])
    for x, y, _ in srcs[:2]:  # the sources away from the trail are still detected
        assert found.query((x, y))[0] < 2


def test_no_streak_in_a_field_of_point_sources_or_noise():
    """Chance alignments of many sources (and short trails below streak_min_length) are not streaks."""
    rng = np.random.default_rng(8)
    srcs = [(x, y, f) for x, y, f in zip(rng.uniform(10, 630, 150), rng.uniform(10, 630, 150),
                                         rng.uniform(500, 20000, 150))]
    e = make_diffexp((640, 640), FWHM, SIGMA, srcs, seed=32)
    _add_trail(e.image, 320.0, 320.0, 30.0, 400.0, FWHM, length=150.0)
    nu = detect.detect(e, {"threshold": 5.0, "mask_streaks": False}).significance
    assert 0.03 < np.mean(nu > 3) < 0.2  # crowded enough for chance alignments, not too crowded to search
    detect.detect(e, {"threshold": 5.0})
    assert not masks.is_set(e.mask, "STREAK").any()
    # the same short trail is found when the minimum length allows it
    detect.detect(e, {"threshold": 5.0, "streak_min_length": 100})
    assert masks.is_set(e.mask, "STREAK").sum() > 100 * FWHM
