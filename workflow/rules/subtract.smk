# Image subtraction (diapipe.subtract): calexp - template -> diffexp, in the
# calexp's flux units, with variance, mask, the difference's PSF and the
# kernel diagnostics (KERNEL, KGRID, KSUMMAP, STAMPS HDUs; SCORR for ZOGY).
# The template input is the coadd already resampled onto the calexp's pixel
# grid (dataset template_exp); the integrator wires its producing rule and
# adds subtract targets to all_targets() once templates exist.
SUBTRACT = config["subtract"]


rule subtract:
    """Difference image of one calexp (one visit, one detector) against its template."""
    input:
        calexp=science_calexp(),
        template=path("template_exp"),
    output:
        diffexp=path("diffexp"),
    log:
        log_path("subtract", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("subtract", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/subtract.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(14.0),
        runtime=10,
    params:
        subtract=SUBTRACT,
    script:
        "../scripts/subtract.py"
