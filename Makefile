# The two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test images protos clean

# The CPU wheel of torch goes in first: an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m offsite.demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The coordinator and client images, offline: a wheelhouse made here, a base image (a registry's, else one
# made from Debian packages), then `docker build --network none` (deploy/images.sh says which base it used).
images: $(STAMP)
	PY=$(BIN)/python deploy/images.sh

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf runs .pytest_cache
