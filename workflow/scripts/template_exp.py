"""Snakemake entry: calexp + template coadds -> the template on the calexp's pixel grid."""

import sys

from diapipe import logs
from diapipe.coadd import template_files
from diapipe.fileio import DiapipeError
from diapipe.skymap import SkyMap

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    coadds = dict(zip(sm.params.patches, sm.input.templates))
    t = template_files(
        sm.input.calexp,
        coadds,
        sm.output.template,
        skymap=SkyMap.read(sm.input.skymap),
        psf_order=sm.params.coadd["template_psf_order"],
        grid_step=sm.params.warp["grid_step"],
        mask_kernel=sm.params.warp["mask_kernel"],
    )
    log.info("template_exp from patches %s, coverage %.3f", t.metadata["PATCHES"], t.metadata["COVERAGE"])
except DiapipeError as err:
    log.error("template_exp failed: %s", err)
    sys.exit(1)
