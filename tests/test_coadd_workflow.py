"""The warp/coadd/template_exp rules on the tiny simulated survey, checked against its truth."""

import shutil

import numpy as np
import pandas as pd
import pytest
import sep
import yaml

from diapipe import masks
from diapipe.exposure import Exposure
from diapipe.skymap import SkyMap
from wfutil import run

pytestmark = pytest.mark.workflow


def _templates(tiny_run):
    return sorted((tiny_run.workdir / "results" / "template").glob("*/*.fits"))


def test_templates_from_template_visits(tiny_run):
    visits = pd.read_parquet(tiny_run.path("truth_visits"))
    tvis = set(visits.loc[visits["is_template"], "visit"])
    paths = _templates(tiny_run)
    sm = SkyMap.read(tiny_run.path("skymap"))
    assert len(paths) == sm.n_patches  # the tiny tract is all covered
    for p in paths:
        co = Exposure.read(p)
        used = {int(v) for v in co.metadata["VISITS"].split(",")}
        assert used <= tvis and co.metadata["NVISITS"] >= 2
        assert co.metadata["BUNIT"] == "nJy" and co.psf is not None
        # the coadd's seeing lies within its inputs' measured seeing (FWHM estimators agree)
        see = [Exposure.read(tiny_run.path("calexp", visit=v, detector=0)).metadata["SEEING"] for v in used]
        assert min(see) * 0.9 < co.metadata["SEEING"] < max(see) * 1.1


def test_template_exp_fluxes_and_positions_match_truth(tiny_run):
    """Static stars in each template_exp: truth fluxes (e-) and positions of that exposure."""
    visits = pd.read_parquet(tiny_run.path("truth_visits"))
    sources = pd.read_parquet(tiny_run.path("truth_sources"))
    fluxes = pd.read_parquet(tiny_run.path("truth_fluxes"))
    stars = set(sources.loc[sources["kind"] == "star", "source_id"])
    ratios, dpos = [], []
    for v in visits["visit"]:
        for d in (0, 1):
            t = Exposure.read(tiny_run.path("template_exp", visit=v, detector=d))
            cx = Exposure.read(tiny_run.path("calexp", visit=v, detector=d))
            assert t.metadata["MAGZERO"] == cx.metadata["MAGZERO"] and t.shape == cx.shape
            assert t.metadata["COVERAGE"] > 0.95
            f = fluxes[(fluxes["visit"] == v) & (fluxes["detector"] == d)]
            f = f[f["source_id"].isin(stars)]
            x, y, fe = f["x"].to_numpy(), f["y"].to_numpy(), f["flux"].to_numpy()
            dd = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
            np.fill_diagonal(dd, np.inf)
            # bright, unsaturated, isolated from anything brighter than 1% of them
            near = (dd < 25) & (fe[None, :] > 0.01 * fe[:, None])
            sel = (fe > 2e4) & (fe < 3e5) & ~near.any(axis=1) & (x > 25) & (x < t.shape[1] - 25) & (y > 25) & (y < t.shape[0] - 25)
            bad = masks.is_set(t.mask, *masks.BAD_PLANES)
            ap, _, fl = sep.sum_circle(t.image.astype(float), x[sel], y[sel], 15.0, mask=bad)
            xw, yw, fw = sep.winpos(t.image.astype(float), x[sel], y[sel], np.full(sel.sum(), 2.0), mask=bad)
            ok = (fl == 0) & (fw == 0)
            ratios += list(ap[ok] / fe[sel][ok])
            dpos += list(np.hypot(xw[ok] - x[sel][ok], yw[ok] - y[sel][ok]))
    ratios, dpos = np.array(ratios), np.array(dpos)
    assert len(ratios) >= 20
    # Zero points of the template visits and of this visit are each fitted from the 10-20 refcat
    # stars of a tiny 512^2 detector (~1% each), and a 15 px aperture misses ~1% of the Moffat
    # wings of the twice-resampled template PSF: 3% bounds their sum (measured 0.980 once).
    assert np.median(ratios) == pytest.approx(1.0, abs=0.03), np.median(ratios)
    # positions: template visits' and this visit's fitted WCS both enter; the rms tells the whole chain
    rms_mas = np.sqrt(np.mean(dpos**2) / 2) * 200
    assert rms_mas < 30, rms_mas


def test_template_selection_matching_no_visit_is_one_clear_error(tiny_run, tmp_path):
    """An MJD range with no visit: each coadd job fails with one DiapipeError line, no template."""
    wf = tmp_path / "wf"
    shutil.copytree(tiny_run.workdir, wf, symlinks=True,
                    ignore=shutil.ignore_patterns(".snakemake", "template", "diff", "sim", "postisr", "logs"))
    cfg = yaml.safe_load((wf / "config" / "tiny.yaml").read_text())
    cfg["coadd"] = {"select": "mjd_range", "mjd_min": 1.0, "mjd_max": 2.0}
    (wf / "bad.yaml").write_text(yaml.safe_dump(cfg))
    targets = [str(p.relative_to(tiny_run.workdir)) for p in _templates(tiny_run)[:2]]
    proc = run(wf, "--cores", "2", "--configfile", "bad.yaml", "--allowed-rules", "coadd", "--keep-going",
               "--", *targets, timeout=300)
    assert proc.returncode != 0
    for t in targets:
        assert not (wf / t).exists()
    logs = sorted((wf / "logs" / "coadd").glob("*.log"))
    assert len(logs) == 2
    for lg in logs:
        text = lg.read_text()
        assert "matches no visit" in text and "mjd_min=1.0" in text and "Traceback" not in text
