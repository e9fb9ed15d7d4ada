"""Helpers for tests that run Snakemake on a copy of the workflow in a temporary directory.

The copy holds the Snakefile, workflow/, config/, envs/ and profiles/; the
``diapipe`` package is symlinked so jobs import this checkout's library.
Snakemake runs as a subprocess from the same venv as pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
TINY = REPO / "config" / "tiny.yaml"


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow into ``dest`` (created) and return it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake")
    for name in ("workflow", "config", "envs", "profiles"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, dest / name, ignore=ignore, dirs_exist_ok=True)
    if not (dest / "diapipe").exists():
        (dest / "diapipe").symlink_to(REPO / "diapipe")
    return dest


def _no_scontrol_dir() -> Path:
    """A directory holding an ``scontrol`` that fails at once (made once per process)."""
    import tempfile

    global _NO_SCONTROL
    if _NO_SCONTROL is None or not (_NO_SCONTROL / "scontrol").exists():
        d = Path(tempfile.mkdtemp(prefix="diapipe-no-scontrol-"))
        (d / "scontrol").write_text("#!/bin/sh\nexit 1\n")
        (d / "scontrol").chmod(0o755)
        _NO_SCONTROL = d
    return _NO_SCONTROL


_NO_SCONTROL: Path | None = None


def env(slurm: bool = False) -> dict:
    """Environment for Snakemake and its jobs: this venv first on PATH.

    Unless ``slurm``: Snakemake imports every installed executor plugin, and the
    SLURM plugin runs ``scontrol show config`` at import, which waits 9 s for a
    controller that is not running (the one-node test cluster is up only for
    tests/test_slurm.py).  An ``scontrol`` that fails at once goes first on
    PATH, so local runs do not pay those 9 s per Snakemake call.
    """
    e = dict(os.environ)
    path = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    if not slurm:
        path = f"{_no_scontrol_dir()}{os.pathsep}{path}"
    e["PATH"] = path
    e.pop("SNAKEMAKE_PROFILE", None)
    return e


def run(workdir: Path, *args, timeout: float = 170, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``snakemake *args`` in ``workdir``; stdout and stderr combined in ``.stdout``."""
    cmd = [SNAKEMAKE, *map(str, args)]
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def write_yaml(path: Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_config() -> Path:
    """The tiny test config; tests that need it skip with a reason until it exists."""
    import pytest

    if not TINY.exists():
        pytest.skip("config/tiny.yaml not written yet (owned by the simulate stage)")
    return TINY
