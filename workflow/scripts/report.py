"""Snakemake entry: the run's products -> one self-contained HTML report and its figure files."""

from pathlib import Path

from diapipe import logs, report

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
inp = sm.input
calexps = dict(zip(sm.params.calexp_ids, inp.calexps))
srcs = dict(zip(sm.params.calexp_ids, inp.srcs))
diffexps = dict(zip(sm.params.diff_ids, inp.diffexps))
cutouts = dict(zip(sm.params.diff_ids, inp.cutouts))
truth = {k: inp[k] for k in ("truth_fluxes", "truth_sources", "truth_visits") if k in inp.keys() and inp[k]}
# one output directory per report section (diapipe.report.FigureSink)
figures = {k: sm.output[k] for k in ("diffexps", "kernel", "astrometry", "quality", "candidates", "lightcurves")}
report.build(sm.output.html, calexps=calexps, srcs=srcs, diffexps=diffexps, cutouts=cutouts,
             dia_scored=inp.diaSources, dia_associated=inp.diaSources_associated, objects=inp.diaObjects,
             lightcurves=inp.lightcurves, association_metrics=inp.association_metrics,
             completeness_plot=inp.completeness_plot, completeness_summary=inp.completeness_summary,
             eval_plots=inp.eval_plots, realbogus_evaluation=inp.evaluation, bench_dir="benchmarks",
             figures_dir=figures, n_cutouts=sm.params.report["n_cutouts"],
             n_lightcurves=sm.params.report["n_lightcurves"],
             thumbnail_size=sm.params.report["thumbnail_size"], **truth)
# Snakemake wants every directory output to exist, even when a section had nothing to draw.
for d in figures.values():
    Path(d).mkdir(parents=True, exist_ok=True)
