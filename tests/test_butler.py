"""The dataset table: dataId -> path, shared by the rules and Python code."""

from pathlib import Path

import pytest
import yaml

import diapipe
from diapipe.butler import Butler
from diapipe.config import load_schema

REPO = Path(__file__).resolve().parent.parent
# "section" names a report figure folder (report_figures), not an image dimension
DATA_ID_KEYS = {"visit", "detector", "band", "patch", "seq", "section"}


@pytest.fixture(scope="module")
def config_datasets() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]


def test_get_formats_the_template():
    b = Butler({"calexp": "results/calexp/{visit}/{detector}.fits", "template": "results/template/{band}/{patch}.fits"})
    assert b.get("calexp", visit=3, detector=1) == Path("results/calexp/3/1.fits")
    assert b.get("template", band="r", patch=7) == Path("results/template/r/7.fits")
    assert b.keys("template") == ["band", "patch"]
    # Extra dataId keys (a full {visit, detector, band} dataId) are ignored.
    assert b.get("calexp", visit=3, detector=1, band="r") == Path("results/calexp/3/1.fits")


def test_root_prefix():
    b = Butler({"refcat": "results/sim/refcat.parquet"}, root="/data/run1")
    assert b.get("refcat") == Path("/data/run1/results/sim/refcat.parquet")


def test_missing_data_id_key_is_named():
    b = Butler({"calexp": "results/calexp/{visit}/{detector}.fits"})
    with pytest.raises(KeyError, match=r"\['detector'\]"):
        b.get("calexp", visit=3)


def test_unknown_dataset_type_lists_known():
    b = Butler({"calexp": "x/{visit}.fits"})
    with pytest.raises(KeyError, match="unknown dataset type 'calexpp'.*calexp"):
        b.get("calexpp", visit=1)


def test_module_get_uses_the_default_table(config_datasets):
    assert diapipe.get("calexp", visit=3, detector=1) == Path(config_datasets["calexp"].format(visit=3, detector=1))
    cfg = {"datasets": {"calexp": "elsewhere/{visit}-{detector}.fits"}}
    assert diapipe.get("calexp", config=cfg, visit=3, detector=1) == Path("elsewhere/3-1.fits")


def test_schema_default_equals_config_yaml(config_datasets):
    """The README, the schema default and config/config.yaml agree on every default path."""
    assert load_schema()["properties"]["datasets"]["default"] == config_datasets


def test_default_table_is_sane(config_datasets):
    templates = list(config_datasets.values())
    assert len(set(templates)) == len(templates), "two dataset types share a path"
    for name, template in config_datasets.items():
        keys = set(Butler(config_datasets).keys(name))
        assert keys <= DATA_ID_KEYS, f"{name}: unknown dataId keys {keys - DATA_ID_KEYS}"
        assert template.startswith("results/"), f"{name}: products live under results/"
    # The public interface of DESIGN.md ("Products and their default paths").
    expected = {
        "calexp": "results/calexp/{visit}/{detector}.fits",
        "src": "results/calexp/{visit}/{detector}.src.parquet",
        "warp": "results/warp/{band}/{patch}/{visit}.fits",
        "template": "results/template/{band}/{patch}.fits",
        "diffexp": "results/diff/{visit}/{detector}.fits",
        "diaSrc": "results/diff/{visit}/{detector}.diaSrc.parquet",
        "diaSources": "results/diaSources.parquet",
        "realbogus_model": "results/realbogus/model.skops",
        "realbogus_metrics": "results/realbogus/metrics.json",
        "diaObjects": "results/diaObjects.parquet",
        "lightcurves": "results/lightcurves.parquet",
        "report": "results/report/index.html",
        "refcat": "results/sim/refcat.parquet",
        "raw": "results/sim/raw/{visit}/{detector}.fits",
    }
    for name, template in expected.items():
        assert config_datasets[name] == template, name


def test_wildcard_patterns_round_trip(config_datasets):
    """Given '{name}' strings (as common.smk's path() does) the template comes back unchanged: a Snakemake pattern."""
    b = Butler(config_datasets)
    for name, template in config_datasets.items():
        wildcards = {k: "{" + k + "}" for k in b.keys(name)}
        assert str(b.get(name, **wildcards)) == str(Path(template))
