"""Measure characterization against truth on exposures of the simulated survey.

    .venv/bin/python benchmarks/survey_characterize.py [--config config/config.yaml ...]
        [--visits 0,1,2] [--detectors 0,1] [--out results.jsonl] [--cache DIR]

For each (visit, detector) the simulator renders the truth exposure; the
"postisr" is truth + Gaussian noise of the truth variance with the truth masks
and the rough header WCS (so ISR errors do not enter).  Prints, per exposure:
MAGZERO - truth, RMS of (fitted - true WCS) over a 16x16 grid of the detector,
the largest |model/true - 1| of the PSF FWHM over a 7x7 grid reaching the
corners, the median and 90th percentile of max |star - PSF model| / peak of the
bright PSF stars (peak > 200 sigma, within 2 FWHM) in the calexp and in the
noiseless truth image (the model's own error), and the pointing error the pattern match recovered.  Not a test
(the whole survey takes minutes); tests/test_characterize_sim.py checks one
exposure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diapipe import config as dpconfig
from diapipe import psfex
from diapipe import simulate as S
from diapipe.astrometry import sky_offset_mas
from diapipe.characterize import characterize
from diapipe.exposure import Exposure, MaskedImage
from diapipe.seeds import rng_for


def postisr_from_truth(plan, cfg, visit, detector, cache=None):
    truth = None
    if cache:
        # the noiseless truth takes ~10x longer to render than characterize takes to run
        cpath = Path(cache) / f"truth_{visit}_{detector}.fits"
        if cpath.exists():
            truth = Exposure.read(cpath)
    if truth is None:
        _, truth = S.simulate_raw(cfg, plan, visit, detector)
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
            truth.write(cpath)
    rng = rng_for(cfg["seed"], "characterize-test-noise", visit=visit, detector=detector)
    img = truth.image + rng.standard_normal(truth.shape).astype(np.float32) * np.sqrt(truth.variance)
    meta = {k: truth.metadata[k] for k in ("visit", "detector", "band", "MJD-OBS", "EXPTIME")}
    post = Exposure(MaskedImage(img, truth.mask, truth.variance), wcs=S.header_wcs(plan, visit, detector),
                    metadata=meta)
    return post, truth


def measure(plan, cfg, visit, detector, char_cfg=None, cache=None) -> dict:
    post, truth = postisr_from_truth(plan, cfg, visit, detector, cache)
    t0 = time.process_time()
    calexp, src = characterize(post, plan.refcat, char_cfg or cfg.get("characterize"))
    cpu = time.process_time() - t0
    m = calexp.metadata
    ny, nx = calexp.shape
    g = np.linspace(0, nx - 1, 16)
    gx, gy = np.meshgrid(g, np.linspace(0, ny - 1, 16))
    r1, d1 = calexp.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    r2, d2 = truth.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    da, dd = sky_offset_mas(r1, d1, r2, d2)
    r0, d0 = post.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    ra0, dd0 = sky_offset_mas(r0, d0, r2, d2)
    errs = []
    for x in np.linspace(0, nx - 1, 7):
        for y in np.linspace(0, ny - 1, 7):
            model = psfex.fwhm(calexp.psf.image(x, y))
            true = psfex.fwhm(S.true_psf_image(plan, visit, detector, x, y, calexp.psf.size))
            errs.append(model / true - 1)
    # bright PSF stars (peak > 200 sigma): max |star - model| / peak within 2 FWHM, as tests/test_characterize.py
    noise = float(np.sqrt(np.median(calexp.variance)))
    bright = src[src.calib_psf_used & (src.peak > 200 * noise)]
    frac = frac_true = np.array([np.nan])
    if len(bright):
        bx, by, rad = bright.x.to_numpy(), bright.y.to_numpy(), 2 * m["PSFFWHM"]
        frac, _ = psfex.star_residuals(calexp.image, calexp.psf, bx, by, radius=rad)
        # the same stars in the noiseless truth image: the model's own error, without photon noise
        # (at 200 sigma the noise alone reaches ~2-3% of the peak somewhere in the core)
        frac_true, _ = psfex.star_residuals(truth.image, calexp.psf, bx, by, radius=rad)
    return dict(
        visit=int(visit), detector=int(detector),
        n_bright=int(len(bright)), resid_median=float(np.nanmedian(frac)),
        resid_p90=float(np.nanpercentile(frac, 90)),
        resid_true_median=float(np.nanmedian(frac_true)), resid_true_p90=float(np.nanpercentile(frac_true, 90)),
        seeing=float(truth.metadata["SEEING"]),
        dMAGZERO=float(m["MAGZERO"] - truth.metadata["MAGZERO"]),
        wcs_rms_mas=float(np.sqrt(np.mean(da**2 + dd**2))),
        header_wcs_error_arcsec=float(np.sqrt(np.mean(ra0**2 + dd0**2)) / 1e3),
        fwhm_err_max=float(np.max(np.abs(errs))),
        n_astrom=int(m["NASTROM"]), n_psf=int(m["NPSFSTAR"]), n_phot=int(m["NPHOTCAL"]),
        wcs_fit_rms_mas=float(m["WCSRMS"]), cpu_s=round(cpu, 2),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=["config/config.yaml"])
    p.add_argument("--visits", help="comma-separated (default: all)")
    p.add_argument("--detectors", help="comma-separated (default: all)")
    p.add_argument("--out", help="append one JSON line per exposure here")
    p.add_argument("--cache", help="directory keeping the rendered truth exposures (FITS, ~50 MB each) between runs")
    args = p.parse_args(argv)
    cfg = dpconfig.load(*args.config)
    plan = S.plan_survey(cfg)
    visits = [int(v) for v in args.visits.split(",")] if args.visits else list(plan.visits["visit"])
    dets = ([int(d) for d in args.detectors.split(",")] if args.detectors
            else list(range(cfg["simulate"]["n_detectors"])))
    for v in visits:
        for d in dets:
            try:
                row = measure(plan, cfg, v, d, cache=args.cache)
            except Exception as exc:  # report and carry on, as --keep-going would
                row = dict(visit=v, detector=d, error=str(exc))
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
