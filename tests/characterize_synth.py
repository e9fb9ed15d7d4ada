"""A synthetic star field with known truth, for the characterization tests and benchmark.

Independent of diapipe.simulate on purpose: a Moffat PSF whose width and
ellipticity vary across the detector, a TAN-SIP WCS with third-order
distortion, Gaussian-approximated Poisson noise, saturation, bad columns and
cosmic rays (masked, as ISR would leave them), galaxies (extended, absent from
the reference catalog), and a Gaia-like refcat with position and magnitude
errors.  The "postisr" exposure carries only a rough TAN WCS whose pointing is
off by ``pointing_error_arcsec`` and rotated by ``rotation_error_deg``.

Everything is in electrons; MAGZERO is the AB magnitude of 1 e-.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.wcs import WCS, Sip

from diapipe import masks
from diapipe.exposure import Exposure, MaskedImage

PIXEL_SCALE = 0.2  # arcsec / px


@dataclass
class Truth:
    wcs: WCS
    magzero: float
    fwhm0: float  # Moffat FWHM (px) at the centre, before pixel integration
    beta: float
    shape: tuple[int, int]
    stars: pd.DataFrame  # x, y, mag, flux (e-)

    def moffat_params(self, x, y):
        """Per-position Moffat FWHM (px) and ellipticity components (e1, e2)."""
        ny, nx = self.shape
        u = (np.asarray(x, float) - nx / 2) / (nx / 2)
        v = (np.asarray(y, float) - ny / 2) / (ny / 2)
        fwhm = self.fwhm0 * (1 + 0.04 * u - 0.03 * v + 0.03 * (u * u + v * v))
        e1 = 0.04 * u
        e2 = 0.03 * v
        return fwhm, e1, e2

    def psf_image(self, x, y, size=25, dx=0.0, dy=0.0, sub=5):
        """True pixel-integrated PSF stamp (unit total flux) centred at the stamp centre + (dx, dy)."""
        c = size // 2
        return _render(size, size, np.array([c + dx]), np.array([c + dy]), np.array([1.0]),
                       *self.moffat_params(x, y), self.beta, sub=sub, box=size // 2)


def _moffat_alpha(fwhm, beta):
    return fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))


def _render(nx, ny, xs, ys, fluxes, fwhm, e1, e2, beta, sub=3, box=15, fwhm_arr=False):
    """Add elliptical Moffat profiles (pixel-integrated by sub-sampling) into a new image."""
    img = np.zeros((ny, nx))
    fwhm = np.broadcast_to(np.asarray(fwhm, float), xs.shape)
    e1 = np.broadcast_to(np.asarray(e1, float), xs.shape)
    e2 = np.broadcast_to(np.asarray(e2, float), xs.shape)
    off = (np.arange(sub) + 0.5) / sub - 0.5
    for x, y, f, fw, a1, a2 in zip(xs, ys, fluxes, fwhm, e1, e2):
        ix, iy = int(round(x)), int(round(y))
        x0, x1 = max(ix - box, 0), min(ix + box + 1, nx)
        y0, y1 = max(iy - box, 0), min(iy + box + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = (np.arange(x0, x1)[:, None] + off[None, :]).ravel() - x
        gy = (np.arange(y0, y1)[:, None] + off[None, :]).ravel() - y
        dx, dy = np.meshgrid(gx, gy)
        alpha = _moffat_alpha(fw, beta)
        # shear the radius: r^2 = ((1-e1) dx^2 + (1+e1) dy^2 - 2 e2 dx dy) / (1 - e^2)^0.5
        det = np.sqrt(1 - a1 * a1 - a2 * a2)
        r2 = ((1 - a1) * dx * dx + (1 + a1) * dy * dy - 2 * a2 * dx * dy) / det / alpha**2
        prof = (beta - 1) / (np.pi * alpha**2) * (1 + r2) ** (-beta)
        pix = prof.reshape(y1 - y0, sub, x1 - x0, sub).mean(axis=(1, 3))
        img[y0:y1, x0:x1] += f * pix
    return img


def true_wcs(shape, ra0=150.0, dec0=2.0, rot_deg=0.3, distortion=1.0) -> WCS:
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    s = PIXEL_SCALE / 3600
    t = np.deg2rad(rot_deg)
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    # Distortion of ~1-2 px at the corners of a 1k detector (scaled with size).
    h = max(nx, ny) / 2
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 1] = 1.2 / h**2, -0.6 / h**2, 0.4 / h**2
    b[0, 2], b[2, 0], b[1, 1] = 1.0 / h**2, 0.5 / h**2, -0.5 / h**2
    a[3, 0], a[1, 2] = 0.8 / h**3, 0.5 / h**3
    b[0, 3], b[2, 1] = -0.7 / h**3, 0.4 / h**3
    w.sip = Sip(a * distortion, b * distortion, None, None, w.wcs.crpix)
    return w


def make_field(
    shape=(1024, 1024),
    n_stars=700,
    n_galaxies=150,
    fwhm0=4.0,
    beta=3.0,
    sky=800.0,
    read_noise=5.0,
    magzero=31.2,
    saturation=50000.0,
    pointing_error_arcsec=30.0,
    rotation_error_deg=0.05,
    seed=1,
    band="r",
):
    """Render (postisr Exposure, refcat DataFrame, Truth)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    wcs = true_wcs(shape)
    # Stars: power-law magnitude distribution 15.5 - 23
    mags = 15.5 + 7.5 * rng.power(2.2, n_stars)
    mags[: min(3, n_stars)] = 14.0  # a few saturated stars (with bleed trails)
    xs = rng.uniform(-5, nx + 5, n_stars)
    ys = rng.uniform(-5, ny + 5, n_stars)
    flux = 10 ** (-0.4 * (mags - magzero))
    truth = Truth(wcs, magzero, fwhm0, beta, shape,
                  pd.DataFrame({"x": xs, "y": ys, "mag": mags, "flux": flux}))
    fw, e1, e2 = truth.moffat_params(xs, ys)
    img = _render(nx, ny, xs, ys, flux, fw, e1, e2, beta, sub=3, box=int(6 * fwhm0))
    # Galaxies: broad Moffats (beta 2: heavy wings, a harsh test of the background and
    # aperture correction in this dense field), not in the refcat.
    gx, gy = rng.uniform(0, nx, n_galaxies), rng.uniform(0, ny, n_galaxies)
    gmag = rng.uniform(18, 22.5, n_galaxies)
    gfw = rng.uniform(2.2, 4.0, n_galaxies) * fwhm0
    img += _render(nx, ny, gx, gy, 10 ** (-0.4 * (gmag - magzero)), gfw,
                   rng.uniform(-0.3, 0.3, n_galaxies), rng.uniform(-0.3, 0.3, n_galaxies),
                   2.0, sub=1, box=int(5 * fwhm0))
    model = img + sky
    var = model + read_noise**2
    data = model + rng.normal(size=shape) * np.sqrt(var)
    mask = np.zeros(shape, masks.MASK_DTYPE)
    sat = data > saturation
    # bleed: saturated columns up and down a few pixels
    if sat.any():
        yy, xx = np.nonzero(sat)
        for dyy in range(-6, 7):
            ok = (yy + dyy >= 0) & (yy + dyy < ny)
            sat[yy[ok] + dyy, xx[ok]] = True
    data[sat] = saturation
    masks.set_plane(mask, sat, "SAT")
    bad = np.zeros(shape, bool)
    for col in rng.integers(0, nx, 3):
        bad[:, col] = True
    data[bad] = rng.uniform(0, 5 * sky, bad.sum())
    masks.set_plane(mask, bad, "BAD")
    cr = np.zeros(shape, bool)
    for _ in range(40):
        cx, cy = rng.integers(2, nx - 2), rng.integers(2, ny - 2)
        cr[cy:cy + 2, cx:cx + rng.integers(1, 4)] = True
    data[cr] += 5000
    masks.set_plane(mask, cr, "CR")

    rough = WCS(naxis=2)
    rough.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    rough.wcs.crpix = wcs.wcs.crpix
    ang = rng.uniform(0, 2 * np.pi)
    dra = pointing_error_arcsec * np.cos(ang) / 3600 / np.cos(np.deg2rad(wcs.wcs.crval[1]))
    ddec = pointing_error_arcsec * np.sin(ang) / 3600
    rough.wcs.crval = [wcs.wcs.crval[0] + dra, wcs.wcs.crval[1] + ddec]
    t = np.deg2rad(rotation_error_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    rough.wcs.cd = rot @ wcs.wcs.cd

    meta = {"visit": 7, "detector": 3, "band": band, "MJD-OBS": 60000.1, "EXPTIME": 30.0,
            "FILTER": band}
    postisr = Exposure(MaskedImage(data.astype(np.float32), mask, var.astype(np.float32)),
                       wcs=rough, metadata=meta)

    # Gaia-like refcat of stars brighter than 21.5, with a margin around the detector.
    ref = truth.stars[truth.stars.mag < 21.5]
    ra, dec = wcs.all_pix2world(ref.x.to_numpy(), ref.y.to_numpy(), 0)
    pos_err = np.clip(0.3 * 10 ** (0.2 * (ref.mag.to_numpy() - 15)), 0.3, 5.0)  # mas
    mag_err = np.clip(0.002 * 10 ** (0.2 * (ref.mag.to_numpy() - 16)), 0.002, 0.03)
    cosd = np.cos(np.deg2rad(dec))
    refcat = pd.DataFrame({
        "id": np.arange(len(ref)),
        "ra": ra + rng.normal(size=len(ref)) * pos_err / 3.6e6 / cosd,
        "dec": dec + rng.normal(size=len(ref)) * pos_err / 3.6e6,
        "ra_err": pos_err,
        "dec_err": pos_err,
        f"{band}_mag": ref.mag.to_numpy() + rng.normal(size=len(ref)) * mag_err,
        f"{band}_magErr": mag_err,
    })
    return postisr, refcat, truth
