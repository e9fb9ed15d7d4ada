"""Snakemake entry: the run's products -> one self-contained HTML report."""

from diapipe import logs, report

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
inp = sm.input
calexps = dict(zip(sm.params.calexp_ids, inp.calexps))
cutouts = dict(zip(sm.params.diff_ids, inp.cutouts))
truth = {k: inp[k] for k in ("truth_fluxes", "truth_sources") if k in inp.keys()}
report.build(sm.output.html, calexps=calexps, cutouts=cutouts, dia_scored=inp.diaSources,
             dia_associated=inp.diaSources_associated, objects=inp.diaObjects, lightcurves=inp.lightcurves,
             association_metrics=inp.association_metrics, completeness_plot=inp.completeness_plot,
             completeness_summary=inp.completeness_summary, eval_plots=inp.eval_plots,
             realbogus_evaluation=inp.evaluation, bench_dir="benchmarks",
             n_cutouts=sm.params.report["n_cutouts"], n_lightcurves=sm.params.report["n_lightcurves"], **truth)
