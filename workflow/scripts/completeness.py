"""Snakemake entry: diaSources + fakes (+ diffexps, truth) -> completeness tables, summary and plot."""

from diapipe import completeness, logs

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    completeness.run(
        sm.input.diaSources,
        list(sm.input.fakes),
        {k: getattr(sm.output, k) for k in ("matched", "curves", "classes", "summary", "plot")},
        config=dict(sm.params.fakes),
        diffexp_paths=list(sm.input.diffexps),
        truth_fluxes=sm.input.get("truth_fluxes"),
        truth_sources=sm.input.get("truth_sources"),
        template_visits=list(sm.params.template_visits),
    )
except Exception:
    log.exception("failed")  # the traceback in the rule's log, not only on stderr
    raise
