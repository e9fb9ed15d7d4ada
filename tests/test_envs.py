"""Conda environments: one pinned env per stage, every rule names one, pins agree with the pip install.

CI cannot reach conda channels, so it runs the rules in the pip-installed venv;
this test keeps the two ways of installing in step (same packages, same versions).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ENVS = sorted((REPO / "envs").glob("*.yaml"))
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]

# conda-forge package name -> pip distribution name, where they differ.
CONDA_TO_PIP = {"pyyaml": "PyYAML", "pytables": "tables"}
# Conda packages with no pip distribution to compare against.
NOT_PIP = {"python", "pip", "nodefaults"}

SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s*(?P<op>==|=)\s*(?P<version>[0-9][A-Za-z0-9.]*)$")


def _pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = list(data["project"]["dependencies"])
    for extra in data["project"].get("optional-dependencies", {}).values():
        reqs += extra
    pins = {}
    for req in reqs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([0-9][A-Za-z0-9.]*)$", req.strip())
        assert m, f"pyproject.toml dependency not pinned exactly (name==X.Y.Z): {req!r}"
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_deps(path: Path) -> list[tuple[str, str, str]]:
    """(manager, name, version) of every dependency of an env file."""
    env = yaml.safe_load(path.read_text())
    out = []
    for dep in env.get("dependencies", []):
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                m = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([0-9][A-Za-z0-9.]*)$", spec.strip())
                assert m, f"{path.name}: pip dependency not pinned with ==: {spec!r}"
                out.append(("pip", m.group(1), m.group(2)))
            continue
        m = SPEC.match(str(dep).strip())
        assert m, f"{path.name}: dependency {dep!r} is not pinned to an exact version ('name =X.Y.Z')"
        out.append(("conda", m.group("name"), m.group("version")))
    return out


def test_there_is_an_env_per_stage_rule_file():
    stages = [p.stem for p in RULE_FILES if p.suffix == ".smk" and p.stem != "common"]
    if not stages:
        pytest.skip("no stage rule files yet")
    names = {p.stem for p in ENVS}
    # Rule files may share an env, but every env a rule names must exist (see below), and
    # at least one env file must be there once stages exist.
    assert names, "envs/ is empty but there are stage rule files"


@pytest.mark.parametrize("env_file", ENVS, ids=[p.name for p in ENVS])
def test_env_file_parses_and_pins_exact_versions(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert isinstance(env, dict) and env.get("dependencies"), f"{env_file.name}: no dependencies"
    assert "conda-forge" in env.get("channels", []), f"{env_file.name}: conda-forge channel missing"
    deps = _env_deps(env_file)
    names = [n for _, n, _ in deps]
    assert len(names) == len(set(names)), f"{env_file.name}: a package listed twice"
    python = [v for _, n, v in deps if n == "python"]
    assert python, f"{env_file.name}: python not pinned"
    assert python[0].split(".")[:2] == ["3", "11"], f"{env_file.name}: python ={python[0]}, the project uses 3.11"


@pytest.mark.parametrize("env_file", ENVS, ids=[p.name for p in ENVS])
def test_env_pins_agree_with_pip_install_and_pyproject(env_file):
    pins = _pyproject_pins()
    for manager, name, version in _env_deps(env_file):
        if name in NOT_PIP:
            continue
        dist = CONDA_TO_PIP.get(name, name)
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{env_file.name}: {name} ={version} is not in the pip install (add it to pyproject.toml)")
        assert installed == version, f"{env_file.name}: {name} ={version} but pip resolved {installed}"
        assert pins.get(_norm(dist)) == version, (
            f"{env_file.name}: {name} ={version} but pyproject.toml pins {pins.get(_norm(dist))}"
        )


def test_pyproject_pins_are_what_pip_installed():
    for name, version in _pyproject_pins().items():
        assert metadata.version(name) == version, f"pyproject.toml pins {name}=={version}, installed {metadata.version(name)}"


def _rule_blocks(text: str):
    """(rule name, body) for each top-level rule/checkpoint of a Snakefile."""
    heads = list(re.finditer(r"^(?:rule|checkpoint)\s+(\w+)\s*:", text, flags=re.M))
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = text[m.end() : end]
        # The block ends at the next unindented, non-comment line.
        stop = re.search(r"^(?=[^\s#])", body, flags=re.M)
        yield m.group(1), body[: stop.start()] if stop else body


def _rules_with_envs():
    out = []
    for path in RULE_FILES:
        for name, body in _rule_blocks(path.read_text()):
            runs = re.search(r"^\s+(shell|script|notebook|wrapper)\s*:", body, flags=re.M)
            env = re.search(r"^\s+conda\s*:\s*\n?\s*[\"']([^\"']+)[\"']", body, flags=re.M)
            out.append((path, name, bool(runs), env.group(1) if env else None))
    return out


RULES = _rules_with_envs()


def test_rules_found():
    assert any(name == "all" for _, name, _, _ in RULES)


@pytest.mark.parametrize("path, rule, runs, env", RULES, ids=[r for _, r, _, _ in RULES])
def test_every_rule_names_an_existing_env(path, rule, runs, env):
    if not runs:
        assert env is None or (path.parent / env).exists()
        return
    assert env, f"rule {rule} ({path.name}) runs code but names no conda env"
    resolved = (path.parent / env).resolve()
    assert resolved.exists(), f"rule {rule} ({path.name}): conda env {env} does not exist"
    assert resolved.parent == (REPO / "envs").resolve(), f"rule {rule}: env {env} is not in envs/"
