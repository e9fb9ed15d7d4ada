# Skymap and warps (diapipe.skymap, diapipe.warp): one TAN tract over the
# field cut into overlapping patches; every visit's calexps resampled onto
# each patch they reach (Lanczos-3, variance, masks, PSF; pixels in nJy).
#
# Which patches a calexp reaches is only certain once its WCS is fitted, but
# the DAG must be known before.  We plan it from the survey plan instead of a
# checkpoint: diapipe.skymap.plan_overlaps projects every planned exposure
# (the simulated survey's true WCS, deterministic from the config, no pixels)
# onto the skymap with skymap.plan_margin pixels to spare.  Fitted WCSs agree
# with the plan to well under an arcsec, so no overlap is missed; a planned
# overlap that turns out empty gives an empty warp (COVERAGE 0) that the coadd
# skips, and a calexp that reaches no patch at all is a clear DiapipeError.
# This keeps the DAG static (dry runs, --summary and cluster submission see
# every job) at the cost of a few empty warps; for user exposures without a
# plan every visit feeds every patch.
from diapipe.skymap import plan_overlaps

SKYMAP = config["skymap"]
WARP = config["warp"]
OVERLAPS = plan_overlaps(config)


rule make_skymap:
    """The tract and patch geometry (JSON), from the config."""
    output:
        skymap=path("skymap"),
    log:
        log_path("make_skymap"),
    benchmark:
        bench_path("make_skymap")
    conda:
        "../../envs/warp.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        skymap=SKYMAP,
        simulate=config.get("simulate", {}),
    script:
        "../scripts/make_skymap.py"


rule warp:
    """One visit's calexps resampled onto one patch."""
    input:
        skymap=path("skymap"),
        calexps=warp_calexps,
    output:
        warp=path("warp"),
    log:
        log_path("warp", band="{band}", patch="{patch}", visit="{visit}"),
    benchmark:
        bench_path("warp", band="{band}", patch="{patch}", visit="{visit}")
    conda:
        "../../envs/warp.yaml"
    threads: 1
    resources:
        mem_mb=lambda wc: 800
        + int((SKYMAP["patch_size"] + 2 * SKYMAP["overlap"]) ** 2 * 4 * 14 / 1e6)
        + detector_mem_mb(3.0, base=0),
        runtime=15,
    params:
        warp=WARP,
    script:
        "../scripts/warp.py"
