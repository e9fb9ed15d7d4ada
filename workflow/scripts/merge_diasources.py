"""Snakemake entry: per-exposure diaSrc tables -> the run's diaSources table."""

from diapipe import logs, measure

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    measure.merge_tables(list(sm.input.tables), sm.output.diaSources)
except Exception:
    log.exception("failed")  # the traceback in the rule's log, not only on stderr
    raise
