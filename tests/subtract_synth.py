"""Simulated science/template pairs with known truth, for the subtraction tests and benchmark.

Stars on a background-subtracted noisy sky, Moffat (or Gaussian) PSFs whose
FWHM varies by 20% across the detector, a template that is deeper, has a
different flux scale and a small differential background, an optional
residual misregistration, and fakes of known flux added to the science image.
Variance planes are the true expectation (sky + source counts), in e-.
"""

from __future__ import annotations

import numpy as np

from diapipe.exposure import Exposure, MaskedImage
from diapipe.psf import PixelPsf, poly_design


def psf_image(fwhm, dx=0.0, dy=0.0, size=31, kind="moffat", beta=3.0, e1=0.0):
    """Unit-sum PSF stamp centred at (half + dx, half + dy), evaluated on a 3x3 subpixel grid."""
    h = size // 2
    sub = (np.arange(3) - 1) / 3.0
    y, x = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    img = np.zeros((size, size))
    for oy in sub:
        for ox in sub:
            xx = x + ox - dx
            yy = y + oy - dy
            r2 = (1 + e1) * xx**2 + (1 - e1) * yy**2
            if kind == "moffat":
                alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
                img += (1 + r2 / alpha**2) ** (-beta)
            else:
                s = fwhm / 2.3548
                img += np.exp(-r2 / (2 * s**2))
    return img / img.sum()


def fwhm_at(x, y, nx, ny, fwhm0, variation=0.2):
    """FWHM varying linearly by ``variation`` (fractional, total) across the detector diagonal."""
    return fwhm0 * (1 + variation * ((x / nx + y / ny) / 2 - 0.5))


def pixel_psf_model(fwhm0, nx, ny, kind, variation, size=31, order=2):
    """PixelPsf fitted to the true PSF on a 7x7 grid (what characterize would deliver)."""
    gx = np.linspace(0, nx - 1, 7)
    X, Y = np.meshgrid(gx, np.linspace(0, ny - 1, 7))
    stamps = np.array([psf_image(fwhm_at(x, y, nx, ny, fwhm0, variation), size=size, kind=kind)
                       for x, y in zip(X.ravel(), Y.ravel())])
    x0, y0, sx, sy = (nx - 1) / 2, (ny - 1) / 2, nx / 2, ny / 2
    A = poly_design(X.ravel(), Y.ravel(), order, x0, y0, sx, sy)
    coef, *_ = np.linalg.lstsq(A, stamps.reshape(len(stamps), -1), rcond=None)
    return PixelPsf(coef.reshape(-1, size, size), order, x0, y0, sx, sy)


def render(shape, xs, ys, fluxes, fwhm_fn, kind, size=31):
    img = np.zeros(shape)
    ny, nx = shape
    h = size // 2
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        st = psf_image(fwhm_fn(x, y), x - ix, y - iy, size, kind) * f
        y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = size - max(0, y1 - ny), size - max(0, x1 - nx)
        img[max(0, y0) : min(ny, y1), max(0, x0) : min(nx, x1)] += st[sy0:sy1, sx0:sx1]
    return img


def make_pair(n=512, seeing_ratio=1.5, fwhm_t=3.0, variation=0.2, shift=(0.0, 0.0), nstars=None, seed=1,
              kind="moffat", sky_s=400.0, sky_t=100.0, flux_scale=0.8, n_fakes=20, fake_flux=3e4,
              star_flux=(500.0, 4e5), bg_t=(3.0, 2.0, -1.5)):
    """Science and template Exposures on one grid, and the truth.

    seeing_ratio: science FWHM / template FWHM (both vary by ``variation`` across the image).
    shift: (dx, dy) px by which the template's stars are displaced (residual misregistration).
    flux_scale: template flux / science flux of every star.
    Returns (science, template, truth dict with stars and fakes).
    """
    rng = np.random.default_rng(seed)
    ny = nx = n
    nstars = nstars if nstars is not None else int(1.6e-3 * n * n)
    # power-law fluxes, dN/dF ~ F^-2
    lo, hi = star_flux
    u = rng.uniform(size=nstars)
    flux = lo / (1 - u * (1 - lo / hi))
    xs = rng.uniform(15, nx - 16, nstars)
    ys = rng.uniform(15, ny - 16, nstars)
    fwhm_s0 = fwhm_t * seeing_ratio
    # fakes in the science image only, at integer pixels (easy forced photometry), away from stars
    fx, fy = [], []
    while len(fx) < n_fakes:
        x, y = rng.integers(40, nx - 40, 2)
        if (nstars == 0 or np.min(np.hypot(xs - x, ys - y)) > 12) and all(np.hypot(np.array(fx) - x, np.array(fy) - y) > 30):
            fx.append(int(x))
            fy.append(int(y))
    fx, fy = np.array(fx, float), np.array(fy, float)
    ff = np.full(n_fakes, fake_flux)
    size = int(2 * np.ceil(3.5 * max(fwhm_s0, fwhm_t)) + 1)
    size = max(size, 31)
    model_s = render((ny, nx), np.r_[xs, fx], np.r_[ys, fy], np.r_[flux, ff],
                     lambda x, y: fwhm_at(x, y, nx, ny, fwhm_s0, variation), kind, size)
    model_t = render((ny, nx), xs + shift[0], ys + shift[1], flux * flux_scale,
                     lambda x, y: fwhm_at(x, y, nx, ny, fwhm_t, variation), kind, size)
    yy, xx = np.mgrid[:ny, :nx]
    bg = bg_t[0] + bg_t[1] * (xx / nx - 0.5) + bg_t[2] * (yy / ny - 0.5)
    var_s = sky_s + model_s
    var_t = sky_t + model_t
    sci = model_s + rng.normal(size=(ny, nx)) * np.sqrt(var_s)
    tpl = model_t + bg + rng.normal(size=(ny, nx)) * np.sqrt(var_t)
    psf_s = pixel_psf_model(fwhm_s0, nx, ny, kind, variation, size)
    psf_t = pixel_psf_model(fwhm_t, nx, ny, kind, variation, size)
    science = Exposure(MaskedImage(sci, None, var_s), psf=psf_s,
                       metadata={"visit": 1, "detector": 0, "band": "r", "MAGZERO": 30.0})
    template = Exposure(MaskedImage(tpl, None, var_t), psf=psf_t,
                        metadata={"band": "r", "patch": 0, "MAGZERO": 30.0 + 2.5 * np.log10(flux_scale)})
    truth = {"x": xs, "y": ys, "flux": flux, "fake_x": fx, "fake_y": fy, "fake_flux": ff,
             "fwhm_s": fwhm_s0, "fwhm_t": fwhm_t, "flux_scale": flux_scale}
    return science, template, truth


# ---------------------------------------------------------------- measurements
def psf_flux(diffexp, x, y):
    """Forced PSF flux (science units) at integer pixel (x, y) with the diffexp's PSF model."""
    p = diffexp.psf.image(x, y)
    h = p.shape[0] // 2
    ix, iy = int(x), int(y)
    win = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
    d = diffexp.image[win].astype(float)
    v = diffexp.variance[win].astype(float)
    ok = np.isfinite(d) & np.isfinite(v) & (v > 0)
    w = p**2 / np.where(ok, v, np.inf)
    f = np.sum(np.where(ok, p * d / np.where(ok, v, 1), 0)) / np.sum(w)
    return float(f), float(1 / np.sqrt(np.sum(w)))


def residual_stats(diffexp, truth, n_bright=50, box=15, exclude=20):
    """std of diff/sqrt(var) in blank sky and in boxes around the brightest stars."""
    from diapipe import masks

    z = diffexp.image / np.sqrt(diffexp.variance)
    good = ~masks.is_set(diffexp.mask, *masks.BAD_PLANES) & np.isfinite(z)
    ny, nx = z.shape
    near = np.zeros((ny, nx), bool)
    yy, xx = np.mgrid[:ny, :nx]
    allx = np.r_[truth["x"], truth["fake_x"]]
    ally = np.r_[truth["y"], truth["fake_y"]]
    allf = np.r_[truth["flux"], truth["fake_flux"]]
    for x, y, f in zip(allx, ally, allf):
        r = exclude if f > 3000 else exclude // 2
        ix, iy = int(round(x)), int(round(y))
        near[max(0, iy - r) : iy + r + 1, max(0, ix - r) : ix + r + 1] = True
    blank = good & ~near
    h = box // 2
    order = np.argsort(-truth["flux"])
    vals = []
    nbox = 0
    for i in order:
        ix, iy = int(round(truth["x"][i])), int(round(truth["y"][i]))
        win = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
        if iy - h < 0 or ix - h < 0 or iy + h >= ny or ix + h >= nx or not good[win].all():
            continue
        vals.append(z[win].ravel())
        nbox += 1
        if nbox == n_bright:
            break
    star = np.concatenate(vals) if vals else np.array([np.nan])
    return float(np.std(z[blank])), float(np.std(star)), nbox
