"""PSF-homogenised coadds (coadd.homogenize): one PSF across coverage steps, and the noise that comes with it."""

import numpy as np
import pytest
from scipy import signal

from diapipe import masks
from diapipe.coadd import assemble_coadd, homogenization_target, matching_kernel
from diapipe.psf import spline_fwhm
from diapipe.warp import warp_to_patch
from warp_synth import make_survey, moffat_stamp, small_skymap, weighted_fwhm

STEP_X = 110  # the two sharpest visits cover only x >= STEP_X of patch 0


@pytest.fixture(scope="module")
def stepped():
    """Patch 0 of 6 visits (seeing 3.3-4.3 px) where the two sharpest stop at x = STEP_X: a coverage step."""
    s = make_survey(n_visits=6, artefacts=(), n_stars=600)
    sm = small_skymap()
    full = assemble_coadd([warp_to_patch([cx], sm, 0) for cx, _ in s["visits"]], reject=False)
    warps = [warp_to_patch([cx], sm, 0) for cx, _ in s["visits"]]
    for w in warps[:2]:
        w.mask[:, :STEP_X] |= masks.MASK_DTYPE(masks.bit("NO_DATA"))
        w.image[:, :STEP_X] = 0
        w.variance[:, :STEP_X] = 0
    plain = assemble_coadd(warps, reject=False)
    homog = assemble_coadd(warps, reject=False, homogenize=True)
    return {"stars": s["stars"], "full": full, "plain": plain, "homog": homog}


def _star_fwhms(co, stars):
    """(x, weighted FWHM) of bright isolated stars with a clean 21 px box, away from the step."""
    x, y = co.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
    dd = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(dd, np.inf)
    sel = ((x > 15) & (x < co.shape[1] - 15) & (y > 15) & (y < co.shape[0] - 15) & (np.abs(x - STEP_X) > 12)
           & (stars["flux_njy"] > 3e5) & (dd.min(axis=1) > 12)
           # no brighter neighbour within 20 px (its wings bias the width)
           & (np.where(dd < 20, stars["flux_njy"][None, :], 0).max(axis=1) < stars["flux_njy"]))
    out = []
    for xi, yi in zip(x[sel], y[sel]):
        ix, iy = int(round(xi)), int(round(yi))
        if co.mask[iy - 10:iy + 11, ix - 10:ix + 11].any():
            continue
        out.append((xi, weighted_fwhm(co.image, xi, yi)))
    return np.array(out)


def test_matching_kernel_turns_a_psf_into_the_target():
    p = moffat_stamp(12.0, 12.0, 3.4, 25, e1=0.05)
    t = homogenization_target_from([p, moffat_stamp(12.0, 12.0, 4.2, 25, e1=-0.03)])
    k = matching_kernel(p / p.sum(), t)
    got = signal.fftconvolve(np.pad(p / p.sum(), (t.shape[0] - 25) // 2), k, mode="same")
    assert k.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.abs(got - t).sum() < 0.01  # L1 of a unit-sum stamp
    assert np.abs(k).sum() < 1.1  # a smoothing, not a deconvolution


def homogenization_target_from(stamps):
    from diapipe.exposure import Exposure, MaskedImage
    from diapipe.psf import PixelPsf

    ws = [Exposure(MaskedImage(np.zeros((50, 50), np.float32)), psf=PixelPsf.constant(s)) for s in stamps]
    return homogenization_target(ws, margin=1.15, grid=2)


def test_plain_coadd_psf_steps_and_homogenised_does_not(stepped):
    full = _star_fwhms(stepped["full"], stepped["stars"])
    plain = _star_fwhms(stepped["plain"], stepped["stars"])
    homog = _star_fwhms(stepped["homog"], stepped["stars"])
    assert len(full) == len(plain) == len(homog)
    left = full[:, 0] < STEP_X
    assert left.sum() >= 4 and (~left).sum() >= 8
    # the plain coadd's stars broaden where the two sharpest visits are missing, and only there
    r = plain[:, 1] / full[:, 1]
    assert np.median(r[left]) > 1.02, r
    assert np.median(r[~left]) == pytest.approx(1.0, abs=0.005)
    # the homogenised coadd's stars all have the carried PSF, the common target, on both sides
    co = stepped["homog"]
    st = co.psf.image(co.shape[1] / 2, co.shape[0] / 2)
    c = st.shape[0] // 2
    ratio = homog[:, 1] / weighted_fwhm(st, c, c)
    assert np.max(np.abs(ratio - 1)) < 0.02, ratio
    assert abs(np.median(ratio[left]) - np.median(ratio[~left])) < 0.005
    assert co.metadata["HOMOGEN"] and co.metadata["HOMFWHM"] == pytest.approx(spline_fwhm(st), rel=1e-6)


def test_noise_autocorrelation_is_carried_to_the_subtraction(stepped):
    """The coadd's predicted NOISEACF survives the template resampling (one more Lanczos pass) and
    is what subtraction takes as the template's noise model (a resampling-only fit cannot describe it)."""
    from diapipe.coadd import resampled_acf
    from diapipe.subtract import NOISE_CORR_HALF, _carried_acf

    co = stepped["homog"]
    hdu = next(h for h in co.extra_hdus if h.name == "NOISEACF")
    a = np.asarray(hdu.data, float)
    h = a.shape[0] // 2
    assert a[h, h] == pytest.approx(1.0) and hdu.header["NRESAMP"] == 1
    assert np.allclose(a, a[::-1, ::-1], atol=1e-6)
    assert 0.5 < a[h, h + 1] < 1.0  # smoothing by the matching kernels: strongly correlated neighbours
    r = resampled_acf(hdu)
    assert r.header["NRESAMP"] == 2 and r.data[h, h] == pytest.approx(1.0)
    # noise this smooth has little power where Lanczos interpolation acts: barely changed
    assert r.data[h, h + 1] == pytest.approx(a[h, h + 1], abs=0.02)
    assert np.allclose(r.data, r.data[::-1, ::-1], atol=1e-6)

    class T:
        extra_hdus = [r]

    got = _carried_acf(T)
    assert got.shape == (2 * NOISE_CORR_HALF + 1,) * 2 and got[NOISE_CORR_HALF, NOISE_CORR_HALF] == 1.0
    assert _carried_acf(stepped["plain"]) is None
