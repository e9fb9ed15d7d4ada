"""Snakemake entry: one raw science frame and its truth exposure."""

from diapipe import logs, simulate

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
cfg = {"seed": sm.params.seed, "simulate": dict(sm.params.sim)}
plan = simulate.load_plan(
    cfg,
    {"truth_visits": sm.input.visits, "truth_sources": sm.input.sources, "truth_amps": sm.input.amps},
    sm.params.seed,
)
visit, detector = int(sm.wildcards.visit), int(sm.wildcards.detector)
simulate.write_raw(cfg, plan, visit, detector, sm.output.raw, sm.output.truth)
log.info("wrote raw visit=%d detector=%d", visit, detector)
