# Association and light curves (diapipe.associate): the reliable diaSources of
# the run (scored by real/bogus) associated across visits into diaObjects; then
# forced PSF photometry of every diaObject on every difference image covering
# it, detected there or not (light curves in nJy).  On the simulated survey the
# association is scored against the truth (association_metrics).
ASSOCIATE = config["associate"]


rule associate:
    """diaSources above the reliability threshold -> diaObjects (diaObjectId on each diaSource)."""
    input:
        unpack(fakes_truth_inputs),
        unpack(associate_fakes_input),
        diaSources=path("diaSources_scored"),
    output:
        diaObjects=path("diaObjects"),
        diaSources=path("diaSources_associated"),
        metrics=path("association_metrics"),
    log:
        log_path("associate"),
    benchmark:
        bench_path("associate")
    conda:
        "../../envs/associate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        associate=ASSOCIATE,
    script:
        "../scripts/associate.py"


rule forced_photometry:
    """PSF flux at every diaObject position on every difference image -> light curves."""
    input:
        unpack(forced_fakes_inputs),
        diaObjects=path("diaObjects"),
        diaSources=path("diaSources_associated"),
        diffexps=[path("diffexp", visit=v, detector=d) for v, d in detect_data_ids()],
    output:
        lightcurves=path("lightcurves"),
    log:
        log_path("forced_photometry"),
    benchmark:
        bench_path("forced_photometry")
    conda:
        "../../envs/associate.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(4.0, base=1000),
        runtime=20,
    script:
        "../scripts/forced_photometry.py"
