"""The sparse-field PSF model (psfex.fit_shape_psf) applies size and shape changes exactly.

A first-order (linearised) dilation model was measured 1-2% too narrow at the corners of a
detector whose FWHM changes by ~10%; these tests fit noiseless stars with a strong size
gradient and ellipticity and compare the model's FWHM with the truth's.
"""

import numpy as np
import pytest

from diapipe import psfex
from diapipe.psf import spline_fwhm

SIZE = 31
N = 2048


def moffat_stamp(fwhm, e1=0.0, e2=0.0, beta=3.0, dx=0.0, dy=0.0, os_=5):
    """Pixel-integrated elliptical Moffat (geometric-mean FWHM ``fwhm`` px), unit sum."""
    h = SIZE // 2
    sub = (np.arange(os_) + 0.5) / os_ - 0.5
    g = (np.arange(-h, h + 1)[:, None] + sub[None, :]).ravel()
    xx, yy = np.meshgrid(g - dx, g - dy)
    a = (1.0 / np.sqrt(1 - e1**2 - e2**2)) * np.array([[1 + e1, e2], [e2, 1 - e1]])
    ai = np.linalg.inv(a)
    u = ai[0, 0] * xx + ai[0, 1] * yy
    v = ai[1, 0] * xx + ai[1, 1] * yy
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    img = (1 + (u**2 + v**2) / alpha**2) ** (-beta)
    img = img.reshape(SIZE, os_, SIZE, os_).mean(axis=(1, 3))
    return img / img.sum()


def truth(x, y):
    """FWHM 4 px at the centre, +12% at the corners (field curvature), ellipticity growing outwards."""
    u, v = (x - (N - 1) / 2) / (N / 2), (y - (N - 1) / 2) / (N / 2)
    r2 = (u**2 + v**2) / 2
    return 4.0 * (1 + 0.12 * r2), 0.06 * r2 * np.cos(2 * np.arctan2(v, u)), 0.06 * r2 * np.sin(2 * np.arctan2(v, u))


def test_transform_psf_dilation_and_shear_match_the_analytic_profile():
    base = moffat_stamp(4.0)
    for p in [(0.1, 0.0, 0.0), (-0.08, 0.05, -0.03)]:
        got = psfex.transform_psf(base, p)
        want = moffat_stamp(4.0 * (1 + p[0]), p[1], p[2])
        # cubic-spline resampling of a pixelised profile: agreement to ~1% of the peak
        assert np.abs(got - want).max() < 0.01 * want.max()
        assert spline_fwhm(got) == pytest.approx(spline_fwhm(want), rel=0.005)


def test_shape_model_fwhm_exact_across_the_detector_from_few_stars():
    rng = np.random.default_rng(1)
    n = 40
    x, y = rng.uniform(0, N - 1, n), rng.uniform(0, N - 1, n)
    stamps = np.stack([moffat_stamp(*truth(a, b)) for a, b in zip(x, y)])
    psf = psfex.fit_shape_psf(stamps, x, y, np.ones(n), 2, (N - 1) / 2, (N - 1) / 2, N / 2, N / 2)
    errs = []
    for a in np.linspace(0, N - 1, 5):
        for b in np.linspace(0, N - 1, 5):
            errs.append(spline_fwhm(psf.image(a, b)) / spline_fwhm(moffat_stamp(*truth(a, b))) - 1)
    # noiseless: the model must be exact to well within the 3% requirement (the
    # linearised dilation model was 1-2% off at the corners of such a field)
    assert np.max(np.abs(errs)) < 0.005, np.round(np.array(errs) * 100, 2)


def test_wiener_denoise_keeps_a_noiseless_psf_and_reduces_noise():
    clean = moffat_stamp(4.0)
    assert np.array_equal(psfex.wiener_denoise(clean, 0.0), clean)
    rng = np.random.default_rng(2)
    sigma = 0.01 * clean.max()
    noisy = clean + rng.normal(0, sigma, clean.shape)
    out = psfex.wiener_denoise(noisy, sigma**2 * clean.size)
    assert np.abs(out - clean).std() < 0.7 * np.abs(noisy - clean).std()
    assert out.sum() == pytest.approx(noisy.sum())
