"""The end-of-run summary: jobs, failures and time per rule from benchmarks and Snakemake's log."""

import pytest

from diapipe import cli, summary

BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"

LOG = """Building DAG of jobs...
[Thu Nov 26 11:56:25 2026]
rule isr:
    input: a
    output: b
    log: logs/isr/visit1_detector0.log
    jobid: 3
Finished jobid: 3 (Rule: isr)
Finished jobid: 4 (Rule: isr)
Finished jobid: 1 (Rule: simulate_raw)
[Thu Nov 26 11:56:40 2026]
Error in rule isr:
    message: None
    jobid: 5
    input: x
    output: y
    log: logs/isr/visit2_detector1.log (check log file(s) for error details)
    shell: ...
Elapsed time: 0:01:52.303136
"""


@pytest.fixture
def run_dir(tmp_path):
    for rule, walls in {"isr": [2.0, 4.0, 6.0], "simulate_raw": [10.0]}.items():
        d = tmp_path / "benchmarks" / rule
        d.mkdir(parents=True)
        for i, s in enumerate(walls):
            (d / f"visit{i}.tsv").write_text(BENCH_HEADER + f"{s}\t0:00:0{int(s)}\t{100 + 50 * i}\t1\t1\t1\t0\t0\t90\t{s * 0.9}\n")
    (tmp_path / "benchmarks" / "isr" / "broken.tsv").write_text("")  # an empty file is skipped
    (tmp_path / "run.log").write_text(LOG)
    return tmp_path


def test_benchmarks_aggregated_per_rule(run_dir):
    t = summary.read_benchmarks(run_dir / "benchmarks")
    assert t["isr"].jobs == 3 and sum(t["isr"].wall_s) == pytest.approx(12.0)
    assert t["isr"].max_rss_mb == pytest.approx(200)
    assert t["isr"].cpu_s == pytest.approx(10.8)
    assert t["simulate_raw"].jobs == 1


def test_log_parsed_for_jobs_and_failures(run_dir):
    r = summary.parse_snakemake_log(run_dir / "run.log")
    assert r.finished == {"isr": 2, "simulate_raw": 1}
    assert r.failed == [("isr", "logs/isr/visit2_detector1.log")]
    assert r.elapsed == "0:01:52.303136"


def test_report_text(run_dir, capsys):
    text = summary.report("failed", run_dir / "run.log", run_dir / "benchmarks", out=run_dir / "logs" / "summary.txt")
    assert "FAILED" in text and "3 jobs finished this run, 1 failed" in text
    isr = next(line for line in text.splitlines() if line.startswith("isr "))
    # run now, failed, jobs, total, mean, max, max RSS
    assert isr.split()[1:] == ["2", "1", "3", "12.0", "4.0", "6.0", "200"]
    assert "logs/isr/visit2_detector1.log" in text
    assert (run_dir / "logs" / "summary.txt").read_text().strip() == text.strip()
    assert "diapipe run summary" in capsys.readouterr().err


def test_log_given_as_list_like_snakemake_does(run_dir):
    text = summary.report("success", [str(run_dir / "run.log")], run_dir / "benchmarks")
    assert "3 jobs finished this run" in text


def test_never_raises(tmp_path):
    text = summary.report("success", 12345, tmp_path)
    assert "SUCCESS" in text


def test_missing_inputs_are_fine(tmp_path):
    text = summary.report("success", tmp_path / "nolog", tmp_path / "nobench")
    assert "0 jobs finished this run, 0 failed" in text


def test_cli(run_dir, capsys):
    assert cli.main(["summary", "--log", str(run_dir / "run.log"), "--benchmarks", str(run_dir / "benchmarks")]) == 0
    assert "simulate_raw" in capsys.readouterr().out


@pytest.mark.workflow
def test_workflow_prints_summary(tiny_run):
    """The Snakefile's onsuccess handler printed the summary and wrote logs/summary.txt."""
    text = (tiny_run.workdir / "logs" / "summary.txt").read_text()
    assert "diapipe run summary: SUCCESS" in text
    assert ", 0 failed" in text
    for rule in ("simulate_raw", "simulate_survey"):
        line = next(x for x in text.splitlines() if x.startswith(rule + " "))
        assert int(line.split()[3]) >= 1 and float(line.split()[4]) > 0  # jobs and seconds from benchmarks
