"""Snakemake entry: the band's template-pool warps on every patch -> the common PSF of homogenised coadds."""

import sys

from diapipe import logs
from diapipe.coadd import selection_from_config, target_psf_files
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
c = dict(sm.params.coadd)
try:
    t = target_psf_files(
        dict(sm.params.warps_by_patch),
        sm.output.psf,
        **selection_from_config(c),
        margin=c["homogenize_margin"],
        grid=c["psf_grid"],
        band=sm.wildcards.band,
    )
    log.info("common PSF of band %s: %d px stamp", sm.wildcards.band, t.shape[0])
except DiapipeError as err:
    log.error("template_psf failed: %s", err)
    sys.exit(1)
