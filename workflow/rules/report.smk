# The run report (diapipe.report): one self-contained HTML file (figures
# inlined as base64 PNGs) with the run summary, per-visit table, difference-
# image thumbnails, kernel and astrometric diagnostics, completeness, ROC, the
# best candidates' cutouts and the top diaObjects' light curves.  Every figure
# is also a PNG under report_figures/<section>/, registered with report() so
# that `snakemake --report report.html` (or .zip) works after a run.


rule report:
    """Self-contained HTML report of the run, and its figures for snakemake --report."""
    input:
        unpack(fakes_truth_inputs),
        truth_visits=(
            path("truth_visits") if config["inputs"]["source"] == "simulate" else []
        ),
        calexps=[path("calexp", visit=v, detector=d) for v, d in calexp_data_ids()],
        srcs=[path("src", visit=v, detector=d) for v, d in calexp_data_ids()],
        diffexps=[path("diffexp", visit=v, detector=d) for v, d in detect_data_ids()],
        cutouts=[
            path("diaSrc_cutouts", visit=v, detector=d) for v, d in detect_data_ids()
        ],
        diaSources=path("diaSources_scored"),
        diaSources_associated=path("diaSources_associated"),
        diaObjects=path("diaObjects"),
        lightcurves=path("lightcurves"),
        association_metrics=path("association_metrics"),
        completeness_plot=path("completeness_plot"),
        completeness_summary=path("completeness_summary"),
        evaluation=path("realbogus_evaluation"),
        eval_plots=path("realbogus_eval_plots"),
    output:
        html=report(
            path("report"),
            caption="../report/index.rst",
            category="Run report",
        ),
        diffexps=report(
            directory(path("report_figures", section="diffexps")),
            patterns=["{name}.png"],
            caption="../report/diffexps.rst",
            category="Difference images",
        ),
        kernel=report(
            directory(path("report_figures", section="kernel")),
            patterns=["{name}.png"],
            caption="../report/kernel.rst",
            category="PSF-matching kernels",
        ),
        astrometry=report(
            directory(path("report_figures", section="astrometry")),
            patterns=["{name}.png"],
            caption="../report/astrometry.rst",
            category="Astrometry",
        ),
        quality=report(
            directory(path("report_figures", section="quality")),
            patterns=["{name}.png"],
            caption="../report/quality.rst",
            category="Completeness and real/bogus",
        ),
        candidates=report(
            directory(path("report_figures", section="candidates")),
            patterns=["{name}.png"],
            caption="../report/candidates.rst",
            category="Candidates",
        ),
        lightcurves=report(
            directory(path("report_figures", section="lightcurves")),
            patterns=["{name}.png"],
            caption="../report/lightcurves.rst",
            category="Light curves",
        ),
    log:
        log_path("report"),
    benchmark:
        bench_path("report")
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(3.0, base=1500),
        runtime=20,
    params:
        report=config["report"],
        calexp_ids=calexp_data_ids(),
        diff_ids=detect_data_ids(),
    script:
        "../scripts/report.py"
