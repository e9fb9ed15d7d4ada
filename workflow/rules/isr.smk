# Instrument signature removal (diapipe.isr): raw -> postisr Exposure in
# electrons (sky not subtracted) with variance and BAD/SAT/CR masks.  The
# master flats of every band are inputs; the job uses the one matching the
# raw's FILTER, so a visit's band need not be known when the DAG is built.
ISR = config["isr"]


rule isr:
    """ISR of one raw frame (one visit, one detector)."""
    input:
        raw=path("raw"),
        bias=path("master_bias"),
        dark=path("master_dark"),
        flats=expand(
            path("master_flat", band="{band}", detector="{detector}"),
            band=bands(),
            allow_missing=True,
        ),
    output:
        postisr=path("postisr"),
    log:
        log_path("isr", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("isr", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/isr.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(6.0),
        runtime=10,
    params:
        # With an exposures table, the band its row gives (absent otherwise, so simulated runs keep their params).
        **isr_table_params(),
        isr=ISR,
    script:
        "../scripts/isr.py"
