"""Snakemake entry: calexp + template (on the calexp's grid) -> diffexp."""

import sys

from diapipe import logs, subtract
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
data_id = {"visit": int(sm.wildcards.visit), "detector": int(sm.wildcards.detector)}
try:
    subtract.subtract_files(
        sm.input.calexp,
        sm.input.template,
        sm.output.diffexp,
        config=dict(sm.params.subtract),
        data_id=data_id,
    )
except DiapipeError as err:
    # one clear line in the job's log (and on stderr), no traceback, no output file
    log.error("subtract failed: %s", err)
    sys.exit(1)
