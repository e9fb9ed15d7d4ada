"""Config validation: defaults filled, bad configs rejected naming the key, before any job starts."""

import copy

import pytest
import yaml

from diapipe import config as dpconfig
from wfutil import REPO, copy_workflow, run, write_yaml


@pytest.fixture
def good() -> dict:
    with open(REPO / "config" / "config.yaml") as fh:
        return yaml.safe_load(fh)


def test_default_config_is_valid(good):
    dpconfig.validate(good)


def test_defaults_filled_from_schema():
    cfg = dpconfig.validate({"seed": 1, "inputs": {}, "datasets": {"raw": "x/{visit}.fits"}})
    schema = dpconfig.load_schema()
    assert cfg["inputs"]["source"] == schema["properties"]["inputs"]["properties"]["source"]["default"]
    # Every stage block not given is filled with all its defaults.
    for name, sub in schema["properties"].items():
        if sub.get("type") == "object" and "default" in sub:
            assert name in cfg, name
            for key, leaf in sub.get("properties", {}).items():
                if "default" in leaf and not leaf.get("properties"):  # nested blocks are filled key by key
                    assert cfg[name][key] == leaf["default"], f"{name}.{key}"


def test_dataset_types_missing_from_an_older_config_get_their_default_paths(good):
    """An older config.yaml lists the dataset types of its day; a newer type gets the default path,
    a remapped one keeps the user's."""
    cfg = copy.deepcopy(good)
    del cfg["datasets"]["template_psf"]
    cfg["datasets"]["calexp"] = "elsewhere/{visit}/{detector}.fits"
    out = dpconfig.validate(cfg)["datasets"]
    default = dpconfig.load_schema()["properties"]["datasets"]["default"]
    assert out["template_psf"] == default["template_psf"]
    assert out["calexp"] == "elsewhere/{visit}/{detector}.fits"
    assert set(default) <= set(out)


def test_defaults_do_not_overwrite_given_values(good):
    cfg = copy.deepcopy(good)
    cfg["simulate"]["nx"] = 128
    assert dpconfig.validate(cfg)["simulate"]["nx"] == 128


def _first_leaf(schema, want_type):
    """(block, key, node) of the first stage key of the given JSON type."""
    for block, sub in schema["properties"].items():
        for key, node in (sub.get("properties") or {}).items():
            if node.get("type") == want_type:
                return block, key, node
    raise LookupError(want_type)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["simulate"].__setitem__("nx", "big"), "'simulate.nx'"),
        (lambda c: c["simulate"].__setitem__("n_detectors", 0), "'simulate.n_detectors'"),
        (lambda c: c.__setitem__("seed", 1.5), "'seed'"),
        (lambda c: c.pop("seed"), "missing config key 'seed'"),
        (lambda c: c.pop("datasets"), "missing config key 'datasets'"),
        (lambda c: c["simulate"].__setitem__("n_detector", 2), "unknown config key 'simulate.n_detector'"),
        (lambda c: c.__setitem__("simulte", {}), "unknown config key 'simulte'"),
        (lambda c: c["inputs"].__setitem__("source", "butler"), "'inputs.source'"),
        (lambda c: c["datasets"].__setitem__("calexp", 3), "'datasets.calexp'"),
        (lambda c: c["simulate"].__setitem__("bands", ["r", 2]), "'simulate.bands.1'"),
    ],
    ids=["wrong-type", "below-minimum", "float-seed", "missing-seed", "missing-datasets",
         "unknown-stage-key", "unknown-block", "bad-enum", "dataset-not-string", "bad-list-item"],
)
def test_bad_config_names_the_key(good, mutate, message):
    cfg = copy.deepcopy(good)
    mutate(cfg)
    with pytest.raises(dpconfig.ConfigError) as err:
        dpconfig.validate(cfg)
    assert message in str(err.value)


def test_every_stage_block_rejects_wrong_types_and_unknown_keys(good):
    """Whatever blocks the stages add: each rejects an unknown key and a wrongly typed one by name."""
    schema = dpconfig.load_schema()
    samples = {"integer": "x", "number": "x", "string": 12345, "boolean": "maybe", "array": 3}
    for block, sub in schema["properties"].items():
        props = sub.get("properties") or {}
        if sub.get("type") != "object" or not props:
            continue
        cfg = copy.deepcopy(good)
        cfg.setdefault(block, {})["no_such_key"] = 1
        with pytest.raises(dpconfig.ConfigError, match=f"unknown config key '{block}.no_such_key'"):
            dpconfig.validate(cfg)
        for key, node in props.items():
            if isinstance(node.get("type"), str) and node["type"] in samples:
                cfg = copy.deepcopy(good)
                cfg.setdefault(block, {})[key] = samples[node["type"]]
                with pytest.raises(dpconfig.ConfigError, match=f"'{block}.{key}'"):
                    dpconfig.validate(cfg)


def test_several_errors_reported_together(good):
    cfg = copy.deepcopy(good)
    cfg["simulate"]["nx"] = "big"
    cfg["simulate"]["bogus"] = 1
    with pytest.raises(dpconfig.ConfigError) as err:
        dpconfig.validate(cfg)
    assert "'simulate.nx'" in str(err.value) and "'simulate.bogus'" in str(err.value)


def test_load_overlays_files(tmp_path):
    overlay = write_yaml(tmp_path / "my.yaml", {"simulate": {"nx": 256}})
    cfg = dpconfig.load(REPO / "config" / "config.yaml", overlay)
    assert cfg["simulate"]["nx"] == 256
    assert cfg["simulate"]["ny"] == yaml.safe_load((REPO / "config" / "config.yaml").read_text())["simulate"]["ny"]


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": [1]}}
    out = dpconfig.deep_merge(base, {"a": {"b": 2}})
    assert out == {"a": {"b": 2, "c": [1]}} and base == {"a": {"b": 1, "c": [1]}}


@pytest.mark.workflow
@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"simulate": {"nx": "big"}}, "simulate.nx"),
        ({"simulate": {"nx_pixels": 100}}, "simulate.nx_pixels"),
        ({"seed": "forty-two"}, "seed"),
    ],
    ids=["wrong-type", "unknown-key", "seed-type"],
)
def test_snakemake_rejects_bad_config_before_any_job(tmp_path, overlay, message):
    wf = copy_workflow(tmp_path / "wf")
    bad = write_yaml(tmp_path / "bad.yaml", overlay)
    proc = run(wf, "--cores", "1", "--configfile", bad, timeout=120)
    assert proc.returncode != 0
    assert f"'{message}'" in proc.stdout, proc.stdout[-3000:]
    # Nothing ran: no product, no log, no job bookkeeping.
    for d in ("results", "logs", "benchmarks"):
        assert not (wf / d).exists() or not any((wf / d).rglob("*.*")), d


@pytest.mark.workflow
def test_snakemake_rejects_missing_key(tmp_path):
    """A config file that lacks a required key (here the whole config replaced, without 'seed')."""
    wf = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config" / "config.yaml").read_text())
    cfg.pop("seed")
    write_yaml(wf / "config" / "config.yaml", cfg)
    proc = run(wf, "-n", timeout=120)
    assert proc.returncode != 0
    assert "missing config key 'seed'" in proc.stdout, proc.stdout[-3000:]
