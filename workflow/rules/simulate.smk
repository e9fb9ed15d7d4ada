# The simulated survey (diapipe.simulate): truth tables and reference catalog
# (one job), raw science frames with their truth exposures (one job per visit
# and detector), raw calibration frames (one job per detector).
# simulate_targets() and raw_calib_inputs() live in common.smk (shared).
SIM = config["simulate"]
SIM_SEED = config["seed"]


rule simulate_survey:
    """Draw the survey plan: visits, sources and transients, amplifiers, reference catalog."""
    output:
        visits=path("truth_visits"),
        sources=path("truth_sources"),
        fluxes=path("truth_fluxes"),
        amps=path("truth_amps"),
        refcat=path("refcat"),
    log:
        log_path("simulate_survey"),
    benchmark:
        bench_path("simulate_survey")
    conda:
        "../../envs/simulate.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        sim=SIM,
        seed=SIM_SEED,
    script:
        "../scripts/simulate_survey.py"


rule simulate_raw:
    """One raw science frame (uint16, overscan, camera headers) and its truth exposure."""
    input:
        visits=path("truth_visits"),
        sources=path("truth_sources"),
        amps=path("truth_amps"),
    output:
        raw=path("raw"),
        truth=path("truth_exposure"),
    log:
        log_path("simulate_raw", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("simulate_raw", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/simulate.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(3.0),
        runtime=10,
    params:
        sim=SIM,
        seed=SIM_SEED,
    script:
        "../scripts/simulate_raw.py"


rule simulate_calib:
    """All raw calibration frames of one detector: biases, darks and twilight flats per band."""
    output:
        bias=expand(
            path("raw_bias", detector="{detector}", seq="{seq}"),
            seq=range(SIM["n_bias"]),
            allow_missing=True,
        ),
        dark=expand(
            path("raw_dark", detector="{detector}", seq="{seq}"),
            seq=range(SIM["n_dark"]),
            allow_missing=True,
        ),
        flat=expand(
            path("raw_flat", band="{band}", detector="{detector}", seq="{seq}"),
            band=bands(),
            seq=range(SIM["n_flat"]),
            allow_missing=True,
        ),
    log:
        log_path("simulate_calib", detector="{detector}"),
    benchmark:
        bench_path("simulate_calib", detector="{detector}")
    conda:
        "../../envs/simulate.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(2.0),
        runtime=10,
    params:
        sim=SIM,
        seed=SIM_SEED,
    script:
        "../scripts/simulate_calib.py"


rule simulate_all:
    """Only the simulated survey: `snakemake --cores 2 simulate_all`."""
    input:
        simulate_targets(),
