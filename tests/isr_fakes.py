"""Small synthetic raw frames that follow the raw-frame contract (docs/raw-format.md),
with known truth, for the ISR and calibration tests (until and beside the simulator).

Signal model as in the contract: raw ADU = electrons / gain + bias(row) per amp,
electrons = flat * (sky + stars) + dark * DARKTIME + hot pixels + cosmic rays, Poisson
+ read noise, clipping at full well with bleed along columns, ADU clipped to [0, 65535].
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from diapipe import masks

NY, NX, NAMP, NOVER = 160, 192, 2, 16
GAINS = (1.6, 2.1)
RDNOISE = (4.5, 6.0)
BIAS = (1000.0, 1200.0)
FULL_WELL = 60000.0  # e-
DARK_RATE = 0.02  # e-/s


class Camera:
    """One detector with fixed defects, flat pattern and amplifiers."""

    def __init__(self, seed=1, ny=NY, nx=NX):
        self.ny, self.nx = ny, nx
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:ny, :nx]
        r2 = ((xx - nx / 2) ** 2 + (yy - ny / 2) ** 2) / (nx**2 + ny**2)
        self.flat = (1 - 0.3 * r2) * (1 + 0.01 * rng.standard_normal((ny, nx)))
        self.bad = np.zeros((ny, nx), bool)
        self.dark = np.full((ny, nx), DARK_RATE)
        # A dead column segment (30% response) and a few dead pixels.
        self.flat[20:, 50] *= 0.3
        self.bad[20:, 50] = True
        dy, dx = rng.integers(5, ny - 5, 6), rng.integers(5, nx - 5, 6)
        self.flat[dy, dx] *= 0.1
        self.bad[dy, dx] = True
        # Hot pixels: 2-50 e-/s.
        hy, hx = rng.integers(5, ny - 5, 15), rng.integers(5, nx - 5, 15)
        self.dark[hy, hx] = rng.uniform(2, 50, 15)
        self.bad[hy, hx] = True
        # A hot column.
        self.dark[:, 140] += 1.0
        self.bad[:, 140] = True
        self.flat = self.flat / np.median(self.flat)
        self.drift = [np.polynomial.Polynomial([0, 6.0 * (i + 1), -4.0 * (i + 1)]) for i in range(NAMP)]

    def raw(self, electrons_ideal, path, *, exptime, darktime=None, obstype="object", band="r",
            seed=0, n_cr=0, header_extra=None):
        """Write a raw frame from the flat-fielded true signal (e-); returns the truth dict."""
        rng = np.random.default_rng(seed)
        ny, nx = self.ny, self.nx
        darktime = exptime if darktime is None else darktime
        expected = self.flat * electrons_ideal + self.dark * darktime
        e = rng.poisson(np.maximum(expected, 0)).astype(float)
        cr = np.zeros((ny, nx), bool)
        for _ in range(n_cr):
            # A straight track with 300-3000 e- per pixel.
            y, x = rng.uniform(5, ny - 5), rng.uniform(5, nx - 5)
            ang, length = rng.uniform(0, np.pi), rng.integers(1, 8)
            for t in range(length):
                py, px = int(round(y + t * np.sin(ang))), int(round(x + t * np.cos(ang)))
                if 0 <= py < ny and 0 <= px < nx:
                    e[py, px] += rng.uniform(300, 3000)
                    cr[py, px] = True
        # Saturation with bleed: excess charge spills up and down the column.
        sat = e >= FULL_WELL
        for x in np.nonzero(sat.any(axis=0))[0]:
            col = e[:, x]
            over = np.clip(col - FULL_WELL, 0, None).sum()
            col = np.minimum(col, FULL_WELL)
            ys = np.nonzero(col >= FULL_WELL)[0]
            lo, hi = ys.min() - 1, ys.max() + 1
            while over > 0 and (lo >= 0 or hi < ny):
                for yb in (lo, hi):
                    if 0 <= yb < ny and over > 0:
                        add = min(FULL_WELL - col[yb], over)
                        col[yb] += add
                        over -= add
                lo, hi = lo - 1, hi + 1
            e[:, x] = col
            sat[:, x] |= col >= FULL_WELL
        namp = NAMP
        w = nx // namp
        rawimg = np.zeros((ny, namp * (w + NOVER)))
        hdr = fits.Header()
        hdr["NAMPS"] = namp
        rows = np.arange(ny)
        for i in range(namp):
            L = chr(65 + i)
            x0 = i * (w + NOVER)
            bias_row = BIAS[i] + self.drift[i](rows / ny)
            amp_e = e[:, i * w : (i + 1) * w] + rng.normal(0, RDNOISE[i], (ny, w))
            rawimg[:, x0 : x0 + w] = amp_e / GAINS[i] + bias_row[:, None]
            rawimg[:, x0 + w : x0 + w + NOVER] = (
                bias_row[:, None] + rng.normal(0, RDNOISE[i] / GAINS[i], (ny, NOVER))
            )
            hdr[f"DATASEC{L}"] = f"[{x0 + 1}:{x0 + w},1:{ny}]"
            hdr[f"BIASSEC{L}"] = f"[{x0 + w + 1}:{x0 + w + NOVER},1:{ny}]"
            hdr[f"DETSEC{L}"] = f"[{i * w + 1}:{(i + 1) * w},1:{ny}]"
            hdr[f"GAIN{L}"] = GAINS[i]
            hdr[f"RDNOISE{L}"] = RDNOISE[i]
            hdr[f"SATURAT{L}"] = np.floor(FULL_WELL / GAINS[i] + BIAS[i])
        hdr["GAIN"] = float(np.mean(GAINS))
        hdr["RDNOISE"] = float(np.mean(RDNOISE))
        hdr["SATURATE"] = min(hdr["SATURATA"], hdr["SATURATB"])
        hdr["OBSTYPE"] = obstype
        hdr["IMAGETYP"] = obstype
        hdr["EXPTIME"] = exptime
        hdr["DARKTIME"] = darktime
        hdr["FILTER"] = band
        hdr["MJD-OBS"] = 60000.1
        hdr["DATE-OBS"] = "2023-02-25T02:24:00"
        hdr["AIRMASS"] = 1.2
        hdr["DETECTOR"] = 0
        hdr["EXPNUM"] = 7
        hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
        hdr["CRVAL1"], hdr["CRVAL2"] = 150.0, 2.0
        hdr["CRPIX1"], hdr["CRPIX2"] = nx / 2, ny / 2
        hdr["CD1_1"], hdr["CD2_2"], hdr["CD1_2"], hdr["CD2_1"] = -5e-5, 5e-5, 0.0, 0.0
        hdr["COMMENT"] = "WCS refers to the assembled, trimmed detector grid"
        for k, v in (header_extra or {}).items():
            if v is None:
                hdr.remove(k, ignore_missing=True)
            else:
                hdr[k] = v
        data = np.clip(np.round(rawimg), 0, 65535).astype(np.uint16)
        hdu = fits.PrimaryHDU(data, header=hdr)
        hdu.writeto(path, overwrite=True)
        truth_mask = np.zeros((ny, nx), masks.MASK_DTYPE)
        masks.set_plane(truth_mask, self.bad, "BAD")
        masks.set_plane(truth_mask, sat, "SAT")
        masks.set_plane(truth_mask, cr, "CR")
        # Expected variance of the calibrated image (e-^2), flat-fielded frame.
        rn2 = np.repeat(np.array(RDNOISE) ** 2, w)[None, :]
        variance = (np.maximum(expected, 0) + rn2) / self.flat**2
        return {"image": electrons_ideal, "mask": truth_mask, "variance": variance}


def scene(ny=NY, nx=NX, sky=800.0, n_stars=25, seed=3, bright=True):
    """True sky + stars in e- (flat-fielded frame): Gaussian stars, FWHM ~3 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ny, :nx]
    img = np.full((ny, nx), sky)
    sig = 3.0 / 2.355
    for i in range(n_stars):
        y0, x0 = rng.uniform(8, ny - 8), rng.uniform(8, nx - 8)
        flux = 10 ** rng.uniform(3, 5.3)
        img += flux / (2 * np.pi * sig**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sig**2))
    if bright:
        # One saturated star (bleeds).
        y0, x0 = ny * 0.6, nx * 0.3
        img += 3e6 / (2 * np.pi * sig**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sig**2))
    return img


def calib_set(cam: Camera, tmp, n=5, band="r", seed=100):
    """Write n bias, n dark (300 s) and n flat (~20000 e-) raws; return their paths."""
    paths = {"bias": [], "dark": [], "flat": []}
    zero = np.zeros((cam.ny, cam.nx))
    for i in range(n):
        p = tmp / f"bias{i}.fits"
        cam.raw(zero, p, exptime=0.0, darktime=0.0, obstype="bias", seed=seed + i)
        paths["bias"].append(p)
        p = tmp / f"dark{i}.fits"
        cam.raw(zero, p, exptime=300.0, obstype="dark", seed=seed + 10 + i)
        paths["dark"].append(p)
        p = tmp / f"flat{i}.fits"
        cam.raw(np.full((cam.ny, cam.nx), 20000.0 * (1 + 0.1 * i)), p, exptime=5.0, obstype="flat",
                band=band, seed=seed + 20 + i)
        paths["flat"].append(p)
    return paths


def simulated_detector(out, visits=(0,), detector=0, overlay="config/tiny.yaml"):
    """Simulator output for one detector of the tiny survey, written under ``out``:
    raw calibration frames, raws and truth exposures of ``visits``.

    Returns dict(cfg, plan, bias/dark/flat: lists of raw paths, raw: {visit: path},
    truth: {visit: path}).  Uses diapipe.simulate directly (no Snakemake).
    """
    from pathlib import Path

    from diapipe import config as dpconfig
    from diapipe import simulate
    from diapipe.fileio import write_fits

    repo = Path(__file__).resolve().parent.parent
    cfg = dpconfig.load(repo / "config/config.yaml", repo / overlay)
    plan = simulate.plan_survey(cfg)
    out = Path(out)
    res = {"cfg": cfg, "plan": plan, "bias": [], "dark": [], "flat": [], "raw": {}, "truth": {}}
    for c in simulate.calib_frames(cfg):
        if c["detector"] != detector:
            continue
        p = out / f"{c['kind']}_{c['band']}_{detector}_{c['seq']}.fits"
        write_fits(simulate.simulate_calib(cfg, c["kind"], detector, c["seq"], c["band"]), p)
        res[c["kind"]].append(p)
    for v in visits:
        rp, tp = out / f"raw_{v}_{detector}.fits", out / f"truth_{v}_{detector}.fits"
        simulate.write_raw(cfg, plan, v, detector, rp, tp)
        res["raw"][v], res["truth"][v] = rp, tp
    return res
