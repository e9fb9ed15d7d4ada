# Template coadds (diapipe.coadd): per band and patch, the selected template
# visits' warps combined (weighted mean, single-visit artefacts rejected,
# variance, PSF, NIMAGE), then resampled onto every calexp's pixel grid
# (template_exp, in the calexp's electrons) for subtraction.
#
# The coadd job gets every warp of the candidate pool on the patch (coadd.visits,
# or the simulated survey's template visits); the library then applies the
# selection (list / MJD range / N best measured seeing), so 'best_seeing' uses
# the seeing characterize measured, not the plan's.  A selection matching no
# visit is one DiapipeError for that patch; other patches carry on.
COADD = config["coadd"]


rule template_psf:
    """The band's common PSF for homogenised coadds (coadd.homogenize): one for every patch."""
    input:
        warps=lambda wc: [p for ps in band_pool_warps(wc).values() for p in ps],
    output:
        psf=path("template_psf"),
    log:
        log_path("template_psf", band="{band}"),
    benchmark:
        bench_path("template_psf", band="{band}")
    conda:
        "../../envs/coadd.yaml"
    threads: 1
    resources:
        # one patch's pool of warps at a time
        mem_mb=lambda wc: 1000
        + int(
            (SKYMAP["patch_size"] + 2 * SKYMAP["overlap"]) ** 2
            * 10
            * max([1] + [len(v) for v in band_pool_warps(wc).values()])
            / 1e6
        ),
        runtime=15,
    params:
        warps_by_patch=band_pool_warps,
        coadd=COADD,
    script:
        "../scripts/template_psf.py"


rule coadd:
    """Template of one band on one patch from the selected visits' warps."""
    input:
        warps=coadd_warps,
        target_psf=coadd_target_psf,
    output:
        template=path("template"),
    log:
        log_path("coadd", band="{band}", patch="{patch}"),
    benchmark:
        bench_path("coadd", band="{band}", patch="{patch}")
    conda:
        "../../envs/coadd.yaml"
    threads: 1
    resources:
        # all warps of the pool in memory (image, mask, variance, PSF-matched copies)
        mem_mb=lambda wc, input: 1000
        + int(
            (SKYMAP["patch_size"] + 2 * SKYMAP["overlap"]) ** 2
            * 8
            * 6
            * max(1, len(input.warps))
            / 1e6
        ),
        runtime=30,
    params:
        coadd=COADD,
    script:
        "../scripts/coadd.py"


rule template_exp:
    """The coadd(s) resampled onto one calexp's pixel grid, for subtraction."""
    input:
        skymap=path("skymap"),
        calexp=path("calexp"),
        templates=lambda wc: list(template_coadds(wc).values()),
    output:
        template=path("template_exp"),
    log:
        log_path("template_exp", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("template_exp", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/coadd.yaml"
    threads: 1
    resources:
        mem_mb=lambda wc, input: detector_mem_mb(6.0)
        + int(
            (SKYMAP["patch_size"] + 2 * SKYMAP["overlap"]) ** 2
            * 12
            * max(1, len(input.templates))
            / 1e6
        ),
        runtime=15,
    params:
        patches=lambda wc: list(template_coadds(wc).keys()),
        coadd=COADD,
        warp=WARP,
    script:
        "../scripts/template_exp.py"
