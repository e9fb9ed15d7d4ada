"""Shared fixtures.

``tiny_run``: the whole workflow run ONCE per pytest session on
config/tiny.yaml in a temporary copy (tests/wfutil.py).  Workflow tests that
only read its products or dry-run against it should use this fixture instead
of running Snakemake again: on 2 cores every extra run costs minutes.
Do not modify files inside it (copy what you need to change).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from wfutil import copy_workflow, run, tiny_config


@dataclass
class TinyRun:
    workdir: Path  # the workflow copy; products under workdir / "results"
    config: Path  # config/tiny.yaml of the copy
    log: str  # Snakemake's output
    wall_s: float

    def path(self, dataset_type: str, **data_id) -> Path:
        """Path of a product of this run, from the Butler table of the merged config."""
        from diapipe import config as dpconfig
        from diapipe.butler import Butler

        cfg = dpconfig.load(self.workdir / "config" / "config.yaml", self.config)
        return self.workdir / Butler(cfg["datasets"]).get(dataset_type, **data_id)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The tiny workflow, run once; DIAPIPE_TINY_RUN=<dir> reuses a finished copy (for development)."""
    tiny_config()  # skips with a reason when the tiny config does not exist
    reuse = os.environ.get("DIAPIPE_TINY_RUN")
    if reuse:
        wf = Path(reuse)
        logs = sorted((wf / ".snakemake" / "log").glob("*.log"))
        return TinyRun(wf, wf / "config" / "tiny.yaml", logs[-1].read_text() if logs else "", 0.0)
    wf = copy_workflow(tmp_path_factory.mktemp("tiny_run") / "wf")
    config = wf / "config" / "tiny.yaml"
    t0 = time.monotonic()
    proc = run(wf, "--cores", "2", "--configfile", config, timeout=1200)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        pytest.fail(f"the tiny workflow run failed ({proc.returncode}):\n{failure_report(wf, proc.stdout)}")
    return TinyRun(wf, config, proc.stdout, wall)


def failure_report(workdir: Path, output: str) -> str:
    """The 'Error in rule' blocks of a Snakemake run and the tails of the failed jobs' logs."""
    import re

    blocks = re.findall(r"^Error in rule \w+:\n(?:[ \t]+.*\n?)*", output, flags=re.M)
    parts = blocks[:5] or [output[-6000:]]
    for block in blocks[:3]:
        m = re.search(r"^\s+log: (\S+)", block, flags=re.M)
        if m and (workdir / m.group(1)).exists():
            tail = (workdir / m.group(1)).read_text(errors="replace")[-2500:]
            parts.append(f"--- {m.group(1)} (tail):\n{tail}")
    return "\n".join(parts)
