"""Benchmark: characterization (postisr -> calexp) of one 4096 x 4096 detector on one core,
and its share of ISR + characterization (goal for both together: under 8 s).

    .venv/bin/python benchmarks/bench_characterize.py [--size 4096] [--stars 6000] [--with-isr]

The postisr is the synthetic star field of tests/characterize_synth.py (Moffat
PSF varying over the detector, TAN-SIP distortion, a header WCS 30" off,
galaxies, saturated stars, bad columns, cosmic rays) scaled to ``size``.
``--with-isr`` also times diapipe.isr on benchmarks/bench_isr.py's synthetic
raw of the same size, in the same process, so the two numbers add up.
Prints the per-step times characterize records (calexp.timing) and the
accuracy it reached against the field's truth.  Not a test: report the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from characterize_synth import make_field  # noqa: E402
from diapipe import characterize as ch  # noqa: E402
from diapipe.astrometry import sky_offset_mas  # noqa: E402


def isr_seconds(size: int) -> tuple[float, float]:
    """(wall, cpu) seconds of read + ISR (with CR detection) + write of one raw."""
    import bench_isr
    from diapipe import isr

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path, out = Path(tmp) / "raw.fits", Path(tmp) / "postisr.fits"
        bench_isr.make_raw(raw_path, size, rng)
        bias, dark, flat = bench_isr.make_masters(size, rng)
        w0, c0 = time.perf_counter(), time.process_time()
        raw = isr.read_raw(raw_path)
        exp = isr.run_isr(raw, bias, dark, flat)
        exp.write(out)
        return time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--stars", type=int, default=6000, help="stars on the detector (15.5-23 mag)")
    p.add_argument("--galaxies", type=int, default=1500)
    p.add_argument("--with-isr", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    post, ref, truth = make_field(shape=(args.size, args.size), n_stars=args.stars, n_galaxies=args.galaxies,
                                  seed=11)
    print(f"rendered a {args.size}x{args.size} field with {args.stars} stars in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        post_path = Path(tmp) / "postisr.fits"
        ref_path = Path(tmp) / "refcat.parquet"
        post.write(post_path)
        ref.to_parquet(ref_path)
        w0, c0 = time.perf_counter(), time.process_time()
        calexp, src = ch.characterize(post_path, ref_path)
        w1, c1 = time.perf_counter(), time.process_time()
        ch.write_calexp(calexp, Path(tmp) / "calexp.fits")
        src.to_parquet(Path(tmp) / "src.parquet")
        w2, c2 = time.perf_counter(), time.process_time()
    print(f"\ncharacterize, {args.size}x{args.size}, 1 thread ({len(src)} sources)")
    print(f"{'step':<26}{'wall s':>10}")
    for k, v in calexp.timing.items():
        if k != "total":
            print(f"{k:<26}{v:>10.2f}")
    print(f"{'read + characterize':<26}{w1 - w0:>10.2f}   (cpu {c1 - c0:.2f})")
    print(f"{'write calexp + src':<26}{w2 - w1:>10.2f}   (cpu {c2 - c1:.2f})")
    char_wall, char_cpu = w2 - w0, c2 - c0
    print(f"{'TOTAL characterize':<26}{char_wall:>10.2f}   (cpu {char_cpu:.2f})")

    m = calexp.metadata
    ny, nx = calexp.shape
    g = np.linspace(0, nx - 1, 20)
    gx, gy = np.meshgrid(g, g)
    r1, d1 = calexp.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    r2, d2 = truth.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    da, dd = sky_offset_mas(r1, d1, r2, d2)
    print(f"\naccuracy: dMAGZERO {m['MAGZERO'] - truth.magzero:+.4f} mag, WCS vs truth "
          f"{np.sqrt(np.mean(da**2 + dd**2)):.2f} mas ({m['NASTROM']} stars), PSF FWHM {m['PSFFWHM']:.2f} px "
          f"({m['NPSFSTAR']} stars)")
    if args.with_isr:
        iw, ic = isr_seconds(args.size)
        print(f"\nISR (bench_isr raw, read + isr + write): {iw:.2f} s wall (cpu {ic:.2f})")
        tot = iw + char_wall
        print(f"ISR + characterize: {tot:.2f} s wall (cpu {ic + char_cpu:.2f}); "
              f"characterize share {char_wall / tot:.0%}; goal < 8 s")
    print("(wall is longer than cpu when other jobs share the machine's cores)")


if __name__ == "__main__":
    main()
