# Thin wrappers around scripts/dev.sh (which works without make as well).
#   make demo        set up .venv (pip) and run the simulated demo survey end to end
#   make test        set up .venv, then snakefmt --check, snakemake --lint and pytest
#   make slurm-test  start a one-node SLURM cluster and run the workflow through it
.PHONY: setup demo lint test slurm-test config-doc clean

setup demo lint test slurm-test:
	bash scripts/dev.sh $@

config-doc:
	bash scripts/dev.sh setup
	.venv/bin/diapipe config-doc -o config/README.md

# Removes products, logs and Snakemake's bookkeeping (not the venv).
clean:
	rm -rf results/sim results/calib results/postisr results/calexp results/warp \
	    results/template results/diff results/realbogus results/report results/*.parquet \
	    logs benchmarks/*/ .snakemake
