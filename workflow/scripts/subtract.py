"""Snakemake entry: calexp + template (on the calexp's grid) -> diffexp."""

from diapipe import logs, subtract

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
data_id = {"visit": int(sm.wildcards.visit), "detector": int(sm.wildcards.detector)}
subtract.subtract_files(
    sm.input.calexp,
    sm.input.template,
    sm.output.diffexp,
    config=dict(sm.params.subtract),
    data_id=data_id,
)
