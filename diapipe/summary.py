"""End-of-run summary: jobs, failures and time per rule, readable without opening the logs.

The Snakefile's ``onsuccess:``/``onerror:`` handlers call :func:`report` with
Snakemake's own log file; time per rule comes from the ``benchmark:`` files
(``benchmarks/<rule>/<dataId>.tsv``, one per job, Snakemake's format: wall
seconds ``s``, ``max_rss`` in MB, ``cpu_time`` in s).  Also available as
``diapipe summary``.
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RuleTimes:
    jobs: int = 0
    wall_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0


def read_benchmarks(root="benchmarks") -> dict[str, RuleTimes]:
    """rule -> timings from every ``<root>/<rule>/*.tsv`` benchmark file (last line of each)."""
    out: dict[str, RuleTimes] = {}
    root = Path(root)
    if not root.is_dir():
        return out
    for tsv in sorted(root.glob("*/*.tsv")):
        try:
            with open(tsv, newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
        except OSError:
            continue
        if not rows:
            continue
        row = rows[-1]  # with `benchmark: repeat(...)` the last repetition
        t = out.setdefault(tsv.parent.name, RuleTimes())
        t.jobs += 1
        t.wall_s.append(_float(row.get("s")))
        t.cpu_s += _float(row.get("cpu_time"))
        t.max_rss_mb = max(t.max_rss_mb, _float(row.get("max_rss")))
    return out


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0  # Snakemake writes "-" for what it could not measure


@dataclass
class RunLog:
    finished: dict[str, int] = field(default_factory=dict)  # rule -> jobs finished this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rule, its log file or '')
    elapsed: str = ""


def parse_snakemake_log(path) -> RunLog:
    """Jobs finished and failed in one Snakemake run, from its log file (.snakemake/log/*.log)."""
    out = RunLog()
    if not path or not Path(path).exists():
        return out
    text = Path(path).read_text(errors="replace")
    for rule in re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)", text, flags=re.M):
        out.finished[rule] = out.finished.get(rule, 0) + 1
    for m in re.finditer(r"^Error in rule (\w+):\n((?:[ \t]+.*\n?)*)", text, flags=re.M):
        log = re.search(r"^\s+log: (\S+)", m.group(2), flags=re.M)
        out.failed.append((m.group(1), log.group(1) if log else ""))
    m = re.search(r"Elapsed time: (\S+)", text)
    out.elapsed = m.group(1) if m else ""
    return out


def format_summary(status: str, times: dict[str, RuleTimes], runlog: RunLog) -> str:
    n_done = sum(runlog.finished.values())
    lines = [
        "",
        "=" * 72,
        f"diapipe run summary: {status.upper()}  -  {n_done} jobs finished this run, "
        f"{len(runlog.failed)} failed" + (f", wall {runlog.elapsed}" if runlog.elapsed else ""),
    ]
    rules = sorted(set(times) | set(runlog.finished) | {r for r, _ in runlog.failed})
    rules = [r for r in rules if r != "all"]
    if rules:
        lines.append(
            f"{'rule':<28}{'run now':>8}{'failed':>7}{'jobs':>6}{'total s':>10}{'mean s':>9}{'max s':>8}{'max RSS MB':>11}"
        )
        for r in rules:
            t = times.get(r, RuleTimes())
            nfail = sum(1 for f, _ in runlog.failed if f == r)
            total = sum(t.wall_s)
            mean = total / t.jobs if t.jobs else 0.0
            mx = max(t.wall_s) if t.wall_s else 0.0
            lines.append(
                f"{r:<28}{runlog.finished.get(r, 0):>8}{nfail:>7}{t.jobs:>6}{total:>10.1f}{mean:>9.1f}{mx:>8.1f}{t.max_rss_mb:>11.0f}"
            )
        lines.append("(jobs / times: every benchmark file under benchmarks/, i.e. all products present)")
    if runlog.failed:
        lines.append("failed jobs (their logs):")
        lines += [f"  {r}: {log or '(no log)'}" for r, log in runlog.failed]
    lines.append("=" * 72)
    return "\n".join(lines)


def report(status: str, snakemake_log=None, benchmarks="benchmarks", out=None, stream=None) -> str:
    """Print the summary to ``stream`` and, if given, write it to ``out``; return the text.

    ``snakemake_log`` is a path or a list of paths (Snakemake hands ``log`` to the
    onsuccess/onerror handlers as a list).  Never raises: a summary must not turn a
    finished run into a failed one.
    """
    stream = stream if stream is not None else sys.stderr
    try:
        if isinstance(snakemake_log, (list, tuple)):
            snakemake_log = next((p for p in snakemake_log if p and Path(p).exists()), None)
        text = format_summary(status, read_benchmarks(benchmarks), parse_snakemake_log(snakemake_log))
    except Exception as exc:  # noqa: BLE001 - see docstring
        text = f"diapipe run summary: {status.upper()} (summary unavailable: {exc!r})"
    print(text, file=stream)
    if out:
        from .fileio import write_text

        try:
            write_text(text + "\n", out)
        except OSError:
            pass  # a summary must never turn a finished run into a failure
    return text


def _run(args) -> int:
    log = args.log
    if log is None:
        # The newest log of a run that did something (dry runs write logs too).
        logs = sorted(Path(".snakemake/log").glob("*.snakemake.log"), reverse=True)
        ran = [p for p in logs if re.search(r"^(Finished jobid|Error in rule)", p.read_text(errors="replace"), re.M)]
        log = (ran or logs or [None])[0]
    report(args.status, log, args.benchmarks, stream=sys.stdout)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("summary", help="jobs, failures and time per rule of the last Snakemake run")
    p.add_argument("--log", help="Snakemake log file (default: the newest in .snakemake/log)")
    p.add_argument("--benchmarks", default="benchmarks", help="benchmark directory")
    p.add_argument("--status", default="last run", help="label printed in the heading")
    p.set_defaults(func=_run)
