# Difference imaging of a reduced frame series without sky WCS (diapipe.aligned),
# used when inputs.source is 'aligned_frames' (e.g. config/saao.yaml): the
# frames listed in inputs.exposures are aligned on the best-seeing frame,
# a template is coadded from the best-seeing ones, and every frame is
# subtracted, measured, associated and forced-photometered; the report and
# every product live beside the summary (results/aligned/).


rule aligned_series:
    """Frames table -> aligned series products (diffexps, diaSources, diaObjects, light curves, report)."""
    input:
        frames=config["inputs"]["exposures"],
    output:
        summary=path("aligned_summary"),
    log:
        log_path("aligned_series"),
    benchmark:
        bench_path("aligned_series")
    conda:
        "../../envs/aligned.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        aligned=config["aligned"],
    script:
        "../scripts/aligned.py"
