"""Logging set-up shared by scripts and the command line."""

from __future__ import annotations

import logging
import sys


def setup(log_file=None, level=logging.INFO) -> logging.Logger:
    """Log to ``log_file`` (Snakemake's ``log:``) and stderr, with timestamps."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return logging.getLogger("diapipe")
