"""Snakemake entry: characterize one postisr exposure -> calexp + src table."""

from diapipe import characterize, logs

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
characterize.run(
    sm.input.postisr,
    sm.input.refcat,
    sm.output.calexp,
    src_path=sm.output.src,
    config=dict(sm.params.characterize),
)
