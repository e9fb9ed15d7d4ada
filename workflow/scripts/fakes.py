"""Snakemake entry: calexp -> calexp with fakes + fakes table."""

from diapipe import fakes, logs

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    fakes.run_files(
        sm.input.calexp,
        sm.output.calexp,
        sm.output.fakes,
        seed=int(sm.params.seed),
        config=dict(sm.params.fakes),
        truth_fluxes=sm.input.get("truth_fluxes"),
        truth_sources=sm.input.get("truth_sources"),
        src=sm.input.src,
    )
except Exception:
    log.exception("failed")  # the traceback in the rule's log, not only on stderr
    raise
