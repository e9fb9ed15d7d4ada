"""Snakemake entry: warps of one band and patch -> template coadd."""

import sys

from astropy.io import fits

from diapipe import logs
from diapipe.coadd import coadd_from_files, selection_from_config
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
c = dict(sm.params.coadd)
data_id = {"band": sm.wildcards.band, "patch": int(sm.wildcards.patch)}
try:
    if not sm.input.warps:
        raise DiapipeError("no template-pool visit is planned on this patch", None, data_id)
    co = coadd_from_files(
        list(sm.input.warps),
        sm.output.template,
        **selection_from_config(c),
        data_id=data_id,
        weighting=c["weighting"],
        reject=c["reject"],
        nsigma=c["nsigma"],
        nsigma_low=c["nsigma_low"],
        ampfrac=c["ampfrac"],
        matched_ampfrac=c["matched_ampfrac"],
        grow=c["grow"],
        psf_order=c["psf_order"],
        psf_grid=c["psf_grid"],
        mask_threshold=c["mask_threshold"],
        sat_threshold=c["sat_threshold"],
        fill_rejected=c["fill_rejected"],
        homogenize=c["homogenize"],
        homogenize_margin=c["homogenize_margin"],
        target_psf=fits.getdata(sm.input.target_psf[0]) if sm.input.target_psf else None,
    )
    log.info("coadd of visits %s, seeing %.3f arcsec", co.metadata["VISITS"], co.metadata.get("SEEING", float("nan")))
except DiapipeError as err:
    log.error("coadd failed: %s", err)
    sys.exit(1)
