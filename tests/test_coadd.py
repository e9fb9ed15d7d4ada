"""Template coadds and template_for, measured against the synthetic truth."""

import numpy as np
import pytest
import sep

from diapipe import masks
from diapipe.coadd import assemble_coadd, coadd_from_files, find_artefacts, select_visits, template_for
from diapipe.exposure import Exposure
from diapipe.fileio import DiapipeError
from diapipe.warp import mean_noise_correlation, photometric_scale, warp_to_patch
from warp_synth import make_calexp, make_survey, small_skymap, weighted_fwhm


@pytest.fixture(scope="module")
def survey():
    """6 visits (artefacts in 4 of them) and the same visits without artefacts, warped onto 4 patches."""
    s = make_survey(n_visits=6, clean_too=True, n_stars=300)
    sm = small_skymap()
    s["sm"] = sm
    s["warps"] = {p: [warp_to_patch([cx], sm, p) for cx, _ in s["visits"]] for p in range(sm.n_patches)}
    s["clean_warps"] = {p: [warp_to_patch([cx], sm, p) for cx in s["clean"]] for p in range(sm.n_patches)}
    s["coadds"] = {p: assemble_coadd(s["warps"][p], data_id={"band": "r", "patch": p}) for p in range(sm.n_patches)}
    return s


def _blank(coadd, stars, rmin=18):
    x, y = coadd.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
    yy, xx = np.mgrid[: coadd.shape[0], : coadd.shape[1]]
    far = coadd.mask == 0
    for xi, yi in zip(x, y):
        if -rmin < xi < coadd.shape[1] + rmin and -rmin < yi < coadd.shape[0] + rmin:
            far &= (xx - xi) ** 2 + (yy - yi) ** 2 > rmin**2
    return far


def test_no_single_visit_artefact_survives(survey):
    """Leak of each artefact = coadd(with) - coadd(without), same rejection maps, in units of coadd sigma.

    Measured where >= 2 visits cover (a pixel seen once cannot be checked by any stacker).
    """
    worst = {}
    for p in range(survey["sm"].n_patches):
        rej = find_artefacts(survey["warps"][p])
        co = assemble_coadd(survey["warps"][p], rejected=rej)
        cc = assemble_coadd(survey["clean_warps"][p], rejected=rej)
        nvis = sum((~masks.is_set(w.mask, "NO_DATA")).astype(int) for w in survey["warps"][p])
        ok = (co.mask == 0) & (co.variance > 0) & (nvis >= 2)
        leak = np.abs(co.image - cc.image)[ok] / np.sqrt(co.variance[ok])
        for _, truth in survey["visits"]:
            for kind, (ra, dec) in truth["artefacts"]:
                worst[kind] = max(worst.get(kind, 0.0), float(leak.max()) if leak.size else 0.0)
        # and the artefacts were there to be found: without rejection they leak far above 3 sigma
        raw = assemble_coadd(survey["warps"][p], reject=False)
        rawc = assemble_coadd(survey["clean_warps"][p], reject=False)
        ok2 = (raw.mask == 0) & (raw.variance > 0) & (nvis >= 2)
        worst.setdefault("unrejected", 0.0)
        worst["unrejected"] = max(worst["unrejected"], float((np.abs(raw.image - rawc.image)[ok2] / np.sqrt(raw.variance[ok2])).max()))
    assert {"cr", "trail", "mover", "transient"} <= set(worst)
    assert worst["unrejected"] > 30
    for kind in ("cr", "trail", "mover", "transient"):
        assert worst[kind] < 3.0, worst


def test_artefact_rejection_spares_clean_visits(survey):
    """On visits without artefacts almost nothing is rejected (no seeing-difference false alarms at stars)."""
    rej = find_artefacts(survey["clean_warps"][0])
    assert max(r.mean() for r in rej) < 0.002


@pytest.fixture(scope="module")
def blank():
    """Four star-free visits: pure blank sky, warped onto the four patches and coadded."""
    s = make_survey(n_visits=4, artefacts=(), n_stars=0)
    sm = small_skymap()
    return [assemble_coadd([warp_to_patch([cx], sm, p) for cx, _ in s["visits"]]) for p in range(sm.n_patches)]


def test_coadd_variance_predicts_blank_sky_noise(survey, blank):
    # per pixel, next to stars as well as on blank fields: the variance plane is each pixel's own
    # variance, so no correlation correction applies
    for p in range(survey["sm"].n_patches):
        cc = assemble_coadd(survey["clean_warps"][p])
        far = _blank(cc, survey["stars"]) & (cc.variance > 0)
        assert np.std(cc.image[far] / np.sqrt(cc.variance[far])) == pytest.approx(1.0, abs=0.05), p
    zs, bs, bv, ncor = [], [], [], []
    for co in blank:
        ok = (co.mask == 0) & (co.variance > 0)
        zs.append(co.image[ok] / np.sqrt(co.variance[ok]))
        # sums of 8x8 boxes: predicted = sum of pixel variances x NOISECOR (the resampling correlation)
        img = np.where(ok, co.image, np.nan)
        var = np.where(ok, co.variance, np.nan)
        ny, nx = (q // 8 * 8 for q in co.shape)
        b = img[:ny, :nx].reshape(ny // 8, 8, nx // 8, 8).sum(axis=(1, 3))
        v = var[:ny, :nx].reshape(ny // 8, 8, nx // 8, 8).sum(axis=(1, 3))
        good = np.isfinite(b)
        bs.append(b[good])
        bv.append(v[good])
        ncor.append(co.metadata["NOISECOR"])
    z = np.concatenate(zs)
    assert np.std(z) == pytest.approx(1.0, abs=0.05)
    bs, bv = np.concatenate(bs), np.concatenate(bv)
    assert len(bs) > 2000
    assert 1.2 < np.mean(ncor) < 1.6  # Lanczos-3 and 0.21"->0.2" pixels
    ratio = np.var(bs) / np.mean(bv * np.mean(ncor))
    assert ratio == pytest.approx(1.0, abs=0.08), ratio
    # without the correction the variance plane would under-predict box sums by > 15%
    assert np.var(bs) / np.mean(bv) > 1.15


def test_coadd_centroids_match_truth(survey):
    stars = survey["stars"]
    d = []
    for co in survey["coadds"].values():
        x, y = co.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
        dd = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
        np.fill_diagonal(dd, np.inf)
        sel = (x > 15) & (x < 225) & (y > 15) & (y < 225) & (stars["flux_njy"] > 1e6) & (dd.min(axis=1) > 15)
        xw, yw, flag = sep.winpos(co.image.astype(float), x[sel], y[sel], np.full(sel.sum(), 1.6),
                                  mask=masks.is_set(co.mask, *masks.BAD_PLANES))
        ok = flag == 0
        d.append(np.hypot(xw[ok] - x[sel][ok], yw[ok] - y[sel][ok]))
    d = np.concatenate(d)
    rms_mas = np.sqrt(np.mean(d**2) / 2) * 200
    assert len(d) >= 15 and rms_mas < 10.0, rms_mas


def nimage(co):
    return next(h.data for h in co.extra_hdus if h.name == "NIMAGE")


def test_coadd_psf_matches_coadded_stars(survey):
    """Everywhere the PSF is exact: stars whose core has one set of inputs (NIMAGE constant)."""
    stars = survey["stars"]
    ratios = []
    n_inexact = 0
    for co in survey["coadds"].values():
        nim = nimage(co)
        x, y = co.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
        dd = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
        np.fill_diagonal(dd, np.inf)
        sel = (x > 15) & (x < 225) & (y > 15) & (y < 225) & (stars["flux_njy"] > 5e5) & (dd.min(axis=1) > 20)
        for xi, yi in zip(x[sel], y[sel]):
            ix, iy = int(round(xi)), int(round(yi))
            if co.mask[iy - 10:iy + 11, ix - 10:ix + 11].any():
                continue
            if np.ptp(nim[iy - 6:iy + 7, ix - 6:ix + 7]) > 0:  # the core the FWHM estimator weighs
                n_inexact += 1
                continue
            st = co.psf.image(xi, yi)
            c = (st.shape[0] - 1) / 2
            ratios.append(weighted_fwhm(co.image, xi, yi) / weighted_fwhm(st, c, c))
    ratios = np.array(ratios)
    assert len(ratios) >= 8
    assert np.max(np.abs(ratios - 1)) < 0.03, ratios


def test_coadd_header_lists_inputs_and_psf_weighting(survey):
    co = survey["coadds"][0]
    m = co.metadata
    assert m["NVISITS"] == 6 and m["VISITS"] == "0,1,2,3,4,5" and m["BUNIT"] == "nJy"
    assert [m[f"INPUT{k}"] for k in range(6)] == list(range(6))
    assert sum(m[f"WEIGHT{k}"] for k in range(6)) == pytest.approx(1.0)
    cp = assemble_coadd(survey["clean_warps"][0], weighting="psf")
    # PSF-aware weights favour the sharper early visits more than inverse-variance weights do
    wv = [m[f"WEIGHT{k}"] for k in range(6)]
    wp = [cp.metadata[f"WEIGHT{k}"] for k in range(6)]
    assert wp[0] / wp[5] > wv[0] / wv[5]
    assert cp.metadata["PSFFWHM"] < m["PSFFWHM"]


def test_star_saturated_in_the_sharpest_visit_is_sat_in_the_coadd(survey):
    """A core saturated in one visit of six (~1/6 of the weight) is averaged from the other
    five while its wings take all six: no PSF fits that star, so the coadd flags it SAT
    (sat_threshold 0.1, as LSST's maskPropagationThresholds); BAD at the same fraction is not."""
    warps = [w.copy() for w in survey["clean_warps"][0]]
    sharp = int(np.argmin([w.metadata["PSFFWHM"] for w in warps]))
    core = (slice(118, 121), slice(118, 121))
    bad = (slice(60, 63), slice(60, 63))
    sat_mask = np.zeros(warps[0].shape, bool)
    sat_mask[core] = True
    bad_mask = np.zeros(warps[0].shape, bool)
    bad_mask[bad] = True
    masks.set_plane(warps[sharp].mask, sat_mask, "SAT")
    masks.set_plane(warps[sharp].mask, bad_mask, "BAD")
    co = assemble_coadd(warps, reject=False)
    assert 0.1 < co.metadata[f"WEIGHT{sharp}"] < 0.5
    assert masks.is_set(co.mask[core], "SAT").all()
    assert not masks.is_set(co.mask[bad], "BAD").any()
    assert masks.is_set(co.mask, "SAT").sum() == 9
    old = assemble_coadd(warps, reject=False, sat_threshold=0.5)
    assert not masks.is_set(old.mask, "SAT").any()


def test_bad_pixels_of_half_the_visits_are_not_bad_in_the_coadd(survey):
    """Bad columns of the three heaviest visits of six crossing one sky pixel (over half the weight):
    the other three give it a value (their weighted mean), so the coadd does not flag it BAD (LSST
    does not propagate BAD); where every visit is bad the pixel has no usable input: BAD and SUSPECT."""
    warps = [w.copy() for w in survey["clean_warps"][0]]
    w0 = assemble_coadd(warps, reject=False)
    wt = np.array([w0.metadata[f"WEIGHT{i}"] for i in range(len(warps))])
    heavy = set(np.argsort(wt)[::-1][:3].tolist())
    assert wt[list(heavy)].sum() > 0.5
    half = (slice(60, 64), slice(60, 62))
    every = (slice(90, 92), slice(90, 92))
    for i, w in enumerate(warps):
        m = np.zeros(w.shape, bool)
        m[every] = True
        if i in heavy:
            m[half] = True
        masks.set_plane(w.mask, m, "BAD")
    assert not masks.is_set(assemble_coadd(warps, reject=False).mask[half], *masks.BAD_PLANES).any()
    # without the PSF-matched fill of the bad visits, the pixel is the other visits' weighted mean
    co = assemble_coadd(warps, reject=False, fill_rejected=False)
    assert not masks.is_set(co.mask[half], *masks.BAD_PLANES).any()
    rest = [i for i in range(len(warps)) if i not in heavy]
    good_mean = sum(wt[i] * warps[i].image[half] for i in rest) / wt[rest].sum()
    # to a small fraction of one visit's pixel noise (the stack's weights are per pixel)
    sigma = np.sqrt(np.median(warps[rest[0]].variance))
    assert np.abs(co.image[half] - good_mean).max() < 0.05 * sigma
    assert masks.is_set(co.mask[every], "BAD").all() and masks.is_set(co.mask[every], "SUSPECT").all()
    # the former default, 0.5 of the weight, flagged the half-bad pixel
    old = assemble_coadd(warps, reject=False, mask_threshold=0.5)
    assert masks.is_set(old.mask[half], "BAD").all()


def test_filled_bad_column_keeps_the_star_of_the_full_mix(survey):
    """A 2-px bad column through the 8 brightest stars of one visit: without the fill the coadd's star
    there is the other five visits' PSF mix, which its PSF model and every subtraction kernel miss;
    with the fill (the others' mean convolved to that visit's PSF) it stays the six-visit star.
    Measured against the coadd without the bad column, in its sigma, over 15 x 15 star boxes: for the
    sharpest visit (whose PSF the fill reaches by a regularised deconvolution) and the broadest."""
    warps = survey["clean_warps"][0]
    ref = assemble_coadd(warps, reject=False)
    x, y = ref.wcs.all_world2pix(survey["stars"]["ra"], survey["stars"]["dec"], 0)
    flux = np.asarray(survey["stars"]["flux_njy"])
    inside = np.flatnonzero((x > 20) & (y > 20) & (x < ref.shape[1] - 20) & (y < ref.shape[0] - 20))
    bright = inside[np.argsort(-flux[inside])][:8]
    column = np.zeros(ref.shape, bool)
    boxes = np.zeros(ref.shape, bool)
    for k in bright:
        xi, yi = int(round(x[k])), int(round(y[k]))
        column[yi - 6:yi + 7, xi - 1:xi + 1] = True
        boxes[yi - 7:yi + 8, xi - 7:xi + 8] = True
    fwhm = [w.metadata["PSFFWHM"] for w in warps]
    rms = {}
    for which, name in ((int(np.argmin(fwhm)), "sharpest"), (int(np.argmax(fwhm)), "broadest")):
        ws = [w.copy() for w in warps]
        masks.set_plane(ws[which].mask, column, "BAD")
        for fill in (False, True):
            co = assemble_coadd(ws, reject=False, fill_rejected=fill)
            z = (co.image - ref.image)[boxes] / np.sqrt(ref.variance[boxes])
            rms[name, fill] = float(np.sqrt(np.mean(z**2)))
            assert not masks.is_set(co.mask[column], *masks.BAD_PLANES).any()
    # measured: sharpest 2.13 -> 0.49, broadest 2.85 -> 0.36
    assert rms["sharpest", False] > 1.8 and rms["broadest", False] > 1.8
    assert rms["sharpest", True] < 0.7 and rms["broadest", True] < 0.5
    assert rms["sharpest", True] < 0.5 * rms["sharpest", False]


def test_stack_median_and_two_visit_reference_match_numpy():
    """The compiled median stack: np.nanmedian, the NaN count, and (pi/2) mean variance / n."""
    from diapipe.coadd import _reference

    rng = np.random.default_rng(3)
    img = rng.normal(size=(7, 30, 40)).astype(np.float32)
    var = rng.uniform(1, 2, size=img.shape).astype(np.float32)
    img[rng.random(img.shape) < 0.3] = np.nan
    img[:, 0, 0] = np.nan  # no data at all
    var[~np.isfinite(img)] = np.nan
    ref, ref_var, n, tot, tot_var = _reference(img, var)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        want = np.nanmedian(img, axis=0)
    assert np.array_equal(n, np.isfinite(img).sum(axis=0))
    assert np.allclose(ref, want, equal_nan=True, atol=1e-6)
    ok = n > 0
    assert np.allclose(ref_var[ok], (np.pi / 2) * np.nansum(var, axis=0)[ok] / n[ok] ** 2, rtol=1e-5)
    assert np.allclose(tot, np.nansum(img, axis=0), atol=1e-5) and np.isnan(ref_var[0, 0])


def test_selection_modes_and_empty_selection():
    cands = [{"visit": v, "band": "r", "mjd": 60000.0 + v, "seeing": s} for v, s in enumerate([1.0, 0.7, 0.9, 0.6, 1.2])]
    assert select_visits(cands, "list", visits=[0, 4]) == [0, 4]
    assert select_visits(cands, "mjd_range", mjd_min=60001, mjd_max=60003) == [1, 2, 3]
    assert select_visits(cands, "best_seeing", n_best=2) == [1, 3]
    assert select_visits(cands, "best_seeing", n_best=2, mjd_max=60002.5) == [1, 2]
    with pytest.raises(DiapipeError, match="matches no visit") as err:
        select_visits(cands, "mjd_range", mjd_min=61000, data_id={"band": "r", "patch": 3})
    assert "patch=3" in str(err.value)
    with pytest.raises(DiapipeError, match="matches no visit"):
        select_visits(cands, "best_seeing", band="g")


def test_coadd_from_files_empty_selection_leaves_no_file(survey, tmp_path):
    paths = []
    for i, w in enumerate(survey["clean_warps"][1][:3]):
        paths.append(tmp_path / f"{i}.fits")
        w.write(paths[-1])
    out = tmp_path / "template.fits"
    with pytest.raises(DiapipeError, match="matches no visit"):
        coadd_from_files(paths, out, mode="list", visits=[99], data_id={"band": "r", "patch": 1})
    assert not out.exists()
    co = coadd_from_files(paths, out, mode="list", visits=[0, 2], data_id={"band": "r", "patch": 1})
    assert out.exists() and co.metadata["VISITS"] == "0,2"


def test_template_for_science_calexp(survey):
    """The coadds on a new visit's pixel grid: fluxes in its electrons, PSF and seams right."""
    stars = survey["stars"]
    sci, truth = make_calexp(50, stars, rot=41.0, dra=1 / 3600, ddec=2 / 3600, pixscale=0.21, fwhm0=4.5,
                             magzero=27.7, seed=500, shape=(400, 400))
    tmpl = template_for(sci, list(survey["coadds"].values()))
    assert tmpl.shape == sci.shape and tmpl.metadata["BUNIT"] == "electron"
    assert tmpl.metadata["MAGZERO"] == 27.7
    # this detector (84" rotated 41 deg) reaches beyond the tract (80"): its corners are NO_DATA
    nod = masks.is_set(tmpl.mask, "NO_DATA")
    assert 0.05 < nod.mean() < 0.5 and not nod[200, 200]
    x, y = truth["x"], truth["y"]
    dd = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(dd, np.inf)
    sel = (stars["flux_njy"] > 1e6) & (x > 22) & (x < 378) & (y > 22) & (y < 378)
    # 20 px apertures hold > 99.9% of both PSFs; the science truth image has the same neighbours
    flux_t, _, fl = sep.sum_circle(tmpl.image.astype(float), x[sel], y[sel], 20.0,
                                   mask=masks.is_set(tmpl.mask, *masks.BAD_PLANES))
    flux_s, _, _ = sep.sum_circle(truth["model"], x[sel], y[sel], 20.0)
    ok = fl == 0
    ratio = flux_t[ok] / flux_s[ok]
    assert ok.sum() >= 10
    assert np.median(ratio) == pytest.approx(1.0, abs=0.003)
    # astrometry on the science grid (isolated stars)
    iso = ok & (dd[sel].min(axis=1) > 20)
    iso &= np.array([not tmpl.mask[int(round(b)) - 6:int(round(b)) + 7, int(round(a)) - 6:int(round(a)) + 7].any()
                     for a, b in zip(x[sel], y[sel])])
    xw, yw, f2 = sep.winpos(tmpl.image.astype(float), x[sel][iso], y[sel][iso], np.full(iso.sum(), 1.6))
    rms_mas = np.sqrt(np.mean((xw - x[sel][iso]) ** 2 + (yw - y[sel][iso]) ** 2) / 2) * 210
    assert iso.sum() >= 5 and rms_mas < 10.0
    # PSF on the science grid matches the template's stars (where the coadd PSF is exact)
    r = []
    iso = ok & (dd[sel].min(axis=1) > 20)
    ra, dec = sci.wcs.all_pix2world(x[sel][iso], y[sel][iso], 0)
    for xi, yi, rai, deci in zip(x[sel][iso], y[sel][iso], ra, dec):
        ix, iy = int(round(xi)), int(round(yi))
        if tmpl.mask[iy - 10:iy + 11, ix - 10:ix + 11].any():
            continue
        exact = True
        for co in survey["coadds"].values():
            cx, cy = co.wcs.all_world2pix([[rai, deci]], 0)[0]
            jx, jy = int(round(cx)), int(round(cy))
            if 6 <= jx < co.shape[1] - 6 and 6 <= jy < co.shape[0] - 6:
                exact &= np.ptp(nimage(co)[jy - 6:jy + 7, jx - 6:jx + 7]) == 0
        if not exact:
            continue
        st = tmpl.psf.image(xi, yi)
        c = (st.shape[0] - 1) / 2
        r.append(weighted_fwhm(tmpl.image, xi, yi) / weighted_fwhm(st, c, c))
    assert len(r) >= 2 and np.max(np.abs(np.array(r) - 1)) < 0.03


def test_template_for_calexp_off_the_tract_is_one_clear_error(survey):
    far, _ = make_calexp(77, survey["stars"], dra=0.5, shape=(64, 64))
    with pytest.raises(DiapipeError, match="no template coadd covers") as err:
        template_for(far, list(survey["coadds"].values()), path="results/calexp/77/0.fits")
    assert "visit=77" in str(err.value)


def test_coadd_roundtrip(survey, tmp_path):
    co = survey["coadds"][2]
    co.write(tmp_path / "t.fits")
    r = Exposure.read(tmp_path / "t.fits")
    assert r.metadata["VISITS"] == co.metadata["VISITS"] and r.psf == co.psf
    assert np.array_equal(nimage(r), nimage(co)) and nimage(co).max() == 6
    assert photometric_scale(r.metadata["MAGZERO"]) == 1.0


def _crowded_warp(visit, xs, ys, fl, fwhm, rng, shape=(200, 200), psf_fwhm=None, extra=()):
    """A warp-like Exposure (nJy) of Moffat stars at (xs, ys) with seeing ``fwhm`` px, sky noise,
    and a constant PixelPsf of ``psf_fwhm`` (default: the true seeing)."""
    from diapipe.exposure import MaskedImage
    from diapipe.psf import PixelPsf
    from warp_synth import _add, make_wcs, moffat_stamp

    img = np.zeros(shape)
    for x, y, f in list(zip(xs, ys, fl)) + list(extra):
        _add(img, x, y, f, fwhm, 25)
    var = np.full(shape, 25.0**2) + np.clip(img, 0, None) * 0.05
    img = img + rng.normal(size=shape) * np.sqrt(var)
    psf = PixelPsf.constant(moffat_stamp(12, 12, psf_fwhm or fwhm, 25, e1=0))
    meta = {"visit": visit, "band": "r", "MAGZERO": 31.4, "BUNIT": "nJy", "COVERAGE": 1.0}
    return Exposure(MaskedImage(img.astype(np.float32), np.zeros(shape, masks.MASK_DTYPE), var.astype(np.float32)),
                    wcs=make_wcs(150.0, 2.0, 0.0, shape, sip=False), psf=psf, metadata=meta)


def test_seeing_differences_in_a_crowded_field_are_not_artefacts():
    """Crowded field (a star every ~12 px), seeing 3.0-4.2 px, and PSF models that are WRONG by
    +-20% in FWHM (as empirical PSFs of crowded real frames were): PSF matching from the stars
    themselves and the flux-conservation test keep the rejected fraction small (SAAO frames lost
    33-39% before), while a transient of 1/3 of a bright star's flux on a star and one on sky are
    still rejected (they add light)."""
    rng = np.random.default_rng(11)
    n = 280
    xs, ys = rng.uniform(5, 195, n), rng.uniform(5, 195, n)
    fl = np.exp(rng.uniform(np.log(2e3), np.log(2e5), n))
    seeing = [3.0, 3.4, 3.8, 4.2]
    wrong = [3.6, 3.0, 4.4, 3.4]  # PSF-model FWHM, deliberately off
    k = int(np.argmax(fl * (xs > 30) * (xs < 170) * (ys > 30) * (ys < 170)))
    trans = [(xs[k], ys[k], fl[k] / 3), (100.0, 20.0, 2e4)]
    ws = [_crowded_warp(v, xs, ys, fl, s, rng, psf_fwhm=p, extra=trans if v == 2 else ())
          for v, (s, p) in enumerate(zip(seeing, wrong))]
    rej = find_artefacts(ws)
    clean = [r.mean() for i, r in enumerate(rej) if i != 2]
    assert max(clean) < 0.02, clean  # measured 0.0 (HEAD before the fix: 0.62 and 0.83 for two of them)
    for x, y, _ in trans:
        assert rej[2][int(round(y)), int(round(x))], (x, y)
    assert rej[2].mean() < 0.05
