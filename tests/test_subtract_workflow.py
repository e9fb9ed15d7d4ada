"""Workflow: the subtract rule turns a calexp and its template_exp into a diffexp; a template
without overlap fails that job alone with an error naming the dataId; a changed subtract
setting reruns exactly the subtract job."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import wfutil
from diapipe.exposure import Exposure

sys.path.insert(0, str(Path(__file__).parent))
from subtract_synth import make_pair  # noqa: E402

pytestmark = pytest.mark.workflow
ALLOWED = ("--allowed-rules", "subtract")


def OVERLAY(**subtract):  # noqa: N802
    # the calexp itself is the science input (no fake injection in this test)
    return {"subtract": subtract, "fakes": {"enabled": False}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = wfutil.copy_workflow(tmp_path_factory.mktemp("subtract_wf"))
    for visit, overlap in ((20, True), (21, False)):
        s, t, _ = make_pair(192, 1.5, seed=visit, n_fakes=2)
        s.metadata["visit"] = visit
        if not overlap:
            t.image[:] = np.nan
        for ds, e in (("calexp", s), ("template_exp", t)):
            p = wd / ("results/calexp/{v}/0.fits" if ds == "calexp" else "results/diff/{v}/0.template.fits").format(v=visit)
            p.parent.mkdir(parents=True, exist_ok=True)
            e.write(p)
    wfutil.write_yaml(wd / "sub.yaml", OVERLAY(spatial_order=0))
    return wd


def _run(wd, *args, check=False):
    # targets and flags first: --configfile takes every argument after it
    return wfutil.run(wd, *args, "--cores", "1", *ALLOWED, "--configfile", "config/config.yaml", "sub.yaml",
                      check=check)


def test_subtract_rule_and_bad_template(workdir):
    r = _run(workdir, "results/diff/20/0.fits", "results/diff/21/0.fits", "--keep-going")
    assert r.returncode != 0  # visit 21 has no overlap
    d = Exposure.read(workdir / "results/diff/20/0.fits")
    assert d.metadata["visit"] == 20 and d.metadata["SUBMETH"] == "AL"
    assert [h.name for h in d.extra_hdus][:3] == ["KERNEL", "KGRID", "KSUMMAP"]
    assert not (workdir / "results/diff/21/0.fits").exists()
    log = (workdir / "logs/subtract/visit21_detector0.log").read_text()
    assert "does not overlap" in log and "visit=21" in log and "Traceback" not in log
    assert (workdir / "benchmarks/subtract/visit20_detector0.tsv").exists()


def test_changed_setting_reruns_subtract(workdir):
    target = "results/diff/20/0.fits"
    _run(workdir, target)
    assert "Nothing to be done" in _run(workdir, target, "-n").stdout
    wfutil.write_yaml(workdir / "sub.yaml", OVERLAY(spatial_order=0, decorrelate=False))
    dry = _run(workdir, target, "-n").stdout
    assert "subtract" in dry and "Nothing to be done" not in dry
    _run(workdir, target)  # (check the product, not the exit status of the summary hook)
    assert Exposure.read(workdir / target).metadata["DECORR"] is False
