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

# Debian packages, when missing and the machine allows it: Fashion-MNIST for the
# demo and the tests, Chromium for the headless-browser test of the HTML report.
data:
	@tools/apt-install dataset-fashion-mnist $(FASHION_DIR) "Fashion-MNIST"

browser:
	@tools/apt-install chromium /usr/bin/chromium "the report's browser test is skipped without it"

demo: setup data
	@if [ -d $(FASHION_DIR) ]; then \
	  $(BIN)/ticketlab lottery --preset quick --controls reinit --runs-dir runs/demo; \
	else \
	  echo "Fashion-MNIST is not installed here; running the demo on mnist1d instead"; \
	  $(BIN)/ticketlab lottery --preset quick --dataset mnist1d --batch-size 50 --steps 700it \
	    --controls reinit --runs-dir runs/demo; \
	fi

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: setup data browser lint
	$(BIN)/python -m pytest

bench: setup data
	$(BIN)/python benchmarks/masked_training.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
