"""Snakemake entry: per-exposure diaSrc tables -> the run's diaSources table."""

from diapipe import logs, measure

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
measure.merge_tables(list(sm.input.tables), sm.output.diaSources)
