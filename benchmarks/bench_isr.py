"""Benchmark: ISR of one 4096 x 4096 detector on one core (goal: under 8 s).

    .venv/bin/python benchmarks/bench_isr.py [--size 4096] [--repeat 1]

Writes a synthetic raw (4 amplifiers with overscan, sky, stars, a saturated
star with bleed, cosmic rays, hot pixels) and master calibrations to a
temporary directory, then times each step of ``diapipe.isr`` and prints a
table.  Not a test: numbers depend on the machine; report them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# One core, as the goal says (before numpy is imported).
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402

from diapipe import isr, masks  # noqa: E402
from diapipe.exposure import Exposure, MaskedImage  # noqa: E402


def make_raw(path: Path, n: int, rng) -> None:
    namp, nover, gain, rn, bias = 4, 32, 1.6, 5.0, 1000.0
    sky = 600.0
    e = np.full((n, n), sky, np.float32)
    # Stars (Gaussian, FWHM 3.5 px) rendered in stamps.
    sig = 3.5 / 2.355
    yy, xx = np.mgrid[-12:13, -12:13]
    for _ in range(3000):
        y0, x0 = rng.integers(12, n - 12, 2)
        flux = 10 ** rng.uniform(3, 6)
        e[y0 - 12 : y0 + 13, x0 - 12 : x0 + 13] += (flux / (2 * np.pi * sig**2)
                                                     * np.exp(-(xx**2 + yy**2) / (2 * sig**2)))
    e = rng.poisson(e).astype(np.float32)
    # Cosmic rays: ~2000 short tracks.
    for _ in range(2000):
        y0, x0 = rng.integers(5, n - 5, 2)
        ln = rng.integers(1, 6)
        e[y0, x0 : x0 + ln] += rng.uniform(500, 5000)
    e = np.minimum(e, 90000.0)
    w = n // namp
    raw = np.empty((n, namp * (w + nover)), np.float32)
    hdr = fits.Header()
    hdr["NAMPS"] = namp
    for a in range(namp):
        L = "ABCD"[a]
        r0 = a * (w + nover)
        drift = bias + 3 * np.linspace(-1, 1, n)[:, None]
        raw[:, r0 : r0 + w] = e[:, a * w : (a + 1) * w] / gain + drift + rng.normal(0, rn / gain, (n, w))
        raw[:, r0 + w : r0 + w + nover] = drift + rng.normal(0, rn / gain, (n, nover))
        hdr[f"DATASEC{L}"] = f"[{r0 + 1}:{r0 + w},1:{n}]"
        hdr[f"BIASSEC{L}"] = f"[{r0 + w + 1}:{r0 + w + nover},1:{n}]"
        hdr[f"DETSEC{L}"] = f"[{a * w + 1}:{(a + 1) * w},1:{n}]"
        hdr[f"GAIN{L}"], hdr[f"RDNOISE{L}"] = gain, rn
        hdr[f"SATURAT{L}"] = int(bias + 90000 / gain - 30)
    hdr.update({"EXPTIME": 30.0, "DARKTIME": 31.0, "FILTER": "r", "MJD-OBS": 60000.0, "EXPNUM": 1,
                "DETECTOR": 0, "AIRMASS": 1.1, "OBSTYPE": "object"})
    fits.PrimaryHDU(np.clip(np.round(raw), 0, 65535).astype(np.uint16), header=hdr).writeto(path, overwrite=True)


def make_masters(n: int, rng):
    z = np.zeros((n, n), np.float32)
    bias = Exposure(MaskedImage(z, None, np.full((n, n), 5.0, np.float32)))
    dark = Exposure(MaskedImage(np.full((n, n), 0.002, np.float32), None, np.full((n, n), 1e-6, np.float32)))
    hot = rng.integers(0, n * n, 3000)
    masks.set_plane(dark.mask.reshape(-1)[None], np.isin(np.arange(n * n), hot)[None], "BAD")
    flat = Exposure(MaskedImage((1 + 0.01 * rng.standard_normal((n, n))).astype(np.float32), None,
                                np.full((n, n), 1e-5, np.float32)))
    return bias, dark, flat


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    rng = np.random.default_rng(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw_path, out = Path(tmp) / "raw.fits", Path(tmp) / "postisr.fits"
        make_raw(raw_path, args.size, rng)
        bias, dark, flat = make_masters(args.size, rng)
        clocks = (time.perf_counter, time.process_time)
        for _ in range(args.repeat):
            t = [tuple(c() for c in clocks)]
            raw = isr.read_raw(raw_path)
            t.append(tuple(c() for c in clocks))
            isr.assemble(raw)
            t.append(tuple(c() for c in clocks))
            isr.run_isr(raw, bias, dark, flat, config={"cr_detect": False})
            t.append(tuple(c() for c in clocks))
            exp = isr.run_isr(raw, bias, dark, flat)
            t.append(tuple(c() for c in clocks))
            exp.write(out)
            t.append(tuple(c() for c in clocks))
            t = np.array(t)  # (6, 2): wall, cpu
            d = np.diff(t, axis=0)
            total = d[0] + d[3] + d[4]  # read + full ISR + write
            rows.append(np.vstack([d, total]))
        ncr = int(masks.is_set(exp.mask, "CR").sum())
    names = ["read raw", "overscan+assemble", "isr without CR", "isr with CR (full)", "write postisr",
             "TOTAL read+isr+write"]
    best = np.min(np.array(rows), axis=0)
    print(f"ISR benchmark, {args.size}x{args.size} detector, 1 thread, best of {args.repeat}")
    print(f"{'step':<24}{'wall s':>10}{'cpu s':>10}")
    for name, (w, c) in zip(names, best):
        print(f"{name:<24}{w:>10.2f}{c:>10.2f}")
    print("(cpu = process time of this one thread; wall is longer when other jobs share the cores)")
    print(f"(CR pixels flagged: {ncr}; the 'isr with CR' time includes assembly and calibration)")


if __name__ == "__main__":
    main()
