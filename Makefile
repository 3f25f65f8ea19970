# `make demo` and `make test` work on a fresh machine: each creates .venv and installs
# what it needs first. torch is installed on its own, pinned, before anything else, so
# no dependency can pull a multi-GB CUDA build onto a CPU machine.
VENV    := .venv
PY      := $(VENV)/bin/python
KILN    := $(VENV)/bin/kiln
STAMP   := $(VENV)/.kiln-installed
PYTHON  ?= python3

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,curate]'
	touch $(STAMP)

demo: setup
	$(KILN) pipeline run tiny
	$(KILN) pipeline status tiny

test: setup
	$(VENV)/bin/ruff check kiln tests benchmarks
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/sft_packing.py
	$(PY) benchmarks/dpo_reference.py  # after `make demo`

clean:
	rm -rf runs .pytest_cache
