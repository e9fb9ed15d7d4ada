"""Snakemake script of rule ds9_regions (thin: diapipe.ds9.regions_from_files)."""

import logging

from diapipe import logs
from diapipe.ds9 import regions_from_files
from diapipe.fileio import DiapipeError

logs.setup(snakemake.log[0])  # noqa: F821
w = snakemake.wildcards  # noqa: F821
try:
    n = regions_from_files(snakemake.input.diaSources, int(w.visit), int(w.detector),  # noqa: F821
                           snakemake.output.regions)  # noqa: F821
    logging.getLogger("diapipe.ds9").info("visit %s detector %s: %d diaSources", w.visit, w.detector, n)
except DiapipeError as exc:
    logging.getLogger("diapipe.ds9").error("%s", exc)
    raise SystemExit(1)
