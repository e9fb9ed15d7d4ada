"""Snakemake entry: draw the survey plan and write the truth tables and refcat."""

from diapipe import logs, simulate

log = logs.setup(snakemake.log[0])  # noqa: F821
cfg = {"seed": snakemake.params.seed, "simulate": dict(snakemake.params.sim)}  # noqa: F821
plan = simulate.plan_survey(cfg, snakemake.params.seed)  # noqa: F821
out = snakemake.output  # noqa: F821
simulate.write_plan(
    plan,
    {
        "truth_visits": out.visits,
        "truth_sources": out.sources,
        "truth_fluxes": out.fluxes,
        "truth_amps": out.amps,
        "refcat": out.refcat,
    },
)
log.info("plan: %d visits, %d sources, %d refcat stars", len(plan.visits), len(plan.sources), len(plan.refcat))
