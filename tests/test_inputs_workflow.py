"""inputs.source 'table' through Snakemake: the user's raw frames from an exposures table.

The raw science and calibration frames and the reference catalog of the
finished tiny simulated run (the session's ``tiny_run``) are copied to a
"user" directory under other names, listed in a table whose cells are mostly
blank (so visit, detector, band, type, MJD and exposure time come from the FITS
headers), and run to calexps with ``inputs.source: table``.  The calexps must
be the simulate route's, pixel for pixel: the same frames through the same
stages give the same bytes, only the raw file name in the header differs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from diapipe import config as dpconfig
from diapipe.skymap import SkyMap
from wfutil import copy_workflow, run, write_yaml

pytestmark = pytest.mark.workflow

DETECTOR = 0


def _user_data(tiny_run, wf: Path, visits) -> Path:
    """Copy the tiny run's frames of one detector to wf/data under camera-like names; write the table."""
    cfg = dpconfig.load(tiny_run.workdir / "config" / "config.yaml", tiny_run.config)
    sim = cfg["simulate"]
    data = wf / "data"
    data.mkdir()
    rows = ["# the tiny survey's frames of detector 0; blank cells come from the FITS headers",
            "path\tvisit\tdetector\tband\ttype"]
    for v in visits:
        dst = data / f"SIM{v:05d}_ccd{DETECTOR}.fits"
        shutil.copy2(tiny_run.path("raw", visit=v, detector=DETECTOR), dst)
        # Visit from the table, the rest from EXPNUM/DETECTOR/FILTER/OBSTYPE.
        rows.append(f"data/{dst.name}\t{v}\t\t\t")
    for kind in ("bias", "dark", "flat"):
        for s in range(sim[f"n_{kind}"]):
            ids = {"detector": DETECTOR, "seq": s, "band": sim["bands"][0]}
            dst = data / f"{kind}{s}_ccd{DETECTOR}.fits"
            shutil.copy2(tiny_run.path(f"raw_{kind}", **ids), dst)
            # Flats: everything from the header; biases say their type, darks their detector.
            cells = {"bias": "\t\t\tbias", "dark": f"\t{DETECTOR}\t\t", "flat": "\t\t\t"}[kind]
            rows.append(f"data/{dst.name}\t{cells}")
    shutil.copy2(tiny_run.path("refcat"), data / "refcat.parquet")
    (wf / "exposures.tsv").write_text("\n".join(rows) + "\n")
    sm = SkyMap.from_config(cfg["skymap"], sim)  # the simulated run's tract, given explicitly
    return write_yaml(wf / "table.yaml", {
        "inputs": {"source": "table", "exposures": "exposures.tsv", "refcat": "data/refcat.parquet"},
        "skymap": {"ra": sm.ra0, "dec": sm.dec0, "n_patches_x": sm.n_patches_x, "n_patches_y": sm.n_patches_y},
    })


def test_table_route_reproduces_the_simulated_calexps(tiny_run, tmp_path):
    cfg = dpconfig.load(tiny_run.workdir / "config" / "config.yaml", tiny_run.config)
    n_t = cfg["simulate"]["n_template_visits"]
    visits = [0, n_t]  # one template and one science visit
    wf = copy_workflow(tmp_path / "wf")
    overlay = _user_data(tiny_run, wf, visits)
    configs = ["--configfile", wf / "config" / "tiny.yaml", overlay]

    # The whole DAG builds from the table, and the simulate stage is not in it.
    dry = run(wf, "-n", "--cores", "2", *configs, timeout=170)
    assert dry.returncode == 0, dry.stdout[-3000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout, flags=re.M))
    assert not [r for r in jobs if r.startswith("simulate")], jobs
    assert int(jobs["isr"]) == 2 and int(jobs["characterize"]) == 2 and int(jobs["master_flat"]) == 1, jobs
    assert {"subtract", "associate", "report"} <= set(jobs), jobs

    targets = [f"results/calexp/{v}/{DETECTOR}.fits" for v in visits]
    proc = run(wf, "--cores", "2", *configs, "--", *targets, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert not (wf / "results" / "sim").exists()  # nothing simulated
    for v in visits:
        ours = wf / "results" / "calexp" / str(v) / f"{DETECTOR}.fits"
        sim = tiny_run.path("calexp", visit=v, detector=DETECTOR)
        with fits.open(ours) as a, fits.open(sim) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for ha, hb in zip(a, b):
                if ha.data is not None:
                    assert np.array_equal(ha.data, hb.data, equal_nan=True), (v, ha.name)
                differ = {k for k in set(ha.header) | set(hb.header)
                          if k not in ("COMMENT", "HISTORY", "") and ha.header.get(k) != hb.header.get(k)}
                assert differ <= {"RAWFILE", "CHECKSUM", "DATASUM"}, (v, ha.name, differ)
            assert a[0].header["RAWFILE"].endswith(f"SIM{v:05d}_ccd{DETECTOR}.fits")
        src_ours = pd.read_parquet(ours.with_suffix("").with_suffix(".src.parquet"))
        src_sim = pd.read_parquet(tiny_run.path("src", visit=v, detector=DETECTOR))
        pd.testing.assert_frame_equal(src_ours, src_sim)
        assert len(src_ours) > 5


def test_bad_table_stops_the_workflow_before_any_job(tiny_run, tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    overlay = _user_data(tiny_run, wf, [0])
    table = wf / "exposures.tsv"
    lines = table.read_text().splitlines()
    lines.append("data/missing.fits\t7\t0\tr\tobject")
    table.write_text("\n".join(lines) + "\n")
    proc = run(wf, "-n", "--cores", "2", "--configfile", wf / "config" / "tiny.yaml", overlay, timeout=170)
    assert proc.returncode != 0
    n = len(lines)  # the appended row's line number
    assert f"inputs.exposures: exposures.tsv line {n} (data/missing.fits), column 'path': no such file" in proc.stdout
    assert "Traceback" not in proc.stdout
