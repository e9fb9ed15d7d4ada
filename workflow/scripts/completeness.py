"""Snakemake entry: diaSources + fakes (+ diffexps, truth) -> completeness tables, summary and plot."""

from diapipe import completeness, logs

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
completeness.run(
    sm.input.diaSources,
    list(sm.input.fakes),
    {k: getattr(sm.output, k) for k in ("matched", "curves", "classes", "summary", "plot")},
    config=dict(sm.params.fakes),
    diffexp_paths=list(sm.input.diffexps),
    truth_fluxes=sm.input.get("truth_fluxes"),
    truth_sources=sm.input.get("truth_sources"),
)
