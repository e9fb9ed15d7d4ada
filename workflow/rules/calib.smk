# Master calibrations (diapipe.calib): per detector a master bias (e-) and a
# master dark (e-/s), and per detector and band a master flat (unit median),
# each a sigma-clipped combination with its variance and a BAD mask of the
# defects found in it.
CALIB = config["calib"]


rule master_bias:
    """Combine the raw bias frames of one detector."""
    input:
        frames=lambda w: raw_calib_inputs("bias", w.detector),
    output:
        bias=path("master_bias"),
    log:
        log_path("master_bias", detector="{detector}"),
    benchmark:
        bench_path("master_bias", detector="{detector}")
    conda:
        "../../envs/isr.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(2.0 + 0.5 * config["simulate"]["n_bias"]),
        runtime=15,
    params:
        kind="bias",
        calib=CALIB,
    script:
        "../scripts/calib.py"


rule master_dark:
    """Combine the raw darks of one detector into a dark-current image (e-/s)."""
    input:
        frames=lambda w: raw_calib_inputs("dark", w.detector),
        bias=path("master_bias"),
    output:
        dark=path("master_dark"),
    log:
        log_path("master_dark", detector="{detector}"),
    benchmark:
        bench_path("master_dark", detector="{detector}")
    conda:
        "../../envs/isr.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(3.0 + 0.5 * config["simulate"]["n_dark"]),
        runtime=15,
    params:
        kind="dark",
        calib=CALIB,
    script:
        "../scripts/calib.py"


rule master_flat:
    """Combine the raw twilight flats of one detector and band."""
    input:
        frames=lambda w: raw_calib_inputs("flat", w.detector, w.band),
        bias=path("master_bias"),
        dark=path("master_dark"),
    output:
        flat=path("master_flat"),
    log:
        log_path("master_flat", band="{band}", detector="{detector}"),
    benchmark:
        bench_path("master_flat", band="{band}", detector="{detector}")
    conda:
        "../../envs/isr.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(4.0 + 0.5 * config["simulate"]["n_flat"]),
        runtime=15,
    params:
        kind="flat",
        calib=CALIB,
    script:
        "../scripts/calib.py"
