"""Measure ISR quality against the simulator's truth and on the real SAAO raw frame.

    .venv/bin/python benchmarks/measure_isr.py [--overlay config/tiny.yaml] [--detectors 0 1] [--visits 0 1 2]

Simulates the calibration raws and the raws of the chosen visits (diapipe.simulate,
no Snakemake), builds the masters, runs ISR and prints, per exposure and pooled:
the mean and standard deviation of (calibrated - truth)/sqrt(variance) on pixels
unmasked in both; the fraction of truth BAD/SAT/CR pixels flagged; the fraction
of clean pixels flagged.  Then the SAAO frame's overscan residual and output shape.
Not a test: prints a table for the report.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import isr_fakes  # noqa: E402
from diapipe import calib, isr, masks  # noqa: E402
from diapipe.exposure import Exposure  # noqa: E402

SAAO = REPO.parent / "shared" / "data" / "saao-raw-frame" / "a8280271.fits"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overlay", default="config/tiny.yaml")
    p.add_argument("--detectors", type=int, nargs="+", default=[0, 1])
    p.add_argument("--visits", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    args = p.parse_args(argv)
    pooled = {"z": [], "hit": {k: 0 for k in ("BAD", "SAT", "CR")}, "tot": {k: 0 for k in ("BAD", "SAT", "CR")},
              "clean_flag": 0, "clean": 0}
    print(f"{'visit':>5} {'det':>3} {'z mean':>8} {'z std':>7} {'BAD':>12} {'SAT':>12} {'CR':>12} {'clean flagged':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for det in args.detectors:
            res = isr_fakes.simulated_detector(Path(tmp), visits=args.visits, detector=det, overlay=args.overlay)
            b = calib.make_master_bias(res["bias"], data_id={"detector": det})
            d = calib.make_master_dark(res["dark"], b, data_id={"detector": det})
            f = calib.make_master_flat(res["flat"], b, d, data_id={"detector": det})
            for v in args.visits:
                exp = isr.run_isr(isr.read_raw(res["raw"][v]), b, d, f)
                t = Exposure.read(res["truth"][v])
                ok = (exp.mask == 0) & (t.mask == 0)
                z = ((exp.image - t.image) / np.sqrt(exp.variance))[ok]
                pooled["z"].append(z)
                cols = []
                for plane in ("BAD", "SAT", "CR"):
                    tp = masks.is_set(t.mask, plane)
                    hit = int((tp & (exp.mask != 0)).sum())
                    pooled["hit"][plane] += hit
                    pooled["tot"][plane] += int(tp.sum())
                    cols.append(f"{hit}/{int(tp.sum())}")
                clean = t.mask == 0
                cf = int(((exp.mask != 0) & clean).sum())
                pooled["clean_flag"] += cf
                pooled["clean"] += int(clean.sum())
                print(f"{v:>5} {det:>3} {z.mean():>8.4f} {z.std():>7.4f} {cols[0]:>12} {cols[1]:>12} {cols[2]:>12} "
                      f"{100 * cf / clean.sum():>13.3f}%")
    z = np.concatenate(pooled["z"])
    print(f"pooled: z mean {z.mean():.4f}, z std {z.std():.4f} over {z.size} pixels")
    for plane in ("BAD", "SAT", "CR"):
        h, n = pooled["hit"][plane], pooled["tot"][plane]
        print(f"pooled: truth {plane} flagged {h}/{n} = {100 * h / max(n, 1):.2f}%")
    print(f"pooled: clean pixels flagged {100 * pooled['clean_flag'] / pooled['clean']:.3f}%")
    if SAAO.exists():
        raw = isr.read_raw(SAAO, {"band": "unknown"})
        amp = raw.amps[0]
        level = isr.overscan_level(raw, amp)
        resid = raw.data[amp.bias.slices] - level[:, None]
        binned = resid[: 520 // 40 * 40].reshape(-1, 40 * resid.shape[1]).mean(axis=1)
        exp = isr.run_isr(raw, config={"cr_detect": False})
        print(f"SAAO a8280271.fits: overscan residual mean {resid.mean():+.4f} ADU, "
              f"max |40-row bin| {np.abs(binned).max():.3f} ADU, output shape {exp.shape}")


if __name__ == "__main__":
    main()
