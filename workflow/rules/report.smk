# The run report (diapipe.report): one self-contained HTML file (figures
# inlined as base64 PNGs) with the run summary, per-visit table, completeness,
# ROC, the best candidates' cutouts and the top diaObjects' light curves.


rule report:
    """Self-contained HTML report of the run."""
    input:
        unpack(fakes_truth_inputs),
        calexps=[path("calexp", visit=v, detector=d) for v, d in calexp_data_ids()],
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
        html=path("report"),
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
