"""The completeness analysis against simulation truth: the difference-image S/N of truth sources."""

import numpy as np
import pandas as pd
import pytest
from _detect_synth import make_diffexp

from diapipe import completeness, measure

FWHM, SIGMA = 3.5, 10.0


def _truth():
    """A flaring star (quiescent Q in the template visits 0 and 1, Q + B in visit 2), a SN that
    exploded between the two template visits, a mover and the SN's host galaxy."""
    ts = pd.DataFrame({"source_id": [1, 2, 3, 4], "kind": ["flare", "sn", "mover", "galaxy"],
                       "host_id": [-1, 4, -1, -1]})
    q, b = 40000.0, 3000.0  # e- (= nJy here: MAGZERO 31.4)
    rows = []
    for v in (0, 1, 2):
        rows.append((1, v, 0, 100.0, 100.0, q + (b if v == 2 else 0.0)))
        rows.append((4, v, 0, 300.0, 300.0, 50000.0))  # host
        if v >= 1:  # SN: absent from the truth before its explosion (visit 0)
            rows.append((2, v, 0, 300.4, 300.2, 1000.0 if v == 1 else 4000.0))
    rows.append((3, 2, 0, 200.0, 400.0, 2500.0))  # mover, only here in visit 2
    tf = pd.DataFrame(rows, columns=["source_id", "visit", "detector", "x", "y", "flux"])
    tf["flux_nJy"] = tf["flux"]
    return tf, ts, q, b


def test_truth_recovery_uses_the_flux_change_since_the_template():
    tf, ts, q, b = _truth()
    # the difference image holds only what changed: the flare's boost, the SN minus its
    # template-average flux (half of visit 1's 1000 e-), the mover
    diff = make_diffexp((512, 512), FWHM, SIGMA, [(100.0, 100.0, b), (300.4, 300.2, 4000.0 - 500.0),
                                                   (200.0, 400.0, 2500.0)], seed=3, visit=2, detector=0)
    dia, _, _ = measure.detect_and_measure(diff.copy())
    rec = completeness.truth_recovery(dia, tf, ts, {(2, 0): diff}, template_visits=[0, 1]).set_index("source_id")
    assert set(rec.index) == {1, 2, 3} and rec["detected"].all()
    assert rec.loc[1, "templateFlux_nJy"] == q and rec.loc[1, "fluxDiff_nJy"] == b
    assert rec.loc[2, "templateFlux_nJy"] == 500.0  # covered by both template visits (via its host)
    assert rec.loc[3, "templateFlux_nJy"] == 0.0
    # snrDiff is the S/N the difference image shows: the measured psfFlux / psfFluxErr of each
    # (noise in a measured S/N is +-1; the boost alone has S/N ~ 23, its total flux would claim ~ 330)
    for sid in (1, 2, 3):
        s = dia.iloc[int(np.argmin(np.hypot(dia["x"] - rec.loc[sid, "x"], dia["y"] - rec.loc[sid, "y"])))]
        measured = s["psfFlux"] / s["psfFluxErr"]
        assert abs(rec.loc[sid, "snrDiff"] - measured) < 3.0, (sid, rec.loc[sid, "snrDiff"], measured)


def test_template_visits_default_to_the_visits_without_a_difference_image():
    tf, ts, q, b = _truth()
    diff = make_diffexp((512, 512), FWHM, SIGMA, [(100.0, 100.0, b)], seed=4, visit=2, detector=0)
    dia, _, _ = measure.detect_and_measure(diff.copy())
    rec = completeness.truth_recovery(dia, tf, ts, {(2, 0): diff}).set_index("source_id")
    assert rec.loc[1, "fluxDiff_nJy"] == b


def test_fakes_measured_next_to_a_bad_column_are_not_clean():
    """A fake whose core touches BAD pixels loses part of its PSF fit: detected, flagged, not 'clean'."""
    from diapipe import masks

    fk = pd.DataFrame({"fakeId": [1, 2], "visit": [2, 2], "detector": [0, 0], "x": [100.0, 300.0],
                       "y": [100.0, 300.0], "flux": [3000.0, 3000.0], "flux_nJy": [3000.0, 3000.0],
                       "kind": ["isolated", "isolated"]})
    diff = make_diffexp((400, 400), FWHM, SIGMA, [(100.0, 100.0, 3000.0), (300.0, 300.0, 3000.0)], seed=5,
                        visit=2, detector=0)
    bad = np.zeros(diff.shape, bool)
    bad[:, 101:104] = True  # a bad column band one pixel from the first fake's centre
    masks.set_plane(diff.mask, bad, "BAD")
    dia, _, _ = measure.detect_and_measure(diff.copy())
    m = completeness.match_fakes(dia, fk, 2.0).set_index("fakeId")
    assert m["detected"].all()
    assert not m.loc[1, "clean"] and m.loc[2, "clean"]


def test_faint_fake_matches_within_its_centroid_error():
    """A faint detection 2.6 px from its fake (match radius 3 x 1.13 px at xErr = yErr = 0.8 px) is the fake;
    a bright one as far off is not, and the radius never exceeds match_radius_max."""
    from diapipe.completeness import classify, match_fakes, match_radii

    fakes = pd.DataFrame({"fakeId": [1, 2, 3], "visit": 1, "detector": 0, "x": [100.0, 300.0, 500.0],
                          "y": [100.0, 300.0, 500.0], "flux": 1000.0})
    dia = pd.DataFrame({"diaSourceId": [11, 12, 13], "visit": 1, "detector": 0, "x": [102.6, 302.6, 505.0],
                        "y": [100.0, 300.0, 500.0], "xErr": [0.8, 0.1, 5.0], "yErr": [0.8, 0.1, 5.0],
                        "snr": [5.2, 80.0, 3.0], "isNegative": False, "isDipole": False, "psfFlux": 1.0,
                        "psfFluxErr": 1.0})
    r = match_radii(dia, 2.0, 3.0, 4.0)
    assert r == pytest.approx([3 * np.hypot(0.8, 0.8), 2.0, 4.0])
    cls = classify(dia, fakes, radius=2.0, nsigma=3.0, radius_max=4.0)
    assert cls["truthClass"].tolist() == ["fake", "false", "false"]
    assert cls["truthId"].tolist() == [1, -1, -1]
    m = match_fakes(dia, fakes, 2.0, nsigma=3.0, radius_max=4.0)
    assert m["detected"].tolist() == [True, False, False]
    # a failed centroid (no error) matches within the largest radius
    nan = dia.assign(xErr=[np.nan, 0.1, 5.0], yErr=[np.nan, 0.1, 5.0])
    assert match_radii(nan, 2.0, 3.0, 4.0)[0] == 4.0
    # the fixed radius alone (nsigma 0, the former behaviour) misses the faint one
    assert classify(dia, fakes, radius=2.0)["truthClass"].tolist() == ["false"] * 3


def test_blend_of_a_host_fake_and_a_supernova_on_the_nucleus_is_real():
    """A host fake 2.2 px and a supernova 2.4 px on either side of their galaxy's nucleus: the blend's centroid
    falls on the nucleus, beyond the match radius of both.  It takes the nearer of the two galaxy's guests
    within match_radius_max (a galaxy does not vary); a residual at a galaxy hosting nothing within 4 px
    stays an artefact."""
    from diapipe.completeness import classify

    ts = pd.DataFrame({"source_id": [1, 2, 3], "kind": ["galaxy", "sn", "galaxy"], "host_id": [np.nan, 1.0, np.nan]})
    tf = pd.DataFrame({"source_id": [1, 2, 3], "visit": 1, "detector": 0, "x": [100.3, 102.8, 400.0],
                       "y": [100.0, 100.0, 400.0]})
    fakes = pd.DataFrame({"fakeId": [7, 8], "visit": 1, "detector": 0, "x": [98.25, 405.0], "y": [100.0, 400.0],
                          "hostId": [1, 3], "flux": 1000.0})
    dia = pd.DataFrame({"diaSourceId": [11, 12], "visit": 1, "detector": 0, "x": [100.4, 400.2],
                        "y": [100.0, 400.0], "xErr": 0.05, "yErr": 0.05, "snr": 40.0, "isNegative": False,
                        "isDipole": False})
    cls = classify(dia, fakes, tf, ts, radius=2.0, nsigma=3.0, radius_max=4.0)
    assert cls["truthClass"].tolist() == ["fake", "artefact"]  # the second galaxy's fake is 4.8 px away
    assert cls["truthId"].tolist() == [7, 3]
    # without the fake, the supernova
    cls = classify(dia, fakes.iloc[1:], tf, ts, radius=2.0, nsigma=3.0, radius_max=4.0)
    assert cls["truthClass"].tolist() == ["transient", "artefact"] and cls["truthId"].iloc[0] == 2
    # a star is not a host: the same geometry around a star stays an artefact
    cls = classify(dia, fakes.iloc[1:], tf, ts.assign(kind=["star", "sn", "galaxy"]), radius=2.0, nsigma=3.0,
                   radius_max=4.0)
    assert cls["truthClass"].tolist() == ["artefact", "artefact"]
