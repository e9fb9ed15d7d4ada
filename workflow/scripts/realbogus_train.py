"""Snakemake entry: features + truth classes of the run's diaSources -> model, metrics, plots."""

from diapipe import logs, realbogus

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
cfg = dict(sm.params.realbogus, seed=sm.params.seed, n_jobs=sm.threads)
realbogus.run_train(list(sm.input.features), sm.input.classes, sm.input.diaSources, sm.output.model,
                    sm.output.metrics, plots_dir=sm.output.plots, config=cfg)
