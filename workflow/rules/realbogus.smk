# Real/bogus classification (diapipe.realbogus): features per difference
# exposure (stamps of +-4 FWHM cut from the diffexp, science calexp and
# template); a classifier trained on the run's fakes and truth-matched
# diaSources (or the model file in realbogus.model_path); reliability added to
# the run's diaSources; evaluation against the truth classes.
# realbogus_model_file() and realbogus_targets() live in common.smk.
from diapipe.realbogus import FEATURE_VERSION

REALBOGUS = config["realbogus"]


rule realbogus_features:
    """Scale-free features of one difference exposure's diaSources from their cutouts."""
    input:
        diaSrc=path("diaSrc"),
        cutouts=path("diaSrc_cutouts"),
        diffexp=path("diffexp"),
        template=path("template_exp"),
        science=science_calexp(),
    output:
        features=path("realbogus_features"),
    log:
        log_path("realbogus_features", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("realbogus_features", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/realbogus.yaml"
    threads: 1
    resources:
        mem_mb=detector_mem_mb(3.0),
        runtime=10,
    params:
        feature_version=FEATURE_VERSION,
    script:
        "../scripts/realbogus_features.py"


rule train_realbogus:
    """Train on fakes and truth transients (real) vs unmatched detections (bogus)."""
    input:
        features=[
            path("realbogus_features", visit=v, detector=d)
            for v, d in detect_data_ids()
        ],
        classes=path("completeness_classes"),
        diaSources=path("diaSources"),
    output:
        model=path("realbogus_model"),
        metrics=path("realbogus_metrics"),
        plots=directory(path("realbogus_train_plots")),
    log:
        log_path("train_realbogus"),
    benchmark:
        bench_path("train_realbogus")
    conda:
        "../../envs/realbogus.yaml"
    threads: REALBOGUS["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        realbogus=REALBOGUS,
        seed=config["seed"],
        feature_version=FEATURE_VERSION,
    script:
        "../scripts/realbogus_train.py"


rule score_realbogus:
    """Add reliability (and isReliable) to the run's diaSources."""
    input:
        diaSources=path("diaSources"),
        features=[
            path("realbogus_features", visit=v, detector=d)
            for v, d in detect_data_ids()
        ],
        model=realbogus_model_file(),
    output:
        scored=path("diaSources_scored"),
    log:
        log_path("score_realbogus"),
    benchmark:
        bench_path("score_realbogus")
    conda:
        "../../envs/realbogus.yaml"
    threads: REALBOGUS["threads"]
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        model_path=REALBOGUS["model_path"],
    script:
        "../scripts/realbogus_score.py"


rule evaluate_realbogus:
    """ROC, MDR/FPR, purity/completeness and completeness vs S/N of the scores on this run."""
    input:
        scored=path("diaSources_scored"),
        classes=path("completeness_classes"),
        fakes=path("completeness_fakes"),
        model=realbogus_model_file(),
    output:
        evaluation=path("realbogus_evaluation"),
        plots=directory(path("realbogus_eval_plots")),
    log:
        log_path("evaluate_realbogus"),
    benchmark:
        bench_path("evaluate_realbogus")
    conda:
        "../../envs/realbogus.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        model_path=REALBOGUS["model_path"],
    script:
        "../scripts/realbogus_evaluate.py"
