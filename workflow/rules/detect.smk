# Detection and measurement of diaSources (diapipe.detect, diapipe.measure): one
# job per difference exposure -> diaSrc table, cutouts and the detection mask;
# one merge job -> the run's diaSources table.  The science image is the calexp
# the subtraction used (science_calexp(), with fakes when fakes.enabled).
# science_calexp() and detect_data_ids() live in common.smk.
DETECT = config["detect"]


rule detect_measure:
    """Detect and measure the diaSources of one difference exposure."""
    input:
        diffexp=path("diffexp"),
        science=science_calexp(),
        template=path("template_exp"),
        refcat=path("refcat"),
    output:
        diaSrc=path("diaSrc"),
        cutouts=path("diaSrc_cutouts"),
        mask=path("diaSrc_mask"),
    log:
        log_path("detect_measure", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("detect_measure", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/detect.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(8.0),
        runtime=10,
    params:
        detect=DETECT,
    script:
        "../scripts/detect.py"


rule merge_diasources:
    """All diaSrc tables of the run in one diaSources table (ids unique across the run)."""
    input:
        tables=[path("diaSrc", visit=v, detector=d) for v, d in detect_data_ids()],
    output:
        diaSources=path("diaSources"),
    log:
        log_path("merge_diasources"),
    benchmark:
        bench_path("merge_diasources")
    conda:
        "../../envs/detect.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/merge_diasources.py"
