"""Workflow: master calibrations and ISR run under Snakemake; bad raws fail alone.

A truncated raw, a raw without EXPTIME, one without FILTER and one of the wrong
shape each make their own isr job fail with one clear error naming the file and
the dataId; with --keep-going the good exposure still gets its postisr.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

import isr_fakes as F
import wfutil
from diapipe import masks
from diapipe.exposure import Exposure

pytestmark = pytest.mark.workflow

OVERLAY = {"simulate": {"n_detectors": 1, "n_bias": 3, "n_dark": 2, "n_flat": 3, "bands": ["r"]}}
VISITS = range(5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workflow copy whose raws (science and calibration) are synthetic contract frames
    (tests/isr_fakes.py) written where the simulator would put them; Snakemake runs only
    the calib and isr rules, so the raws are taken as given."""
    wd = wfutil.copy_workflow(tmp_path_factory.mktemp("isr_wf"))
    wfutil.write_yaml(wd / "small.yaml", OVERLAY)
    cam = F.Camera(seed=11)
    zero = np.zeros((cam.ny, cam.nx))
    sim = OVERLAY["simulate"]
    for kind, n in (("bias", sim["n_bias"]), ("dark", sim["n_dark"]), ("flat", sim["n_flat"])):
        for s in range(n):
            sub = f"flat/r/0/{s}" if kind == "flat" else f"{kind}/0/{s}"
            p = wd / f"results/sim/calib/{sub}.fits"
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "flat":
                cam.raw(zero + 20000.0, p, exptime=5.0, obstype="flat", band="r", seed=100 + s)
            else:
                cam.raw(zero, p, exptime=300.0 if kind == "dark" else 0.0, obstype=kind,
                        seed=(200 if kind == "dark" else 300) + s)
    for v in VISITS:
        p = wd / f"results/sim/raw/{v}/0.fits"
        p.parent.mkdir(parents=True, exist_ok=True)
        cam.raw(F.scene(), p, exptime=30.0, seed=v, n_cr=5, header_extra={"EXPNUM": v})
    return wd


def _run(wd, *args):
    return wfutil.run(wd, "--cores", "2", "--configfile", wfutil.tiny_config(), "small.yaml",
                      "--allowed-rules", "master_bias", "master_dark", "master_flat", "isr", *args)


def _edit(path, fn):
    with fits.open(path) as h:
        data, header = h[0].data.copy(), h[0].header.copy()
    data, header = fn(data, header)
    fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)


def test_bad_raws_fail_alone_with_keep_going(workdir):
    wd = workdir
    raw = wd / "results/sim/raw"
    # 1: truncated; 2: no EXPTIME; 3: no FILTER; 4: wrong shape (columns cut off).
    p1 = raw / "1/0.fits"
    p1.write_bytes(p1.read_bytes()[:30000])
    _edit(raw / "2/0.fits", lambda d, h: (d, (h.remove("EXPTIME"), h)[1]))
    _edit(raw / "3/0.fits", lambda d, h: (d, (h.remove("FILTER"), h)[1]))
    _edit(raw / "4/0.fits", lambda d, h: (d[:, :-40], h))
    targets = [f"results/postisr/{v}/0.fits" for v in range(5)]
    proc = _run(wd, "--keep-going", "--", *targets)
    assert proc.returncode != 0, proc.stdout[-3000:]
    good = wd / "results/postisr/0/0.fits"
    assert good.exists(), proc.stdout[-4000:]
    exp = Exposure.read(good)
    assert exp.shape == (F.NY, F.NX) and exp.metadata["visit"] == 0
    assert masks.is_set(exp.mask, "BAD").any()
    expected = {1: "truncated", 2: "EXPTIME", 3: "FILTER", 4: "outside the raw array"}
    for v, word in expected.items():
        assert not (wd / f"results/postisr/{v}/0.fits").exists()
        log = (wd / f"logs/isr/visit{v}_detector0.log").read_text()
        assert word in log, log[-2000:]
        assert f"results/sim/raw/{v}/0.fits" in log and f"visit={v}" in log and "detector=0" in log, log[-2000:]
        # One clear line, not a numpy traceback from deep inside.
        err = [ln for ln in log.splitlines() if "DiapipeError" in ln]
        assert len(err) >= 1, log[-2000:]
    # No partial files left beside the outputs.
    assert not list((wd / "results/postisr").rglob("*.tmp*"))
    # Masters were made once per detector/band.
    assert (wd / "results/calib/flat/r/0.fits").exists()
    f = Exposure.read(wd / "results/calib/flat/r/0.fits")
    assert abs(np.median(f.image[f.mask == 0]) - 1) < 1e-3
