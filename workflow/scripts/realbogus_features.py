"""Snakemake entry: one exposure's diaSrc + cutouts + diffexp + template + science calexp -> real/bogus features."""

from diapipe import logs, realbogus

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
realbogus.run_features(sm.input.diaSrc, sm.input.cutouts, sm.input.diffexp, sm.output.features,
                       template_path=sm.input.template, science_path=sm.input.science)
