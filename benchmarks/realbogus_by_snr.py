"""Held-out real/bogus metrics of a finished survey run, for all diaSources and above S/N cuts.

    python benchmarks/realbogus_by_snr.py RUNDIR [--cuts 0 6 7 8 10 15]

Reads RUNDIR/results/realbogus/{diaSources.parquet, metrics.json} (the scored diaSources and the
held-out visits) and RUNDIR/results/completeness/classes.parquet (truth classes: fake, transient,
variable, mover are real; artefact, false are bogus).  Prints AUC, MDR at FPR 1% and FPR at MDR 1%
of the held-out visits per S/N cut, and where the threshold's misses and the bogus sit in S/N.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from diapipe.realbogus import labels_from_classes, roc_metrics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rundir", type=Path)
    ap.add_argument("--cuts", type=float, nargs="+", default=[0, 6, 7, 8, 10, 15])
    args = ap.parse_args()
    res = args.rundir / "results"
    cls = pd.read_parquet(res / "completeness" / "classes.parquet")
    lab = labels_from_classes(cls)
    sc = pd.read_parquet(res / "realbogus" / "diaSources.parquet")
    m = json.loads((res / "realbogus" / "metrics.json").read_text())
    sc = sc[sc.visit.isin(m["heldout_visits"])]
    y = lab.reindex(sc.diaSourceId.to_numpy()).to_numpy()
    ok = np.isfinite(y)
    sc, y = sc[ok], y[ok].astype(int)
    snr, rel = sc.snr.to_numpy(), sc.reliability.to_numpy()
    print(f"held-out visits {m['heldout_visits']}: {y.sum()} real, {(1 - y).sum()} bogus; model {m['model']}")
    print("| S/N cut | reals | bogus | AUC | MDR@FPR1% | FPR@MDR1% |\n|---|---|---|---|---|---|")
    for cut in args.cuts:
        s = snr >= cut
        if y[s].min() == y[s].max():
            continue
        r = roc_metrics(y[s], rel[s])
        print(f"| >= {cut:g} | {y[s].sum()} | {(1 - y[s]).sum()} | {r['auc']:.4f} | {100 * r['mdr_at_fpr1']:.1f} % "
              f"| {100 * r['fpr_at_mdr1']:.1f} % |")
    bins = [0, 5, 6, 7, 8, 10, 15, 30, np.inf]
    miss = (y == 1) & (rel < m["threshold"])
    print(f"S/N bins {bins[:-1]}...")
    print("reals below the threshold", np.histogram(snr[miss], bins)[0].tolist())
    print("all reals               ", np.histogram(snr[y == 1], bins)[0].tolist())
    print("bogus                   ", np.histogram(snr[y == 0], bins)[0].tolist())


if __name__ == "__main__":
    main()
