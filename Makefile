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
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check subq tests benchmarks

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m subq bench

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
