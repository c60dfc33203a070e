# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= all
CONFIG ?= config/config.yaml
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-full test-cluster venv lint format her2st report clean gpu-check

venv: $(STAMP)

# torch first (the local CPU build), then everything else constrained to it, so that no
# dependency can pull the multi-GB CUDA torch/torchvision wheels.
# The histomap package itself is installed in editable mode (`pip install -e .`): the Snakefile,
# rule scripts, tests, benchmarks and the `histomap` command all import the installed package.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet -e . -c constraints.txt
	$(BIN)/pip check
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# The inner loop: everything but the tests marked `slow` (Snakemake runs, network training of
# more than a few seconds); `make test` (and CI) still run all of them.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Every GPU / full-size config executed on the CPU through tests/shrink.yaml (sizes only): about
# 30 minutes on 2 cores and up to 16 GB of temporary files, so a target of its own; CI runs it
# after `make test` (.ci/run).
test-full: $(STAMP)
	$(BIN)/python -m pytest -m full tests/test_full_configs.py

# The demo workflow on a real one-node SLURM cluster on this machine (root; installs SLURM from the
# Debian packages if missing, starts and stops its daemons): cluster/README.md.
test-cluster: $(STAMP)
	HISTOMAP_PYTHON=$(abspath $(BIN))/python bash cluster/test_cluster.sh

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow

# Format the Snakefile and rule files with snakefmt (settings: pyproject.toml [tool.snakefmt]).
format: $(STAMP)
	$(BIN)/snakefmt Snakefile workflow

her2st: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/her2st.yaml

# On a machine with a CUDA GPU (and the CUDA build of torch, docs/gpu.md): the paper-sized
# workloads (PixNet on the four HER2ST sections, Diff-ST, a Visium HD-sized dense map, respaced
# sampling), under 8 min on one H100 -> benchmarks/results/gpu/gpu_check.{csv,md}. No $(STAMP):
# `make venv` would install the CPU torch; the GPU environment is made as docs/gpu.md says.
gpu-check:
	$(BIN)/python benchmarks/gpu_check.py

report: $(STAMP)
	$(BIN)/snakemake --cores 1 --configfile $(CONFIG) --report results/report/report.html

clean:
	rm -rf results logs .snakemake
