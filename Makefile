# `make demo` and `make test` work on a fresh machine: each creates .venv and installs
# what it needs first. torch is installed on its own, pinned, before anything else, so
# no dependency can pull a multi-GB CUDA build onto a CPU machine.
VENV    := .venv
PY      := $(VENV)/bin/python
KILN    := $(VENV)/bin/kiln
STAMP   := $(VENV)/.kiln-installed
PYTHON  ?= python3
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' kiln/__init__.py)

.PHONY: setup demo test test-fast lint bench image gpu-check nemo-env clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,curate,track]'
	touch $(STAMP)

# NeMo 2.7.3 in its own venv, for the interop tests that run NeMo's own importer and exporter
# (tests/conversion/test_nemo_interop.py calls this; reused once installed; never mixed into .venv)
NEMO_VENV  := .venv-nemo
NEMO_PINS  := tests/conversion/nemo-env.txt

nemo-env: $(NEMO_VENV)/.installed

$(NEMO_VENV)/.installed: $(NEMO_PINS)
	@start=$$(date +%s); \
	rm -rf $(NEMO_VENV) && $(PYTHON) -m venv $(NEMO_VENV) && \
	$(NEMO_VENV)/bin/pip install -q torch==2.13.0 && \
	$(NEMO_VENV)/bin/pip install -q --no-deps -r $(NEMO_PINS) && \
	touch $@ && echo "nemo-env: NeMo 2.7.3 installed in $$(( $$(date +%s) - start )) s"

# ends by printing where the pipeline's report page is (runs/demo/report/index.html: opens offline)
demo: setup
	$(KILN) pipeline run tiny
	$(KILN) pipeline status tiny
	$(KILN) report tiny

lint: setup
	$(VENV)/bin/ruff check kiln tests benchmarks tools
	$(VENV)/bin/lint-imports  # layers import downwards only, no import cycles (pyproject.toml)

# the whole suite: real process groups, a real Slurm and Ray, NeMo's own code in its own venv
test: lint nemo-env
	$(VENV)/bin/pytest -q

# the inner loop: unit tests and single-process checks, nothing launched (< 3 min)
test-fast: lint
	$(VENV)/bin/pytest -q -m "not slow"

# the kiln image for Slurm (pyxis) and Docker jobs: an NGC NeMo image plus kiln's pins (docker/README.md)
image:
	docker build -f docker/Dockerfile -t kiln:$(VERSION) .

# every GPU-only path on the GPU(s) at hand, one table of pass/fail (run it in the kiln image)
gpu-check:
	python tools/gpu_check.py

bench: setup
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/sft_packing.py
	$(PY) benchmarks/dpo_reference.py  # after `make demo`

clean:
	rm -rf runs .pytest_cache
