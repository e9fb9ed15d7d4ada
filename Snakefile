# diapipe: difference imaging from raw frames to transients.
#
#   snakemake --cores all                       # the simulated demo survey
#   snakemake --cores all --configfile my.yaml  # overlay your settings
#
# Stages are one rule file each in workflow/rules; their settings are one
# block each in config/config.yaml (documented in config/README.md).


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# The simulated survey's rules exist only when it is the source: with
# inputs.source 'table' no rule may claim the user's raw frames or refcat.
if config["inputs"]["source"] == "simulate":

    include: "workflow/rules/simulate.smk"


include: "workflow/rules/calib.smk"
include: "workflow/rules/isr.smk"
include: "workflow/rules/characterize.smk"
include: "workflow/rules/warp.smk"
include: "workflow/rules/coadd.smk"
include: "workflow/rules/subtract.smk"
include: "workflow/rules/detect.smk"
include: "workflow/rules/fakes.smk"
include: "workflow/rules/realbogus.smk"
include: "workflow/rules/associate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/ds9.smk"
include: "workflow/rules/aligned.smk"


rule all:
    default_target: True
    input:
        all_targets(),


# A summary the user can read without opening the logs: jobs, failures and time
# per rule (from benchmarks/), also written to logs/summary.txt.
onsuccess:
    from diapipe import summary

    summary.report("success", log, out="logs/summary.txt")


onerror:
    from diapipe import summary

    summary.report("failed", log, out="logs/summary.txt")
