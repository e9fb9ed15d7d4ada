"""False diaSources of a finished simulated survey run against the Gaussian-noise expectation.

    python benchmarks/false_detections.py RUNDIR [--threshold 5]

For every difference image of RUNDIR/results/diff it prints the number of noise detections per
polarity that a Gaussian field with the image's PSF would give above the detection threshold
(diapipe.detect.expected_false_detections: Euler characteristic of the matched-filtered field on
the valid pixels), next to the diaSources that completeness labelled ``false`` (no true source,
fake or artefact within the match radius; RUNDIR/results/completeness/classes.parquet), split by
sign and into *isolated* ones (template PSF flux below 3 sigma: nothing in the template there, so
not a galaxy or star residual).  Isolated positive false detections far above the expectation are
light in the science image that the truth does not have (or a variance plane that is too small);
they are what limits the real/bogus classifier at S/N 5, where such a peak and a faint fake look
alike.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from diapipe.detect import expected_false_detections, valid_pixels
from diapipe.exposure import Exposure


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rundir", type=Path)
    ap.add_argument("--threshold", type=float, default=5.0, help="detection threshold (sigma); detect.threshold")
    args = ap.parse_args()
    res = args.rundir / "results"
    cls = pd.read_parquet(res / "completeness" / "classes.parquet")
    dia = pd.read_parquet(res / "diaSources.parquet").set_index("diaSourceId")
    cls = cls.join(dia[["templateFlux", "templateFluxErr"]], on="diaSourceId")
    cls["isolated"] = ~(np.abs(cls.templateFlux) >= 3 * cls.templateFluxErr)  # NaN error counts as isolated
    print("| visit | detector | expected noise / sign | false + | false - | isolated + | isolated - "
          "| isolated + S/N < 6 |\n|---|---|---|---|---|---|---|---|")
    tot = np.zeros(6)
    for path in sorted(res.glob("diff/*/*.fits"), key=lambda p: (int(p.parent.name), p.name)):
        if not path.stem.isdigit():
            continue  # template, cutouts, detection masks
        visit, detector = int(path.parent.name), int(path.stem)
        exp = Exposure.read(path)
        ny, nx = exp.shape
        npix = int(valid_pixels(exp).sum())
        side = int(np.sqrt(npix))
        expected = expected_false_detections(exp.psf.image(0.5 * (nx - 1), 0.5 * (ny - 1)), (side, side),
                                             args.threshold, polarity="one")
        c = cls[(cls.visit == visit) & (cls.detector == detector) & (cls.truthClass == "false")]
        pos, neg = c[~c.isNegative], c[c.isNegative]
        row = (expected, len(pos), len(neg), int(pos.isolated.sum()), int(neg.isolated.sum()),
               int((pos.isolated & (pos.snr < 6)).sum()))
        tot += row
        print(f"| {visit} | {detector} | {row[0]:.2f} | " + " | ".join(str(int(v)) for v in row[1:]) + " |")
    print(f"| all | | {tot[0]:.1f} | " + " | ".join(str(int(v)) for v in tot[1:]) + " |")


if __name__ == "__main__":
    main()
