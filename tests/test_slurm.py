"""The SLURM profile, proven on a real one-node SLURM cluster (scripts/slurm-cluster.sh).

Needs root and the Debian packages slurm-wlm and munge; skipped with the reason
otherwise.  Measured on 2 shared cores: the 3-rule toy ~65 s idle, 105-161 s at
load ~20; the tiny survey when it was the simulate stage alone (16 jobs) ~5 min.
Every job pays ~15-20 s of scheduling latency and two Snakemake start-ups, so
the full tiny DAG (129 jobs; 100 sbatch jobs with the profile's calib/exposure
groups) needs tens of minutes: 2,242 s at load 7-13 (2026-11-26, passed); at
load 17-25 it did not finish within 2400 s.  Both test wall times are printed and written
as JSON beside the test's files (slurm_toy_wall.json, slurm_tiny_wall.json).
`make slurm-test` installs the packages and runs this file with
DIAPIPE_SLURM_REQUIRED=1, which turns every skip into a failure.
Each run is wrapped in `timeout -k`: a wrong status setting makes the plugin
wait forever and ignore SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from wfutil import REPO, SNAKEMAKE, copy_workflow, env, tiny_config

SCRIPT = REPO / "scripts" / "slurm-cluster.sh"
PROFILE = REPO / "profiles" / "slurm"
REQUIRED = os.environ.get("DIAPIPE_SLURM_REQUIRED") == "1"
STATE = Path(os.environ.get("STATE", "/tmp/diapipe-slurm"))

pytestmark = pytest.mark.workflow
# The tiny survey through SLURM takes many minutes on 2 cores: only under `make slurm-test`
# (or DIAPIPE_SLURM_FULL=1); the toy workflow runs whenever SLURM is available.
FULL = REQUIRED or os.environ.get("DIAPIPE_SLURM_FULL") == "1"


def _skip(reason: str):
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


def _running() -> bool:
    return all(
        (STATE / f"{d}.pid").exists() and _alive(int((STATE / f"{d}.pid").read_text())) for d in ("munged", "slurmctld", "slurmd")
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster():
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "timeout") if not shutil.which(t)]
    if missing:
        _skip(f"SLURM not installed ({', '.join(missing)} missing): run `make slurm-test` as root")
    if os.geteuid() != 0:
        _skip("starting the one-node SLURM cluster needs root")
    started_here = not _running()
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        _skip(f"could not start the one-node SLURM cluster: {proc.stderr.strip()[-800:]}")
    yield
    if started_here:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def _record(tmp_path: Path, name: str, **figures) -> None:
    """Print the measured figures and keep them as JSON beside the test's files (pytest tmp dir)."""
    doc = {"test": name, **figures}
    (tmp_path / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()) + f" (-> {tmp_path / (name + '.json')})")


def _snakemake_slurm(workdir: Path, *args, limit: int) -> tuple[subprocess.CompletedProcess, float]:
    cmd = ["timeout", "-k", "10", str(limit), SNAKEMAKE, "--profile", str(PROFILE), *map(str, args)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env(slurm=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wall = time.monotonic() - t0
    if proc.returncode == 124:
        pytest.fail(f"snakemake --profile slurm timed out after {limit} s:\n{proc.stdout[-4000:]}")
    return proc, wall


TOY = '''
rule all:
    input:
        "c.txt",


rule a:
    output:
        "a.txt",
    log:
        "logs/a.log",
    resources:
        mem_mb=200,
        runtime=2,
    shell:
        "echo $SLURM_JOB_ID > {output} 2> {log}"


rule b:
    input:
        "a.txt",
    output:
        "b.txt",
    log:
        "logs/b.log",
    shell:
        "(cat {input}; echo $SLURM_JOB_ID) > {output} 2> {log}"


rule c:
    input:
        "b.txt",
    output:
        "c.txt",
    log:
        "logs/c.log",
    threads: 2
    shell:
        "(cat {input}; echo $SLURM_JOB_ID) > {output} 2> {log}"
'''


def test_toy_workflow_through_sbatch(cluster, tmp_path):
    """Three chained rules, each a separate SLURM job, with the profile's status checks via squeue."""
    (tmp_path / "Snakefile").write_text(TOY)
    proc, wall = _snakemake_slurm(tmp_path, limit=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    job_ids = (tmp_path / "c.txt").read_text().split()
    # Each rule ran inside its own SLURM job.
    assert len(job_ids) == 3 and len(set(job_ids)) == 3 and all(j.isdigit() for j in job_ids), job_ids
    assert len(re.findall(r"submitted with SLURM jobid", proc.stdout)) == 3
    _record(tmp_path, "slurm_toy_wall", wall_s=round(wall, 1), sbatch_jobs=3)


def test_tiny_config_end_to_end_through_sbatch(cluster, tmp_path):
    """The tiny survey config, end to end, every job an sbatch job."""
    if not FULL:
        pytest.skip("tiny config through SLURM takes minutes: run `make slurm-test` (or DIAPIPE_SLURM_FULL=1)")
    tiny = tiny_config()
    wf = copy_workflow(tmp_path / "wf")
    proc, wall = _snakemake_slurm(wf, "--configfile", tiny, limit=3600)
    submitted = len(re.findall(r"submitted with SLURM jobid", proc.stdout))
    # Recorded before the asserts: a failed run's wall time is worth knowing too.
    _record(tmp_path, "slurm_tiny_wall", wall_s=round(wall, 1), sbatch_jobs=submitted, returncode=proc.returncode)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert submitted >= 1
    m = re.search(r"(\d+) of \1 steps \(100%\) done", proc.stdout)
    assert m, proc.stdout[-3000:]
    # Nothing left to do afterwards.
    dry = subprocess.run(
        [SNAKEMAKE, "-n", "--configfile", str(tiny)], cwd=wf, env=env(), capture_output=True, text=True, timeout=120
    )
    assert "Nothing to be done" in dry.stdout + dry.stderr
