"""Snakemake entry: scored diaSources -> diaObjects + associated diaSources (+ truth metrics)."""

import json

import pandas as pd

from diapipe import associate, logs
from diapipe.fileio import DiapipeError, write_text

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
cfg = sm.params.associate
try:
    srcs, objs = associate.run_associate(sm.input.diaSources, sm.output.diaObjects, sm.output.diaSources,
                                         cfg["match_radius"], cfg["reliability_min"], cfg["exclude_fakes"],
                                         fakes_path=sm.input.fakes if "fakes" in sm.input.keys() else None)
    metrics = {"n_diaSources_associated": int(len(srcs)), "n_diaObjects": int(len(objs))}
    if "truth_fluxes" in sm.input.keys():
        metrics.update(associate.association_metrics(srcs, pd.read_parquet(sm.input.truth_fluxes),
                                                     pd.read_parquet(sm.input.truth_sources),
                                                     cfg["truth_match_radius"]))
    log.info("association: %s", metrics)
    write_text(json.dumps(metrics, indent=2) + "\n", sm.output.metrics)
except DiapipeError as exc:
    log.error("%s", exc)
    raise SystemExit(1)
