# Characterization (diapipe.characterize): postisr -> calexp (background
# subtracted, fitted TAN-SIP WCS, PixelPsf, MAGZERO/SEEING/WCSRMS in the header)
# and its source table, calibrated against the reference catalog.
CHARACTERIZE = config["characterize"]


rule characterize:
    """Background, PSF model, astrometric and photometric calibration of one exposure."""
    input:
        postisr=path("postisr"),
        refcat=path("refcat"),
    output:
        calexp=path("calexp"),
        src=path("src"),
    log:
        log_path("characterize", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("characterize", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/characterize.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(8.0),
        runtime=10,
    params:
        characterize=CHARACTERIZE,
    script:
        "../scripts/characterize.py"
