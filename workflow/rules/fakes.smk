# Fakes (diapipe.fakes): point sources of known flux injected into each science
# calexp before subtraction, isolated and on galaxies; and the completeness
# analysis (diapipe.completeness) matching them, and the simulation truth, to
# the diaSources.  Subtraction uses science_calexp() (common.smk): the calexp
# with fakes.  Input functions and targets live in common.smk.
FAKES = config["fakes"]
# Each rule gets only the keys it uses, so changing how fakes are matched reruns the
# completeness analysis, not the injection and everything downstream of it.
MATCH_KEYS = (
    "match_radius",
    "match_nsigma",
    "match_radius_max",
    "snr_bins",
    "mag_bin_width",
    "truth_snr_min",
)


rule inject_fakes:
    """Inject fakes into one calexp; record them in the fakes table."""
    input:
        unpack(fakes_truth_inputs),
        calexp=path("calexp"),
        src=path("src"),
    output:
        calexp=path("calexp_fakes"),
        fakes=path("fakes"),
    log:
        log_path("inject_fakes", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("inject_fakes", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/detect.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(4.0),
        runtime=10,
    params:
        fakes={k: v for k, v in FAKES.items() if k not in MATCH_KEYS},
        seed=config["seed"],
    script:
        "../scripts/fakes.py"


rule completeness:
    """Completeness vs S/N and magnitude, flux and position accuracy, false detections."""
    input:
        unpack(fakes_truth_inputs),
        diaSources=path("diaSources"),
        fakes=(
            [path("fakes", visit=v, detector=d) for v, d in detect_data_ids()]
            if FAKES["enabled"]
            else []
        ),
        diffexps=[path("diffexp", visit=v, detector=d) for v, d in detect_data_ids()],
    output:
        curves=path("completeness"),
        matched=path("completeness_fakes"),
        classes=path("completeness_classes"),
        summary=path("completeness_summary"),
        plot=path("completeness_plot"),
    log:
        log_path("completeness"),
    benchmark:
        bench_path("completeness")
    conda:
        "../../envs/detect.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(3.0, base=1000),
        runtime=20,
    params:
        fakes={k: FAKES[k] for k in MATCH_KEYS},
        # visits coadded into templates: a truth source's template flux (flares, SNe)
        template_visits=sorted(template_pool()),
    script:
        "../scripts/completeness.py"
