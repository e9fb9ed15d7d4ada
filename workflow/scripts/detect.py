"""Snakemake entry: diffexp (+ science calexp, template, refcat) -> diaSrc table, cutouts, detection mask."""

from diapipe import logs, measure

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    measure.run_files(
        sm.input.diffexp,
        sm.output.diaSrc,
        science_path=sm.input.science,
        template_path=sm.input.template,
        refcat_path=sm.input.refcat,
        cutouts_path=sm.output.cutouts,
        mask_path=sm.output.mask,
        config=dict(sm.params.detect),
    )
except Exception:
    log.exception("failed")  # the traceback in the rule's log, not only on stderr
    raise
