"""Snakemake script of rule aligned_series (thin: diapipe.aligned.run_series)."""

from pathlib import Path

import pandas as pd

from diapipe import aligned, logs
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
settings = dict(sm.params.aligned)
title = settings.pop("title", "aligned series")
try:
    frames = pd.read_csv(sm.input.frames, sep="\t")
    aligned.run_series(frames, Path(sm.output.summary).parent, settings, title=title)
except DiapipeError as exc:
    log.error("%s", exc)
    raise SystemExit(1)
