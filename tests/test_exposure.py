"""The Exposure file format: written and read back identical, readable by plain astropy, atomic."""

import hashlib
import os
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from diapipe import masks
from diapipe.exposure import Exposure, MaskedImage
from diapipe.fileio import DiapipeError
from diapipe.psf import PixelPsf, poly_terms

NY, NX = 48, 64


def make_wcs(sip=True) -> WCS:
    """A TAN(-SIP) WCS with 0.2"/px, a small rotation and a few-pixel distortion at the corners."""
    w = WCS(naxis=2)
    scale = 0.2 / 3600
    th = np.deg2rad(3.0)
    w.wcs.crpix = [NX / 2 + 0.5, NY / 2 + 0.5]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.cd = scale * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    if sip:
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[3, 0] = 2e-3, -1e-3, 3e-5
        b[1, 1], b[0, 3] = 1.5e-3, -2e-5
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    else:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    return w


def make_psf() -> PixelPsf:
    """A first-order spatially varying PSF (Gaussian whose width grows with x)."""
    y, x = np.mgrid[-7:8, -7:8]
    g = lambda s: np.exp(-(x**2 + y**2) / (2 * s**2))  # noqa: E731
    comps = np.zeros((len(poly_terms(1)), 15, 15))
    comps[0] = g(1.5)
    comps[1] = 0.1 * (g(1.8) - g(1.5))  # x term
    comps[2] = 0.05 * (g(1.6) - g(1.5))  # y term
    return PixelPsf(comps, order=1, x0=NX / 2, y0=NY / 2, sx=NX / 2, sy=NY / 2)


@pytest.fixture
def exposure() -> Exposure:
    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 5.0, (NY, NX)).astype(np.float32)
    image[3, 4] = np.nan  # NaN pixels must survive too
    mask = np.zeros((NY, NX), masks.MASK_DTYPE)
    masks.set_plane(mask, image > 110, "DETECTED")
    masks.set_plane(mask, image < 90, "DETECTED_NEGATIVE")
    mask[:, 0] |= masks.bits("BAD", "EDGE")
    mask[10, 10] |= masks.bits(*masks.MASK_PLANES)  # every plane on one pixel, incl. the highest bit
    variance = rng.uniform(20, 30, (NY, NX)).astype(np.float32)
    meta = {
        "visit": 12,
        "detector": 1,
        "band": "r",
        "MJD-OBS": 60345.123456789012,
        "EXPTIME": 30.0,
        "MAGZERO": 31.4123456789,
        "SEEING": 0.87,
        "FILTER": "r",
        "isTemplate": True,
        "provenance": "diapipe 0.1.0 test; a long string that needs more than one FITS card to hold it all",
    }
    return Exposure(MaskedImage(image, mask, variance), wcs=make_wcs(), psf=make_psf(), metadata=meta)


def sky_grid(w: WCS):
    y, x = np.mgrid[0:NY:7, 0:NX:9]
    return w.all_pix2world(x.ravel(), y.ravel(), 0)


def assert_same(a: Exposure, b: Exposure):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.variance, b.variance)
    assert b.image.dtype == np.float32 and b.variance.dtype == np.float32
    assert b.mask.dtype == masks.MASK_DTYPE
    assert a.metadata == b.metadata
    assert a.psf == b.psf
    assert (a.wcs is None) == (b.wcs is None)
    if a.wcs is not None:
        np.testing.assert_allclose(b.wcs.wcs.crval, a.wcs.wcs.crval, rtol=0, atol=1e-12)
        np.testing.assert_allclose(b.wcs.wcs.crpix, a.wcs.wcs.crpix, rtol=0, atol=1e-12)
        np.testing.assert_allclose(b.wcs.pixel_scale_matrix, a.wcs.pixel_scale_matrix, rtol=1e-12)
        assert (a.wcs.sip is None) == (b.wcs.sip is None)
        if a.wcs.sip is not None:
            np.testing.assert_array_equal(b.wcs.sip.a, a.wcs.sip.a)
            np.testing.assert_array_equal(b.wcs.sip.b, a.wcs.sip.b)
        # The mapping itself, at sub-milliarcsecond level over the whole detector.
        ra_a, dec_a = sky_grid(a.wcs)
        ra_b, dec_b = sky_grid(b.wcs)
        assert np.max(np.hypot((ra_a - ra_b) * np.cos(np.deg2rad(dec_a)), dec_a - dec_b)) * 3.6e6 < 1e-3


def test_round_trip_identical(exposure, tmp_path):
    path = tmp_path / "calexp.fits"
    exposure.write(path)
    back = Exposure.read(path)
    assert_same(exposure, back)
    assert back.data_id == {"visit": 12, "detector": 1, "band": "r"}
    # ... and a second generation too (read -> write -> read changes nothing).
    back.write(tmp_path / "again.fits")
    assert_same(exposure, Exposure.read(tmp_path / "again.fits"))


def test_sip_actually_matters(exposure):
    """Guard for the WCS check above: the SIP terms move corner pixels by more than a pixel."""
    ra_sip, dec_sip = sky_grid(exposure.wcs)
    ra_tan, dec_tan = sky_grid(make_wcs(sip=False))
    sep = np.hypot((ra_sip - ra_tan) * np.cos(np.deg2rad(dec_sip)), dec_sip - dec_tan) * 3600 / 0.2
    assert sep.max() > 1.0


def test_round_trip_without_wcs_and_psf(tmp_path):
    e = Exposure(MaskedImage(np.arange(12, dtype=np.float32).reshape(3, 4)), metadata={"patch": 5})
    e.write(tmp_path / "x.fits")
    back = Exposure.read(tmp_path / "x.fits")
    assert_same(e, back)
    assert back.wcs is None and back.psf is None


def test_same_data_same_bytes(exposure, tmp_path):
    exposure.write(tmp_path / "a.fits")
    exposure.write(tmp_path / "b.fits")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.fits", "b.fits")]
    assert digest[0] == digest[1]


def test_opens_with_plain_astropy(exposure, tmp_path):
    path = tmp_path / "calexp.fits"
    exposure.write(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checksums must verify, no FITS fix-ups needed
        with fits.open(path, checksum=True) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
            np.testing.assert_array_equal(hdul["IMAGE"].data, exposure.image)
            np.testing.assert_array_equal(hdul["VARIANCE"].data, exposure.variance)
            assert hdul["IMAGE"].data.dtype.kind == "f" and hdul["IMAGE"].data.dtype.itemsize == 4
            mask_header = hdul["MASK"].header
            planes = {k[3:]: v for k, v in mask_header.items() if k.startswith("MP_")}
            assert planes == masks.MASK_PLANES
            assert hdul[0].header["EXPTIME"] == 30.0
            assert hdul[0].header["MJD-OBS"] == 60345.123456789012
            # Plain astropy WCS from the IMAGE header gives the same sky positions (incl. SIP).
            w = WCS(hdul["IMAGE"].header)
            assert w.sip is not None
            ra, dec = sky_grid(w)
            ra0, dec0 = sky_grid(exposure.wcs)
            assert np.max(np.abs(ra - ra0)) * 3.6e6 < 1e-3 and np.max(np.abs(dec - dec0)) * 3.6e6 < 1e-3
            # DS9 aligns MASK and VARIANCE frames with IMAGE through their own WCS.
            for name in ("MASK", "VARIANCE"):
                assert hdul[name].header["CTYPE1"].startswith("RA---TAN")


def test_mask_planes_decoded_by_name(exposure, tmp_path):
    exposure.write(tmp_path / "e.fits")
    back = Exposure.read(tmp_path / "e.fits")
    for name in masks.MASK_PLANES:
        np.testing.assert_array_equal(masks.is_set(back.mask, name), masks.is_set(exposure.mask, name))
    assert masks.is_set(back.mask, "BAD")[:, 0].all()
    assert not masks.is_set(back.mask, "BAD")[:, 1:].any() or back.mask[10, 10] != 0


def test_mask_written_with_other_numbering_is_remapped(exposure, tmp_path):
    """A file whose MASK header numbers the planes differently is translated by plane name."""
    hdul = exposure.to_hdulist()
    other = {"SAT": 0, "BAD": 5, "CR": 1}
    m = np.zeros(exposure.shape, np.int32)
    m[1, 2] = 1 << 0  # SAT
    m[2, 3] = 1 << 5  # BAD
    m[4, 5] = (1 << 1) | (1 << 0)  # CR + SAT
    hdul["MASK"].data = m
    for key in list(hdul["MASK"].header):
        if key.startswith("MP_"):
            del hdul["MASK"].header[key]
    for card in masks.header_cards(other):
        hdul["MASK"].header[card[0]] = card[1]
    hdul.writeto(tmp_path / "other.fits")
    back = Exposure.read(tmp_path / "other.fits")
    assert back.mask[1, 2] == masks.bit("SAT")
    assert back.mask[2, 3] == masks.bit("BAD")
    assert back.mask[4, 5] == masks.bits("CR", "SAT")
    assert np.count_nonzero(back.mask) == 3


def test_atomic_write_leaves_no_partial_file(exposure, tmp_path, monkeypatch):
    path = tmp_path / "calexp.fits"

    def half_write(self, fileobj, **kwargs):
        with open(fileobj, "wb") as fh:
            fh.write(b"SIMPLE  =                    T" + b" " * 100)  # a partial file...
        raise OSError("disk full")  # ...then the failure

    monkeypatch.setattr(fits.HDUList, "writeto", half_write)
    with pytest.raises(OSError, match="disk full"):
        exposure.write(path)
    assert not path.exists()
    assert os.listdir(tmp_path) == []  # no temporary left behind either


def test_failed_rewrite_keeps_old_file(exposure, tmp_path, monkeypatch):
    path = tmp_path / "calexp.fits"
    exposure.write(path)
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt  # even a SIGINT mid-write

    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(KeyboardInterrupt):
        exposure.write(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["calexp.fits"]


def test_bad_file_gives_one_clear_error(tmp_path, exposure):
    notexp = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]).writeto(
        notexp
    )
    with pytest.raises(DiapipeError, match="table.fits") as err:
        Exposure.read(notexp)
    assert "IMAGE" in str(err.value)

    with pytest.raises(DiapipeError, match="missing.fits"):
        Exposure.read(tmp_path / "missing.fits")


@pytest.mark.parametrize("cut", ["third", "hdu_boundary", "last_data", "header"])
def test_truncated_file_is_an_error(tmp_path, exposure, cut):
    """A file cut short (full disk, killed copy) is refused, never read with defaults filled in."""
    exposure.write(tmp_path / "good.fits")
    data = (tmp_path / "good.fits").read_bytes()
    with fits.open(tmp_path / "good.fits") as hdul:
        info = [hdul.fileinfo(i) for i in range(len(hdul))]
    n = {
        "third": len(data) // 3,
        "hdu_boundary": info[3]["hdrLoc"],  # VARIANCE and PSF gone, the rest a valid FITS file
        "last_data": len(data) - 2880 - 100,
        "header": info[2]["hdrLoc"] + 1000,
    }[cut]
    (tmp_path / "truncated.fits").write_bytes(data[:n])
    with pytest.raises(DiapipeError, match="truncated.fits"):
        Exposure.read(tmp_path / "truncated.fits")


def test_corrupted_pixels_fail_the_checksum(tmp_path, exposure):
    exposure.write(tmp_path / "e.fits")
    data = bytearray((tmp_path / "e.fits").read_bytes())
    with fits.open(tmp_path / "e.fits") as hdul:
        loc = hdul.fileinfo(3)["datLoc"]  # a VARIANCE pixel
    data[loc + 41] ^= 0x10
    (tmp_path / "bad.fits").write_bytes(bytes(data))
    with pytest.raises(DiapipeError, match="bad.fits.*|.*checksum") as err:
        Exposure.read(tmp_path / "bad.fits")
    assert "bad.fits" in str(err.value) and "VARIANCE" in str(err.value)


def test_copy_is_deep(exposure):
    c = exposure.copy()
    c.image[0, 0] += 1
    c.mask[0, 0] |= masks.bit("CR")
    c.variance[0, 0] += 1
    c.metadata["visit"] = 99
    c.psf.components[0, 7, 7] += 1
    c.wcs.wcs.crval = [0.0, 0.0]
    assert exposure.image[0, 0] != c.image[0, 0]
    assert not masks.is_set(exposure.mask, "CR")[0, 0] or exposure.mask[0, 0] != c.mask[0, 0]
    assert exposure.variance[0, 0] != c.variance[0, 0]
    assert exposure.metadata["visit"] == 12
    assert exposure.psf != c.psf
    assert exposure.wcs.wcs.crval[0] == pytest.approx(150.1)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="one shape"):
        MaskedImage(np.zeros((4, 4)), variance=np.zeros((4, 5)))


def test_psf_round_trip_values(exposure, tmp_path):
    exposure.write(tmp_path / "e.fits")
    psf = Exposure.read(tmp_path / "e.fits").psf
    for x, y in [(0, 0), (NX - 1, NY - 1), (10.5, 30.2)]:
        a, b = exposure.psf.image(x, y), psf.image(x, y)
        assert b.sum() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-7)
    # the PSF does vary: FWHM grows towards +x
    assert psf.fwhm(NX - 1, NY / 2) > psf.fwhm(0, NY / 2) + 0.05


def test_killed_writer_temporaries_removed_by_next_write(exposure, tmp_path):
    """SIGKILL cannot be caught: the next write of the same product removes the dead writer's temporary."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".calexp.fits.{dead_pid}.abc123.tmp.fits"
    stale.write_bytes(b"partial")
    live = tmp_path / f".calexp.fits.{os.getpid()}.xyz.tmp.fits"  # a live writer's file is left alone
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.fits.{dead_pid}.q.tmp.fits"  # another product's temporary too
    other.write_bytes(b"x")
    exposure.write(tmp_path / "calexp.fits")
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert Exposure.read(tmp_path / "calexp.fits").shape == exposure.shape
