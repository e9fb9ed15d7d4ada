"""Skymap geometry and warping: flux, astrometry, variance, masks and PSF, measured against truth."""

import numpy as np
import pytest
import sep

from diapipe import masks
from diapipe.exposure import Exposure
from diapipe.fileio import DiapipeError
from diapipe.skymap import SkyMap
from diapipe.warp import (
    PixelMap,
    lanczos_resample,
    mean_noise_correlation,
    photometric_scale,
    warp_to_patch,
)
from warp_synth import DEC0, RA0, make_calexp, make_wcs, small_skymap, star_catalog, weighted_fwhm


# ------------------------------------------------------------------ skymap
def test_patches_share_pixels_in_the_overlap():
    sm = SkyMap(RA0, DEC0, pixel_scale=0.2, patch_size=100, overlap=10, n_patches_x=3, n_patches_y=2)
    assert sm.patch_shape == (120, 120) and sm.n_patches == 6
    # tract pixel 95,50 is in the inner box of patch 0 and in the overlap of patch 1
    ra, dec = sm.tract_wcs().wcs_pix2world([[95.0, 50.0]], 0)[0]
    x0, y0 = sm.patch_wcs(0).wcs_world2pix([[ra, dec]], 0)[0]
    x1, y1 = sm.patch_wcs(1).wcs_world2pix([[ra, dec]], 0)[0]
    assert (x0, y0) == pytest.approx((105, 60), abs=1e-6)
    assert (x1, y1) == pytest.approx((5, 60), abs=1e-6)  # integer offset: coadds line up exactly
    # tract centre is (ra0, dec0) and the scale is right
    ny, nx = sm.tract_shape
    c = sm.tract_wcs().wcs_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0]
    assert c == pytest.approx((RA0, DEC0), abs=1e-9)
    a = sm.tract_wcs().wcs_pix2world([[0.0, 0.0], [100.0, 0.0]], 0)
    sep_arcsec = np.hypot((a[1, 0] - a[0, 0]) * np.cos(np.deg2rad(DEC0)), a[1, 1] - a[0, 1]) * 3600
    assert sep_arcsec == pytest.approx(20.0, rel=1e-4)


def test_patches_overlapping_and_outside(tmp_path):
    sm = SkyMap(RA0, DEC0, pixel_scale=0.2, patch_size=200, overlap=20, n_patches_x=3, n_patches_y=3)
    # a small detector on the tract centre overlaps only the middle patch (4) ...
    w = make_wcs(RA0, DEC0, 0.0, (100, 100))
    assert sm.patches_overlapping(w, (100, 100)) == [4]
    # ... one on the corner of patches 4, 5, 7, 8 (tract pixel 400, 400) touches those four; a detector 1 degree away touches none: one clear error
    w2 = make_wcs(RA0 - 20 / 3600 / np.cos(np.deg2rad(DEC0)), DEC0 + 20 / 3600, 30.0, (100, 100))
    assert sorted(sm.patches_overlapping(w2, (100, 100))) == [4, 5, 7, 8]
    far = make_wcs(RA0 + 1.0, DEC0, 0.0, (100, 100))
    assert sm.patches_overlapping(far, (100, 100)) == []
    with pytest.raises(DiapipeError, match="overlaps no patch"):
        sm.require_overlap(far, (100, 100), path="calexp/9/0.fits", data_id={"visit": 9, "detector": 0})
    sm.write(tmp_path / "skymap.json")
    assert SkyMap.read(tmp_path / "skymap.json") == sm


def test_warp_of_calexp_outside_patch_is_one_clear_error():
    sm = small_skymap()
    cx, _ = make_calexp(9, star_catalog(np.random.default_rng(0), n=5), dra=0.5, shape=(64, 64))
    with pytest.raises(DiapipeError) as err:
        warp_to_patch([cx], sm, 0, paths=["results/calexp/9/0.fits"])
    assert "results/calexp/9/0.fits" in str(err.value) and "patch=0" in str(err.value)


# --------------------------------------------------------------- resampling
def test_lanczos_preserves_flat_and_propagates_white_noise_variance():
    rng = np.random.default_rng(1)
    img = 100.0 + rng.normal(size=(600, 600)) * 3.0
    var = np.full(img.shape, 9.0)
    # arbitrary sub-pixel shifts and a rotation
    yy, xx = np.mgrid[140:460, 140:460].astype(float)
    t = np.deg2rad(17)
    xc = 300 + (xx - 300) * np.cos(t) - (yy - 300) * np.sin(t) + 0.37
    yc = 300 + (xx - 300) * np.sin(t) + (yy - 300) * np.cos(t) - 0.21
    val, v, _, ok = lanczos_resample(img, xc.ravel(), yc.ravel(), var)
    assert ok.all()
    assert np.mean(val) == pytest.approx(100.0, abs=0.05)
    # per-pixel variance: predicted (sum w^2 var) vs empirical, within 3%
    assert np.std(val) / np.sqrt(np.mean(v)) == pytest.approx(1.0, abs=0.03)
    # sums of 8x8 blocks: the resampling correlation inflates them by ~1/sum(w^2)
    blocks = (val - 100).reshape(320, 320).reshape(40, 8, 40, 8).sum(axis=(1, 3))
    pred = v.reshape(320, 320).reshape(40, 8, 40, 8).sum(axis=(1, 3)) * mean_noise_correlation()
    assert np.var(blocks) / np.mean(pred) == pytest.approx(1.0, abs=0.1)
    # ... whereas ignoring the correlation under-predicts them by ~20%
    assert np.var(blocks) / np.mean(pred / mean_noise_correlation()) > 1.12


def test_compiled_lanczos_is_the_lanczos_sum_and_flags_the_edges():
    """The compiled loop against the formula: sum_j sum_k L(dy_j) L(dx_k) I / (sum L)^2, mask OR of the window."""
    from diapipe.warp import lanczos

    rng = np.random.default_rng(5)
    img = rng.normal(size=(40, 50)).astype(np.float32)
    var = rng.uniform(1, 2, size=img.shape).astype(np.float32)
    msk = np.zeros(img.shape, masks.MASK_DTYPE)
    msk[20, 30] = 4
    x = np.concatenate([rng.uniform(2, 46.99, 300), [2.0, 1.999, 46.999, 47.0, np.nan, 29.5]])
    y = np.concatenate([rng.uniform(2, 36.99, 300), [2.0, 20.0, 20.0, 20.0, 20.0, 20.5]])
    val, v, m, ok = lanczos_resample(img, x, y, var, msk)
    # inside iff the 6 x 6 window fits: 2 <= x < nx - 3 (NaN is outside)
    assert ok[:300].all() and list(ok[300:]) == [True, False, True, False, False, True]
    for i in np.flatnonzero(ok):
        i0, j0 = int(np.floor(x[i])), int(np.floor(y[i]))
        kx, ky = np.arange(i0 - 2, i0 + 4), np.arange(j0 - 2, j0 + 4)
        # the weights come from a table at 1/4096 px phase steps
        xq, yq = i0 + np.rint((x[i] - i0) * 4096) / 4096, j0 + np.rint((y[i] - j0) * 4096) / 4096
        wx, wy = lanczos(xq - kx), lanczos(yq - ky)
        wx, wy = wx / wx.sum(), wy / wy.sum()
        win = img[np.ix_(ky, kx)].astype(float)
        assert val[i] == pytest.approx(wy @ win @ wx, abs=1e-5)  # float32 sums
        assert v[i] == pytest.approx(wy**2 @ var[np.ix_(ky, kx)].astype(float) @ wx**2, rel=1e-3)
        assert m[i] == (4 if (j0 - 2 <= 20 <= j0 + 3 and i0 - 2 <= 30 <= i0 + 3) else 0)
    assert (val[~ok] == 0).all() and (m[~ok] == 0).all()


def test_pixel_map_matches_astropy():
    w_in = make_wcs(RA0, DEC0, 11.0, (400, 400), 0.21)
    sm = small_skymap()
    pw = sm.patch_wcs(0)
    pm = PixelMap(w_in, pw, (0, 0, 240, 240), grid_step=32)
    x = np.array([0.0, 17.3, 120.0, 239.0])
    y = np.array([0.0, 200.1, 64.5, 239.0])
    xi, yi = pm(x, y)
    ra, dec = pw.all_pix2world(x, y, 0)
    xt, yt = w_in.all_world2pix(ra, dec, 0, tolerance=1e-8)
    assert np.max(np.hypot(xi - xt, yi - yt)) < 1e-3  # px


# ------------------------------------------------------------ warp quality
@pytest.fixture(scope="module")
def warped():
    rng = np.random.default_rng(5)
    stars = star_catalog(rng, n=250, radius_deg=0.012, fmin=3e5, fmax=1e7)
    cx, truth = make_calexp(1, stars, rot=23.0, dra=3 / 3600, ddec=-2 / 3600, pixscale=0.21, fwhm0=3.6,
                            magzero=28.3, seed=11)
    sm = small_skymap()
    return sm, stars, cx, truth, {p: warp_to_patch([cx], sm, p) for p in range(sm.n_patches)}


def _isolated(x, y, flux, rmin=14.0):
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1) > rmin


def test_warp_conserves_aperture_flux_without_trend(warped):
    sm, stars, cx, truth, warps = warped
    scale = photometric_scale(cx.metadata["MAGZERO"])
    ratios, xs, ys = [], [], []
    for p, w in warps.items():
        assert w.metadata["BUNIT"] == "nJy" and w.metadata["MAGZERO"] == 31.4
        x, y = w.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
        iso = _isolated(truth["x"], truth["y"], stars["flux_njy"])
        inner = (x > 30) & (x < 210) & (y > 30) & (y < 210) & iso
        r_in = 12.0  # px of the calexp; the same angle in the warp
        fc, _, flc = sep.sum_circle(cx.image.astype(float), truth["x"][inner], truth["y"][inner], r_in,
                                    mask=masks.is_set(cx.mask, *masks.BAD_PLANES))
        fw, _, flw = sep.sum_circle(w.image.astype(float), x[inner], y[inner], r_in * 0.21 / 0.2,
                                    mask=masks.is_set(w.mask, *masks.BAD_PLANES))
        good = (flc == 0) & (flw == 0)
        ratios.append(fw[good] / (fc[good] * scale))
        xs.append(x[inner][good])
        ys.append(y[inner][good])
    ratio, xs, ys = np.concatenate(ratios), np.concatenate(xs), np.concatenate(ys)
    assert len(ratio) >= 25
    assert abs(np.median(ratio) - 1) < 0.003
    # no trend across the patch: fitted slope over the patch width < 0.3%
    A = np.column_stack([np.ones_like(xs), (xs - 120) / 240, (ys - 120) / 240])
    coef, *_ = np.linalg.lstsq(A, ratio, rcond=None)
    assert np.all(np.abs(coef[1:]) < 0.003), coef


def test_warp_centroids_match_truth(warped):
    sm, stars, cx, truth, warps = warped
    dx, dy = [], []
    for w in warps.values():
        x, y = w.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
        sel = (x > 20) & (x < 220) & (y > 20) & (y < 220) & (stars["flux_njy"] > 2e6)
        sel &= _isolated(truth["x"], truth["y"], stars["flux_njy"])
        xw, yw, flag = sep.winpos(w.image.astype(float), x[sel], y[sel], np.full(sel.sum(), 3.6 / 2.355),
                                  mask=masks.is_set(w.mask, *masks.BAD_PLANES))
        ok = flag == 0
        dx.append(xw[ok] - x[sel][ok])
        dy.append(yw[ok] - y[sel][ok])
    dx, dy = np.concatenate(dx), np.concatenate(dy)
    rms_mas = np.sqrt(np.mean(dx**2 + dy**2) / 2) * 200.0
    assert len(dx) >= 10 and rms_mas < 10.0, rms_mas


def test_warp_mask_footprint_and_no_data(warped):
    sm, stars, cx, truth, warps = warped
    w = warps[0]
    bad_in = masks.is_set(cx.mask, "BAD")
    # every warp pixel whose 6x6 kernel footprint covers a BAD calexp pixel is BAD
    pm = PixelMap(cx.wcs, w.wcs, (0, 0, 240, 240))
    yy, xx = np.mgrid[:240, :240]
    xi, yi = pm(xx.ravel().astype(float), yy.ravel().astype(float))
    x0, y0 = np.floor(xi).astype(int) - 2, np.floor(yi).astype(int) - 2
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 6 <= 400) & (y0 + 6 <= 400)
    expect = np.zeros(240 * 240, bool)
    for j in range(6):
        for k in range(6):
            expect[inside] |= bad_in[y0[inside] + j, x0[inside] + k]
    got = masks.is_set(w.mask, "BAD").ravel()
    assert np.array_equal(got[inside], expect[inside])
    assert masks.is_set(w.mask, "NO_DATA").ravel()[~inside].all()
    assert not masks.is_set(w.mask, "NO_DATA").ravel()[inside].any()


def test_warped_psf_matches_warped_stars(warped):
    sm, stars, cx, truth, warps = warped
    ratios = []
    for w in warps.values():
        x, y = w.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
        sel = (x > 25) & (x < 215) & (y > 25) & (y < 215) & (stars["flux_njy"] > 1e6)
        sel &= _isolated(truth["x"], truth["y"], stars["flux_njy"], 20)
        for xi, yi in zip(x[sel], y[sel]):
            ix, iy = int(round(xi)), int(round(yi))
            if w.mask[iy - 10:iy + 11, ix - 10:ix + 11].any():  # bad column or edge in the stamp
                continue
            st = w.psf.image(xi, yi)
            c = (st.shape[0] - 1) / 2
            ratios.append(weighted_fwhm(w.image, xi, yi) / weighted_fwhm(st, c, c))
    ratios = np.array(ratios)
    assert len(ratios) >= 8
    assert np.max(np.abs(ratios - 1)) < 0.03, ratios


def test_warp_file_roundtrip(warped, tmp_path):
    w = warped[4][1]
    w.write(tmp_path / "w.fits")
    r = Exposure.read(tmp_path / "w.fits")
    assert r.metadata["patch"] == 1 and r.metadata["BUNIT"] == "nJy" and r.psf == w.psf
    assert np.array_equal(r.mask, w.mask)


def test_warp_files_bad_calexp_and_empty_patch(tmp_path):
    """Off the tract: one DiapipeError naming the file, no output.  On the tract but not this patch: empty warp."""
    from diapipe.warp import warp_files

    sm = small_skymap()
    stars = star_catalog(np.random.default_rng(0), n=5)
    far, _ = make_calexp(9, stars, dra=0.5, shape=(64, 64))
    far.write(tmp_path / "far.fits")
    out = tmp_path / "warp.fits"
    with pytest.raises(DiapipeError, match="overlaps no patch") as err:
        warp_files([tmp_path / "far.fits"], sm, 0, out, visit=9, band="r")
    assert "far.fits" in str(err.value) and not out.exists()
    # a small detector in patch 3's corner of the tract (beyond patch 0's overlap): empty warp for patch 0
    corner, _ = make_calexp(8, stars, dra=-30 / 3600, ddec=30 / 3600, shape=(64, 64))
    corner.write(tmp_path / "corner.fits")
    assert sm.patches_overlapping(corner.wcs, corner.shape) == [3]
    w = warp_files([tmp_path / "corner.fits"], sm, 0, out, visit=8, band="r")
    assert out.exists() and w.metadata["COVERAGE"] == 0.0 and Exposure.read(out).metadata["visit"] == 8
