"""Atomic output: a file appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched,
    so a failed job never leaves a partial product for Snakemake to trust.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    _remove_stale_temporaries(path)
    # The writer's PID is in the name so a later attempt can tell a dead writer's leftovers.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by a writer that was killed (SIGKILL, power cut).

    Only files whose writer process no longer exists are removed, so a concurrent
    writer (never expected under Snakemake) is not disturbed.
    """
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_parquet(df, path) -> None:
    """Write a pandas DataFrame to Parquet atomically, without the pandas index."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_fits(hdul, path) -> None:
    """Write an astropy HDUList atomically, with CHECKSUM/DATASUM cards.

    Not ``writeto(checksum=True)``: astropy then puts the current time in the
    checksum cards' comments, so the same data would give different bytes on
    every run.  A fixed comment keeps "same config, same bytes".
    """
    for hdu in hdul:
        hdu.add_checksum(when="HDU checksum")
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True, checksum=False)


def write_text(text: str, path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


class DiapipeError(RuntimeError):
    """An error a user can act on: names the file and the dataId."""

    def __init__(self, message: str, path=None, data_id: dict | None = None):
        parts = [message]
        if path is not None:
            parts.append(f"file: {path}")
        if data_id:
            parts.append("dataId: " + ", ".join(f"{k}={v}" for k, v in data_id.items()))
        super().__init__("; ".join(parts))
        self.path = path
        self.data_id = data_id
