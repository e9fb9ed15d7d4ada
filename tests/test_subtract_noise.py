"""Noise calibration of the difference image when the template's noise is correlated (issue 5).

A template coadd reaches the calexp grid through two Lanczos-3 resamplings
(warp, then coadd -> calexp): its pixels are correlated (rho(1 px) ~ 0.2) and
its propagated variance plane (sum w^2 var) is ~8% below the pixel variance.
The kernel sums correlated pixels, so K^2 (*) var under-predicts the convolved
template's noise, and the afterburner, assuming white inputs, mis-whitens.
subtract measures each input's blank-sky noise (variance scale and the
resampling correlation model) and propagates it (SubtractConfig.empirical_noise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from diapipe import masks
from diapipe.detect import _filtered_noise, matched_filter
from diapipe.subtract import fit_resampling_model, measure_noise, resampling_noise_model, subtract
from diapipe.warp import lanczos_resample

sys.path.insert(0, str(Path(__file__).parent))
from subtract_synth import make_pair, residual_stats  # noqa: E402


def resample(img, var, angle_deg=0.0, shift=(0.0, 0.0)):
    """Lanczos-3 resampling of (image, variance) by a small rotation and shift; NO_DATA where it cannot reach."""
    ny, nx = img.shape
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    xc, yc = (nx - 1) / 2, (ny - 1) / 2
    xin = xc + c * (xx - xc) - s * (yy - yc) + shift[0]
    yin = yc + s * (xx - xc) + c * (yy - yc) + shift[1]
    val, v, _, ok = lanczos_resample(img, xin.ravel(), yin.ravel(), var)
    return val.reshape(ny, nx), v.reshape(ny, nx), ok.reshape(ny, nx)


def correlated_template(t, angle=4.0):
    """The template as the pipeline delivers it: resampled twice (noise correlated, plane = sum w^2 var).

    Rotated by ``angle`` and back, so the stars stay put while the sub-pixel
    phase runs over all values across the image, as in a warp.
    """
    img, var = t.image.astype(float), t.variance.astype(float)
    ok = np.ones(img.shape, bool)
    for a in (angle, -angle):
        img, var, o = resample(np.where(ok, img, 0.0), np.where(ok, var, 0.0), angle_deg=a)
        ok &= o
    masks.set_plane(t.mask, ~ok, "NO_DATA")
    t.image[...] = np.where(ok, img, np.nan)
    t.variance[...] = np.where(ok, var, 0.0)
    return t


def test_measure_noise_white_and_twice_resampled():
    rng = np.random.default_rng(5)
    n = 600
    white = rng.normal(size=(n, n)) * 7.0
    var = np.full((n, n), 49.0)
    scale, rho, _ = measure_noise(white, var, np.ones((n, n), bool))
    assert scale == pytest.approx(1.0, abs=0.01)
    assert fit_resampling_model(rho) < 0.05
    # twice resampled with rotations (the sub-pixel phase runs over all values, as for a warp)
    img, v, ok = resample(white, var, angle_deg=3.0)
    img, v, ok2 = resample(np.where(ok, img, 0), np.where(ok, v, 49.0), angle_deg=-5.0, shift=(0.3, 0.1))
    good = ok2 & ok
    core = np.zeros_like(good)
    core[40:-40, 40:-40] = True
    good &= core
    z = img[good] / np.sqrt(v[good])
    scale, rho, _ = measure_noise(img, v, good)
    assert scale == pytest.approx(np.var(z), rel=0.01)  # the plane under-predicts the pixel variance ...
    assert np.var(z) > 1.04  # ... by several per cent
    nres = fit_resampling_model(rho)
    assert nres == pytest.approx(2.0, abs=0.25)
    model = resampling_noise_model(nres)
    h = model.shape[0] // 2
    assert model[h, h + 1] == pytest.approx(rho[2, 3], abs=0.02)  # rho(1 px) ~ 0.2
    # the model's large-aperture variance: a 9 x 9 box sum of the noise, measured vs predicted
    from scipy import ndimage

    box = ndimage.uniform_filter(np.where(good, img, 0), 9)[good & ndimage.binary_erosion(good, iterations=6)] * 81
    pred = np.mean(v[good]) * scale * np.sum(
        [model[h + dy, h + dx] * (9 - abs(dy)) * (9 - abs(dx)) for dy in range(-h, h + 1) for dx in range(-h, h + 1)
         if abs(dy) < 9 and abs(dx) < 9])
    assert np.var(box) == pytest.approx(pred, rel=0.05)


def _mf_std(d):
    """Noise of the PSF matched-filtered significance, as detection measures it (its noiseScale)."""
    good = ~masks.is_set(d.mask, *masks.BAD_PLANES) & np.isfinite(d.image)
    nu = matched_filter(d.image, d.variance, good, d.psf.image(d.shape[1] / 2, d.shape[0] / 2))
    return _filtered_noise(nu, good)[0]


@pytest.mark.parametrize("ratio", [0.8, 1.5])
def test_correlated_template_noise_is_propagated(ratio):
    """Blank sky within 1% (pixels; and 2% after the PSF matched filter), bright stars within 2%; not without the fix.

    Measured (seed 3): science convolved (ratio 0.8) blank 1.044 -> 1.002, stars 1.067 -> 1.001;
    template convolved (1.5) matched-filter noise 1.032 -> 1.001.
    """
    s, t, truth = make_pair(448, seeing_ratio=ratio, seed=3, sky_t=60.0)
    t = correlated_template(t)
    res = {}
    for emp in (True, False):
        d = subtract(s, t, {"empirical_noise": emp})
        blank, stars, nbox = residual_stats(d, truth)
        res[emp] = (blank, stars, _mf_std(d))
    blank, stars, mf = res[True]
    assert abs(blank - 1) < 0.01, f"blank-sky std {blank:.4f}"
    assert abs(stars - 1) < 0.02, f"bright-star boxes std {stars:.4f}"
    if ratio > 1:
        # template convolved: the afterburner whitens the template's own correlation too.  (Science
        # convolved, the unconvolved template keeps it, and the matched-filter noise is 0.96 of the
        # prediction with or without the measured noise: not solved.)
        assert abs(mf - 1) < 0.02, f"matched-filter std {mf:.4f}"
    assert d.metadata["EMPNOISE"] is False
    # without the measured template noise one of them is off by more than the tolerance
    b0, s0, m0 = res[False]
    assert abs(b0 - 1) > 0.01 or abs(s0 - 1) > 0.02 or abs(m0 - 1) > 0.02, res
