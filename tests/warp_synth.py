"""Synthetic calexps with known truth for the warp/coadd tests and benchmark.

Stars are rendered (pixel-integrated, 4x4 sub-sampled, slightly elliptical
Moffat whose FWHM varies across the detector) through a TAN-SIP WCS; the
calexp carries the true WCS, a PixelPsf fitted to the true PSF, expected
variance, MAGZERO, a bad column and hot pixels.  Single-visit artefacts
(cosmic rays, a satellite trail, a mover, a transient) can be injected, and
each is returned with its position so tests can look for residuals.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from diapipe import masks
from diapipe.exposure import Exposure, MaskedImage
from diapipe.psf import PixelPsf

RA0, DEC0 = 150.0, 2.0
BETA = 3.5


def make_wcs(ra, dec, rot_deg, shape, pixscale=0.2, sip=True) -> WCS:
    """TAN(-SIP) WCS with the detector centre at (ra, dec), rotated by rot_deg."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    s = pixscale / 3600
    t = np.deg2rad(rot_deg)
    w.wcs.cd = np.array([[-s * np.cos(t), s * np.sin(t)], [s * np.sin(t), s * np.cos(t)]])
    if sip:
        from astropy.wcs import Sip

        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        # ~0.3 px at the corners of a 400 px detector: a real-looking low-order distortion
        a[2, 0], a[0, 2], a[1, 1] = 2e-6, -1.5e-6, 1e-6
        b[0, 2], b[2, 0], b[1, 1] = 2.5e-6, 1e-6, -1e-6
        a[3, 0] = 2e-9
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    else:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.set()
    return w


def moffat_stamp(x, y, fwhm, size, e1=0.05, sub=4):
    """Pixel-integrated Moffat centred at sub-pixel (x, y) on a size x size grid, unit sum."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / BETA) - 1))
    o = (np.arange(sub) + 0.5) / sub - 0.5
    yy, xx = np.mgrid[:size, :size]
    dx = (xx[..., None, None] + o[None, None, None, :] - x)
    dy = (yy[..., None, None] + o[None, None, :, None] - y)
    # mild ellipticity along the detector x axis: tests that the PSF is rotated with the image
    r2 = ((1 - e1) * dx**2 + (1 + e1) * dy**2) / alpha**2
    prof = (1 + r2) ** (-BETA)
    img = prof.mean(axis=(-1, -2))
    return img / img.sum()


def fwhm_at(x, y, shape, fwhm0):
    """True FWHM (px) at detector (x, y): a 6% gradient across the detector in x and 3% in y."""
    ny, nx = shape
    return fwhm0 * (1 + 0.06 * (x - nx / 2) / nx + 0.03 * (y - ny / 2) / ny)


def star_catalog(rng, n=150, radius_deg=0.03, fmin=3e4, fmax=3e6):
    """Stars spread over a square around (RA0, DEC0); flux in nJy (log-uniform)."""
    ra = RA0 + rng.uniform(-radius_deg, radius_deg, n) / np.cos(np.deg2rad(DEC0))
    dec = DEC0 + rng.uniform(-radius_deg, radius_deg, n)
    flux = np.exp(rng.uniform(np.log(fmin), np.log(fmax), n))
    return {"ra": ra, "dec": dec, "flux_njy": flux}


def _pixel_psf(shape, fwhm0, size=25):
    ny, nx = shape
    xs, ys, st = [], [], []
    for yv in np.linspace(0, ny - 1, 4):
        for xv in np.linspace(0, nx - 1, 4):
            c = (size - 1) / 2
            st.append(moffat_stamp(c, c, fwhm_at(xv, yv, shape, fwhm0), size))
            xs.append(xv)
            ys.append(yv)
    from diapipe.warp import fit_pixel_psf

    return fit_pixel_psf(np.array(xs), np.array(ys), st, 1, (0, 0, nx, ny))


def make_calexp(visit, stars, *, detector=0, band="r", shape=(400, 400), pixscale=0.2, dra=0.0, ddec=0.0, rot=0.0,
                fwhm0=4.0, sky=400.0, read_noise=5.0, magzero=28.0, seed=1, artefacts=(), mask_bad=True,
                mjd=60000.0, noise=True, sip=True):
    """One calexp (electrons, background subtracted) and its truth.

    ``artefacts``: names from ('cr', 'trail', 'mover', 'transient'); each
    lands only in this visit.  Returns (exposure, truth dict).
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    wcs = make_wcs(RA0 + dra / np.cos(np.deg2rad(DEC0)), DEC0 + ddec, rot, shape, pixscale, sip=sip)
    model = np.zeros(shape)
    fscale = 10 ** (-0.4 * (magzero - 31.4))  # nJy per e-
    x, y = wcs.all_world2pix(stars["ra"], stars["dec"], 0, quiet=True)
    flux_e = stars["flux_njy"] / fscale
    R = 15
    size = 2 * R + 1
    for xi, yi, fe in zip(x, y, flux_e):
        _add(model, xi, yi, fe, fwhm_at(xi, yi, shape, fwhm0), size)
    truth = {"x": x, "y": y, "flux_e": flux_e, "wcs": wcs, "artefacts": []}
    extra = np.zeros(shape)
    mask = np.zeros(shape, masks.MASK_DTYPE)
    for kind in artefacts:
        if kind == "cr":
            for _ in range(4):
                cx, cy = rng.integers(30, nx - 30), rng.integers(30, ny - 30)
                L = rng.integers(1, 5)
                xs_ = cx + np.arange(L)
                extra[cy, xs_] += rng.uniform(2000, 20000, L)
                truth["artefacts"].append(("cr", wcs.all_pix2world([[cx, cy]], 0)[0]))
        elif kind == "trail":
            # a satellite trail: a PSF-wide line across the detector at ~50 sigma per pixel
            ang = rng.uniform(0, np.pi)
            c0 = np.array([nx / 2, ny / 2]) + rng.uniform(-40, 40, 2)
            yy, xx = np.mgrid[:ny, :nx]
            d = (xx - c0[0]) * np.sin(ang) - (yy - c0[1]) * np.cos(ang)
            sig = fwhm0 / 2.355
            extra += 1000.0 * np.exp(-0.5 * d**2 / sig**2)
            truth["artefacts"].append(("trail", wcs.all_pix2world([c0], 0)[0]))
        elif kind in ("mover", "transient"):
            # a point source only in this visit (an asteroid, or a transient at a fixed sky place)
            px, py = rng.uniform(60, nx - 60), rng.uniform(60, ny - 60)
            fe = 2e5 if kind == "mover" else 1e5
            _add(extra, px, py, fe, fwhm_at(px, py, shape, fwhm0), size)
            truth["artefacts"].append((kind, wcs.all_pix2world([[px, py]], 0)[0]))
    expected = model + extra
    variance = sky + np.clip(expected, 0, None) + read_noise**2
    # noise from its own generator, so a visit with and without artefacts has the same noise
    nrng = np.random.default_rng(seed + 7919)
    img = expected + (nrng.normal(size=shape) * np.sqrt(variance) if noise else 0.0)
    # defects: a bad column and hot pixels, flagged BAD (values garbage, as after ISR)
    bc = int(nx * 0.3) + visit % 7
    img[:, bc] = 1e5
    hot = nrng.integers(0, nx, (2, 10))
    img[hot[1], hot[0]] = 5e4
    if mask_bad:
        mask[:, bc] |= masks.bit("BAD")
        mask[hot[1], hot[0]] |= masks.bit("BAD")
    mi = MaskedImage(img, mask, variance)
    meta = {"visit": visit, "detector": detector, "band": band, "MAGZERO": magzero, "MJD-OBS": mjd,
            "EXPTIME": 30.0, "SEEING": fwhm0 * pixscale}
    exp = Exposure(mi, wcs=wcs, psf=_pixel_psf(shape, fwhm0), metadata=meta)
    truth["model"] = model
    truth["extra"] = extra
    return exp, truth


def _add(img, x, y, flux, fwhm, size):
    ny, nx = img.shape
    R = size // 2
    ix, iy = int(round(x)), int(round(y))
    st = moffat_stamp(x - ix + R, y - iy + R, fwhm, size)
    x0, y0 = ix - R, iy - R
    sx0, sy0 = max(0, -x0), max(0, -y0)
    sx1, sy1 = size - max(0, x0 + size - nx), size - max(0, y0 + size - ny)
    if sx0 >= sx1 or sy0 >= sy1:
        return
    img[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1] += flux * st[sy0:sy1, sx0:sx1]


# ------------------------------------------------------------------ a survey
ARTEFACTS = [("cr", "trail"), ("mover",), ("transient",), (), ("cr",), ()]


def make_survey(n_visits=6, artefacts=ARTEFACTS, seed=3, n_stars=200, shape=(400, 400), clean_too=False):
    """Visits of one detector, dithered (+-8"), rotated (0-15 deg), seeing 3.3-4.3 px, zero points 28.0-28.5.

    Returns dict(stars, visits=[(calexp, truth)], clean=[calexp without artefacts] if clean_too).
    """
    rng = np.random.default_rng(seed)
    stars = star_catalog(rng, n=n_stars, radius_deg=0.012, fmin=1e5, fmax=1e7)
    out = {"stars": stars, "visits": [], "clean": []}
    for v in range(n_visits):
        a = artefacts[v % len(artefacts)] if artefacts else ()
        kw = dict(rot=3.0 * v, dra=((v * 7) % 5 - 2) * 4 / 3600, ddec=((v * 3) % 3 - 1) * 5 / 3600, pixscale=0.21,
                  fwhm0=3.3 + 0.2 * v, seed=100 + v, magzero=28.0 + 0.1 * v, mjd=60000.0 + v, shape=shape)
        out["visits"].append(make_calexp(v, stars, artefacts=a, **kw))
        if clean_too:
            out["clean"].append(make_calexp(v, stars, artefacts=(), **kw)[0])
    return out


def small_skymap():
    """2 x 2 patches of 200 px (+20 px overlap) at 0.2"/px around (RA0, DEC0): 80" x 80", inside every detector."""
    from diapipe.skymap import SkyMap

    return SkyMap(RA0, DEC0, pixel_scale=0.2, patch_size=200, overlap=20, n_patches_x=2, n_patches_y=2)


def weighted_fwhm(img, x, y, sw=2.0, r=10):
    """FWHM (px) from Gaussian-weighted second moments about (x, y), deconvolved from the weight.

    The same estimator on stars and on PSF-model stamps makes the two comparable.
    """
    ix, iy = int(round(x)), int(round(y))
    st = np.asarray(img[iy - r:iy + r + 1, ix - r:ix + r + 1], float)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    dx, dy = xx - (x - ix), yy - (y - iy)
    w = np.exp(-0.5 * (dx**2 + dy**2) / sw**2) * st
    m = 0.5 * ((w * (dx**2 + dy**2)).sum() / w.sum())
    s2 = m * sw**2 / (sw**2 - m)
    return 2.3548 * np.sqrt(s2)
