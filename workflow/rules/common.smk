# Helpers shared by the rule files (config validation, the dataset table
# (Butler), the lists of dataIds and every stage's input functions and
# targets; Snakemake's linter wants functions apart from rules).  Python
# lives here and in the library only.
import os
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(workflow.basedir)
# Jobs (local, conda or SLURM) import the library from this checkout.
sys.path.insert(0, str(REPO))
# (update(), not os.environ[...] =: the linter would ask for an envvars: assertion.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        [
            str(REPO),
            *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p),
        ]
    )
)

from diapipe import config as dpconfig
from diapipe.butler import Butler

# Rejects a bad config before any job starts, naming the key.
try:
    dpconfig.validate(config)
except dpconfig.ConfigError as err:
    raise WorkflowError(str(err))

BUTLER = Butler(config["datasets"])

# inputs.source 'table': the user's raw frames come from the exposures table
# (diapipe.inputs; blank cells filled from FITS headers, validated here, before
# any job), the reference catalog from inputs.refcat, and the simulate stage
# does not run (Snakefile).  raw, raw_bias, raw_dark and raw_flat then resolve
# through the table instead of their path templates (path() below).
EXPOSURES = None
TABLE_DATASETS = ("raw", "raw_bias", "raw_dark", "raw_flat")
if config["inputs"]["source"] == "table":
    from diapipe import inputs as dpinputs

    try:
        EXPOSURES = dpinputs.read_exposure_table(config["inputs"]["exposures"])
        dpinputs.check_calibrations(
            EXPOSURES, config["inputs"]["exposures"], config["calib"]["min_frames"]
        )
    except dpinputs.ExposureTableError as err:
        raise WorkflowError(f"inputs.exposures: {err}")
    if not config["inputs"].get("refcat"):
        raise WorkflowError(
            "inputs.source is 'table' but inputs.refcat is not set: give the reference "
            "catalog (Parquet with id, ra, dec [deg], ra_err, dec_err [mas], <band>_mag)"
        )
    sky = config["skymap"]
    if (
        sky["ra"] is None
        or sky["dec"] is None
        or min(sky["n_patches_x"], sky["n_patches_y"]) <= 0
    ):
        raise WorkflowError(
            "inputs.source is 'table': set skymap.ra, skymap.dec (deg) and skymap.n_patches_x, "
            "n_patches_y (the tract over your field); the defaults come from the simulated survey"
        )
    BUTLER.datasets["refcat"] = config["inputs"]["refcat"]


wildcard_constraints:
    visit=r"\d+",
    detector=r"\d+",
    seq=r"\d+",
    band=r"[A-Za-z0-9_]+",
    patch=r"\d+",


def path(dataset_type, **data_id):
    """Path (or Snakemake pattern, when given wildcards as '{name}') of a dataset."""
    if EXPOSURES is not None and dataset_type in TABLE_DATASETS:
        # Raw frames listed in the exposures table: an input function when given no dataId.
        if not data_id:
            return lambda w: dpinputs.lookup(EXPOSURES, dataset_type, **dict(w.items()))
        return dpinputs.lookup(EXPOSURES, dataset_type, **data_id)
    if not data_id:
        data_id = {k: f"{{{k}}}" for k in BUTLER.keys(dataset_type)}
    return str(BUTLER.get(dataset_type, **data_id))


def log_path(rule_name, **data_id):
    parts = [f"{k}{v}" for k, v in data_id.items()] or ["all"]
    return f"logs/{rule_name}/" + "_".join(parts) + ".log"


def bench_path(rule_name, **data_id):
    parts = [f"{k}{v}" for k, v in data_id.items()] or ["all"]
    return f"benchmarks/{rule_name}/" + "_".join(parts) + ".tsv"


def detector_mem_mb(factor=1.0, base=500):
    """Memory (MB) for a per-detector job, from the detector size: factor x 4-byte images."""
    sim = config["simulate"]
    npix = sim["nx"] * sim["ny"]
    if EXPOSURES is not None and EXPOSURES["npix"].max() > 0:
        npix = int(EXPOSURES["npix"].max())  # the largest raw frame of the table
    return int(base + factor * npix * 4 / 1e6 * 12)


def visits():
    """All science and template visit numbers (of the simulated survey, or the exposures table)."""
    if EXPOSURES is not None:
        return dpinputs.visits(EXPOSURES)
    sim = config["simulate"]
    return list(range(sim["n_template_visits"] + sim["n_science_visits"]))


def detectors():
    if EXPOSURES is not None:
        return dpinputs.detectors(EXPOSURES)
    return list(range(config["simulate"]["n_detectors"]))


def bands():
    if EXPOSURES is not None:
        return dpinputs.bands(EXPOSURES)
    return list(config["simulate"]["bands"])


def raw_calib_inputs(kind, detector, band=None):
    """Paths of the raw calibration frames of a kind ('bias', 'dark', 'flat')."""
    if EXPOSURES is not None:
        return dpinputs.calib_paths(EXPOSURES, kind, detector, band)
    seqs = range(config["simulate"][f"n_{kind}"])
    if kind == "flat":
        return [path("raw_flat", band=band, detector=detector, seq=s) for s in seqs]
    return [path(f"raw_{kind}", detector=detector, seq=s) for s in seqs]


def simulate_targets():
    """Every product of the simulate stage (none when raws come from a table)."""
    if config["inputs"]["source"] != "simulate":
        return []
    tables = ("truth_visits", "truth_sources", "truth_fluxes", "truth_amps", "refcat")
    out = [path(n) for n in tables]
    for v in visits():
        for d in detectors():
            out += [path(n, visit=v, detector=d) for n in ("raw", "truth_exposure")]
    for d in detectors():
        out += raw_calib_inputs("bias", d) + raw_calib_inputs("dark", d)
        for b in bands():
            out += raw_calib_inputs("flat", d, b)
    return out


def science_calexp():
    """The science image subtraction and detection use: with fakes when fakes.enabled."""
    return path("calexp_fakes") if config["fakes"]["enabled"] else path("calexp")


def template_pool():
    """Visits that may go into a template (coadd.visits, or the simulated template visits)."""
    return set(config["coadd"]["visits"] or OVERLAPS.template_pool)


def detect_data_ids():
    """(visit, detector) of every difference exposure: science visits with a template.

    LSST subtracts every visit, but a template visit differenced against a
    coadd that contains it has correlated noise and a suppressed signal, which
    would bias completeness, real/bogus training and light curves; so only
    visits outside the template pool are subtracted.  When every visit is in
    the pool (user exposures without a plan) all visits are subtracted.
    (OVERLAPS comes from warp.smk; this is only called after it is included.)
    """
    pool = template_pool()
    with_template = [
        (v, d) for v in visits() for d in detectors() if OVERLAPS.patches_of(v, d)
    ]
    science = [(v, d) for v, d in with_template if v not in pool]
    return science or with_template


def all_targets():
    # A frame series without sky WCS runs as one job (aligned.smk).
    if config["inputs"]["source"] == "aligned_frames":
        return [path("aligned_summary")]
    targets = []
    targets += simulate_targets()
    targets += isr_targets()
    targets += characterize_targets()
    targets += coadd_targets()
    targets += template_exp_targets()
    targets += subtract_targets()
    targets += detect_targets()
    targets += completeness_targets()
    targets += realbogus_targets()
    targets += associate_targets()
    targets += [path("report")]
    targets += ds9_targets()
    return targets


def calexp_data_ids():
    """(visit, detector) of every calexp (science and template visits; the table's object frames)."""
    if EXPOSURES is not None:
        return dpinputs.data_ids(EXPOSURES)
    return [(v, d) for v in visits() for d in detectors()]


# ---- isr (rules in isr.smk)


def isr_table_params():
    """{'band': ...} for the isr rule with an exposures table (the table may name a band the header lacks)."""
    if EXPOSURES is None:
        return {}
    bands_of = dpinputs.visit_bands(EXPOSURES)
    return {"band": lambda w: bands_of[int(w.visit)]}


def isr_targets():
    return [path("postisr", visit=v, detector=d) for v, d in calexp_data_ids()]


# ---- characterize (rules in characterize.smk)


def characterize_targets():
    out = []
    for v, d in calexp_data_ids():
        out += [path("calexp", visit=v, detector=d), path("src", visit=v, detector=d)]
    return out


# ---- warp (rules in warp.smk)


def warp_calexps(wildcards):
    """Calexps of the visit's detectors planned to reach the patch."""
    v, p = int(wildcards.visit), int(wildcards.patch)
    return [
        path("calexp", visit=v, detector=d) for d in OVERLAPS.detectors_on_patch(v, p)
    ]


def warp_targets():
    out = []
    for b in bands():
        for p in OVERLAPS.patches_in_band(b):
            out += [
                path("warp", band=b, patch=p, visit=v)
                for v in OVERLAPS.visits_on_patch(b, p)
            ]
    return out


# ---- coadd (rules in coadd.smk)


def coadd_pool(band, patch):
    pool = COADD["visits"] or OVERLAPS.template_pool
    on_patch = OVERLAPS.visits_on_patch(band, int(patch))
    return [v for v in on_patch if v in set(pool)]


def coadd_warps(wildcards):
    return [
        path("warp", band=wildcards.band, patch=wildcards.patch, visit=v)
        for v in coadd_pool(wildcards.band, wildcards.patch)
    ]


def band_pool_warps(wildcards):
    """{patch: [warp paths]} of the band's template pool on every patch (the common PSF's inputs)."""
    return {
        p: coadd_warps(SimpleNamespace(band=wildcards.band, patch=p))
        for p in OVERLAPS.patches_in_band(wildcards.band)
    }


def coadd_target_psf(wildcards):
    """The band's common PSF when coadds are homogenised, else nothing."""
    return [path("template_psf", band=wildcards.band)] if COADD["homogenize"] else []


def template_coadds(wildcards):
    """{patch: coadd path} for the patches planned under this exposure."""
    v, d = int(wildcards.visit), int(wildcards.detector)
    b = OVERLAPS.visit_band[v]
    return {p: path("template", band=b, patch=p) for p in OVERLAPS.patches_of(v, d)}


def coadd_targets():
    out = [path("skymap")]
    for b in bands():
        out += [path("template", band=b, patch=p) for p in OVERLAPS.patches_in_band(b)]
    return out


def template_exp_targets():
    return [
        path("template_exp", visit=v, detector=d)
        for v in visits()
        for d in detectors()
        if OVERLAPS.patches_of(v, d)
    ]


# ---- subtract (rules in subtract.smk)


def subtract_targets():
    """Science visits only (detect_data_ids() in common.smk says why)."""
    return [path("diffexp", visit=v, detector=d) for v, d in detect_data_ids()]


# ---- detect (rules in detect.smk)


def detect_targets():
    return [path("diaSources")]


# ---- fakes (rules in fakes.smk)


def fakes_truth_inputs(wildcards=None):
    """Truth tables (galaxy hosts, isolation, truth matching) exist only for the simulated survey."""
    if config["inputs"]["source"] != "simulate":
        return {}
    return {
        "truth_fluxes": path("truth_fluxes"),
        "truth_sources": path("truth_sources"),
    }


def completeness_targets():
    return [path("completeness"), path("completeness_plot")]


# ---- realbogus (rules in realbogus.smk)


def realbogus_model_file():
    """The model that scores: realbogus.model_path if set, else the one trained on this run."""
    return REALBOGUS["model_path"] or path("realbogus_model")


def realbogus_targets():
    targets = [path("diaSources_scored"), path("realbogus_evaluation")]
    if not REALBOGUS["model_path"]:
        targets += [path("realbogus_model"), path("realbogus_metrics")]
    return targets


# ---- associate (rules in associate.smk)


def associate_fakes_input(wildcards=None):
    """The fakes the completeness analysis matched (left out of association), when fakes are injected."""
    return {"fakes": path("completeness_fakes")} if config["fakes"]["enabled"] else {}


def forced_fakes_inputs(wildcards=None):
    """Each diffexp's fakes table (same order), subtracted before forced photometry."""
    if not config["fakes"]["enabled"]:
        return {}
    return {"fakes": [path("fakes", visit=v, detector=d) for v, d in detect_data_ids()]}


def associate_targets():
    return [
        path("diaObjects"),
        path("diaSources_associated"),
        path("association_metrics"),
        path("lightcurves"),
    ]


# ---- ds9 (rules in ds9.smk)


def ds9_targets():
    """A DS9 region file of diaSources for every difference image."""
    return [path("diaSrc_regions", visit=v, detector=d) for v, d in detect_data_ids()]
