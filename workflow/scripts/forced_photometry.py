"""Snakemake entry: diaObjects x difference images -> forced PSF light curves (nJy)."""

from diapipe import associate, logs
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    associate.run_forced(list(sm.input.diffexps), sm.input.diaObjects, sm.output.lightcurves,
                         sm.input.diaSources, list(sm.input.fakes) if "fakes" in sm.input.keys() else None)
except DiapipeError as exc:
    log.error("%s", exc)
    raise SystemExit(1)
