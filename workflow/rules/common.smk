# Helpers shared by the rule files: config validation, the dataset table
# (Butler) and the lists of dataIds.  Python lives here and in the library only.
import os
import sys
from pathlib import Path

REPO = Path(workflow.basedir)
# Jobs (local, conda or SLURM) import the library from this checkout.
sys.path.insert(0, str(REPO))
# (update(), not os.environ[...] =: the linter would ask for an envvars: assertion.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        [str(REPO)]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
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


wildcard_constraints:
    visit=r"\d+",
    detector=r"\d+",
    seq=r"\d+",
    band=r"[A-Za-z0-9_]+",
    patch=r"\d+",


def path(dataset_type, **data_id):
    """Path (or Snakemake pattern, when given wildcards as '{name}') of a dataset."""
    if not data_id:
        data_id = {k: "{" + k + "}" for k in BUTLER.keys(dataset_type)}
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
    return int(base + factor * npix * 4 / 1e6 * 12)


def visits():
    """All science and template visit numbers of the simulated survey."""
    sim = config["simulate"]
    return list(range(sim["n_template_visits"] + sim["n_science_visits"]))


def detectors():
    return list(range(config["simulate"]["n_detectors"]))


def bands():
    return list(config["simulate"]["bands"])


def raw_calib_inputs(kind, detector, band=None):
    """Paths of the raw calibration frames of a kind ('bias', 'dark', 'flat')."""
    seqs = range(config["simulate"]["n_" + kind])
    if kind == "flat":
        return [path("raw_flat", band=band, detector=detector, seq=s) for s in seqs]
    return [path("raw_" + kind, detector=detector, seq=s) for s in seqs]


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


def all_targets():
    targets = []
    targets += simulate_targets()
    targets += isr_targets()
    targets += characterize_targets()
    targets += coadd_targets()
    targets += template_exp_targets()
    return targets
