"""Master calibrations (diapipe.calib) on synthetic contract raws with known defects."""

from __future__ import annotations

import numpy as np
import pytest

import isr_fakes as F
from diapipe import calib, cli, masks
from diapipe.exposure import Exposure
from diapipe.fileio import DiapipeError


@pytest.fixture(scope="module")
def cam_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    cam = F.Camera(seed=4)
    paths = F.calib_set(cam, tmp, n=5)
    b = calib.make_master_bias(paths["bias"], data_id={"detector": 0})
    d = calib.make_master_dark(paths["dark"], b, data_id={"detector": 0})
    f = calib.make_master_flat(paths["flat"], b, d, data_id={"detector": 0})
    return dict(tmp=tmp, cam=cam, paths=paths, bias=b, dark=d, flat=f)


def test_master_bias_level_and_variance(cam_set):
    b = cam_set["bias"]
    # Overscan-corrected: the residual bias is zero within its noise.
    assert abs(np.mean(b.image)) < 3 * np.sqrt(np.mean(b.variance) / b.image.size) + 0.05
    # Variance of the mean of 5 frames = read noise^2 / 5 per amplifier (e-^2), within 10%.
    w = F.NX // 2
    for i, rn in enumerate(F.RDNOISE):
        v = np.mean(b.variance[:, i * w : (i + 1) * w])
        assert v == pytest.approx(rn**2 / 5, rel=0.1)
        # ... and it describes the actual scatter of the master.
        assert np.var(b.image[:, i * w : (i + 1) * w]) == pytest.approx(rn**2 / 5, rel=0.1)
    assert b.metadata["OBSTYPE"] == "bias" and b.metadata["NCOMBINE"] == 5
    assert b.metadata["BUNIT"] == "electron"


def test_master_dark_rate_and_hot_pixels(cam_set):
    d, cam = cam_set["dark"], cam_set["cam"]
    good = ~cam.bad
    assert np.median(d.image[good]) == pytest.approx(F.DARK_RATE, abs=0.005)
    z = (d.image - cam.dark)[good] / np.sqrt(d.variance[good])
    assert abs(np.std(z) - 1) < 0.1
    hot = (cam.dark > F.DARK_RATE + 0.5)
    bad = masks.is_set(d.mask, "BAD")
    assert np.all(bad[hot])  # every hot pixel and the hot column
    assert (bad & ~cam.bad).sum() <= 0.001 * bad.size
    assert d.metadata["BUNIT"] == "electron/s"


def test_master_flat_response_and_dead_pixels(cam_set):
    f, cam = cam_set["flat"], cam_set["cam"]
    bad = masks.is_set(f.mask, "BAD")
    good = ~cam.bad & ~bad
    assert np.median(f.image[good]) == pytest.approx(1.0, abs=1e-3)
    ratio = f.image[good] / cam.flat[good]
    # The master follows the true response (vignetting, PRNU) to its quoted precision.
    z = (f.image[good] - cam.flat[good] * np.median(ratio)) / np.sqrt(f.variance[good])
    assert abs(np.std(z) - 1) < 0.15
    assert np.all(bad[cam.bad])  # dead pixels, the dead column, and the dark's hot pixels
    # Only the good rows of the partly dead column may be over-flagged.
    extra = bad & ~cam.bad
    assert extra.sum() <= 0.002 * bad.size + 20
    assert f.metadata["band"] == "r"


def test_clipped_mean_rejects_outliers():
    rng = np.random.default_rng(0)
    frames = [rng.normal(100, 5, (40, 40)).astype(np.float32) for _ in range(7)]
    frames[3][10, 10] += 5000  # a cosmic ray in one frame
    mean, var, n = calib.clipped_mean(frames, 4.0)
    assert n[10, 10] == 6
    assert abs(mean[10, 10] - 100) < 10
    assert np.mean(var) == pytest.approx(25 / 7, rel=0.1)


def test_two_frames_keep_the_lower_where_they_disagree():
    rng = np.random.default_rng(1)
    a = rng.normal(10, 1, (50, 50)).astype(np.float32)
    b = rng.normal(10, 1, (50, 50)).astype(np.float32)
    b[5, 5] += 300  # cosmic ray in the second dark
    mean, var, n = calib.clipped_mean([a, b], 4.0)
    assert mean[5, 5] == pytest.approx(a[5, 5])
    assert n[5, 5] == 1
    assert np.median(n) == 2


def test_too_few_frames(cam_set):
    with pytest.raises(DiapipeError, match="at least 2 frames"):
        calib.make_master_bias(cam_set["paths"]["bias"][:1], data_id={"detector": 0})


def test_wrong_frame_type(cam_set):
    with pytest.raises(DiapipeError, match="not a bias") as exc:
        calib.make_master_bias(cam_set["paths"]["bias"][:2] + cam_set["paths"]["flat"][:1],
                               data_id={"detector": 0})
    assert str(cam_set["paths"]["flat"][0]) in str(exc.value)


def test_flats_of_two_bands(cam_set, tmp_path):
    cam = cam_set["cam"]
    p = tmp_path / "flat_g.fits"
    cam.raw(np.full((cam.ny, cam.nx), 20000.0), p, exptime=5.0, obstype="flat", band="g", seed=9)
    with pytest.raises(DiapipeError, match="several bands"):
        calib.make_master_flat(cam_set["paths"]["flat"][:2] + [p], data_id={"detector": 0})


def test_shape_mismatch_with_bias(cam_set, tmp_path):
    small = F.Camera(ny=100)
    paths = []
    for i in range(2):
        p = tmp_path / f"dark{i}.fits"
        small.raw(np.zeros((100, F.NX)), p, exptime=300.0, obstype="dark", seed=i)
        paths.append(p)
    with pytest.raises(DiapipeError, match="shape"):
        calib.make_master_dark(paths, cam_set["bias"], data_id={"detector": 0})


def test_cli_calib(cam_set, tmp_path):
    paths = cam_set["paths"]
    out_b, out_d = tmp_path / "bias.fits", tmp_path / "dark.fits"
    assert cli.main(["calib", "bias", *map(str, paths["bias"]), "-o", str(out_b), "--detector", "0"]) == 0
    assert cli.main(["calib", "dark", *map(str, paths["dark"]), "--bias", str(out_b), "-o", str(out_d),
                     "--detector", "0"]) == 0
    out_f = tmp_path / "flat.fits"
    assert cli.main(["calib", "flat", *map(str, paths["flat"]), "--bias", str(out_b), "--dark", str(out_d),
                     "-o", str(out_f), "--detector", "0", "--band", "r"]) == 0
    f = Exposure.read(out_f)
    assert f.metadata["band"] == "r" and f.metadata["detector"] == 0
    np.testing.assert_allclose(f.image, cam_set["flat"].image, rtol=1e-6)


def test_defect_map_finds_faint_partial_columns():
    """A column segment whose pixels are each within the noise threshold but coherently
    high (a trap part-way up the column) is flagged from where it starts."""
    rng = np.random.default_rng(3)
    dev = rng.normal(0, 1, (400, 100)).astype(np.float32)
    thresh = 6.0
    dev[150:, 40] += 0.8 * thresh  # below the per-pixel threshold, far above the column noise
    dev[:, 70] -= 0.9 * thresh  # a low column over the whole height
    bad = calib.defect_map(dev, thresh, sign=0)
    assert bad[160:, 40].all() and bad[10:390, 70].all()
    assert not bad[:130, 40].any()  # the segment's start is found to within the running window
    other = np.ones(dev.shape[1], bool)
    other[[40, 70]] = False
    assert bad[:, other].mean() < 1e-3
    hot = calib.defect_map(dev, thresh, sign=+1)
    assert not hot[10:390, 70].any()  # a low column is not hot
