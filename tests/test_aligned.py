"""diapipe.aligned on a handful of real SAAO KB13475 frames (no sky WCS): alignment, template, subtraction quality."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from diapipe import aligned, masks
from diapipe.exposure import Exposure

REPO = Path(__file__).resolve().parents[1]
FRAMES = REPO / "config" / "saao-frames.tsv"
DATA = REPO.parent / "shared" / "data" / "saao-kb13475" / "images"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"SAAO frames not present in {DATA}")


def test_frames_table_in_time_order():
    t = aligned.frames_table(str(DATA / "AKB13475I000[1-5].fits"))
    assert list(t["visit"]) == [1, 2, 3, 4, 5]
    assert np.all(np.diff(t["mjd"]) > 0) and set(t["band"]) == {"I"}
    full = pd.read_csv(FRAMES, sep="\t")  # the committed table lists the whole series
    assert len(full) == 173 and full["visit"].is_unique and (full["mjd"].diff().dropna() >= 0).all()


def test_series_on_three_frames(tmp_path):
    """Three frames from three nights: aligned to < 0.15 px, subtracted to near the noise.

    Open problem (measured, not asserted here): a few frames subtract badly (robust residual std
    8.9 sigma for frame 61 against a 3-frame template, 13 for frame 13 in the nightly run, and
    frame 128 leaves 0.2% of its pixels unmasked); aligned.run_series leaves such frames out of
    association when they flood with diaSources or their forced fluxes.
    """
    t = pd.read_csv(FRAMES, sep="\t")
    t["path"] = [str(REPO / p) for p in t["path"]]
    t = t[t["visit"].isin([1, 31, 121])]
    s = aligned.run_series(t, tmp_path, {"n_best": 2, "min_detections": 2}, title="SAAO test")
    assert s["aligned"] == 3 and s["subtracted"] == 3
    assert s["align_rms_px_median"] < 0.15  # measured 0.06 px on bright matched stars
    assert 3.0 < s["template_seeing_px"] < 6.0  # PFWHM of these frames is 4.5-6 px
    in_template = set(fits.getheader(tmp_path / "template.fits")["FRAMES"].split(","))
    visit_frame = {int(v): Path(p).name for v, p in zip(t["visit"], t["path"])}
    rstds, lows = [], []
    for p in sorted((tmp_path / "diff").glob("*[0-9].fits")):
        d = Exposure.read(p)
        ok = (d.mask & masks.bits(*masks.BAD_PLANES)) == 0
        z = d.image[ok] / np.sqrt(d.variance[ok])
        rstd = 1.4826 * np.median(np.abs(z - np.median(z)))
        rstds.append(rstd)
        # a frame inside its own (2-frame, equal-weight) template cancels half of its own noise:
        # f1 - (f1 + f2)/2 has std 0.71 sigma against a predicted 1.22 sigma (ratio ~0.6)
        lows.append(0.45 if visit_frame[int(p.stem)] in in_template else 0.7)
        # frames are offset by up to ~140 px (NO_DATA outside the overlap), saturated bulge stars grown
        assert ok.mean() > 0.5
        assert (p.with_suffix(".reg")).exists()
    # crowded bulge field: residuals of bright stars push the robust std above 1
    assert all(lo < r < 1.6 for r, lo in zip(rstds, lows)), (rstds, lows)
    assert json.loads((tmp_path / "summary.json").read_text())["frames"] == 3
    html = (tmp_path / "report" / "index.html").read_text()
    assert "SAAO test" in html and "lightcurves" in html
