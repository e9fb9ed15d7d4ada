"""The whole chain on the tiny survey: wiring facts that no single stage test sees."""

from __future__ import annotations

import pandas as pd
import pytest

from diapipe import masks
from diapipe.exposure import Exposure

pytestmark = pytest.mark.workflow


def _science_and_template_visits(tiny_run):
    v = pd.read_parquet(tiny_run.path("truth_visits"))
    col = "is_template" if "is_template" in v else None
    tmpl = set(v.loc[v[col].astype(bool), "visit"]) if col else set()
    return sorted(set(v["visit"]) - tmpl), sorted(tmpl)


def test_only_science_visits_are_subtracted(tiny_run):
    science, templates = _science_and_template_visits(tiny_run)
    assert science and templates
    for v in templates:
        assert not tiny_run.path("diffexp", visit=v, detector=0).exists()
    dia = pd.read_parquet(tiny_run.path("diaSources"))
    assert set(dia["visit"]) <= set(science)


def test_fakes_are_injected_before_subtraction(tiny_run):
    """The diffexp carries the INJECTED plane: subtraction used calexp_fakes, as detection did."""
    science, _ = _science_and_template_visits(tiny_run)
    d = Exposure.read(tiny_run.path("diffexp", visit=science[0], detector=0))
    assert masks.is_set(d.mask, "INJECTED").sum() > 0


def test_chain_reaches_the_report(tiny_run):
    for ds in ("diaSources_scored", "diaObjects", "lightcurves", "association_metrics", "report"):
        assert tiny_run.path(ds).exists(), ds
    scored = pd.read_parquet(tiny_run.path("diaSources_scored"))
    assert "reliability" in scored and "isReliable" in scored
