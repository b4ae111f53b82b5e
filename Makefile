# The two commands: `make demo` and `make test`. Both create .venv on first use and install it from the
# lock (requirements/*.lock: every transitive dependency at an exact version with its hashes), never from
# whatever was released this morning. `make lock` refreshes the lock; `make test-latest` runs the suite
# against the newest releases pyproject.toml's ranges allow, in a separate environment.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP = $(1)/python -m pip install -q --disable-pip-version-check
TORCH_VERSION := 2.13.0
# Torch is locked as its CPU wheel (an unpinned torch pulls gigabytes of CUDA packages). A GPU machine names
# a CUDA wheel index instead, e.g. `make test TORCH_INDEX=https://download.pytorch.org/whl/cu128`: torch
# $(TORCH_VERSION) comes from there (that wheel pins its CUDA libraries exactly), everything else from the lock.
TORCH_INDEX ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# Where the CPU wheel is found: a local wheel folder pip is configured with (PIP_FIND_LINKS), else PyTorch's index.
TORCH_SOURCE = $(if $(PIP_FIND_LINKS),$(patsubst %,--find-links %,$(PIP_FIND_LINKS)),--extra-index-url $(TORCH_CPU_INDEX))

.PHONY: install demo test test-latest lock images protos clean

$(STAMP): pyproject.toml requirements/dev.lock requirements/torch-cpu.lock
	$(PY) -m venv $(VENV)
ifeq ($(TORCH_INDEX),)
	$(call PIP,$(BIN)) --require-hashes --no-deps -r requirements/torch-cpu.lock \
	  || $(call PIP,$(BIN)) --require-hashes --no-deps --extra-index-url $(TORCH_CPU_INDEX) -r requirements/torch-cpu.lock
else
	$(call PIP,$(BIN)) --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)
endif
	$(call PIP,$(BIN)) --require-hashes --no-deps -r requirements/dev.lock
	$(call PIP,$(BIN)) --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)  # .venv from the lock, offsite in it (editable): `. .venv/bin/activate` puts `offsite` on the PATH

demo: $(STAMP)
	$(BIN)/python -m offsite.demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The newest releases the ranges in pyproject.toml allow, in .venv-latest (made anew each time), and the suite
# against them: drift found here before users find it. The versions it ran with are printed first.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	$(call PIP,.venv-latest/bin) torch==$(TORCH_VERSION)
	$(call PIP,.venv-latest/bin) --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/python -m pip list --disable-pip-version-check --format freeze \
	  | grep -iE '^(torch|transformers|peft|tokenizers|accelerate|bitsandbytes|grpcio|grpcio-tools|protobuf|cryptography|fastapi|uvicorn|safetensors)=='
	.venv-latest/bin/python -m pytest

# Refresh the lock to the newest releases the ranges allow (uv resolves; the header of each file says how).
# LOCK_UPGRADE=--upgrade-package=NAME moves one package only; LOCK_UPGRADE= keeps every pin that still fits.
LOCK_UPGRADE ?= --upgrade
UV_COMPILE = $(BIN)/uv pip compile -q --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--generate-hashes --custom-compile-command 'make lock' $(LOCK_UPGRADE)
lock: $(STAMP)
	$(UV_COMPILE) pyproject.toml --no-emit-package torch $(TORCH_SOURCE) -o requirements/runtime.lock
	$(UV_COMPILE) pyproject.toml --extra dev --no-emit-package torch $(TORCH_SOURCE) \
	  -c requirements/runtime.lock -o requirements/dev.lock
	echo 'torch==$(TORCH_VERSION)' | $(UV_COMPILE) - $(TORCH_SOURCE) -c requirements/runtime.lock -o requirements/torch-cpu.lock

# The coordinator and client images, offline: a wheelhouse made here from the lock, a base image (a registry's,
# else one made from Debian packages), then `docker build --network none` (deploy/images.sh says which base it used).
images: $(STAMP)
	PY=$(BIN)/python deploy/images.sh

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf runs .pytest_cache
