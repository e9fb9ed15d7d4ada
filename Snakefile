# diapipe: difference imaging from raw frames to transients.
#
#   snakemake --cores all                       # the simulated demo survey
#   snakemake --cores all --configfile my.yaml  # overlay your settings
#
# Stages are one rule file each in workflow/rules; their settings are one
# block each in config/config.yaml (documented in config/README.md).


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/calib.smk"
include: "workflow/rules/isr.smk"
include: "workflow/rules/characterize.smk"
include: "workflow/rules/subtract.smk"
include: "workflow/rules/detect.smk"
include: "workflow/rules/fakes.smk"


rule all:
    input:
        all_targets(),
    default_target: True
