"""Benchmark of diapipe.subtract: residual table, speed, and the DECam pair against SFFT.

    python benchmarks/bench_subtract.py                 # everything except SFFT
    python benchmarks/bench_subtract.py --table         # residual/fake table on simulated pairs
    python benchmarks/bench_subtract.py --speed         # 1024^2 and 4096^2 pairs, AL and ZOGY
    python benchmarks/bench_subtract.py --decam         # DECam cutouts, side by side with SFFT's outputs
    python benchmarks/bench_subtract.py --speed --sfft /tmp/sfftvenv/bin/python --sfft-sizes 1024

One core: the thread counts of every BLAS/FFT library are pinned to 1 before
numpy is imported.  Times are wall clock and process CPU time (the CPU time
is the fairer number on a shared, loaded machine).  SFFT is *not* a project
dependency: it runs, if asked, from a separate interpreter (a throwaway venv
with ``pip install sfft``) in a subprocess, with its Numpy (CPU) backend and
one thread, on the same FITS files.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
           "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from diapipe import masks  # noqa: E402
from diapipe.exposure import Exposure, MaskedImage  # noqa: E402
from diapipe.subtract import _robust_sigma, read_image, subtract  # noqa: E402
from subtract_synth import make_pair, psf_flux, residual_stats  # noqa: E402

DECAM = ROOT.parent / "shared" / "data" / "decam-sfft"


def timed(fn, *a, **k):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    return out, time.perf_counter() - w, time.process_time() - c


# ---------------------------------------------------------------- residual table
CASES = [
    ("0.8", dict(seeing_ratio=0.8)),
    ("1.0", dict(seeing_ratio=1.0)),
    ("1.5", dict(seeing_ratio=1.5)),
    ("2.0", dict(seeing_ratio=2.0)),
    ("1.5, 0.3 px shift", dict(seeing_ratio=1.5, shift=(0.3, 0.0))),
    ("0.8, 0.28 px shift", dict(seeing_ratio=0.8, shift=(0.2, 0.2))),
    ("1.5, Gaussian PSFs", dict(seeing_ratio=1.5, kind="gaussian")),
    # the default survey's equal-seeing visit: survey FWHM and star fluxes (errors-in-variables case)
    ("1.0, FWHM 4.5 px, stars to 2e6 e-, 1024^2", dict(seeing_ratio=1.0, fwhm_t=4.5, star_flux=(500.0, 2e6), n=1024)),
]


def table(methods=("al", "zogy"), n=512):
    print(f"\n## Residuals on simulated {n}x{n} pairs (Moffat beta=3 unless said, FWHM_tmpl 3 px varying 20% "
          "across the image, 20 fakes of 3e4 e-)\n")
    print("| seeing sci/tmpl | method | blank std(D/sigma) | 50 brightest stars, 15x15 boxes | fake PSF-flux bias "
          "| FLUXRAT (true 1.25) | CONVDIR | stamps used/rejected | KORDER | time [s] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, case in CASES:
        case = dict(case)
        s, t, truth = make_pair(case.pop("n", n), seed=3, **case)
        for method in methods:
            d, wall, cpu = timed(subtract, s, t, {"method": method})
            blank, stars, nbox = residual_stats(d, truth)
            fl = np.array([psf_flux(d, x, y)[0] for x, y in zip(truth["fake_x"], truth["fake_y"])])
            bias = fl.mean() / truth["fake_flux"][0] - 1
            err = fl.std() / np.sqrt(len(fl)) / truth["fake_flux"][0]
            m = d.metadata
            print(f"| {name} | {method.upper()} | {blank:.4f} | {stars:.4f} ({nbox}) | {bias:+.4f} +- {err:.4f} "
                  f"| {m['FLUXRAT']:.4f} | {m['CONVDIR']}{' (flipped)' if m['CONVFLIP'] else ''} "
                  f"| {m['NSTAMP']}/{m['NREJ']} | {m['KORDER']} | {cpu:.2f} |", flush=True)


# ---------------------------------------------------------------- speed
SFFT_SCRIPT = textwrap.dedent("""
    import sys, time
    from sfft.CustomizedPacket import Customized_Packet
    d, hw, conv = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    w, c = time.perf_counter(), time.process_time()
    Customized_Packet.CP(FITS_REF=d + "/ref.fits", FITS_SCI=d + "/sci.fits", FITS_mREF=d + "/mref.fits",
                         FITS_mSCI=d + "/msci.fits", ForceConv=conv, GKerHW=hw, FITS_DIFF=d + "/sfft_diff.fits",
                         KerPolyOrder=2, BGPolyOrder=1, ConstPhotRatio=True, BACKEND_4SUBTRACT="Numpy",
                         NUM_CPU_THREADS_4SUBTRACT=1, VERBOSE_LEVEL=0)
    print("SFFTTIME", time.perf_counter() - w, time.process_time() - c)
""")


def run_sfft(python, s, t, truth, half, workdir, reuse=False):
    """SFFT (Numpy backend, 1 thread) on the same pair; returns (diff, wall, cpu) or None.

    The run's output and times stay in ``workdir``; ``reuse`` reads them back instead of rerunning.
    """
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if reuse and (wd / "sfft_diff.fits").exists() and (wd / "times.txt").exists():
        wall, cpu = map(float, (wd / "times.txt").read_text().split())
        return fits.getdata(wd / "sfft_diff.fits"), wall, cpu
    fits.PrimaryHDU(s.image.astype(np.float64)).writeto(wd / "sci.fits", overwrite=True)
    fits.PrimaryHDU(t.image.astype(np.float64)).writeto(wd / "ref.fits", overwrite=True)
    # SFFT fits the kernel on "masked" images: keep everything but the fakes (the transients)
    ms, mr = s.image.astype(float).copy(), t.image.astype(float).copy()
    for x, y in zip(truth["fake_x"], truth["fake_y"]):
        sl = (slice(int(y) - 10, int(y) + 11), slice(int(x) - 10, int(x) + 11))
        ms[sl] = mr[sl] = 0.0
    fits.PrimaryHDU(ms).writeto(wd / "msci.fits", overwrite=True)
    fits.PrimaryHDU(mr).writeto(wd / "mref.fits", overwrite=True)
    (wd / "run_sfft.py").write_text(SFFT_SCRIPT)
    env = dict(os.environ)
    r = subprocess.run([python, str(wd / "run_sfft.py"), str(wd), str(half), "REF"], capture_output=True,
                       text=True, env=env, cwd=wd)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("SFFTTIME")]
    if r.returncode != 0 or not line:
        # returncode -9 and no stderr: killed, e.g. by the OOM killer
        # (SFFT's Numpy backend at 4096^2 passed 21.8 GB RSS on a 23 GB machine)
        print(f"SFFT failed (returncode {r.returncode}): {r.stderr[-500:]}")
        return None
    _, wall, cpu = line[0].split()
    (wd / "times.txt").write_text(f"{wall} {cpu}")
    return fits.getdata(wd / "sfft_diff.fits"), float(wall), float(cpu)


def speed(sizes=(1024, 4096), sfft_python=None, sfft_sizes=(1024,), sfft_reuse=False):
    print("\n## Speed, one core (seeing ratio 1.5, Moffat, PSF varying 20%, default configuration)\n")
    print("| image | method | wall [s] | CPU [s] | blank std(D/sigma) | stars std | fake bias | KSIZE | NSTAMP | KORDER |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        s, t, truth = make_pair(n, 1.5, seed=5, n_fakes=20 if n <= 1024 else 60)
        subtract(s, t, {"spatial_order": 0})  # warm-up: imports, FFT plans
        for method in ("al", "zogy"):
            d, wall, cpu = timed(subtract, s, t, {"method": method})
            blank, stars, _ = residual_stats(d, truth)
            fl = np.array([psf_flux(d, x, y)[0] for x, y in zip(truth["fake_x"], truth["fake_y"])])
            print(f"| {n}x{n} | ours {method.upper()} | {wall:.2f} | {cpu:.2f} | {blank:.4f} | {stars:.4f} "
                  f"| {fl.mean() / truth['fake_flux'][0] - 1:+.4f} | {d.metadata['KSIZE']} | {d.metadata['NSTAMP']} "
                  f"| {d.metadata['KORDER']} |",
                  flush=True)
        if sfft_python and n in sfft_sizes:
            # SFFT neither decorrelates nor writes a variance: compare it with our difference
            # *without* decorrelation, both normalised by that run's variance plane
            # (var_sci + K^2 (*) var_tmpl, the per-pixel variance of such a difference)
            nd, wall, cpu = timed(subtract, s, t, {"decorrelate": False})
            half = nd.metadata["KSIZE"] // 2
            rows = [("ours AL, not decorrelated", nd, wall, cpu)]
            res = run_sfft(sfft_python, s, t, truth, half, Path(tempfile.gettempdir()) / f"diapipe_bench_sfft_{n}",
                           reuse=sfft_reuse)
            if res is not None:
                img, swall, scpu = res
                em = masks.is_set(nd.mask, "EDGE")
                em[: 2 * half] = em[-2 * half :] = True
                em[:, : 2 * half] = em[:, -2 * half :] = True
                mk = nd.mask.copy()
                masks.set_plane(mk, em, "EDGE")
                de = Exposure(MaskedImage(img.astype(np.float32), mk, nd.variance), psf=s.psf)
                rows.append(("SFFT (Numpy backend, 1 thread, incl. its numba JIT)", de, swall, scpu))
            for label, de, wall, cpu in rows:
                blank, stars, _ = residual_stats(de, truth)
                fl = np.array([psf_flux(de, x, y)[0] for x, y in zip(truth["fake_x"], truth["fake_y"])])
                print(f"| {n}x{n} | {label} | {wall:.2f} | {cpu:.2f} | {blank:.4f} | {stars:.4f} "
                      f"| {fl.mean() / truth['fake_flux'][0] - 1:+.4f} | {2 * half + 1} | - | - |", flush=True)
    if sfft_python:
        print("\nSFFT rows: its difference normalised by the variance plane of our non-decorrelated AL "
              "difference of the same pair (SFFT writes none); fake fluxes with the science PSF.")


# ---------------------------------------------------------------- DECam
def _decam_stats(d, label):
    d = np.nan_to_num(np.asarray(d, float))
    core = d[16:-16, 16:-16]
    rms = _robust_sigma(core)
    n5 = int(np.sum(np.abs(core) > 5 * rms))
    box = d[125:130, 128:133]  # transient at (x, y) = (130, 127)
    yy, xx = np.mgrid[: d.shape[0], : d.shape[1]]
    ap = (xx - 130) ** 2 + (yy - 127) ** 2 <= 9
    print(f"| {label} | {rms:.2f} | {n5} | {box.max():.1f} | {box.max() / rms:.1f} | {d[ap].sum():.0f} |")


def _mean_stack(epoch):
    frames = [fits.getdata(DECAM / f"DEC-{epoch}{c}.mini.fits").astype(float) for c in "abcde"]
    h = fits.getheader(DECAM / f"DEC-{epoch}a.mini.fits")
    img = np.mean(frames, axis=0)
    gain = 5 * float(h["GAIN"])  # e-/ADU of a mean of 5 frames
    var = _robust_sigma(img) ** 2 + np.clip(img, 0, None) / gain
    return Exposure(MaskedImage(img, None, var), metadata={"SATURATE": float(h["SATURATE"]), "GAIN": gain})


def decam():
    if not DECAM.exists():
        print("DECam data not found at", DECAM)
        return
    # a 256x256 cutout: ~8 candidate stars, among them the transient and a mover, so no spatial
    # variation, a lower S/N threshold and the tighter clipping that few stamps need
    cfg = {"spatial_order": 0, "stamp_min_snr": 10.0, "clip_sigma": 4.0}
    print("\n## DECam cutouts (256x256, i band): blank-sky robust RMS, count of |D| > 5 RMS pixels (16-px border "
          "excluded), the transient at (130, 127)\n")
    print("| difference | robust RMS [ADU] | N(>5 RMS) | centre peak [ADU] | peak / RMS | r=3 px aperture sum [ADU] |")
    print("|---|---|---|---|---|---|")
    _decam_stats(fits.getdata(DECAM / "FinalDifference.fits"), "SFFT FinalDifference (not decorrelated)")
    _decam_stats(fits.getdata(DECAM / "FinalDifference.DeCorr.fits"), "SFFT FinalDifference.DeCorr")
    inputs = {
        "SFFT's Stack-*.fits": (read_image(DECAM / "Stack-DEC-OBS04.fits"), read_image(DECAM / "Stack-DEC-OBS18.fits")),
        "our mean of 5 frames": (_mean_stack("OBS04"), _mean_stack("OBS18")),
    }
    notes = []
    for label, (s, t) in inputs.items():
        for method in ("al", "zogy"):
            d, wall, cpu = timed(subtract, s, t, dict(cfg, method=method), data_id={"field": "decam"})
            _decam_stats(d.image, f"ours {method.upper()} on {label}")
            m = d.metadata
            notes.append(f"ours {method.upper()} on {label}: CONVDIR {m['CONVDIR']}, KSUM {m['KSUM']}, "
                         f"NSTAMP {m['NSTAMP']} (NREJ {m['NREJ']}), KCHI2 {m['KCHI2']}, KFALLBK {m['KFALLBK']}, "
                         f"PSF sigma sci/tmpl {m['PSFSIGS']}/{m['PSFSIGT']} px, {cpu:.2f} s CPU")
    print()
    for n in notes:
        print("-", n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--decam", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--sfft", metavar="PYTHON", help="interpreter with sfft installed (e.g. /tmp/sfftvenv/bin/python)")
    p.add_argument("--sfft-sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--sfft-reuse", action="store_true", help="reuse a previous SFFT run's output and times")
    a = p.parse_args(argv)
    everything = not (a.table or a.speed or a.decam)
    if a.decam or everything:
        decam()
    if a.table or everything:
        table()
    if a.speed or everything:
        speed(a.sizes, a.sfft, a.sfft_sizes, a.sfft_reuse)


if __name__ == "__main__":
    main()
