"""Snakemake entry: diaSources + features + model -> diaSources with reliability and isReliable."""

from diapipe import logs, realbogus

sm = snakemake  # noqa: F821
logs.setup(sm.log[0])
realbogus.run_score(sm.input.diaSources, list(sm.input.features), sm.input.model, sm.output.scored,
                    threads=sm.threads)
