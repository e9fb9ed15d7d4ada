"""Snakemake entry: scored diaSources + truth classes -> evaluation JSON and plots."""

from diapipe import logs, realbogus

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
realbogus.run_evaluate(sm.input.scored, sm.input.classes, sm.input.model, sm.output.evaluation,
                       plots_dir=sm.output.plots, fakes_path=sm.input.get("fakes"))
