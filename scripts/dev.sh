#!/usr/bin/env bash
# Set up the environment and run the demo survey, the tests or the SLURM test.
#
#   bash scripts/dev.sh setup        # .venv with diapipe + Snakemake + test tools (pip only)
#   bash scripts/dev.sh demo         # setup, then the simulated demo survey end to end
#   bash scripts/dev.sh test         # setup, then snakefmt --check, snakemake --lint, pytest
#   bash scripts/dev.sh slurm-test   # setup, then the workflow through a one-node SLURM cluster
#
# The Makefile targets of the same names call this script; it needs only
# bash and Python >= 3.11 with pip/venv.  Environment knobs:
#   PYTHON (python3)   interpreter used to create .venv
#   VENV   (.venv)     where the environment lives
#   CORES  (all)       --cores for the demo
#   PYTEST_ARGS ()     extra pytest arguments, e.g. "-k butler -x"
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
BIN=$VENV/bin
CORES=${CORES:-all}
# Rules that shell out to `diapipe` or `python` find the venv's first.
export PATH="$PWD/$BIN:$PATH"

log() { printf '\n== %s\n' "$*" >&2; }

setup() {
    if [ ! -x "$BIN/python" ]; then
        "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "diapipe needs Python >= 3.11, this is " + sys.version' \
            || exit 1
        log "creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
    # Reinstall only when the pins changed (pyproject.toml newer than the stamp).
    local stamp="$VENV/.diapipe-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        log "installing diapipe with its pinned dependencies (pip install -e '.[test]')"
        "$BIN/pip" install --disable-pip-version-check -q -e '.[test]'
        touch "$stamp"
    fi
}

lint() {
    log "snakefmt --check"
    "$BIN/snakefmt" --check workflow/ Snakefile
    log "snakemake --lint"
    local out rc=0
    out=$("$BIN/snakemake" --lint 2>&1) || rc=$?
    # Clean means exit 0 and nothing printed but the congratulation line.
    if [ "$rc" -ne 0 ] || printf '%s\n' "$out" | grep -v -e '^Congratulations, your workflow is in a good condition!$' -e '^Using workflow specific profile ' -e '^$' -q; then
        printf '%s\n' "$out" >&2
        echo "snakemake --lint is not clean (exit $rc); fix the lints above" >&2
        exit 1
    fi
    echo "lint clean"
}

run_pytest() {
    log "pytest $*"
    local rc=0
    # shellcheck disable=SC2086
    "$BIN/pytest" "$@" ${PYTEST_ARGS:-} || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests (exit 5): that is a failure here, the suite always has tests" >&2
        exit 1
    fi
    return "$rc"
}

cmd=${1:-}
case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        log "running the demo survey: snakemake --profile profiles/default --cores $CORES"
        start=$(date +%s)
        "$BIN/snakemake" --profile profiles/default --cores "$CORES"
        echo "demo finished in $(($(date +%s) - start)) s; products under results/ (see README.md)"
        ;;
    lint)
        setup
        lint
        ;;
    test)
        setup
        lint
        run_pytest
        ;;
    slurm-test)
        setup
        # Installs slurm-wlm and munge with apt-get when missing (needs root).
        bash scripts/slurm-cluster.sh install
        DIAPIPE_SLURM_REQUIRED=1 run_pytest tests/test_slurm.py -v
        ;;
    *)
        echo "usage: $0 {setup|demo|lint|test|slurm-test}" >&2
        exit 2
        ;;
esac
