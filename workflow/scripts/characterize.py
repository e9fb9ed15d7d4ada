"""Snakemake entry: characterize one postisr exposure -> calexp + src table."""

from diapipe import characterize, logs
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    characterize.run(
        sm.input.postisr,
        sm.input.refcat,
        sm.output.calexp,
        src_path=sm.output.src,
        config=dict(sm.params.characterize),
    )
except DiapipeError as exc:
    log.error("%s: %s", type(exc).__name__, exc)  # the job's log says why, in one line
    raise
