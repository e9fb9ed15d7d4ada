"""A changed setting reruns exactly its stage and what is downstream of it; nothing else.

Uses the session's ``tiny_run`` (the whole workflow run once on config/tiny.yaml)
and dry runs against it with an overlay config that changes one key.  From the
dry run's per-job reasons we take the rules whose params changed; we assert
they include the stage that owns the key and nothing upstream of it, that every
job of those rules reruns, and that the set of rerun rules is exactly those
rules plus everything downstream of them in the rule graph (so nothing
upstream, nothing unrelated).

Adding a stage is one line in STAGE_KEYS: (rule file stem, dotted config key).
A row is skipped, with the reason, while its rule file is not part of the
workflow or its key is not in the schema yet.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from diapipe import config as dpconfig
from wfutil import REPO, SNAKEMAKE, copy_workflow, env, run, write_yaml

pytestmark = pytest.mark.workflow

# (stage rule file in workflow/rules/, config key it reads): one per stage.
STAGE_KEYS = [
    ("simulate", "simulate.dither_arcsec"),
    ("calib", "calib.clip_sigma"),  # master bias/dark/flat
    ("isr", "isr.saturation_margin"),
    ("characterize", "characterize.detection.threshold"),
    ("warp", "skymap.overlap"),  # the patch grid (make_skymap) and so every warp
    ("warp", "warp.grid_step"),
    ("coadd", "coadd.nsigma"),  # template outlier rejection
    ("subtract", "subtract.spatial_order"),  # the kernel's spatial variation order
    ("fakes", "fakes.n_isolated"),
    ("fakes", "fakes.match_nsigma"),  # matching only: the completeness analysis, not the injection
    ("detect", "detect.threshold"),
    ("realbogus", "realbogus.rf_n_estimators"),
    ("associate", "associate.match_radius"),
    ("report", "report.n_cutouts"),
]


# ---------------------------------------------------------------- parsing
def dry_run_jobs(text: str) -> dict[str, list[str]]:
    """rule -> list of per-job reasons, from `snakemake -n` output."""
    jobs: dict[str, list[str]] = {}
    for m in re.finditer(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n?)*)", text, flags=re.M):
        reason = re.search(r"^\s+reason: (.*)$", m.group(2), flags=re.M)
        jobs.setdefault(m.group(1), []).append(reason.group(1) if reason else "")
    return jobs


def rule_graph(workdir: Path, *configs) -> dict[str, set[str]]:
    """rule -> rules that consume its output, from `snakemake --rulegraph`."""
    args = ["--rulegraph"] + (["--configfile", *configs] if configs else [])
    proc = run(workdir, *args, check=True)
    names = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", proc.stdout, flags=re.M))
    graph: dict[str, set[str]] = {n: set() for n in names.values()}
    for a, b in re.findall(r"^\s*(\d+) -> (\d+)", proc.stdout, flags=re.M):
        graph[names[a]].add(names[b])
    return graph


def downstream(graph: dict[str, set[str]], rules: set[str]) -> set[str]:
    out, todo = set(rules), list(rules)
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in out:
                out.add(nxt)
                todo.append(nxt)
    return out


def rules_in_file(stem: str) -> set[str]:
    path = REPO / "workflow" / "rules" / f"{stem}.smk"
    if not path.exists():
        return set()
    return set(re.findall(r"^(?:rule|checkpoint) (\w+)\s*:", path.read_text(), flags=re.M))


def schema_node(key: str) -> dict | None:
    node = dpconfig.load_schema()
    for part in key.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def changed_value(value, node: dict):
    """A valid value different from ``value`` for the schema node."""
    if "enum" in node:
        others = [v for v in node["enum"] if v != value]
        assert others, f"enum {node['enum']} has a single value"
        return others[0]
    t = node.get("type")
    if t == "boolean":
        return not value
    if t == "integer":
        new = value + 1
        if "maximum" in node and new > node["maximum"]:
            new = value - 1
        return new
    if t == "number":
        new = round(value * 1.1 + 0.01, 6)
        if "maximum" in node and new > node["maximum"]:
            new = round(value * 0.9, 6)
        return new
    if t == "string":
        return value + "x"
    raise NotImplementedError(f"no rule to change a {t} value")


def nested(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def effective_config(tiny_run) -> dict:
    return dpconfig.load(tiny_run.workdir / "config" / "config.yaml", tiny_run.config)


# ---------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def dag(tiny_run):
    """(rule graph, rule -> jobs of a full run): computed once, each Snakemake call costs seconds."""
    graph = rule_graph(tiny_run.workdir, tiny_run.config)
    full = dry_run_jobs(run(tiny_run.workdir, "-n", "--forceall", "--configfile", tiny_run.config, check=True).stdout)
    return graph, full


def test_unchanged_rerun_does_nothing(tiny_run):
    proc = run(tiny_run.workdir, "-n", "--configfile", tiny_run.config, check=True)
    assert "Nothing to be done" in proc.stdout, proc.stdout[-3000:]
    assert not dry_run_jobs(proc.stdout)


@pytest.mark.parametrize("stage, key", STAGE_KEYS, ids=[k for _, k in STAGE_KEYS])
def test_changed_key_reruns_its_stage_and_downstream_only(tiny_run, dag, tmp_path, stage, key):
    stage_rules = rules_in_file(stage)
    graph, full = dag
    if not stage_rules & set(graph):
        pytest.skip(f"stage {stage!r} has no rules in the workflow yet")
    node = schema_node(key)
    if node is None:
        pytest.skip(f"config key {key!r} not in the schema yet")

    cfg = effective_config(tiny_run)
    value = cfg
    for part in key.split("."):
        value = value[part]
    overlay = write_yaml(tmp_path / "overlay.yaml", nested(key, changed_value(value, node)))

    proc = run(tiny_run.workdir, "-n", "--configfile", tiny_run.config, overlay, check=True)
    jobs = dry_run_jobs(proc.stdout)
    changed = {r for r, reasons in jobs.items() if any(x.startswith("Params have changed") for x in reasons)}
    assert changed, f"changing {key} reran nothing:\n{proc.stdout[-3000:]}"
    assert changed & stage_rules, f"{key} did not change the params of any rule of stage {stage}: {changed}"
    # Other rules may read the key too (make_skymap reads the simulated field), but none upstream.
    upstream = {r for r in graph if r not in stage_rules and downstream(graph, {r}) & stage_rules}
    assert not changed & upstream, f"{key} changed the params of rules upstream of {stage}: {changed & upstream}"
    expected = downstream(graph, changed) - {"all"}
    rerun = set(jobs) - {"all"}
    assert rerun == expected, (
        f"changing {key}: reran {sorted(rerun)}, expected {sorted(expected)} "
        f"(unexpected: {sorted(rerun - expected)}, missing: {sorted(expected - rerun)})"
    )
    # Every job of a changed rule reruns (all its dataIds), not only some of them.
    for rule in changed:
        assert len(jobs[rule]) == len(full[rule]), f"{rule}: {len(jobs[rule])} of {len(full[rule])} jobs rerun"


def test_parsers_on_known_output():
    text = (
        "rule a:\n    output: x\n    jobid: 1\n    reason: Params have changed since last execution: ...\n"
        "    resources: tmpdir=/tmp\n\nlocalrule all:\n    input: x\n    jobid: 0\n"
        "    reason: Input files updated by another job: x\n    resources: tmpdir=/tmp\n"
        "Job stats:\njob count\n"
    )
    jobs = dry_run_jobs(text)
    assert jobs == {
        "a": ["Params have changed since last execution: ..."],
        "all": ["Input files updated by another job: x"],
    }
    graph = {"a": {"b", "c"}, "b": {"d"}, "c": set(), "d": set(), "e": {"a"}}
    assert downstream(graph, {"b"}) == {"b", "d"}
    assert downstream(graph, {"a"}) == {"a", "b", "c", "d"}
    assert changed_value(2, {"type": "integer", "maximum": 2}) == 1
    assert changed_value("a", {"type": "string", "enum": ["a", "b"]}) == "b"


# ------------------------------------------------------- kill and restart
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# The killed run goes up to this rule (and all it needs): the raw-to-calexp half of
# the DAG has every kind of job (one-to-many, many-to-one, per-dataId), at half the cost.
KILL_UNTIL = "isr"


def test_sigkill_then_restart_gives_identical_outputs(tiny_run, tmp_path):
    """SIGKILL the whole run half way, restart with --rerun-incomplete: same bytes as uninterrupted."""
    wf = copy_workflow(tmp_path / "wf")
    tiny = wf / "config" / "tiny.yaml"
    cmd = [SNAKEMAKE, "--cores", "2", "--configfile", str(tiny), "--until", KILL_UNTIL]
    # Own session: SIGKILL goes to Snakemake and every job it started, like a node crash.
    proc = subprocess.Popen(
        cmd, cwd=wf, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # Kill once a few products exist but the run is not done.
    deadline = time.monotonic() + 600
    results = wf / "results"
    while time.monotonic() < deadline and proc.poll() is None:
        n = sum(1 for p in results.rglob("*") if p.is_file() and not p.name.startswith(".")) if results.exists() else 0
        if n >= 6:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A killed Snakemake leaves its lock behind: --unlock (as the error message says), then restart.
    run(wf, "--unlock", "--configfile", tiny, check=True)
    restart = run(wf, "--cores", "2", "--rerun-incomplete", "--configfile", tiny, "--until", KILL_UNTIL, timeout=1200)
    assert restart.returncode == 0, restart.stdout[-6000:]

    got = {k: v for k, v in _files(wf / "results").items() if k != "README.md"}
    ref = _files(tiny_run.workdir / "results")
    leftovers = [k for k in got if Path(k).name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert any(k.startswith("postisr/") for k in got), sorted(got)[:20]
    missing = sorted(set(got) - set(ref))
    assert not missing, f"files not in the uninterrupted run: {missing[:10]}"
    differ = [k for k in got if ref[k] != got[k]]
    assert not differ, f"{len(differ)} of {len(got)} files differ after kill + restart: {differ[:10]}"
    shutil.rmtree(wf, ignore_errors=True)
