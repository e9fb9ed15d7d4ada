"""Shared fixtures.

``tiny_run``: the whole workflow run ONCE per pytest session on
config/tiny.yaml in a temporary copy (tests/wfutil.py).  Workflow tests that
only read its products or dry-run against it should use this fixture instead
of running Snakemake again: on 2 cores every extra run costs minutes.
Do not modify files inside it (copy what you need to change).
"""

from __future__ import annotations

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
    tiny_config()  # skips with a reason when the tiny config does not exist
    wf = copy_workflow(tmp_path_factory.mktemp("tiny_run") / "wf")
    config = wf / "config" / "tiny.yaml"
    t0 = time.monotonic()
    proc = run(wf, "--cores", "2", "--configfile", config, timeout=1200)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        pytest.fail(f"the tiny workflow run failed ({proc.returncode}):\n{proc.stdout[-8000:]}")
    return TinyRun(wf, config, proc.stdout, wall)
