"""Snakemake entry: config -> skymap JSON."""

import sys

from diapipe import logs
from diapipe.fileio import DiapipeError
from diapipe.skymap import SkyMap

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    skymap = SkyMap.from_config(dict(sm.params.skymap), dict(sm.params.simulate))
    skymap.write(sm.output.skymap)
    log.info("skymap %s", skymap)
except DiapipeError as err:
    log.error("make_skymap failed: %s", err)
    sys.exit(1)
