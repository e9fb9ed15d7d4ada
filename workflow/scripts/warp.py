"""Snakemake entry: one visit's calexps -> warp on one patch."""

import sys

from diapipe import logs
from diapipe.fileio import DiapipeError
from diapipe.skymap import SkyMap
from diapipe.warp import warp_files

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
cfg = dict(sm.params.warp)
try:
    w = warp_files(
        list(sm.input.calexps),
        SkyMap.read(sm.input.skymap),
        int(sm.wildcards.patch),
        sm.output.warp,
        visit=int(sm.wildcards.visit),
        band=sm.wildcards.band,
        mask_kernel=cfg["mask_kernel"],
        grid_step=cfg["grid_step"],
        psf_order=cfg["psf_order"],
        psf_grid=cfg["psf_grid"],
    )
    log.info("warp written: coverage %.3f", w.metadata.get("COVERAGE", 0.0))
except DiapipeError as err:
    log.error("warp failed: %s", err)
    sys.exit(1)
