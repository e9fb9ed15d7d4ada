# DS9 region files (diapipe.ds9): every difference image gets a region file
# marking its diaSources (green = reliable, red = below the real/bogus
# threshold, magenta box = dipole), for `diapipe show <visit> <detector>`.


rule ds9_regions:
    """Scored diaSources of one difference image -> DS9 region file (image coordinates)."""
    input:
        diaSources=path("diaSources_scored"),
    output:
        regions=path("diaSrc_regions"),
    log:
        log_path("ds9_regions", visit="{visit}", detector="{detector}"),
    benchmark:
        bench_path("ds9_regions", visit="{visit}", detector="{detector}")
    conda:
        "../../envs/ds9.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/ds9_regions.py"
