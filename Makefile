# The two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test protos clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU wheel of torch first: an unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m offsite.demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf runs .pytest_cache
