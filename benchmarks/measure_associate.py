"""Association and forced-photometry acceptance figures of a finished run, against the simulation truth.

    python benchmarks/measure_associate.py [WORKDIR] [--config config/tiny.yaml]

Prints: fraction of each true transient's diaSources in its main diaObject
(>= 0.99 wanted), fraction of truth-matched diaObjects merging two true sources
(< 0.01), and chi^2/dof of the forced light curves of simulated SNe against
their true fluxes over all points (0.8-1.3), with the numbers behind them.

    python benchmarks/measure_associate.py WORKDIR --no-reliability-cut

does the same for every diaSource that is not a fake, whatever its
reliability: associated again and force-photometered on every difference
image (fakes subtracted) into a temporary directory.  The run's own products
hold only the reliable diaObjects; this shows whether the figures hold for the
transients the real/bogus cut dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diapipe import associate as asc  # noqa: E402
from diapipe import config as dpconfig  # noqa: E402
from diapipe.butler import Butler  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", nargs="?", default=".")
    ap.add_argument("--config", default=None, help="overlay config (relative to workdir)")
    ap.add_argument("--no-reliability-cut", action="store_true",
                    help="associate and force-photometer every non-fake diaSource, not only the reliable ones")
    a = ap.parse_args(argv)
    wd = Path(a.workdir)
    cfg = dpconfig.load(wd / "config" / "config.yaml", *([wd / a.config] if a.config else []))
    b = Butler(cfg["datasets"], root=wd)
    if a.no_reliability_cut:
        srcs, lc = _associate_all(wd, b, cfg)
    else:
        srcs = pd.read_parquet(b.get("diaSources_associated"))
        lc = pd.read_parquet(b.get("lightcurves"))
    tf = pd.read_parquet(b.get("truth_fluxes"))
    ts = pd.read_parquet(b.get("truth_sources"))
    r = cfg["associate"]["truth_match_radius"]
    out = {"association": asc.association_metrics(srcs, tf, ts, r),
           "sn_lightcurves": asc.lightcurve_chi2(lc, srcs, tf, ts, kinds=("sn",), radius_px=r),
           "all_transient_lightcurves": asc.lightcurve_chi2(lc, srcs, tf, ts, kinds=asc.TRANSIENT_KINDS,
                                                            radius_px=r)}
    print(json.dumps(out, indent=2))
    print("\nSN forced points: pulls (psfFlux - truth) / psfFluxErr by true S/N")
    print(pull_table(lc, srcs, tf, ts, r).to_string())
    return 0


def _associate_all(wd: Path, b: Butler, cfg: dict):
    """(associated diaSources, forced light curves) of every non-fake scored diaSource."""
    import re
    import tempfile

    dia = pd.read_parquet(b.get("diaSources_scored"))
    fk = pd.read_parquet(b.get("completeness_fakes"))
    dia = dia[~dia["diaSourceId"].isin(fk.loc[fk["diaSourceId"] >= 0, "diaSourceId"])]
    srcs, objs = asc.associate(dia, cfg["associate"]["match_radius"])
    # every difference image of the run: the Butler's diffexp template, globbed and parsed back
    pat = b.template("diffexp")
    rx = re.compile(re.escape(pat).replace(r"\{visit\}", r"(?P<visit>\d+)").replace(r"\{detector\}", r"(?P<detector>\d+)"))
    ids = sorted((int(m["visit"]), int(m["detector"])) for p in wd.glob(pat.format(visit="*", detector="*"))
                 if (m := rx.fullmatch(p.relative_to(wd).as_posix())))
    tmp = Path(tempfile.mkdtemp(prefix="measure_associate_"))
    srcs.to_parquet(tmp / "sources.parquet")
    objs.to_parquet(tmp / "objects.parquet")
    fakes = [b.get("fakes", visit=v, detector=d) for v, d in ids] if cfg["fakes"]["enabled"] else None
    lc = asc.run_forced([b.get("diffexp", visit=v, detector=d) for v, d in ids], tmp / "objects.parquet",
                        tmp / "lightcurves.parquet", tmp / "sources.parquet", fakes)
    print(f"no reliability cut: {len(dia)} non-fake diaSources -> {len(objs)} diaObjects, forced on {len(ids)} "
          f"difference images (products in {tmp})")
    return srcs, lc


def pull_table(lc, srcs, tf, ts, radius, kinds=("sn",)) -> pd.DataFrame:
    """chi2, mean and std of the pulls and the median fractional flux error, in bins of true S/N.

    Same points as associate.lightcurve_chi2 (flagged and edge points out), plus how many were flagged.
    """
    import numpy as np

    x = asc.truth_matched_points(lc, srcs, tf, ts, radius, kinds)
    if x is None:
        return pd.DataFrame()
    n_flag = x.attrs["n_flagged"]
    x["z"] = (x["psfFlux"] - x["flux_nJy"]) / x["psfFluxErr"]
    x["bin"] = pd.cut(x["flux_nJy"] / x["psfFluxErr"], [-np.inf, 1, 5, 20, 50, 200, np.inf])
    g = x.groupby("bin", observed=True)
    out = pd.DataFrame({"n": g.size(), "chi2_dof": g["z"].apply(lambda z: float(np.mean(z**2))),
                        "mean_pull": g["z"].mean(), "std_pull": g["z"].std(),
                        "median_frac_err": g.apply(lambda q: float(np.median((q["psfFlux"] - q["flux_nJy"])
                                                                             / q["flux_nJy"].where(q["flux_nJy"] > 0))),
                                                   include_groups=False)})
    out.attrs["n_flagged"] = n_flag
    print(f"(forced_flag points left out: {n_flag})")
    return out


if __name__ == "__main__":
    sys.exit(main())
