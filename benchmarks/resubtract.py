"""Re-subtract a finished survey run's difference images with changed subtract settings, and measure them.

    python benchmarks/resubtract.py RUNDIR --set method=zogy [--set basis_degrees=[8,2,2] ...]
                                    [--visits 11] [-o OUTDIR] [-j 2]

For every diffexp of RUNDIR (results/diff/{visit}/{detector}.fits), the science image and
template the run subtracted (datasets calexp_fakes, or calexp without fakes, and template_exp)
are subtracted again with the run's ``subtract`` settings overridden by ``--set KEY=VALUE``
(VALUE read as YAML, validated against the schema), written to OUTDIR/{visit}/{detector}.fits
(default: a fresh temporary directory) and measured by ``measure_diff_noise.py`` (issue 5's
table: blank sky, bright-star boxes, the kernel's own stamps against the other stars).

What-if comparisons of subtraction settings on one run then need no second survey run: the
inputs, truth and measurement are the run's own; only the subtraction changes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from diapipe import config as dpconfig  # noqa: E402
from diapipe.butler import Butler  # noqa: E402


def parse_sets(items) -> dict:
    """``KEY=VALUE`` strings -> {KEY: YAML-parsed VALUE}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _one(job) -> str:
    science, template, output, settings, data_id = job
    from diapipe.subtract import subtract_files

    e = subtract_files(science, template, output, config=settings, data_id=data_id)
    m = e.metadata
    return (f"{data_id['visit']}/{data_id['detector']}: {m['SUBMETH']} convolved {m['CONVDIR']} "
            f"KORDER {m['KORDER']} NSTAMP {m['NSTAMP']} {m['SUBTIME']:.2f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rundir", type=Path)
    ap.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                    help="subtract setting to override (YAML value), e.g. method=zogy or basis_degrees=[6,2,2]")
    ap.add_argument("--config", default=None, help="overlay config the run used (relative to RUNDIR)")
    ap.add_argument("--visits", type=int, nargs="*", help="only these visits")
    ap.add_argument("-o", "--output", type=Path, default=None, help="where the new diffexps go (default: a temp dir)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="subtractions in parallel")
    a = ap.parse_args(argv)
    wd = a.rundir
    overlays = [wd / "config" / "config.yaml", *([wd / a.config] if a.config else [])]
    cfg = dpconfig.load(*overlays)
    overrides = parse_sets(a.sets)
    cfg["subtract"].update(overrides)
    cfg = dpconfig.validate(cfg)  # a mistyped key or value is refused here, not deep in subtract
    b = Butler(cfg["datasets"], root=wd)
    science = "calexp_fakes" if cfg["fakes"]["enabled"] else "calexp"
    out = a.output or Path(tempfile.mkdtemp(prefix="resubtract-"))
    jobs = []
    for p in sorted((wd / "results" / "diff").glob("*/*.fits")):
        if not (p.stem.isdigit() and p.parent.name.isdigit()):
            continue
        data_id = {"visit": int(p.parent.name), "detector": int(p.stem)}
        if a.visits and data_id["visit"] not in a.visits:
            continue
        jobs.append((b.get(science, **data_id), b.get("template_exp", **data_id),
                     out / str(data_id["visit"]) / f"{data_id['detector']}.fits", dict(cfg["subtract"]), data_id))
    if not jobs:
        print(f"no diffexps under {wd / 'results' / 'diff'}", file=sys.stderr)
        return 1
    print(f"re-subtracting {len(jobs)} difference images into {out} with subtract overrides "
          f"{overrides or '(none)'}")
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for line in pool.map(_one, jobs):
            print(line, flush=True)
    import measure_diff_noise

    argv2 = [str(wd), "--diff-dir", str(out)] + (["--config", a.config] if a.config else [])
    if a.visits:
        argv2 += ["--visits", *map(str, a.visits)]
    return measure_diff_noise.main(argv2)


if __name__ == "__main__":
    sys.exit(main())
