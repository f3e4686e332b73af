# `make demo`: set up and run a short lottery experiment on Fashion-MNIST.
# `make test`: set up, lint with ruff, run the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser demo test lint bench clean

setup: $(STAMP)

# torch is pinned (pyproject) to a release whose CPU build is available here,
# and installed first so no CUDA packages are pulled in.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from the Debian package, when missing and the machine allows it.
data:
	@if [ -d $(FASHION_DIR) ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get here; install Fashion-MNIST yourself (see README)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "note: not root and no sudo: cannot install dataset-fashion-mnist"; exit 0; fi; \
	echo "installing the Debian package dataset-fashion-mnist"; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	|| ( $$SUDO apt-get update -qq >/dev/null 2>&1 && \
	     $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ) \
	|| echo "note: could not install dataset-fashion-mnist"

# Chromium for the headless-browser test of the HTML report, when missing and the machine allows it.
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get here; install chromium yourself (the report test is skipped)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "note: not root and no sudo: cannot install chromium"; exit 0; fi; \
	echo "installing the Debian package chromium"; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
	|| ( $$SUDO apt-get update -qq >/dev/null 2>&1 && \
	     $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 ) \
	|| echo "note: could not install chromium"

demo: setup data
	@if [ -d $(FASHION_DIR) ]; then \
	  $(BIN)/ticketlab lottery --preset quick --controls reinit --runs-dir runs/demo; \
	else \
	  echo "Fashion-MNIST is not installed here; running the demo on mnist1d instead"; \
	  $(BIN)/ticketlab lottery --preset quick --dataset mnist1d --batch-size 50 --steps 700it \
	    --controls reinit --runs-dir runs/demo; \
	fi

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: setup data browser lint
	$(BIN)/python -m pytest

bench: setup data
	$(BIN)/python benchmarks/masked_training.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
